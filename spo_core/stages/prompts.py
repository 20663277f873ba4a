"""Stage ``prompts``: fix the training and evaluation prompt sets as text files.

Sources are any of :func:`spo_core.data.prompts.load_prompts` (the SPO 4k file, Pick-a-Pic,
PartiPrompts, plain text, the toy world's files); an optional deterministic subsample keeps runs
small. Downstream stages read ``train.txt`` / ``eval.txt`` so that the sets are DVC-versioned.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..config import PromptsConfig, Strict
from ..data.prompts import load_prompts, sample_prompts
from ..utils import atomic_file
from .common import stage_main

STAGE = "prompts"
HEADLINE = ["num_train", "num_eval"]  # `dvc metrics show`; all: metrics.json


class PromptsStageConfig(Strict):
    train: PromptsConfig
    eval: PromptsConfig
    num_train: int | None = Field(default=None, ge=1)  # None: all
    num_eval: int | None = Field(default=None, ge=1)
    seed: int = 0
    output_dir: str = "artifacts/prompts"


def _write(prompts: list[str], path: Path) -> None:
    with atomic_file(path, "w") as fh:
        for p in prompts:
            fh.write(" ".join(p.split()) + "\n")  # one line per prompt, whatever whitespace it had


def run(cfg: PromptsStageConfig) -> dict:
    train = load_prompts(**cfg.train.model_dump())
    evals = load_prompts(**cfg.eval.model_dump())
    if cfg.num_train is not None and cfg.num_train < len(train):
        train = sample_prompts(train, cfg.num_train, cfg.seed)
    if cfg.num_eval is not None and cfg.num_eval < len(evals):
        evals = sample_prompts(evals, cfg.num_eval, cfg.seed + 1)
    out = Path(cfg.output_dir)
    _write(train, out / "train.txt")
    _write(evals, out / "eval.txt")
    overlap = len(set(train) & set(evals))
    return {"num_train": len(train), "num_eval": len(evals), "train_eval_overlap": overlap}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, PromptsStageConfig, run, argv, headline=HEADLINE)


if __name__ == "__main__":
    raise SystemExit(main())
