"""Stage ``train_ddpo``: the DDPO baseline (``python -m spo_core.stages.train_ddpo``)."""

from __future__ import annotations

from ..config import DDPOConfig
from ..methods.ddpo import DDPOMethod
from .common import stage_main
from .trainer_stage import HEADLINE, run_training

STAGE = "train_ddpo"


def run(cfg: DDPOConfig) -> dict:
    return run_training(STAGE, cfg, lambda policy, scorer: DDPOMethod(
        cfg.sampler, scorer, cfg.samples_per_prompt, cfg.clip_range, cfg.adv_clip))


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, DDPOConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
