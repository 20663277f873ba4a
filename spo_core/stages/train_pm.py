"""Stage ``train_pm``: train the step-agnostic and step-aware preference models, evaluate all variants.

Outputs one scorer directory per trained variant under ``output_dir`` (``aware/``, ``agnostic/``),
``accuracy.md`` / ``accuracy.json``, and metrics such as ``acc/aware/t951`` (see
:mod:`spo_core.preference.train`).
"""

from __future__ import annotations

from ..preference.config import TrainPMConfig
from ..preference.train import run_train_pm
from .common import stage_main

STAGE = "train_pm"
# what `dvc metrics show` prints; every metric is in MLflow and in {output_dir}/metrics.json
HEADLINE = ["acc/*/mean", "train_pairs"]


def run(cfg: TrainPMConfig) -> dict:
    return run_train_pm(cfg)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, TrainPMConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
