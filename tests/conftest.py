"""Shared fixtures: an offline, tracking-free environment and tiny SD-1.5 / SDXL policies."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / mlflow so that no test reaches the network or a store.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch

# The tiny models gain little from intra-op threads, and on a busy 2-core machine two OpenMP
# threads per process slow them down several-fold (measured: 5-8x); SPO_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SPO_TEST_THREADS", "1")))

TINY_PROMPTS = ["a red cube", "a blue ball", "a green tree", "a small cat"]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    # Re-assert per test: a test elsewhere may have changed them.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")


@pytest.fixture(scope="session")
def make_policy():
    """Factory for fresh tiny policies: ``make_policy("sd15")`` / ``make_policy("sdxl")``.

    Fresh per call (about 0.05 s) because tests attach LoRAs or wrap methods; the tiny builder
    seeds torch with 0, so every call returns identical weights. ``resolution=None`` gives the
    native 32 px.
    """
    from spo_core.config import ModelConfig
    from spo_core.models.diffusion import load_policy

    def make(kind: str = "sd15", resolution: int | None = 16, **kw):
        # 16 px images (8x8 latents) instead of the native 32 px: 2.5x cheaper UNet calls, same code paths.
        return load_policy(ModelConfig(pretrained=f"tiny:{kind}", kind=kind, resolution=resolution, **kw))

    return make


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Factory for tiny diffusers pipeline directories on disk (one per kind per session)."""
    from spo_core.models.tiny import save_tiny_pipeline

    cache: dict[str, object] = {}

    def get(kind: str = "sd15"):
        if kind not in cache:
            cache[kind] = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"tiny_{kind}") / "pipe")
        return cache[kind]

    return get


@pytest.fixture
def tiny_prompts():
    return list(TINY_PROMPTS)


def _perturb_lora(policy, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def perturb_lora():
    """Give the LoRA B matrices random values: peft's gaussian init leaves B = 0 (a no-op adapter)."""
    return _perturb_lora


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for every flow test of the session (starting one costs ~30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """MLflow on, into tmp_path; yields a function returning the runs of experiment ``spo``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("SPO_DISABLE_MLFLOW", raising=False)
    monkeypatch.delenv("SPO_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    import mlflow

    mlflow.set_tracking_uri(uri)  # mlflow's process-global URI wins over the environment variable
    yield lambda: mlflow.search_runs(experiment_names=["spo"], order_by=["start_time ASC"])
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def copy_checkout():
    """Factory: ``copy_checkout(dst)`` copies this checkout's git-tracked files (as they are now, edits
    included) to ``dst``, a stand-in for a fresh clone."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def copy(dst: Path) -> Path:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            if (root / f).is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / f, dst / f)
        return dst

    return copy
