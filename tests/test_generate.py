"""Tests for ``spo generate`` (spo_core.stages.generate) on the tiny SD-1.5 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo_core.config import LoraConfig, ModelConfig
from spo_core.models.diffusion import load_policy
from spo_core.models.lora import KOHYA_WEIGHT_NAME, attach_lora, save_lora
from spo_core.rollouts import sample_images
from spo_core.stages.generate import MANIFEST, main

TINY = ModelConfig(pretrained="tiny:sd15")
COMMON = ["--model", "tiny:sd15", "--steps", "2", "--device", "cpu"]




@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """Our LoRA directory (diffusers file + kohya export) with random B, so it changes the images."""
    policy = load_policy(TINY)
    cfg = LoraConfig(rank=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # lora_A's init: the same LoRA whatever tests ran before
        attach_lora(policy, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return save_lora(policy, tmp_path_factory.mktemp("lora") / "lora", cfg)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _run(out: Path, *extra: str) -> dict:
    assert main([*COMMON, "--out", str(out), *extra]) == 0
    return json.loads((out / MANIFEST).read_text())


def test_generate_writes_pngs_and_manifest_with_kohya_lora(lora_dir, tmp_path):
    kohya = lora_dir / KOHYA_WEIGHT_NAME
    out = tmp_path / "kohya"
    man = _run(out, "--lora", str(kohya), "--prompt", "a red circle", "--prompt", "a blue square",
               "--num-images", "2", "--seed", "5", "--batch-size", "3")
    names = ["00000_00_seed5.png", "00000_01_seed6.png", "00001_00_seed7.png", "00001_01_seed8.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST])
    assert [im["file"] for im in man["images"]] == names
    assert [(im["prompt"], im["prompt_idx"], im["image_idx"], im["seed"]) for im in man["images"]] == [
        ("a red circle", 0, 0, 5), ("a red circle", 0, 1, 6), ("a blue square", 1, 0, 7), ("a blue square", 1, 1, 8)]
    assert man["lora"] == str(kohya) and man["lora_scale"] == 1.0
    assert man["sampler"] == {"num_steps": 2, "guidance_scale": 5.0, "eta": 1.0}
    assert man["model"]["pretrained"] == "tiny:sd15" and man["model"]["dtype"] == "float32"
    assert all(_pixels(out / n).shape == (32, 32, 3) for n in names)

    # The same LoRA from our diffusers-format directory gives the same pixels; scale 0 gives the base.
    same = tmp_path / "dir"
    _run(same, "--lora", str(lora_dir), "--prompt", "a red circle", "--prompt", "a blue square",
         "--num-images", "2", "--seed", "5")
    base = tmp_path / "base"
    _run(base, "--prompt", "a red circle", "--prompt", "a blue square", "--num-images", "2", "--seed", "5")
    off = tmp_path / "off"
    _run(off, "--lora", str(kohya), "--lora-scale", "0", "--prompt", "a red circle", "--prompt", "a blue square",
         "--num-images", "2", "--seed", "5")
    for n in names:
        # kohya's file holds alpha and the weights scaled apart, and the first run uses another batch size:
        # float rounding may move a pixel by one 8-bit level, never more.
        diff = np.abs(_pixels(out / n).astype(int) - _pixels(same / n).astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (n, diff.max(), (diff == 0).mean())
        assert np.array_equal(_pixels(off / n), _pixels(base / n))
    assert not all(np.array_equal(_pixels(out / n), _pixels(base / n)) for n in names)

    # The seed rule is the evaluation's: image j of prompt p uses seed + p * num_images + j.
    policy = load_policy(TINY)
    ref = sample_images(policy, ["a blue square"], [7], num_steps=2)[0]
    expect = (ref.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(_pixels(base / "00001_00_seed7.png"), expect)


def test_prompts_file_and_resolution(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# a comment\na green star\n\na white cat\n")
    man = _run(tmp_path / "out", "--prompts-file", str(pf), "--prompt", "first", "--resolution", "16")
    assert [im["prompt"] for im in man["images"]] == ["first", "a green star", "a white cat"]
    assert man["resolution"] == 16
    assert _pixels(tmp_path / "out" / man["images"][2]["file"]).shape == (16, 16, 3)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    # The runner returns the exit code (one line on stderr, no traceback); nothing is left behind.
    assert main([*COMMON, "--out", str(tmp_path / "a")]) == 2
    assert "no prompts given" in capsys.readouterr().err
    assert main([*COMMON, "--out", str(tmp_path / "b"), "--prompt", "x", "--lora", str(tmp_path / "missing")]) == 2
    assert "not found at" in capsys.readouterr().err
    assert main([*COMMON, "--out", str(tmp_path / "c"), "--prompt", "x", "--num-images", "0"]) == 2
    err = capsys.readouterr().err
    assert "--num-images must be >= 1" in err and "Traceback" not in err
    assert not any((tmp_path / d).exists() for d in "abc")
