"""Stage ``train_d3po``: the D3PO baseline (``python -m spo_core.stages.train_d3po``)."""

from __future__ import annotations

from ..config import D3POConfig
from ..methods.d3po import D3POMethod
from .common import stage_main
from .trainer_stage import HEADLINE, run_training

STAGE = "train_d3po"


def run(cfg: D3POConfig) -> dict:
    return run_training(STAGE, cfg, lambda policy, scorer: D3POMethod(cfg.sampler, cfg.loss, scorer, threshold=cfg.threshold))


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, D3POConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
