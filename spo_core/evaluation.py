"""Paired evaluation of a base model and any number of LoRAs: fixed seeds, scores, CIs, win-rates.

The protocol of the SPO paper (REFERENCE.md section 5): every model generates from the same
prompts with the same per-image seeds (DDIM 20 steps, CFG 5.0, eta 1.0), every image is scored by
every scorer, and the mean of each scorer is reported per model. On top of the paper's means this
module reports what small effects need: a t interval per mean, the paired difference to the base
model, and the win-rate over the base with a cluster bootstrap over prompts.

Data flow::

    item_table(prompts, N, seed)              one row per (prompt, image): seed = seed + p * N + j
    evaluate_models(policy, models, ...)      per model: generate in batches -> decode once ->
                                              every scorer on the same decoded batch -> frame rows
    summarize(scores) / compare_to_base(...)  per (model, scorer) statistics via spo_core.stats
    results_table / winrate_table / ...       markdown in the shape of the paper's Tables 1-2
    comparison_grid(...)                      rows = prompts, columns = models, same seeds
    write_outputs(out_dir, ...)               scores.parquet, summary.csv, winrates.csv, table.md, grid.png
    write_base_results / read_base_results    the base model's rows and grid tiles, kept by the stage
                                              ``evaluate_base`` and reused while its settings match

Images are never held for the whole run: each batch is scored and dropped (only the few grid
images are kept), so 500 prompts of SDXL cost no more memory than one batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import model_validator
from tqdm.auto import tqdm

from .config import SamplingConfig, ScorerConfig
from .models.diffusion import DiffusionPolicy
from .models.lora import adapters_disabled, hub_lora_id, load_lora, resolve_lora
from .utils import atomic_path
from .reporting import image_grid, markdown_table, save_png_atomic, write_text_atomic
from .rollouts import sample_images
from .scorers.base import Scorer
from .stats import bootstrap_win_rate_ci, mean_ci, paired_diff_ci
from .errors import InputError

log = logging.getLogger(__name__)

BASE = "base"
ITEM_KEYS = ["prompt_idx", "image_idx"]
# Model and scorer names become MLflow metric keys ("<model>/<scorer>/mean") and file names.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# Which training stage writes a LoRA, guessed from its name or path (for the "missing LoRA" error).
_PRODUCERS = (("diffusion_dpo", "train_diffusion_dpo"), ("diffusion-dpo", "train_diffusion_dpo"),
              ("d3po", "train_d3po"), ("ddpo", "train_ddpo"), ("grpo", "train_grpo"), ("dpo", "train_diffusion_dpo"), ("spo", "train_spo"))


class EvaluationError(InputError, RuntimeError):
    """An evaluation that cannot run as configured; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Configuration pieces (the stage's EvaluateConfig assembles them)


# How evaluation images are sampled; the defaults are the paper's protocol.
EvalSamplerConfig = SamplingConfig


class EvalScorerConfig(ScorerConfig):
    """A scorer of the evaluation; ``label`` names its column (default: ``name``).

    Give a label when one scorer appears twice (e.g. ``channel`` with channel 0 and channel 1).
    """

    label: str | None = None

    @property
    def column(self) -> str:
        return self.label or self.name

    @model_validator(mode="after")
    def _check_column(self) -> "EvalScorerConfig":
        check_name(self.column, "scorer label")
        return self


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"{what} '{name}' may only hold letters, digits, '_', '-' and '.': rename it")
    return name


# ----------------------------------------------------------------------------------------------
# Models: the base and LoRAs on it


@dataclass(frozen=True)
class ModelSpec:
    """One evaluated model: the base (``lora=None``) or the base with a LoRA at ``scale``."""

    name: str
    lora: Path | None = None
    scale: float = 1.0


def producing_stage(name: str, path: str | Path) -> str:
    """The training stage that conventionally writes this LoRA (a guess from its name and path)."""
    text = f"{name} {path}".lower()
    for key, stage in _PRODUCERS:
        if key in text:
            return stage
    return "train_spo"


def model_specs(loras: Mapping[str, str | Path], scale: float = 1.0) -> list[ModelSpec]:
    """``[base, *loras]`` after checking every LoRA path exists or, for hub ids, downloading it (before any
    expensive work)."""
    specs = [ModelSpec(BASE)]
    for name, path in loras.items():
        check_name(name, "LoRA name")
        if name == BASE:
            raise EvaluationError(f"a LoRA may not be named '{BASE}' (the model without LoRA has that name): rename it")
        p = Path(path).expanduser()
        if not p.exists() and hub_lora_id(path) is not None:
            p = resolve_lora(path)  # a hub id: downloaded (or taken from the cache) now, or one clear error
        if not p.exists():
            stage = producing_stage(name, path)
            raise EvaluationError(
                f"LoRA '{name}' not found at '{path}'. It is written by the training stage '{stage}': run "
                f"`spo {stage.replace('_', '-')}` (or `dvc repro {stage}`) first, or give an existing LoRA directory or "
                f"released .safetensors file, diffusers or kohya format (loras.{name} in the evaluate config, --lora for "
                f"spo generate)."
            )
        specs.append(ModelSpec(name, p, scale))
    return specs


@contextlib.contextmanager
def use_model(policy: DiffusionPolicy, spec: ModelSpec, adapter_name: str = "eval") -> Iterator[None]:
    """Make ``policy`` behave as ``spec`` inside the block.

    A LoRA is loaded under ``adapter_name``, made the only active adapter with weight ``scale`` and
    deleted afterwards; the base runs with any adapters already on the denoiser disabled.
    """
    unet = policy.denoiser
    if spec.lora is None:
        if getattr(unet, "_hf_peft_config_loaded", False) and unet.peft_config:
            with adapters_disabled(policy):
                yield
        else:
            yield
        return
    load_lora(policy, spec.lora, adapter_name=adapter_name)
    try:
        unet.set_adapters([adapter_name], weights=[float(spec.scale)])
        yield
    finally:
        unet.delete_adapters([adapter_name])


def check_loras(policy: DiffusionPolicy, models: Sequence[ModelSpec]) -> None:
    """Load and drop every LoRA once before any image is made: one of the wrong architecture, or with
    NaN weights, fails in seconds instead of after the base model's whole evaluation."""
    for spec in models:
        if spec.lora is not None:
            with use_model(policy, spec, adapter_name="check"):
                pass


# ----------------------------------------------------------------------------------------------
# Items, generation and scoring


def image_seed(base_seed: int, prompt_idx: int, image_idx: int, images_per_prompt: int) -> int:
    """Seed of image ``image_idx`` of prompt ``prompt_idx``: ``base_seed + prompt_idx * N + image_idx``."""
    return int(base_seed) + int(prompt_idx) * int(images_per_prompt) + int(image_idx)


def item_table(prompts: Sequence[str], images_per_prompt: int = 1, seed: int = 0) -> pd.DataFrame:
    """One row per generated image (prompt-major): prompt, prompt_idx, image_idx, seed."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if not prompts:
        raise ValueError("no prompts to generate from: give at least one prompt")
    rows = [
        {"prompt": p, "prompt_idx": i, "image_idx": j, "seed": image_seed(seed, i, j, images_per_prompt)}
        for i, p in enumerate(prompts)
        for j in range(images_per_prompt)
    ]
    return pd.DataFrame(rows)


def image_filename(prompt_idx: int, image_idx: int, seed: int) -> str:
    return f"{int(prompt_idx):05d}_{int(image_idx):02d}_seed{int(seed)}.png"


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels: scores then equal those of the saved PNG files."""
    return (images.clamp(0, 1) * 255).round() / 255


def iter_images(policy: DiffusionPolicy, items: pd.DataFrame, sampler: EvalSamplerConfig, batch_size: int = 8,
                quantize: bool = True, desc: str = "generating") -> Iterator[tuple[pd.DataFrame, torch.Tensor]]:
    """Yield ``(rows, images)`` batches: images (B, 3, H, W) in [0, 1] on the policy's device, decoded once.

    Each image's noise comes from its own seed (``sample_images``), so the images do not depend on
    ``batch_size`` or on which other images share the batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        rows = items.iloc[start:start + batch_size]
        imgs = sample_images(policy, rows["prompt"].tolist(), rows["seed"].tolist(), num_steps=sampler.num_steps,
                             guidance_scale=sampler.guidance_scale, eta=sampler.eta, batch_size=batch_size)
        yield rows, (quantize_8bit(imgs) if quantize else imgs)


def save_images(images: torch.Tensor, rows: pd.DataFrame, out_dir: str | Path) -> list[str]:
    """Write one PNG per image (named by :func:`image_filename`) atomically; returns the file names."""
    out = Path(out_dir)
    names = []
    for img, (_, row) in zip(images, rows.iterrows()):
        name = image_filename(row["prompt_idx"], row["image_idx"], row["seed"])
        save_png_atomic(img.detach().float().cpu(), out / name)
        names.append(name)
    return names


def score_images(images: torch.Tensor, prompts: list[str], scorers: Mapping[str, Scorer],
                 batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Score the same decoded images with every scorer (in sub-batches); clean images have t = 0."""
    n = images.shape[0]
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    step = batch_size or n
    out: dict[str, np.ndarray] = {}
    for label, scorer in scorers.items():
        parts = []
        for s in range(0, n, step):
            sub = images[s:s + step]
            t = torch.zeros(sub.shape[0], dtype=torch.long, device=sub.device)
            with torch.no_grad():
                val = torch.as_tensor(scorer.score(sub, prompts[s:s + step], t))
            if val.shape != (sub.shape[0],):
                raise EvaluationError(
                    f"scorer '{label}' returned shape {tuple(val.shape)} for {sub.shape[0]} images: a scorer must return "
                    "one score per image, shape (B,)"
                )
            parts.append(val.detach().float().cpu().numpy())
        scores = np.concatenate(parts).astype(np.float64)
        if not np.all(np.isfinite(scores)):
            raise EvaluationError(f"scorer '{label}' returned non-finite scores (NaN/inf): check its weights and inputs")
        out[label] = scores
    return out


@dataclass
class EvaluationRun:
    """What :func:`evaluate_models` produced."""

    scores: pd.DataFrame  # model, prompt, prompt_idx, image_idx, seed, one column per scorer
    scorer_columns: list[str]
    models: list[str]
    grid_prompts: list[str]
    grid_images: dict[str, torch.Tensor] = field(default_factory=dict)  # model -> (G, 3, H, W) on CPU


def evaluate_models(
    policy: DiffusionPolicy,
    models: Sequence[ModelSpec],
    prompts: Sequence[str],
    scorers: Mapping[str, Scorer],
    images_per_prompt: int = 1,
    seed: int = 0,
    sampler: EvalSamplerConfig | None = None,
    batch_size: int = 8,
    score_batch_size: int | None = None,
    grid_prompts: int = 8,
    quantize: bool = True,
    image_dir: str | Path | None = None,
) -> EvaluationRun:
    """Generate and score ``images_per_prompt`` images per prompt for every model on the same seeds.

    ``image_dir``: also save every image as ``image_dir/<model>/<prompt_idx>_<image_idx>_seed<seed>.png``.
    """
    sampler = sampler or EvalSamplerConfig()
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names must be unique, got {names}")
    if not scorers:
        raise EvaluationError("no scorers given: configure at least one scorer")
    check_loras(policy, models)
    items = item_table(list(prompts), images_per_prompt, seed)
    n_grid = min(int(grid_prompts), len(prompts))
    frames, grid = [], {}
    for k, spec in enumerate(models):
        cols: dict[str, list[np.ndarray]] = {label: [] for label in scorers}
        tiles: dict[int, torch.Tensor] = {}
        with use_model(policy, spec, adapter_name=f"eval{k}"):
            for rows, imgs in iter_images(policy, items, sampler, batch_size, quantize, desc=f"evaluate {spec.name}"):
                for label, vals in score_images(imgs, rows["prompt"].tolist(), scorers, score_batch_size).items():
                    cols[label].append(vals)
                for pos, (_, row) in enumerate(rows.iterrows()):
                    if row["image_idx"] == 0 and row["prompt_idx"] < n_grid:
                        tiles[int(row["prompt_idx"])] = imgs[pos].detach().float().cpu()
                if image_dir is not None:
                    save_images(imgs, rows, Path(image_dir) / spec.name)
        frame = items.copy()
        frame.insert(0, "model", spec.name)
        for label in scorers:
            frame[label] = np.concatenate(cols[label])
        frames.append(frame)
        if n_grid:
            grid[spec.name] = torch.stack([tiles[i] for i in range(n_grid)])
        log.info("evaluated %s: %s", spec.name,
                 ", ".join(f"{c}={frame[c].mean():.4f}" for c in scorers))
    scores = pd.concat(frames, ignore_index=True)
    return EvaluationRun(scores, list(scorers), names, list(prompts[:n_grid]), grid)


def merge_runs(first: EvaluationRun, second: EvaluationRun | None) -> EvaluationRun:
    """Two runs on the same prompts and seeds as one (``first``'s models first)."""
    if second is None:
        return first
    if first.grid_prompts != second.grid_prompts or first.scorer_columns != second.scorer_columns:
        raise EvaluationError("cannot merge evaluations with different grid prompts or scorers")
    scores = pd.concat([first.scores, second.scores], ignore_index=True)
    return EvaluationRun(scores, first.scorer_columns, first.models + second.models, first.grid_prompts,
                         {**first.grid_images, **second.grid_images})


# ----------------------------------------------------------------------------------------------
# The base model's results, kept for reuse (stage evaluate_base)

BASE_FILES = {"scores": "scores.parquet", "grid": "grid_tiles.safetensors", "settings": "settings.json"}


def write_base_results(out_dir: str | Path, run: EvaluationRun, settings: dict) -> None:
    """Keep the base model's rows, grid tiles and the settings they were made with in ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / BASE_FILES["scores"]) as tmp:
        run.scores.to_parquet(tmp, index=False)
    # 8-bit tiles (the grid's images are 8-bit levels already when ``quantize`` is on)
    tiles = {BASE: (run.grid_images[BASE].clamp(0, 1) * 255).round().to(torch.uint8).contiguous()} \
        if BASE in run.grid_images else {}
    with atomic_path(out / BASE_FILES["grid"]) as tmp:
        save_file(tiles, str(tmp))
    record = {"settings": settings, "scorer_columns": run.scorer_columns, "grid_prompts": run.grid_prompts}
    write_text_atomic(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", out / BASE_FILES["settings"])


def read_base_results(base_dir: str | Path, settings: dict) -> tuple[EvaluationRun | None, str]:
    """The kept base results if they were made with exactly ``settings``; else ``(None, why not)``."""
    from safetensors.torch import load_file

    folder = Path(base_dir)
    if not all((folder / name).is_file() for name in BASE_FILES.values()):
        return None, f"no base results in '{folder}' (the stage evaluate_base writes them)"
    record = json.loads((folder / BASE_FILES["settings"]).read_text())
    kept = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if record.get("settings") != kept:
        differ = sorted(k for k in set(kept) | set(record.get("settings", {}))
                        if kept.get(k) != record.get("settings", {}).get(k))
        return None, f"the base results in '{folder}' were made with other settings ({', '.join(differ)})"
    scores = pd.read_parquet(folder / BASE_FILES["scores"])
    grid = {k: v.float() / 255 for k, v in load_file(str(folder / BASE_FILES["grid"])).items()}
    return EvaluationRun(scores, list(record["scorer_columns"]), [BASE], list(record["grid_prompts"]), grid), ""


# ----------------------------------------------------------------------------------------------
# Statistics


def summarize(scores: pd.DataFrame, scorer_columns: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Per (model, scorer): n, mean, std, t-interval (``stats.mean_ci``) and its half-width."""
    rows = []
    for model, g in scores.groupby("model", sort=False):
        for col in scorer_columns:
            x = g[col].to_numpy(dtype=np.float64)
            mean, lo, hi = mean_ci(x, level)
            rows.append({"model": model, "scorer": col, "n": len(x), "mean": mean, "std": float(x.std(ddof=1)),
                         "ci_low": lo, "ci_high": hi, "half_width": (hi - lo) / 2})
    return pd.DataFrame(rows)


def _aligned(scores: pd.DataFrame, model: str) -> pd.DataFrame:
    return scores[scores["model"] == model].set_index(ITEM_KEYS).sort_index()


def compare_to_base(scores: pd.DataFrame, scorer_columns: Sequence[str], base: str = BASE, level: float = 0.95,
                    n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each model against ``base`` per scorer, paired on (prompt_idx, image_idx).

    ``diff``: mean of model - base with its t interval (``stats.paired_diff_ci``); ``winrate``: share
    of items where the model scores higher (ties half) with a cluster-bootstrap interval over prompts
    (``stats.bootstrap_win_rate_ci`` with ``groups=prompt_idx``).
    """
    if base not in set(scores["model"]):
        raise EvaluationError(f"no '{base}' rows in the scores: the base model must be evaluated to compare against it")
    ref = _aligned(scores, base)
    rows = []
    for model in scores["model"].drop_duplicates():
        if model == base:
            continue
        cur = _aligned(scores, model)
        if not cur.index.equals(ref.index) or not np.array_equal(cur["seed"].to_numpy(), ref["seed"].to_numpy()):
            raise EvaluationError(
                f"model '{model}' and '{base}' were not scored on the same (prompt, image, seed) items: evaluate them "
                "in one run (same prompts, images_per_prompt and seed)"
            )
        groups = cur.index.get_level_values("prompt_idx").to_numpy()
        for col in scorer_columns:
            a, b = cur[col].to_numpy(np.float64), ref[col].to_numpy(np.float64)
            diff, dlo, dhi = paired_diff_ci(a, b, level)
            wr, wlo, whi = bootstrap_win_rate_ci(a, b, n_boot=n_boot, level=level, seed=seed, groups=groups)
            rows.append({"model": model, "scorer": col, "n_pairs": len(a), "n_prompts": len(np.unique(groups)),
                         "diff": diff, "diff_ci_low": dlo, "diff_ci_high": dhi,
                         "winrate": wr, "winrate_ci_low": wlo, "winrate_ci_high": whi})
    cols = ["model", "scorer", "n_pairs", "n_prompts", "diff", "diff_ci_low", "diff_ci_high",
            "winrate", "winrate_ci_low", "winrate_ci_high"]
    return pd.DataFrame(rows, columns=cols)


def flat_metrics(summary: pd.DataFrame, comparisons: pd.DataFrame) -> dict[str, float]:
    """``<model>/<scorer>/{mean,ci_low,ci_high}`` and, per non-base model, the comparison keys."""
    out: dict[str, float] = {}
    for r in summary.itertuples(index=False):
        key = f"{r.model}/{r.scorer}"
        out[f"{key}/mean"] = float(r.mean)
        out[f"{key}/ci_low"] = float(r.ci_low)
        out[f"{key}/ci_high"] = float(r.ci_high)
    for r in comparisons.itertuples(index=False):
        key = f"{r.model}/{r.scorer}"
        out[f"{key}/diff_vs_base"] = float(r.diff)
        out[f"{key}/diff_ci_low"] = float(r.diff_ci_low)
        out[f"{key}/diff_ci_high"] = float(r.diff_ci_high)
        out[f"{key}/winrate_vs_base"] = float(r.winrate)
        out[f"{key}/winrate_ci_low"] = float(r.winrate_ci_low)
        out[f"{key}/winrate_ci_high"] = float(r.winrate_ci_high)
    return out


# ----------------------------------------------------------------------------------------------
# Tables


def _decimals(half_width: float) -> int:
    """Decimals that show the half-width with two significant digits (2 to 6)."""
    if not math.isfinite(half_width) or half_width <= 0:
        return 4
    return int(min(6, max(2, 1 - math.floor(math.log10(half_width)))))


def format_mean_ci(mean: float, half_width: float, signed: bool = False) -> str:
    d = _decimals(half_width)
    sign = "+" if signed else ""
    return f"{mean:{sign}.{d}f} ± {half_width:.{d}f}"


def format_rate_ci(rate: float, lo: float, hi: float) -> str:
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}]"


def _pivot(df: pd.DataFrame, cell) -> pd.DataFrame:
    """Rows = models (first-seen order), columns = scorers (first-seen order), cells = cell(row)."""
    models = list(dict.fromkeys(df["model"]))
    scorers = list(dict.fromkeys(df["scorer"]))
    cells = {(r["model"], r["scorer"]): cell(r) for _, r in df.iterrows()}
    return pd.DataFrame([{"model": m, **{s: cells.get((m, s), "n/a") for s in scorers}} for m in models],
                        columns=["model", *scorers])


def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's Tables 1-2: rows = models, columns = scorers, cells ``mean ± CI half-width``."""
    return _pivot(summary, lambda r: format_mean_ci(r["mean"], r["half_width"]))


def winrate_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Rows = non-base models, columns = scorers, cells ``win-rate [CI low, CI high]``."""
    return _pivot(comparisons, lambda r: format_rate_ci(r["winrate"], r["winrate_ci_low"], r["winrate_ci_high"]))


def diff_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Rows = non-base models, columns = scorers, cells ``+diff ± CI half-width`` (model - base)."""
    return _pivot(comparisons, lambda r: format_mean_ci(r["diff"], (r["diff_ci_high"] - r["diff_ci_low"]) / 2, True))


def report_markdown(summary: pd.DataFrame, comparisons: pd.DataFrame, description: str = "",
                    level: float = 0.95, base: str = BASE) -> str:
    """``table.md``: the means table, then win-rates and paired differences against the base."""
    pct = f"{100 * level:g}%"
    parts = ["# Evaluation", ""]
    if description:
        parts += [description, ""]
    parts += [f"## Mean score ± {pct} CI half-width (Student t)", "", markdown_table(results_table(summary)).rstrip(), ""]
    if comparisons.empty:
        parts += [f"No model besides '{base}': nothing to compare.", ""]
    else:
        parts += [f"## Win-rate vs {base} [{pct} cluster-bootstrap CI over prompts; ties count half]", "",
                  markdown_table(winrate_table(comparisons)).rstrip(), "",
                  f"## Paired difference vs {base} (model - {base}, mean ± {pct} CI half-width)", "",
                  markdown_table(diff_table(comparisons)).rstrip(), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Image grid


def _resize_tiles(images: torch.Tensor, size: int | None) -> tuple[torch.Tensor, int]:
    """(images at a side near ``size``, integer nearest upscale for image_grid)."""
    side = images.shape[-1]
    if size is None or size == side:
        return images, 1
    if size > side and size % side == 0:
        return images, size // side  # crisp nearest-neighbour upscale of tiny images
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", antialias=size < side,
                                          align_corners=False)
    return out.reshape(*images.shape[:-2], size, size).clamp(0, 1), 1


def comparison_grid(grid_images: Mapping[str, torch.Tensor], prompts: Sequence[str],
                    image_size: int | None = 256) -> Image.Image:
    """Rows = prompts, columns = models (same seeds in every row), via ``reporting.image_grid``."""
    if not grid_images:
        raise EvaluationError("no grid images: set grid_prompts >= 1")
    models = list(grid_images)
    stacked = torch.stack([grid_images[m] for m in models], dim=1)  # (G, M, 3, H, W)
    if stacked.shape[0] != len(prompts):
        raise ValueError(f"{stacked.shape[0]} grid rows but {len(prompts)} prompts")
    tiles, scale = _resize_tiles(stacked, image_size)
    return image_grid(tiles, list(prompts), models, scale=scale)


# ----------------------------------------------------------------------------------------------
# Outputs

OUTPUT_FILES = {"scores": "scores.parquet", "summary": "summary.csv", "winrates": "winrates.csv",
                "table": "table.md", "grid": "grid.png"}


def write_outputs(out_dir: str | Path, scores: pd.DataFrame, summary: pd.DataFrame, comparisons: pd.DataFrame,
                  table_md: str, grid: Image.Image | None) -> dict[str, Path]:
    """Write the evaluation files (each atomically) into ``out_dir``; returns kind -> path."""
    out = Path(out_dir)
    paths = {k: out / v for k, v in OUTPUT_FILES.items()}
    with atomic_path(paths["scores"]) as tmp:
        scores.to_parquet(tmp, index=False)
    for kind, df in (("summary", summary), ("winrates", comparisons)):
        with atomic_path(paths[kind]) as tmp:
            df.to_csv(tmp, index=False)
    write_text_atomic(table_md, paths["table"])
    if grid is not None:
        save_png_atomic(grid, paths["grid"])
    else:
        paths.pop("grid")
    return paths
