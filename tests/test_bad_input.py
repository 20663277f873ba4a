"""Bad input gets one clear error naming the problem and the fix, and nothing already written is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spo_core.config import ConfigError, LoraConfig, ModelConfig, load_spo_config
from spo_core.models.diffusion import ModelLoadError, load_policy
from spo_core.models.lora import attach_lora
from spo_core.models.tiny import save_tiny_pipeline
from spo_core.checkpoints import CheckpointError, CheckpointStore
from spo_core.training import TrainingError, _load_lora_into
from spo_core.utils import atomic_dir


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")


def test_unreachable_hub_id_names_id_and_local_dir_fix():
    with pytest.raises(ModelLoadError) as ei:
        load_policy(ModelConfig(pretrained="someone/not-downloaded-model", kind="sd15"))
    msg = str(ei.value)
    assert "someone/not-downloaded-model" in msg and "--local-dir" in msg and "model.pretrained=DIR" in msg


def test_directory_that_is_not_a_pipeline(tmp_path: Path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        load_policy(ModelConfig(pretrained=str(tmp_path / "junk")))


def test_corrupt_unet_weights(tmp_path: Path):
    d = save_tiny_pipeline("sd15", tmp_path / "pipe")
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load the diffusion model"):
        load_policy(ModelConfig(pretrained=str(d)))


def test_unknown_profile_and_bad_values():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_spo_config("nope")
    with pytest.raises(ConfigError, match="unknown key 'sampler.kk'"):
        load_spo_config("tiny", ["sampler.kk=3"])
    with pytest.raises(ConfigError, match="sampler.resampler"):
        load_spo_config("tiny", ["sampler.resampler=sometimes"])


@pytest.mark.parametrize("stage", ["train_spo", "train_grpo"])
def test_a_trainer_refuses_a_noiseless_sampler(tmp_path: Path, stage):
    # eta = 0 (DDIM's deterministic step, the flow ODE) has no log-probability: training would be NaN
    res = subprocess.run([sys.executable, "-m", f"spo_core.stages.{stage}", "--params", "toy_flow", "--set",
                          "sampler.eta=0"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "sampler.eta" in res.stderr and "use eta > 0" in res.stderr
    assert not (tmp_path / "metrics").exists()


def test_stage_cli_rejects_bad_override_with_exit_2(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "spo_core.stages.train_spo", "--params", "tiny", "--set", "lora.rank=0"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert res.returncode == 2
    assert "lora.rank" in res.stderr and "greater than or equal to 1" in res.stderr
    assert not (tmp_path / "metrics").exists()  # nothing half-written


def test_corrupt_checkpoint_is_named(tmp_path: Path):
    ck = tmp_path / "checkpoints" / "round-000003"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"garbage")
    (ck / "lora.safetensors").write_bytes(b"garbage")
    (ck / "manifest.json").write_text('{"step": 3}')
    with pytest.raises(CheckpointError, match="round-000003.*corrupt.*delete that folder"):
        CheckpointStore.load(CheckpointStore(tmp_path / "checkpoints", prefix="round").latest())


def test_checkpoint_of_another_lora_rank_is_refused():
    policy = load_policy(ModelConfig(pretrained="tiny:sd15"))
    attach_lora(policy, LoraConfig(rank=4))
    other = load_policy(ModelConfig(pretrained="tiny:sd15"))
    attach_lora(other, LoraConfig(rank=2))
    from spo_core.models.lora import lora_state_dict

    with pytest.raises(TrainingError, match="rank or target modules differ"):
        _load_lora_into(policy, lora_state_dict(other), Path("ckpt"))


def test_failed_atomic_write_keeps_previous_output(tmp_path: Path):
    out = tmp_path / "stage_out"
    with atomic_dir(out) as d:
        (d / "result.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "result.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "result.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["stage_out"]  # no temp dirs left behind


def test_weights_are_never_loaded_with_pickle():
    # Every torch.load in the package passes weights_only=True; trust_remote_code is never set.
    root = Path(__file__).resolve().parents[1] / "spo_core"
    for py in root.rglob("*.py"):
        text = py.read_text()
        for line in text.splitlines():
            if "torch.load(" in line and "def " not in line:
                assert "weights_only=True" in line, f"{py}: {line.strip()}"
        assert "trust_remote_code=True" not in text, py
