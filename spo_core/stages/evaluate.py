"""Stage ``evaluate``: the base model and its LoRAs on fixed prompts and seeds, scored, with CIs.

``python -m spo_core.stages.evaluate`` (DVC), ``spo evaluate``, or :func:`run` from a flow or a test.
Writes ``scores.parquet``, ``summary.csv``, ``winrates.csv``, ``table.md`` and ``grid.png`` into
``output_dir`` (replaced as a whole, atomically), logs the tables and the grid to MLflow, and
returns flat metrics ``<model>/<scorer>/<statistic>`` (``metrics/evaluate.json``).

With ``base_dir`` set, the base model's images and scores are taken from there (the stage
``evaluate_base`` writes them) when they were made with this evaluation's settings, base weights
and scorer weights; otherwise the base is generated and scored here, as without ``base_dir``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator

from .. import tracking
from ..config import ModelConfig, PromptsConfig, Strict
from ..data.prompts import load_prompts
from ..evaluation import (
    BASE,
    EvalSamplerConfig,
    EvalScorerConfig,
    EvaluationError,
    EvaluationRun,
    ModelSpec,
    check_name,
    compare_to_base,
    comparison_grid,
    evaluate_models,
    flat_metrics,
    merge_runs,
    model_specs,
    read_base_results,
    report_markdown,
    summarize,
    write_outputs,
)
from ..models.diffusion import load_policy
from ..scorers.base import build_scorer
from ..toyworld.render import render_prompts
from ..toyworld.world import LoadedWorld, load_world
from ..utils import atomic_dir, path_digest, resolve_device, seed_everything, staged
from .common import stage_main

log = logging.getLogger(__name__)
STAGE = "evaluate"
REFERENCE_COLUMN = "renderer"  # the grid column of grid_reference


def headline(cfg: "EvaluateConfig") -> list[str]:
    """What `dvc metrics show` prints: the first scorer's figures (every metric is in MLflow and in
    ``{output_dir}/metrics.json``)."""
    first = cfg.scorers[0].column
    return [f"*/{first}/{s}" for s in ("mean", "diff_vs_base", "diff_ci_low", "diff_ci_high", "winrate_vs_base")] \
        + ["num_prompts"]


class EvaluateConfig(Strict):
    """Everything the ``evaluate`` stage needs (section ``evaluate`` of params.yaml / a profile)."""

    model: ModelConfig
    # name -> LoRA directory (ours) or .safetensors file (released SPO LoRAs, diffusers or kohya format).
    loras: dict[str, str] = Field(default_factory=dict)
    lora_scale: float = 1.0
    prompts: PromptsConfig
    num_prompts: int | None = Field(default=500, ge=2)  # first N prompts; None: all of them
    images_per_prompt: int = Field(default=1, ge=1)
    seed: int = 0  # image (p, j) uses seed + p * images_per_prompt + j
    sampler: EvalSamplerConfig = EvalSamplerConfig()
    scorers: list[EvalScorerConfig] = Field(min_length=1)
    batch_size: int = Field(default=8, ge=1)  # images generated (and decoded) together
    score_batch_size: int | None = Field(default=None, ge=1)  # None: score each generated batch at once
    level: float = Field(default=0.95, gt=0, lt=1)
    n_boot: int = Field(default=1000, ge=100)
    bootstrap_seed: int = 0
    quantize: bool = True  # score 8-bit images, as scoring the saved PNG files would
    grid_prompts: int = Field(default=8, ge=0)  # 0: no grid
    grid_image_size: int | None = Field(default=256, ge=8)  # tile side in grid.png; None: native size
    # A toy world directory: grid.png then opens each row with the world's renderer image of its prompt
    # (the ideal answer, column "renderer"), so a viewer sees what each model gets right. None: no column.
    grid_reference: str | None = None
    save_images: bool = False  # also write every image to output_dir/images/<model>/
    # The stage evaluate_base's folder: the base's results are reused from there while their settings
    # match (a retrained LoRA is evaluated without regenerating the base). None: evaluate the base here.
    base_dir: str | None = None
    output_dir: str = "artifacts/evaluate"
    device: str = "auto"

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            check_name(name, "LoRA name")
            if name in (BASE, REFERENCE_COLUMN):
                raise ValueError(f"a LoRA may not be named '{name}' (a column of the evaluation): rename it")
        return v

    @model_validator(mode="after")
    def _unique_columns(self) -> "EvaluateConfig":
        cols = [s.column for s in self.scorers]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ValueError(f"scorers {dup} appear more than once: give each a distinct 'label'")
        return self


def with_reference(grid_images: dict[str, torch.Tensor], prompts: list[str], world: LoadedWorld | None,
                   seed: int) -> dict[str, torch.Tensor]:
    """The grid's tiles with the toy renderer's image of each prompt as the first column."""
    if world is None or not grid_images:
        return grid_images
    side = next(iter(grid_images.values())).shape[-1]
    ref = render_prompts(list(prompts), side, seed, world.config)
    return {REFERENCE_COLUMN: ref, **grid_images}


def describe(cfg: EvaluateConfig, n_prompts: int) -> str:
    s = cfg.sampler
    if cfg.model.kind in ("sd3", "flux"):
        how = f"flow {'ODE' if s.eta == 0 else 'SDE'} {s.num_steps} steps, guidance {s.guidance_scale:g}, noise level {s.eta:g}"
    else:
        how = f"DDIM {s.num_steps} steps, CFG {s.guidance_scale:g}, eta {s.eta:g}"
    return (f"{n_prompts} prompts ({cfg.prompts.source}{': ' + cfg.prompts.path if cfg.prompts.path else ''}) x "
            f"{cfg.images_per_prompt} image(s), {how}; "
            f"model {cfg.model.pretrained}; image (p, j) seed = {cfg.seed} + p * {cfg.images_per_prompt} + j for every model.")


def eval_prompts(cfg: EvaluateConfig) -> list[str]:
    prompts = load_prompts(**cfg.prompts.model_dump())
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    if len(prompts) < 2:
        raise EvaluationError(f"evaluation needs at least 2 prompts for confidence intervals, got {len(prompts)}: "
                              "point prompts at a larger set or raise num_prompts")
    return prompts


def base_settings(cfg: EvaluateConfig, prompts: list[str]) -> dict:
    """Everything the base model's images and scores depend on (what evaluate_base's results must match)."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "model_weights": path_digest(cfg.model.pretrained), "vae_weights": path_digest(cfg.model.vae),
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "num_prompts": len(prompts),
        "images_per_prompt": cfg.images_per_prompt, "seed": cfg.seed, "sampler": cfg.sampler.model_dump(mode="json"),
        "scorers": [s.model_dump(mode="json") for s in cfg.scorers],
        "scorer_weights": [path_digest(s.path) for s in cfg.scorers],
        "quantize": cfg.quantize, "grid_prompts": cfg.grid_prompts, "save_images": cfg.save_images,
    }


def generate(cfg: EvaluateConfig, models: list[ModelSpec], prompts: list[str], image_dir: Path | None) -> EvaluationRun:
    """Generate and score ``models`` as ``cfg`` says (shared by evaluate and evaluate_base)."""
    device = resolve_device(cfg.device)
    scorers = {s.column: build_scorer(s.name, s.path, device, **s.options) for s in cfg.scorers}
    policy = load_policy(cfg.model, device)
    log.info("evaluating %s on %d prompts x %d images with scorers %s",
             [m.name for m in models], len(prompts), cfg.images_per_prompt, list(scorers))
    return evaluate_models(
        policy, models, prompts, scorers, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
        sampler=cfg.sampler, batch_size=cfg.batch_size, score_batch_size=cfg.score_batch_size,
        grid_prompts=cfg.grid_prompts, quantize=cfg.quantize, image_dir=image_dir,
    )


def kept_base(cfg: EvaluateConfig, prompts: list[str]) -> EvaluationRun | None:
    """evaluate_base's results for these settings, or None (and why, in the log)."""
    if cfg.base_dir is None:
        return None
    base, why = read_base_results(cfg.base_dir, base_settings(cfg, prompts))
    if base is None:
        log.info("evaluating the base model here: %s", why)
    else:
        log.info("base model: reusing its images' scores from %s (same settings and weights)", cfg.base_dir)
    return base


def run(cfg: EvaluateConfig) -> dict:
    seed_everything(cfg.seed)
    models = model_specs(cfg.loras, cfg.lora_scale)  # fails early on a missing LoRA
    prompts = eval_prompts(cfg)
    base = kept_base(cfg, prompts)
    # Read before generating: a wrong grid_reference fails now, not after the whole evaluation.
    world = load_world(cfg.grid_reference) if cfg.grid_reference and cfg.grid_prompts else None
    if base is not None:
        models = [m for m in models if m.name != BASE]

    with atomic_dir(cfg.output_dir) as tmp:
        res = generate(cfg, models, prompts, tmp / "images" if cfg.save_images else None) if models else None
        if base is not None:
            res = merge_runs(base, res)
            kept_images = Path(cfg.base_dir) / "images" / BASE
            if cfg.save_images and kept_images.is_dir():
                shutil.copytree(kept_images, tmp / "images" / BASE)
        summary = summarize(res.scores, res.scorer_columns, cfg.level)
        comparisons = compare_to_base(res.scores, res.scorer_columns, level=cfg.level, n_boot=cfg.n_boot,
                                      seed=cfg.bootstrap_seed)
        table = report_markdown(summary, comparisons, describe(cfg, len(prompts)), cfg.level)
        tiles = with_reference(res.grid_images, res.grid_prompts, world, cfg.seed)
        grid = comparison_grid(tiles, res.grid_prompts, cfg.grid_image_size) if tiles else None
        written = write_outputs(tmp, res.scores, summary, comparisons, table, grid)
    out_dir = Path(cfg.output_dir)
    files = [staged(out_dir) / p.relative_to(tmp) for p in written.values()]  # in place once the stage commits
    log.info("evaluation for %s\n%s", out_dir, table)

    tracking.set_description(table)  # the headline result, on the run's page
    tracking.log_table(summary, f"{STAGE}/summary")
    if not comparisons.empty:
        tracking.log_table(comparisons, f"{STAGE}/winrates")
    if grid is not None:
        tracking.log_image(grid, f"{STAGE}/grid.png")
    for path in files:
        tracking.log_artifact(path, f"{STAGE}/files")

    metrics = flat_metrics(summary, comparisons)
    metrics["num_prompts"] = len(prompts)
    metrics["num_images_per_model"] = len(prompts) * cfg.images_per_prompt
    metrics["base_reused"] = int(base is not None)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, EvaluateConfig, run, argv, headline=headline)


if __name__ == "__main__":
    raise SystemExit(main())
