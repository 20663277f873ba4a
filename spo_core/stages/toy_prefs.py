"""Stage ``toy_prefs``: the toy preference dataset (``python -m spo_core.stages.toy_prefs``).

Writes ``train.parquet`` (pairs for training prompts) and ``validation.parquet`` (pairs for
held-out prompts) in the Pick-a-Pic schema; read them with ``read_preference_dataset``.
"""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from ..data.pickapic import write_preference_dataset
from ..models.diffusion import load_policy, pipeline_kind
from ..toyworld.config import ToyPrefsConfig
from ..toyworld.dataset import build_pairs, pair_statistics
from ..toyworld.world import load_world
from ..utils import atomic_dir
from .common import stage_main

STAGE = "toy_prefs"
# what `dvc metrics show` prints; every metric is in MLflow and in {output_dir}/metrics.json
HEADLINE = ["train_pairs", "validation_label_reward_agreement"]
TRAIN_FILE = "train.parquet"
VALIDATION_FILE = "validation.parquet"
log = logging.getLogger(__name__)


def _take(prompts: list[str], n: int | None, what: str) -> list[str]:
    if n is not None and n > len(prompts):
        raise ValueError(f"{what}={n} but the world has only {len(prompts)} such prompts: "
                         "lower it or set it to null (all)")
    return prompts if n is None else prompts[:n]


def run(cfg: ToyPrefsConfig) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world = load_world(cfg.world_dir)
    policy = load_policy(ModelConfig(pretrained=cfg.base_dir, kind=pipeline_kind(cfg.base_dir)))
    metrics: dict = {}
    with atomic_dir(cfg.output_dir) as tmp:
        splits = (
            ("train", _take(world.train_prompts, cfg.n_train_prompts, "n_train_prompts"), TRAIN_FILE),
            ("validation", _take(world.validation_prompts, cfg.n_validation_prompts, "n_validation_prompts"),
             VALIDATION_FILE),
        )
        for split, prompts, file in splits:
            pairs = build_pairs(policy, prompts, world.config, cfg.sampler, cfg.labels, cfg.seed, split)
            write_preference_dataset(pairs.frame, tmp / file)
            metrics.update(pair_statistics(pairs, split))
    log.info("toy preference pairs written to %s", cfg.output_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, ToyPrefsConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
