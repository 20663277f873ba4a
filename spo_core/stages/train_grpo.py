"""Stage ``train_grpo``: the Flow-GRPO baseline (``python -m spo_core.stages.train_grpo``)."""

from __future__ import annotations

from ..config import GRPOConfig
from ..methods.grpo import FlowGRPOMethod
from .common import stage_main
from .trainer_stage import HEADLINE, run_training

STAGE = "train_grpo"


def run(cfg: GRPOConfig) -> dict:
    return run_training(STAGE, cfg, lambda policy, scorer: FlowGRPOMethod(
        cfg.sampler, scorer, cfg.samples_per_prompt, cfg.clip_range, cfg.adv_clip, kl_beta=cfg.kl_beta,
        global_std=cfg.global_std, timestep_fraction=cfg.timestep_fraction))


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, GRPOConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
