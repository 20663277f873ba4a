"""Stage ``toy_world``: prompts, world description and tokenizer (``python -m spo_core.stages.toy_world``)."""

from __future__ import annotations

from ..toyworld.config import ToyWorldConfig
from ..toyworld.world import write_world
from .common import stage_main

STAGE = "toy_world"
HEADLINE = ["vocabulary_words", "n_colour_shape_pairs"]  # `dvc metrics show`; all: metrics.json


def run(cfg: ToyWorldConfig) -> dict:
    desc = write_world(cfg)
    w = cfg.world
    return {
        "n_train": desc["n_train"],
        "n_validation": desc["n_validation"],
        "n_heldout_pairs": len(desc["heldout_pairs"]),
        "n_colour_shape_pairs": len(w.colours) * len(w.shapes),
        "vocabulary_words": len(desc["vocabulary"]),
        "tokenizer_vocab_size": desc["tokenizer_vocab_size"],
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, ToyWorldConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
