"""The baselines train on the shared loop: D3PO, DDPO and Diffusion-DPO, a few rounds on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo_core.config import D3POConfig, DDPOConfig, DiffusionDPOConfig
from spo_core.data.pickapic import encode_image, write_preference_dataset
from spo_core.methods.d3po import D3POMethod
from spo_core.models.diffusion import load_policy
from spo_core.scorers.simple import BrightnessScorer
from spo_core.stages import train_d3po, train_ddpo, train_diffusion_dpo
from spo_core.training import RoundContext
from spo_core.rollouts import RowRNG

BASE = dict(model=dict(pretrained="tiny:sd15", resolution=16), sampler=dict(num_steps=3), lora=dict(rank=2),
            optim=dict(lr=1e-3), scorer=dict(name="brightness"),
            prompts=dict(source="list", prompts=["a red cat", "a dog", "blue sky"]), device="cpu")


def _train(tmp_path: Path, **kw) -> dict:
    return {"rounds": 2, "prompts_per_round": 2, "train_batch_size": 8, "output_dir": str(tmp_path / "out"), **kw}


def _moved(tmp_path: Path) -> float:
    sd = load_file(str(tmp_path / "out/lora/pytorch_lora_weights.safetensors"))
    # the up (B) matrices start at zero: kohya / diffusers-UNet names ".up.", diffusers-transformer "lora_B"
    return max(float(v.abs().max()) for k, v in sd.items() if ".up." in k or "lora_B" in k)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stages write metrics/ under the working directory


def test_d3po_pairs_share_only_the_first_state():
    cfg = D3POConfig.model_validate({**BASE, "train": {}})
    policy = load_policy(cfg.model)
    prompts = ["a red cat", "a dog"]
    ctx = RoundContext(policy, 0, prompts, policy.encode_prompts(prompts), torch.Generator().manual_seed(0), None,
                       rng=RowRNG([1, 2]))
    pairs, m = D3POMethod(cfg.sampler, cfg.loss, BrightnessScorer()).collect(ctx)
    n_steps = cfg.sampler.num_steps
    assert len(pairs) == 2 * n_steps and m["sample_unet_evals"] == 2 * 2 * n_steps
    first = pairs.t == pairs.t.max()
    assert pairs.shared[first].all() and not pairs.shared[~first].any()
    assert torch.equal(pairs.x_t_w[first], pairs.x_t_l[first])  # one x_T for both trajectories
    assert (pairs.score_w >= pairs.score_l).all()


def test_d3po_trains(tmp_path):
    cfg = D3POConfig.model_validate({**BASE, "train": _train(tmp_path)})
    out = train_d3po.run(cfg)
    assert out["rounds"] == 2 and _moved(tmp_path) > 0


def test_ddpo_trains(tmp_path):
    cfg = DDPOConfig.model_validate({**BASE, "samples_per_prompt": 3, "train": _train(tmp_path)})
    out = train_ddpo.run(cfg)
    # 2 prompts x 3 samples x 3 steps sampled per round, one evaluation per trained transition.
    assert out["total_unet_evals"] == 2 * (2 * 3 * 3 + 2 * 3 * 3) and _moved(tmp_path) > 0


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_diffusion_dpo_trains_and_drops_ties(tmp_path, kind):
    # sd3: Diffusion-DPO on the flow process (t / 1000 uniform, the velocity eps - x0 as target)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        a, b = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
        lab = (0.5, 0.5) if i % 4 == 0 else ((1.0, 0.0) if a.mean() > b.mean() else (0.0, 1.0))
        rows.append(dict(caption=f"image {i}", jpg_0=encode_image(a), jpg_1=encode_image(b), label_0=lab[0], label_1=lab[1]))
    write_preference_dataset(rows, tmp_path / "prefs.parquet")
    model = dict(pretrained=f"tiny:{kind}", kind=kind, resolution=16)
    cfg = DiffusionDPOConfig.model_validate({**BASE, "model": model, "dataset": str(tmp_path / "prefs.parquet"),
                                             "train": _train(tmp_path, prompts_per_round=4,
                                                             export_kohya=kind == "sd15")})
    from spo_core.methods.diffusion_dpo import DiffusionDPOMethod

    assert len(DiffusionDPOMethod(cfg.dataset).captions) == 9  # 3 ties dropped
    out = train_diffusion_dpo.run(cfg)
    # Policy and reference each see win and lose: 4 evaluations per pair, no sampling.
    assert out["total_unet_evals"] == 2 * 4 * 4 and _moved(tmp_path) > 0
