"""Two processes whose samplers keep different numbers of pairs (threshold > 0) still train what one
process trains on the same global prompts: the round's pairs are gathered, ordered and shared out,
so every process runs the same backward passes (no DDP hang) and the gradient is the global mean.

The processes are spawned with a gloo process group (accelerate's MULTI_CPU) and a scorer that gives
every candidate of a "flat" prompt the same score: a process holding only flat prompts keeps no pair
in that round.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from spo_core.config import D3POConfig, SPOConfig
from spo_core.methods.d3po import D3POMethod
from spo_core.methods.spo import SPOMethod
from spo_core.models.diffusion import load_policy
from spo_core.scorers.simple import BrightnessScorer
from spo_core.training import prompts_for_round, train_rounds

PROMPTS = ["flat one", "flat two", "sharp three", "sharp four"]
# Global budgets, the same for 1 and 2 processes: 4 prompts per round (2 per process), micro-batches of 4.
PER_ROUND, BATCH = 4, 4


class GatedScorer:
    """Brightness x 1000 (every pair kept) except for prompts starting with "flat" (all tied: none kept)."""

    name = "gated"

    def score(self, images, prompts, timesteps=None):
        s = BrightnessScorer().score(images, prompts, timesteps) * 1000
        flat = torch.tensor([p.startswith("flat") for p in prompts], device=s.device)
        return torch.where(flat, torch.zeros_like(s), s)


def _seed_with_an_empty_process() -> int:
    """A seed whose rounds 0-2 give some process both flat prompts in one round, and mixed ones in another."""
    for seed in range(100):
        kinds = []
        for r in range(3):
            for p in range(2):
                got = prompts_for_round(PROMPTS, PER_ROUND, r, seed, p, 2)
                kinds.append(sum(x.startswith("flat") for x in got))
        if 2 in kinds and 1 in kinds:
            return seed
    raise AssertionError("no suitable seed")


def _config(kind: str, out: Path, per_round: int, batch: int, seed: int):
    base = {
        "model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 16},
        "lora": {"rank": 2},
        "optim": {"lr": 1.0e-3},
        "train": {"rounds": 3, "prompts_per_round": per_round, "train_batch_size": batch, "seed": seed,
                  "output_dir": str(out), "export_kohya": False},
        "prompts": {"source": "list", "prompts": PROMPTS},
        "scorer": {"name": "brightness"},  # validated only: the processes use GatedScorer
        "device": "cpu",
    }
    if kind == "spo":
        cfg = SPOConfig.model_validate({**base, "sampler": {"num_steps": 4, "kappa": 1000, "k": 2, "threshold": 0.05}})
        return cfg, lambda: SPOMethod(cfg.sampler, cfg.loss, GatedScorer())
    cfg = D3POConfig.model_validate({**base, "sampler": {"num_steps": 4}, "threshold": 0.05})
    return cfg, lambda: D3POMethod(cfg.sampler, cfg.loss, GatedScorer(), threshold=cfg.threshold)


def _train(kind: str, out: Path, per_round: int, batch: int, seed: int) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    cfg, make_method = _config(kind, out, per_round, batch, seed)
    policy = load_policy(cfg.model, "cpu")
    acc = Accelerator(cpu=True)
    train_rounds(policy, make_method(), list(PROMPTS), cfg.lora, cfg.optim, cfg.train, accelerator=acc)
    acc.wait_for_everyone()


def _worker(rank: int, world: int, port: int, kind: str, out: str, seed: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), SPO_DISABLE_MLFLOW="1", HF_HUB_OFFLINE="1")
    _train(kind, Path(out), PER_ROUND, BATCH, seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spo", "d3po"])
def test_two_processes_keeping_different_pair_counts_match_one(kind: str, tmp_path: Path):
    seed = _seed_with_an_empty_process()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kind, str(tmp_path / "two"), seed)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a process was still running after 300 s (DDP desynchronised)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    _train(kind, tmp_path / "one", PER_ROUND, BATCH, seed)

    one_hist = json.loads((tmp_path / "one/history.json").read_text())
    two_hist = json.loads((tmp_path / "two/history.json").read_text())
    # Some round really kept fewer pairs than segments (the filter is active), and the logged
    # counts are the sums over both processes.
    assert any(0 < h["pairs"] for h in one_hist)
    assert any(h["keep_fraction"] < 1 for h in one_hist)
    for a, b in zip(one_hist, two_hist):
        assert a["pairs"] == b["pairs"] and a["train_items"] == b["train_items"]
        assert a["optimizer_steps"] == b["optimizer_steps"]
        assert a["keep_fraction"] == pytest.approx(b["keep_fraction"])
        if "loss" in a:
            # float32 sums in another order on 2 processes: 1.8e-6 measured on an AMD EPYC after two
            # rounds (the LoRA below is held to the same 1e-5).
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    one = load_file(str(tmp_path / "one/lora/pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two/lora/pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    ups = [k for k in one if "lora_B" in k or ".up." in k]
    assert max(float(one[k].abs().max()) for k in ups) > 1e-4  # training moved the zero-initialised half
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-5, k
