"""Every section of every packaged profile validates into its stage's typed config, without weights."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

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
    "train_grpo": ("spo_core.config", "GRPOConfig"),
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


def _dvc_stages() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("profile", ["toy", "toy_flow", "micro_flow", "sd15", "sdxl", "sd35m", "flux_dev"])
def test_dvc_yaml_runs_under_every_pipeline_profile(profile):
    # `spo params PROFILE > params.yaml && dvc repro` needs every stage's params section, and each
    # stage must write the very output path that dvc.yaml declares.
    from spo_core.ablation import stage_entry, stage_section
    from spo_core.stages.common import output_root

    raw = read_profile(profile)
    for name, stage in _dvc_stages().items():
        section = stage_section(name)
        assert section in raw, f"profile {profile} lacks section '{section}' that dvc.yaml's stage {name} reads"
        cfg = validate_section(stage_entry(name)[0], raw[section], f"{profile}.{section} (stage {name})")
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        written = str(output_root(cfg))
        assert written in outs, f"{profile}.{name} writes {written}, dvc.yaml expects {outs}"


def test_disabled_toy_stage_writes_only_a_marker(tmp_path, monkeypatch):
    from spo_core.stages import toy_world
    from spo_core.stages.common import SKIPPED_MARKER

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))
    (tmp_path / "params.yaml").write_text("toy_world: {enabled: false, output_dir: out/world}\n")
    (tmp_path / "out/world").mkdir(parents=True)
    (tmp_path / "out/world/train_prompts.txt").write_text("left over from the toy profile\n")
    assert toy_world.main([]) == 0
    assert [p.name for p in (tmp_path / "out/world").iterdir()] == [SKIPPED_MARKER]
    assert '"skipped": 1' in (tmp_path / "metrics/toy_world.json").read_text()


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, dotted
        node = node[part]
    return node


@pytest.mark.parametrize("profile", ["toy", "micro", "sd15", "sdxl", "sd35m", "flux_dev"])
def test_params_file_holds_every_key_dvc_lists_and_loads_back(profile, tmp_path):
    # dvc.yaml lists single keys (train_spo.train.rounds) and DVC refuses a stage whose key is missing
    # from params.yaml, so `spo params` writes every value, defaults included.
    from spo_core.cli import main

    out = tmp_path / "params.yaml"
    assert main(["params", profile, "-o", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    for stage in _dvc_stages().values():
        for key in stage["params"]:
            _get(written, key)
    raw = read_profile(profile)
    assert set(written) == set(raw)
    for section, data in raw.items():
        mod, cls = SECTIONS[section]
        cls = getattr(importlib.import_module(mod), cls)
        assert validate_section(cls, written[section], section) == validate_section(cls, data, section)


@pytest.mark.parametrize("profile", ["sd15", "sdxl"])
def test_real_profiles_state_global_budgets(profile):
    # One profile, any number of GPUs, the same work: budgets are over all processes.
    raw = read_profile(profile)
    pm, noisy = raw["train_pm"], raw["noisy_pairs"]
    consumed = pm["max_steps"] * pm["batch_size"] * pm.get("gradient_accumulation_steps", 1)
    assert consumed == noisy["max_pairs"] * noisy.get("repeats", 1)  # train_pm sees each built pair once
    spo = raw["train_spo"]["train"]
    assert spo["rounds"] * spo["prompts_per_round"] == 10 * 4000  # 10 epochs of the 4k training prompts
    for section in ("train_spo", "train_d3po", "train_ddpo", "train_diffusion_dpo", "train_pm"):
        assert raw[section]["launch"]["num_processes"] == 4, section
        mod, cls = SECTIONS[section]
        cls = getattr(importlib.import_module(mod), cls)
        for n in (1, 2, 4):  # a 1- or 2-GPU machine runs the same profile (launch is operational)
            validate_section(cls, {**raw[section], "launch": {"num_processes": n}}, f"{profile}.{section}")
    # DVC depends on the preference data by path (${noisy_pairs.data} in dvc.yaml): local folders
    # outside the repository and its DVC-tracked data/ (never pushed), not hub ids.
    for key in ("data", "eval_data"):
        assert Path(noisy[key]).is_absolute(), (key, noisy[key])
    assert raw["train_diffusion_dpo"]["dataset"] == noisy["data"]


def test_noisy_pairs_data_is_a_dvc_dependency_by_path():
    deps = _dvc_stages()["noisy_pairs"]["deps"]
    assert "${noisy_pairs.data}" in deps and "${noisy_pairs.eval_data}" in deps
    for profile in ("toy", "micro"):  # the toy world's pairs: inside toy_prefs' output, so DVC orders them
        noisy = read_profile(profile)["noisy_pairs"]
        assert all(noisy[k].startswith(read_profile(profile)["toy_prefs"]["output_dir"] + "/") for k in ("data", "eval_data"))


def test_flow_profiles_carry_flow_grpos_published_settings():
    sd3, flux = read_profile("sd35m"), read_profile("flux_dev")
    assert sd3["train_spo"]["model"]["kind"] == "sd3" and flux["train_spo"]["model"]["kind"] == "flux"
    g3, gf = sd3["train_grpo"], flux["train_grpo"]
    assert (g3["sampler"]["num_steps"], g3["sampler"]["guidance_scale"], g3["sampler"]["eta"]) == (10, 4.5, 0.7)
    assert (gf["sampler"]["num_steps"], gf["sampler"]["guidance_scale"], gf["sampler"]["eta"]) == (6, 3.5, 0.9)
    assert (g3["kl_beta"], gf["kl_beta"]) == (0.01, 0.0) and g3["samples_per_prompt"] == gf["samples_per_prompt"] == 24
    for g, steps in ((g3, 10), (gf, 6)):
        assert g["clip_range"] == 1e-4 and g["global_std"] and g["optim"]["lr"] == 3e-4
        # two optimiser steps per 48 groups of 24 images, each step over the trained steps of half of them
        t = g["train"]
        per_step = t["train_batch_size"] * t["gradient_accumulation_steps"]
        assert per_step == 24 * 24 * int(steps * g["timestep_fraction"]) and t["prompts_per_round"] == 24
    assert sd3["evaluate"]["sampler"]["eta"] == 0.0 and flux["evaluate"]["sampler"]["num_steps"] == 28


def test_the_committed_params_yaml_is_the_toy_profile_written_out():
    # `dvc repro` on a fresh clone reads the committed params.yaml: a config field added without
    # regenerating it leaves keys that dvc.yaml lists missing ("Parameters ... are missing").
    from spo_core.params_file import params_text

    committed = (Path(__file__).parents[1] / "params.yaml").read_text()
    assert yaml.safe_load(committed) == yaml.safe_load(params_text("toy")), \
        "params.yaml is stale: regenerate it with `spo params toy -o params.yaml`"
