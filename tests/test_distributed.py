"""Two processes (torchrun, gloo, accelerate MULTI_CPU) train the same LoRA as one process with the
same global batch: per-prompt noise streams and rank-sliced prompts make the data identical, and
DDP averages the two halves' gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

CFG = {
    "train_spo": {
        "model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 16},
        "sampler": {"num_steps": 4, "kappa": 1000, "k": 2, "threshold": 0.0},
        "lora": {"rank": 2},
        "optim": {"lr": 1.0e-3},
        # One optimiser step per round over all pairs: the mean of the two processes' means is the
        # global mean because both hold the same number of pairs.
        "train": {"rounds": 2, "prompts_per_round": 2, "train_batch_size": 64, "seed": 0},
        "scorer": {"name": "brightness"},
        "prompts": {"source": "list", "prompts": ["a red cat", "a blue dog", "a green tree", "a yellow sun"]},
        "device": "cpu",
    }
}


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "SPO_DISABLE_MLFLOW": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    stage = ["-m", "spo_core.stages.train_spo", "--params", "cfg.yaml"]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", *stage,
          "--set", "train.output_dir=two"], tmp_path)
    _run([sys.executable, *stage, "--set", "train.prompts_per_round=4", "--set", "train.output_dir=one"], tmp_path)
    one = load_file(str(tmp_path / "one/lora/pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two/lora/pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    ups = [k for k in one if ".up." in k]
    # The trained (zero-initialised) up-projections moved, and both runs moved them the same way.
    assert max(float(one[k].abs().max()) for k in ups) > 1e-4
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-5, k
