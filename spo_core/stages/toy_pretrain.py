"""Stage ``toy_pretrain``: train the toy base model (``python -m spo_core.stages.toy_pretrain``).

Writes a diffusers pipeline directory (load it with ``load_policy(ModelConfig(pretrained=DIR, kind=...))``,
kind ``sd15`` or ``sd3`` as trained)
plus ``loss.csv`` and ``samples.png`` (held-out prompts: renderer image, then base samples).
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from .. import tracking
from ..toyworld.compare import model_vs_renderer, sample_grid
from ..toyworld.config import ToyPretrainConfig
from ..toyworld.pretrain import train_base, trained_modules
from ..toyworld.world import load_world
from ..utils import atomic_dir, staged
from .common import stage_main

STAGE = "toy_pretrain"
# what `dvc metrics show` prints; every metric is in MLflow and in {output_dir}/metrics.json
HEADLINE = ["final_loss", "validation_base_reward", "validation_renderer_reward"]
log = logging.getLogger(__name__)


def run(cfg: ToyPretrainConfig) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world = load_world(cfg.world_dir)
    result = train_base(cfg, world, on_log=lambda step, loss: tracking.log_metrics({"loss": loss}, step=step))
    policy = result.policy
    wcfg = world.config
    metrics: dict = {
        "steps": cfg.steps,
        "steps_run": result.steps_run,
        "resumed_from_step": result.start_step,
        "final_loss": result.losses[-1][1] if result.losses else float("nan"),
        "s_per_step": result.train_seconds / max(result.steps_run, 1),
    }
    for name, module in trained_modules(policy).items():  # unet or transformer, then the text encoder(s)
        metrics[f"{name}_parameters"] = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        grid = sample_grid(policy, world.validation_prompts[: cfg.grid_prompts], wcfg, cfg.sampler, seed=cfg.seed)
        held = world.validation_prompts[: cfg.eval_prompts]
        metrics.update(model_vs_renderer(policy, held, wcfg, cfg.sampler, cfg.seed, "validation"))
        train = world.train_prompts[: cfg.eval_prompts]
        metrics.update(model_vs_renderer(policy, train, wcfg, cfg.sampler, cfg.seed, "train"))
    with atomic_dir(cfg.output_dir) as tmp:
        policy.save_pretrained(tmp)
        pd.DataFrame(result.losses, columns=["step", "loss"]).to_csv(tmp / "loss.csv", index=False)
        grid.save(tmp / "samples.png")
    tracking.log_image(grid, "toy_pretrain_samples.png")
    tracking.log_artifact(staged(cfg.output_dir) / "loss.csv")
    log.info("toy base model saved to %s", cfg.output_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, ToyPretrainConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
