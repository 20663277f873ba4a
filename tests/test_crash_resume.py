"""Reliability of training: SIGKILL mid-run + --resume is bitwise identical to an uninterrupted run;
a non-finite loss stops with a clear error and keeps the last good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from spo_core.config import SPOConfig
from spo_core.methods.spo import SPOMethod
from spo_core.models.diffusion import load_policy
from spo_core.scorers.simple import BrightnessScorer
from spo_core.checkpoints import CheckpointStore
from spo_core.training import TrainingError, train_rounds

CFG = {
    "train_spo": {
        "model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 16},
        "sampler": {"num_steps": 4, "kappa": 1000, "k": 2, "threshold": 0.0},
        "lora": {"rank": 2},
        "optim": {"lr": 1.0e-3},
        "train": {"rounds": 5, "prompts_per_round": 2, "train_batch_size": 4, "seed": 3, "checkpoint_every": 1,
                  "keep_checkpoints": 2},
        "scorer": {"name": "brightness"},
        "prompts": {"source": "list", "prompts": ["a red cat", "a blue dog", "a green tree"]},
        "device": "cpu",
    }
}
ENV = {**os.environ, "SPO_DISABLE_MLFLOW": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cmd(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spo_core.stages.train_spo", "--params", "cfg.yaml", "--set", f"train.output_dir={out}", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    ref = subprocess.run(_cmd("ref"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(_cmd("crash"), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = CheckpointStore(tmp_path / "crash" / "checkpoints", prefix="round")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = ckpts.latest()
        if latest is not None and int(latest.name.split("-")[1]) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "crash" / "lora").exists()
    done = int(ckpts.latest().name.split("-")[1])
    assert done < 4

    resumed = subprocess.run(_cmd("crash", "--set", "train.resume=true"), cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a = load_file(str(tmp_path / "ref/lora/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "crash/lora/pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _NaNAfter(SPOMethod):
    """Returns a NaN loss from round ``bad_round`` on (a stand-in for a diverging run)."""

    bad_round: int = 1

    def loss(self, ctx, batch):
        loss, m = super().loss(ctx, batch)
        if ctx.round >= self.bad_round:
            loss = loss * float("nan")
        return loss, m


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path: Path):
    cfg = SPOConfig.model_validate({**CFG["train_spo"], "train": {**CFG["train_spo"]["train"], "rounds": 3,
                                                                   "output_dir": str(tmp_path / "run")}})
    policy = load_policy(cfg.model, "cpu")
    method = _NaNAfter(cfg.sampler, cfg.loss, BrightnessScorer())
    with pytest.raises(TrainingError, match="non-finite loss.*round 1"):
        train_rounds(policy, method, cfg.prompts.prompts, cfg.lora, cfg.optim, cfg.train, device="cpu")
    ck = CheckpointStore(tmp_path / "run" / "checkpoints", prefix="round").latest()
    assert ck is not None and ck.name == "round-000000"
    saved = CheckpointStore.load(ck)
    lora, hist = saved.tensors["lora"], saved.manifest["history"]
    assert saved.step == 0 and all(torch.isfinite(v).all() for v in lora.values()) and len(hist) == 1
    assert not (tmp_path / "run" / "lora").exists()
