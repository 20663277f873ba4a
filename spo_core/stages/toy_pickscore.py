"""Stage ``toy_pickscore``: train the toy PickScore (``python -m spo_core.stages.toy_pickscore``).

Writes a CLIPModel directory with its tokenizer and ``preprocessor_config.json``; score with
``build_scorer("toy_pickscore", path=DIR)`` (or ``"pickscore"``: the same ClipScorer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from .. import tracking
from ..data.pickapic import read_preference_dataset
from ..toyworld.config import ToyPickScoreConfig
from ..toyworld.toy_pickscore import PairTensors, save_toy_pickscore, train_toy_pickscore
from ..toyworld.world import load_world
from ..utils import atomic_dir
from .common import stage_main
from .toy_prefs import TRAIN_FILE, VALIDATION_FILE

STAGE = "toy_pickscore"
# what `dvc metrics show` prints; every metric is in MLflow and in {output_dir}/metrics.json
HEADLINE = ["validation_accuracy", "validation_clip_only_accuracy"]
log = logging.getLogger(__name__)


def run(cfg: ToyPickScoreConfig) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world = load_world(cfg.world_dir)
    prefs = Path(cfg.prefs_dir)
    train = PairTensors.from_frame(read_preference_dataset(prefs / TRAIN_FILE))
    validation = PairTensors.from_frame(read_preference_dataset(prefs / VALIDATION_FILE))
    phase_offset = {"clip": 0, "pref": cfg.clip_steps}  # one step axis for both phases' curves

    def on_log(phase: str, step: int, loss: float) -> None:
        tracking.log_metrics({f"{phase}_loss": loss}, step=phase_offset[phase] + step)

    result = train_toy_pickscore(cfg, world, train, validation, on_log=on_log)
    with atomic_dir(cfg.output_dir) as tmp:
        save_toy_pickscore(result.model, world.tokenizer(), cfg, world.config.resolution, tmp)
        pd.DataFrame(result.history, columns=["phase", "step", "loss"]).to_csv(tmp / "loss.csv", index=False)
    log.info("toy PickScore saved to %s (held-out accuracy %.3f)", cfg.output_dir, result.metrics["validation_accuracy"])
    return {**result.metrics, "train_pairs": len(train.captions), "validation_pairs": len(validation.captions),
            "parameters": sum(p.numel() for p in result.model.parameters())}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, ToyPickScoreConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
