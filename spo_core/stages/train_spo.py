"""Stage ``train_spo``: SPO LoRA training (``python -m spo_core.stages.train_spo``)."""

from __future__ import annotations

from ..config import SPOConfig
from ..methods.spo import SPOMethod
from .common import stage_main
from .trainer_stage import HEADLINE, run_training

STAGE = "train_spo"


def run(cfg: SPOConfig) -> dict:
    return run_training(STAGE, cfg, lambda policy, scorer: SPOMethod(cfg.sampler, cfg.loss, scorer))


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, SPOConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
