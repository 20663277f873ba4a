"""Stage ``noisy_pairs``: Pick-a-Pic-schema pairs -> one-step x0 estimates at random / fixed timesteps.

Outputs ``<output_dir>/train`` and ``<output_dir>/eval`` (see :mod:`spo_core.preference.noisy_pairs`);
re-running resumes (complete shards are kept). Metrics: pairs written, seconds per pair.
"""

from __future__ import annotations

from ..preference.config import NoisyPairsConfig
from ..preference.noisy_pairs import run_noisy_pairs
from .common import stage_main

STAGE = "noisy_pairs"
HEADLINE = ["pairs_written", "eval_pairs"]  # `dvc metrics show`; all: metrics.json


def run(cfg: NoisyPairsConfig) -> dict:
    return run_noisy_pairs(cfg)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, NoisyPairsConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
