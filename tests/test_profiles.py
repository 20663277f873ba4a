"""Every section of every packaged profile validates into its stage's typed config, without weights."""

from __future__ import annotations

import importlib

import pytest

from spo_core.config import available_profiles, read_profile, validate_section

SECTIONS = {
    "toy_world": ("spo_core.toyworld.config", "ToyWorldConfig"),
    "toy_pretrain": ("spo_core.toyworld.config", "ToyPretrainConfig"),
    "toy_prefs": ("spo_core.toyworld.config", "ToyPrefsConfig"),
    "toy_pickscore": ("spo_core.toyworld.config", "ToyPickScoreConfig"),
    "prompts": ("spo_core.stages.prompts", "PromptsStageConfig"),
    "noisy_pairs": ("spo_core.preference.config", "NoisyPairsConfig"),
    "train_pm": ("spo_core.preference.config", "TrainPMConfig"),
    "train_spo": ("spo_core.config", "SPOConfig"),
    "train_d3po": ("spo_core.config", "D3POConfig"),
    "train_ddpo": ("spo_core.config", "DDPOConfig"),
    "train_diffusion_dpo": ("spo_core.config", "DiffusionDPOConfig"),
    "evaluate": ("spo_core.stages.evaluate", "EvaluateConfig"),
}


@pytest.mark.parametrize("profile", available_profiles())
def test_profile_sections_validate(profile):
    raw = read_profile(profile)
    assert "train_spo" in raw
    for section, data in raw.items():
        assert section in SECTIONS, f"profile {profile} has a section no stage reads: {section}"
        mod, cls = SECTIONS[section]
        validate_section(getattr(importlib.import_module(mod), cls), data, f"{profile}.{section}")


def test_real_profiles_carry_the_paper_defaults():
    sd15, sdxl = read_profile("sd15"), read_profile("sdxl")
    assert sd15["train_spo"]["sampler"]["k"] == 4 and sdxl["train_spo"]["sampler"]["k"] == 2
    assert sd15["train_spo"]["lora"]["rank"] == 4 and sdxl["train_spo"]["lora"]["rank"] == 64
    assert sd15["train_pm"]["optim"]["lr"] == 3e-6 and sdxl["train_pm"]["optim"]["lr"] == 1e-6
    assert sd15["train_pm"]["max_steps"] == 8000 and sdxl["train_pm"]["max_steps"] == 7000
    assert len(sd15["evaluate"]["scorers"]) == 4
