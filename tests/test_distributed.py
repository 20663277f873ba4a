"""Two processes train the same LoRA as one process with the same (global) budgets: the stage's own
command starts them (``launch.num_processes: 2`` -> ``accelerate launch``, gloo on CPUs), per-prompt
noise streams and rank-sliced prompts make the data identical, and DDP averages the two halves'
gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from spo_core.config import BudgetError
from spo_core.training import prompts_for_round, round_positions

CFG = {
    "train_spo": {
        "model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 16},
        "sampler": {"num_steps": 4, "kappa": 1000, "k": 2, "threshold": 0.0},
        "lora": {"rank": 2},
        "optim": {"lr": 1.0e-3},
        # Global budgets: 4 prompts per round and one optimiser step per round over all pairs, whatever
        # the number of processes (each of 2 processes samples 2 prompts and trains half the batch).
        "train": {"rounds": 2, "prompts_per_round": 4, "train_batch_size": 64, "seed": 0},
        "scorer": {"name": "brightness"},
        "prompts": {"source": "list", "prompts": ["a red cat", "a blue dog", "a green tree", "a yellow sun"]},
        "device": "cpu",
    }
}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPO_DISABLE_MLFLOW": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_round_positions_are_global():
    one = round_positions(6, 3)
    assert round_positions(6, 3, 0, 2) + round_positions(6, 3, 1, 2) == one == list(range(18, 24))
    prompts = list("abcdefg")
    assert prompts_for_round(prompts, 6, 3, 0, 0, 3) + prompts_for_round(prompts, 6, 3, 0, 1, 3) \
        + prompts_for_round(prompts, 6, 3, 0, 2, 3) == prompts_for_round(prompts, 6, 3, 0)
    with pytest.raises(BudgetError, match=r"prompts_per_round=6 .* 4 processes cannot share equally"):
        round_positions(6, 0, 0, 4)


@pytest.mark.slow
def test_two_launched_processes_match_one(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    stage = [sys.executable, "-m", "spo_core.stages.train_spo", "--params", "cfg.yaml"]
    # A global budget two processes cannot share is refused before any process starts.
    bad = _run([*stage, "--set", "launch.num_processes=3", "--set", "train.output_dir=three"], tmp_path)
    assert bad.returncode == 2 and "train.prompts_per_round=4 is a global budget that 3 processes" in bad.stderr
    two = _run([*stage, "--set", "launch.num_processes=2", "--set", "train.output_dir=two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "starting 2 processes (accelerate launch, CPU/gloo)" in two.stderr
    assert "spo: 2 process(es) share 4 prompts per round" in two.stderr
    one = _run([*stage, "--set", "train.output_dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "spo: 1 process(es) share 4 prompts per round" in one.stderr
    a = load_file(str(tmp_path / "one/lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two/lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    ups = [k for k in a if ".up." in k]
    # The trained (zero-initialised) up-projections moved, and both runs moved them the same way.
    assert max(float(a[k].abs().max()) for k in ups) > 1e-4
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


GRPO = {
    "train_grpo": {
        "model": {"pretrained": "tiny:flux", "kind": "flux", "resolution": 16},
        "sampler": {"num_steps": 4, "guidance_scale": 3.0, "eta": 0.7},
        "samples_per_prompt": 3,
        "global_std": True,  # the round's reward std over both processes' groups
        "lora": {"rank": 2, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "optim": {"lr": 1.0e-3},
        "train": {"rounds": 2, "prompts_per_round": 4, "train_batch_size": 64, "seed": 0},
        "scorer": {"name": "brightness"},
        "prompts": CFG["train_spo"]["prompts"],
        "device": "cpu",
    }
}


@pytest.mark.slow
def test_two_processes_match_one_for_flow_grpo_on_a_flux_model(tmp_path: Path):
    # Each process samples its own prompts' groups on the flow SDE; the global std and the gradients
    # are shared, so the LoRA equals the one-process run's.
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(GRPO))
    stage = [sys.executable, "-m", "spo_core.stages.train_grpo", "--params", "cfg.yaml"]
    two = _run([*stage, "--set", "launch.num_processes=2", "--set", "train.output_dir=two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "grpo: 2 process(es) share 4 prompts per round" in two.stderr
    one = _run([*stage, "--set", "train.output_dir=one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one/lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two/lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-4
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
