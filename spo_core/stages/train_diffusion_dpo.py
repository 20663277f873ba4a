"""Stage ``train_diffusion_dpo``: the offline Diffusion-DPO baseline."""

from __future__ import annotations

from ..config import DiffusionDPOConfig
from ..methods.diffusion_dpo import DiffusionDPOMethod
from .common import stage_main
from .trainer_stage import HEADLINE, run_training

STAGE = "train_diffusion_dpo"


def run(cfg: DiffusionDPOConfig) -> dict:
    return run_training(STAGE, cfg, lambda policy, scorer: DiffusionDPOMethod(
        cfg.dataset, cfg.beta, cfg.train.prompts_per_round, cfg.train.seed), offline=True, needs_scorer=False)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, DiffusionDPOConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
