"""Stage ``evaluate_base``: the base model alone, on the evaluation's prompts, seeds, sampler and scorers.

``python -m spo_core.stages.evaluate_base`` (DVC), ``spo evaluate-base``, or :func:`run`. It reads
section ``evaluate`` of params.yaml (one evaluation protocol for both stages) and writes
``evaluate.base_dir``: the base model's per-image scores, its grid tiles and the settings they were
made with. The stage ``evaluate`` reuses them while its settings and the weights match, so a
retrained LoRA (``dvc exp run -S train_spo.train.rounds=2``) is evaluated without regenerating and
rescoring the unchanged base; DVC reruns this stage only when the base model, the prompts, the
scorers or the protocol change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import pandas as pd
from pydantic import model_validator

from .. import tracking
from ..evaluation import BASE, ModelSpec, flat_metrics, summarize, write_base_results
from ..utils import atomic_dir, seed_everything
from .common import stage_main
from .evaluate import EvaluateConfig, base_settings, eval_prompts, generate

log = logging.getLogger(__name__)
STAGE = "evaluate_base"
SECTION = "evaluate"
HEADLINE = ["base/*/mean", "num_prompts"]


class EvaluateBaseConfig(EvaluateConfig):
    """Section ``evaluate``, as the base-only stage reads it: it writes ``base_dir``."""

    # The LoRAs, the comparison's bootstrap and the grid's tile size and reference column never change
    # this stage's results.
    OPERATIONAL: ClassVar[frozenset[str]] = EvaluateConfig.OPERATIONAL | {
        "base_dir", "loras", "lora_scale", "n_boot", "bootstrap_seed", "grid_image_size", "grid_reference"}
    OUTPUT_FIELD: ClassVar[str] = "base_dir"

    @model_validator(mode="after")
    def _needs_base_dir(self) -> "EvaluateBaseConfig":
        if not self.base_dir:
            raise ValueError("base_dir is not set: the stage evaluate_base writes the base model's results there; "
                             "set evaluate.base_dir (e.g. artifacts/evaluate_base)")
        return self


def run(cfg: EvaluateBaseConfig) -> dict:
    seed_everything(cfg.seed)
    prompts = eval_prompts(cfg)
    with atomic_dir(cfg.base_dir) as tmp:
        res = generate(cfg, [ModelSpec(BASE)], prompts, tmp / "images" if cfg.save_images else None)
        write_base_results(tmp, res, base_settings(cfg, prompts))
    summary = summarize(res.scores, res.scorer_columns, cfg.level)
    log.info("base model on %d prompts: %s (kept in %s)", len(prompts),
             ", ".join(f"{r.scorer}={r.mean:.4f}" for r in summary.itertuples()), Path(cfg.base_dir))
    tracking.log_table(summary, f"{STAGE}/summary")
    metrics = flat_metrics(summary, pd.DataFrame())
    metrics["num_prompts"] = len(prompts)
    metrics["num_images"] = len(res.scores)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, EvaluateBaseConfig, run, argv, headline=HEADLINE, section=SECTION)


if __name__ == "__main__":
    raise SystemExit(main())
