"""Ablation tables: one training stage run per variant (plus an optional evaluation), one table.

An ablation is data (:class:`AblationSpec`, YAML under ``spo_core/ablations/`` or any file):

    table: k                          # reports/k.md, MLflow table k.json
    params: params.yaml               # params file or profile holding the stage sections
    train:                            # the stage the variants change
      stage: train_spo
      set: ["train.output_dir={out}/train"]     # wiring; {out} = artifacts/ablations/<table>/<variant>
    evaluate:                         # optional, the same for every variant
      stage: evaluate
      set: ["loras={lora: '{out}/train/lora'}", "output_dir={out}/eval"]
    variants:                         # name -> overrides of the train stage's section
      k2: ["sampler.k=2"]
      k4: ["sampler.k=4"]
    columns: ["train_spo.final_loss", "evaluate.lora/brightness/mean"]   # optional; default all

Each variant calls the same stage functions as DVC and Prefect do
(:func:`spo_core.stages.common.execute` with the stage's ``run``) inside its own MLflow run,
nested under one ablation run; the stage metrics of a variant go to ``{out}/metrics/``. How the
variants are scheduled (one after another, or as parallel Prefect tasks on GPU slots) is the
caller's choice: :func:`run_ablation` takes a ``map_variants`` function.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field, field_validator

from . import tracking
from .config import ConfigError, Strict, load_section, validate_section
from .reporting import markdown_table, write_text_atomic

log = logging.getLogger(__name__)

__all__ = [
    "AblationSpec", "StageStep", "available_specs", "build_table", "load_spec", "run_ablation", "run_sequential",
    "run_variant", "stage_entry", "step_overrides", "variant_dir", "variant_plan", "write_report",
]

SPEC_DIR = Path(__file__).parent / "ablations"
OUT = "{out}"  # placeholder for the variant's output folder in StageStep.set
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

MapVariants = Callable[["AblationSpec", list[str], "str | None"], dict[str, dict[str, float]]]


class StageStep(Strict):
    stage: str  # stage module spo_core.stages.<stage> and its params section
    set: list[str] = Field(default_factory=list)  # overrides for every variant; "{out}" -> the variant folder


class AblationSpec(Strict):
    table: str = Field(pattern=_NAME)
    description: str = ""
    params: str = "params.yaml"
    train: StageStep = StageStep(stage="train_spo", set=["train.output_dir={out}/train"])
    evaluate: StageStep | None = None
    variants: dict[str, list[str]] = Field(min_length=1)
    columns: list[str] | None = None  # table columns (as in the default table); None: every metric
    output_root: str = "artifacts/ablations"
    report_dir: str = "reports"

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        import re

        bad = [n for n in v if not re.match(_NAME, n)]
        if bad:
            raise ValueError(f"variant names {bad} must be letters, digits, '_', '.', '-' (they name folders and runs)")
        return v

    @property
    def steps(self) -> list[StageStep]:
        return [self.train] + ([self.evaluate] if self.evaluate else [])


# ----------------------------------------------------------------------------------------------
# Loading


def available_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(spec: str | os.PathLike) -> AblationSpec:
    """An :class:`AblationSpec` from a YAML path or the name of a packaged spec (``spo_core/ablations``)."""
    import yaml

    path = Path(spec)
    if not path.suffix:
        path = SPEC_DIR / f"{spec}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown ablation '{spec}': choose one of {available_specs()} or pass a YAML file path")
    if not path.exists():
        raise ConfigError(f"ablation spec '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"ablation spec '{path}' is not valid YAML: {exc}") from exc
    return validate_section(AblationSpec, data, f"ablation spec '{path}'")


def stage_entry(stage: str) -> tuple[type[BaseModel], Callable[[Any], dict]]:
    """The config class and ``run`` function of ``spo_core.stages.<stage>``."""
    module = f"spo_core.stages.{stage}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ConfigError(f"no stage module {module}: check the stage name in the ablation spec") from None
        raise
    run = getattr(mod, "run", None)
    if run is None:
        raise ConfigError(f"{module} has no run(cfg) function")
    cfg_cls = getattr(mod, "CONFIG", None) or typing.get_type_hints(run).get("cfg")
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, BaseModel)):
        raise ConfigError(f"{module}.run has no config class: annotate run(cfg: <ConfigClass>) or set CONFIG")
    return cfg_cls, run


def variant_dir(spec: AblationSpec, variant: str) -> Path:
    return Path(spec.output_root) / spec.table / variant


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def step_overrides(step: StageStep, out: Path, variant: list[str] | None = None) -> list[str]:
    """The variant's own overrides, then the step's wiring with ``{out}`` filled in.

    A variant may not set a key the wiring sets (its outputs would collide with another variant's).
    """
    variant = list(variant or [])
    wiring = [s.replace(OUT, out.as_posix()) for s in step.set]
    clash = sorted({_key(v) for v in variant} & {_key(w) for w in wiring})
    if clash:
        raise ConfigError(f"variant overrides set {clash}, which the ablation spec wires per variant: "
                          f"drop them from the variant")
    return variant + wiring


# ----------------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def _scoped_env(**values: str | None) -> Iterator[None]:
    """Set (or with None, unset) environment variables for the block; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variant_plan(spec: AblationSpec, variant: str) -> list[tuple[str, BaseModel, Callable[[Any], dict]]]:
    """``(stage, validated config, run)`` per step of one variant: bad overrides fail here, before any run."""
    if variant not in spec.variants:
        raise ConfigError(f"ablation '{spec.table}' has no variant '{variant}': choose one of {sorted(spec.variants)}")
    out = variant_dir(spec, variant)
    plan = []
    for i, step in enumerate(spec.steps):
        overrides = step_overrides(step, out, spec.variants[variant] if i == 0 else None)
        cfg_cls, run = stage_entry(step.stage)
        plan.append((step.stage, load_section(spec.params, step.stage, cfg_cls, overrides), run))
    return plan


def run_variant(spec: AblationSpec, variant: str, parent_run_id: str | None = None) -> dict[str, float]:
    """Run the spec's stages for one variant; return its metrics as ``<stage>.<metric>``.

    Stage metrics files go to ``<variant dir>/metrics``; the MLflow runs are ``<variant>`` (nested
    under ``parent_run_id``) with one child per stage. Safe in a worker process; not in parallel
    threads of one process (the environment and the global RNGs are per process).
    """
    from .stages.common import execute

    plan = variant_plan(spec, variant)
    out = variant_dir(spec, variant)
    tags = {"stage": "ablation_variant", "ablation": spec.table, "variant": variant}
    row: dict[str, float] = {}
    with tracking.stage_run(variant, params={"overrides": " ".join(spec.variants[variant])},
                            nested_parent=parent_run_id, tags=tags) as run:
        with _scoped_env(SPO_METRICS_DIR=str(out / "metrics"), SPO_PARENT_RUN_ID=run.info.run_id if run else None):
            for stage, cfg, run_fn in plan:
                log.info("ablation %s, variant %s: stage %s", spec.table, variant, stage)
                metrics = execute(stage, cfg, run_fn)
                row.update({f"{stage}.{k}": v for k, v in metrics.items()})
        tracking.log_metrics(row)
    return row


def run_sequential(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    """The plain scheduler: the variants one after another in this process."""
    return {v: run_variant(spec, v, parent_run_id) for v in variants}


def build_table(spec: AblationSpec, rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per variant (in spec order): ``variant``, ``overrides``, then the metric columns."""
    records = [{"variant": v, "overrides": " ".join(spec.variants[v]), **rows[v]} for v in spec.variants if v in rows]
    df = pd.DataFrame.from_records(records)
    if spec.columns is not None:
        missing = [c for c in spec.columns if c not in df.columns]
        if missing:
            have = sorted(c for c in df.columns if c not in ("variant", "overrides"))
            raise ConfigError(f"ablation '{spec.table}': columns {missing} are not among the metrics {have}: "
                              "fix 'columns' in the spec")
        df = df[["variant", "overrides", *spec.columns]]
    return df


def write_report(spec: AblationSpec, df: pd.DataFrame) -> Path:
    """``<report_dir>/<table>.md``: a title, what was varied, and the table."""
    stages = " + ".join(s.stage for s in spec.steps)
    text = (f"# Ablation: {spec.table}\n\n" + (f"{spec.description.strip()}\n\n" if spec.description.strip() else "")
            + f"Stages: {stages}; base parameters: `{spec.params}` (section `{spec.train.stage}`); "
            f"outputs under `{Path(spec.output_root) / spec.table}`.\n\n" + markdown_table(df))
    return write_text_atomic(text, Path(spec.report_dir) / f"{spec.table}.md")


def run_ablation(spec: AblationSpec, map_variants: MapVariants = run_sequential,
                 variants: list[str] | None = None) -> pd.DataFrame:
    """Run the variants (all, or the named ones) under one MLflow run; log and write the table."""
    names = list(spec.variants) if variants is None else list(variants)
    unknown = [v for v in names if v not in spec.variants]
    if unknown:
        raise ConfigError(f"ablation '{spec.table}' has no variants {unknown}: choose from {sorted(spec.variants)}")
    for v in names:  # a bad override or a missing section fails before anything runs
        variant_plan(spec, v)
    tags = {"stage": "ablation", "ablation": spec.table}
    with tracking.stage_run(f"ablation-{spec.table}", params=spec.model_dump(mode="json"), tags=tags) as run:
        rows = map_variants(spec, names, run.info.run_id if run else None)
        df = build_table(spec, rows)
        path = write_report(spec, df)
        tracking.log_table(df, spec.table)
        tracking.log_artifact(path)
    log.info("ablation %s written to %s\n%s", spec.table, path, markdown_table(df))
    return df
