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
      k4: {set: ["sampler.k=4"]}      # the same, long form
      d3po: {stage: train_d3po, set: []}   # long form: another training stage (method tables)
    columns: ["train_spo.final_loss", "evaluate.lora/brightness/mean"]   # optional; default all
    seeds: [0, 1]                     # optional: every variant trained once per seed (see below)

With ``seeds``, every variant becomes one run per seed, named ``<variant>.s<seed>`` (the override
``<seed_key>=<seed>``, default ``train.seed``, appended), and the report adds an across-seeds
summary (mean ± standard deviation over the seeds of each metric) per variant; the
expanded names are in ``seed_groups``. Use it where the differences between variants are small
next to the training noise.

Placeholders in ``set``: ``{out}`` is the variant's folder; ``{run}`` is the training run's folder
``<output_root>/runs/<stage>-<hash of its resolved config>``, so that variants of different tables
with the same configuration (e.g. the default SPO row of every ablation) train once: a finished
run (``done.json``) is reused, not retrained.

A ``compare`` step (instead of, or besides, per-variant ``evaluate``) evaluates the base model and
every variant's LoRA together, once, on the same prompts and seeds (paired differences against the
base), and the table then has one row per model:

    compare:
      stage: evaluate
      lora: "{run}/lora"              # each variant's LoRA
      set: ["output_dir={root}/compare"]   # {root} = <output_root>/<table>
    efficiency_reference: ddpo       # optional: compute each variant needs to reach this one's final reward
    contrasts: ["aware - plain"]     # optional: paired differences between variants (spo_core.contrasts),
                                     # over seeds and over prompts, in the report's "Contrasts" section

Each variant calls the same stage functions as DVC and Prefect do
(:func:`spo_core.stages.common.execute` with the stage's ``run``) inside its own MLflow run,
nested under one ablation run; the stage metrics of a variant go to ``{out}/metrics/``. How the
variants are scheduled (one after another, or as parallel Prefect tasks on leased GPUs) is the
caller's choice: :func:`run_ablation` takes a ``map_variants`` function.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from . import tracking
from .config import ConfigError, Strict, load_section, validate_section
from .reporting import markdown_table, write_text_atomic
from .utils import atomic_file, scoped_env

log = logging.getLogger(__name__)

__all__ = [
    "AblationSpec", "StageStep", "available_specs", "build_table", "load_spec", "run_ablation", "run_sequential",
    "run_variant", "stage_entry", "step_overrides", "variant_dir", "variant_plan", "write_report",
]

SPEC_DIR = Path(__file__).parent / "ablations"
OUT = "{out}"  # placeholder for the variant's output folder in StageStep.set
RUN = "{run}"  # placeholder for the (shared, config-addressed) training run folder
ROOT = "{root}"  # placeholder for the table's folder (compare step)
DONE = "done.json"  # a finished training run: its stage metrics
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

MapVariants = Callable[["AblationSpec", list[str], "str | None"], dict[str, dict[str, float]]]


def _long_form(variants: Any) -> Any:
    """``name: [overrides]`` is short for ``name: {set: [overrides]}``."""
    if isinstance(variants, dict):
        return {k: {"set": x} if isinstance(x, list) else x for k, x in variants.items()}
    return variants


class StageStep(Strict):
    stage: str  # stage module spo_core.stages.<stage> and its params section
    set: list[str] = Field(default_factory=list)  # overrides for every variant; "{out}" -> the variant folder


class Variant(Strict):
    stage: str | None = None  # the training stage; None: the spec's train.stage
    set: list[str] = Field(default_factory=list)  # overrides of that stage's section


class CompareStep(Strict):
    stage: str = "evaluate"
    lora: str = "{run}/lora"  # where each variant's LoRA is ("{run}", "{out}" filled in per variant)
    set: list[str] = Field(default_factory=list)  # "{root}" -> <output_root>/<table>


class AblationSpec(Strict):
    table: str = Field(pattern=_NAME)
    description: str = ""
    paper: str = ""  # the paper's numbers for this table (markdown), printed beside ours in the report
    params: str = "params.yaml"
    train: StageStep = StageStep(stage="train_spo", set=["train.output_dir={out}/train"])
    evaluate: StageStep | None = None
    compare: CompareStep | None = None
    variants: dict[str, Variant] = Field(min_length=1)
    columns: list[str] | None = None  # table columns (as in the default table); None: every metric
    efficiency_reference: str | None = None  # a variant: compute each needs to reach its final reward
    contrasts: list[str] = Field(default_factory=list)  # "A - B": paired differences (needs compare)
    seeds: list[int] | None = Field(default=None, min_length=1)  # expanded into <variant>.s<seed> at validation
    seed_key: str = "train.seed"  # the training stages' seed setting
    seed_groups: dict[str, list[str]] = Field(default_factory=dict)  # derived from seeds: variant -> its runs
    output_root: str = "artifacts/ablations"
    report_dir: str = "reports"

    @field_validator("variants", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return _long_form(v)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        import re

        bad = [n for n in v if not re.match(_NAME, n)]
        if bad:
            raise ValueError(f"variant names {bad} must be letters, digits, '_', '.', '-' (they name folders and runs)")
        if "base" in v:
            raise ValueError("no variant may be named 'base': that is the model without LoRA in compare tables")
        return v

    @model_validator(mode="before")
    @classmethod
    def _expand_seeds(cls, data: Any) -> Any:
        """``seeds`` -> one variant per (variant, seed); ``seeds`` becomes None and ``seed_groups``
        records the expansion, so that validating a dumped spec again does not expand twice."""
        if not isinstance(data, dict) or data.get("seeds") is None:
            return data
        seeds, variants = data["seeds"], data.get("variants")
        if data.get("seed_groups"):
            raise ValueError("set 'seeds' (seed_groups is derived from it), not both")
        if not isinstance(seeds, list) or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) for x in seeds):
            raise ValueError(f"seeds must be a list of distinct integers, got {seeds!r}")
        if not isinstance(variants, dict):
            return data  # the field validators report the problem
        key = data.get("seed_key", "train.seed")
        expanded: dict[str, Any] = {}
        groups: dict[str, list[str]] = {}
        for name, v in _long_form(variants).items():
            v = v.model_dump() if isinstance(v, BaseModel) else v
            if not isinstance(v, dict):
                expanded[name] = v  # the field validators report the problem
                continue
            overrides = list(v.get("set") or [])
            if any(_key(o) == key for o in overrides):
                raise ValueError(f"variant '{name}' sets {key}, which 'seeds' sets per run: drop one of them")
            groups[name] = []
            for seed in seeds:
                run = f"{name}.s{seed}"
                expanded[run] = {**v, "set": [*overrides, f"{key}={seed}"]}
                groups[name].append(run)
        return {**data, "variants": expanded, "seeds": None, "seed_groups": groups}

    @model_validator(mode="after")
    def _reference_known(self) -> "AblationSpec":
        ref = self.efficiency_reference
        if ref is not None and ref not in self.variants and ref not in self.seed_groups:
            raise ValueError(f"efficiency_reference '{ref}' is not a variant: "
                             f"choose one of {sorted(self.seed_groups or self.variants)}")
        return self

    @model_validator(mode="after")
    def _contrasts_known(self) -> "AblationSpec":
        from .contrasts import parse_contrast

        if self.contrasts and self.compare is None:
            raise ValueError("'contrasts' need a 'compare' step (the joint evaluation they pair): add one or drop them")
        names = set(self.seed_groups or self.variants)
        for text in self.contrasts:
            unknown = [n for n in parse_contrast(text) if n not in names]
            if unknown:
                raise ValueError(f"contrast {text!r} names {unknown}, not variants: choose from {sorted(names)}")
        return self

    def seed_values(self) -> list[int]:
        """The seeds a seed-expanded spec was expanded with (from the run names)."""
        runs = next(iter(self.seed_groups.values()), [])
        return [int(r.rsplit(".s", 1)[1]) for r in runs]

    def runs_of(self, name: str) -> list[str]:
        """The variants a (seed-expanded) variant name stands for."""
        return self.seed_groups.get(name, [name])

    def train_stage(self, variant: str) -> str:
        return self.variants[variant].stage or self.train.stage

    def overrides(self, variant: str) -> str:
        v = self.variants[variant]
        return " ".join(([f"stage={v.stage}"] if v.stage else []) + v.set)

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


def stage_section(stage: str) -> str:
    """The params section ``spo_core.stages.<stage>`` reads: its ``SECTION``, else its own name
    (``evaluate_base`` reads ``evaluate``)."""
    return getattr(importlib.import_module(f"spo_core.stages.{stage}"), "SECTION", stage)


def variant_dir(spec: AblationSpec, variant: str) -> Path:
    return Path(spec.output_root) / spec.table / variant


def table_dir(spec: AblationSpec) -> Path:
    return Path(spec.output_root) / spec.table


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _fill(text: str, out: Path, run: Path | None = None, root: Path | None = None) -> str:
    text = text.replace(OUT, out.as_posix())
    if run is not None:
        text = text.replace(RUN, run.as_posix())
    return text.replace(ROOT, root.as_posix()) if root is not None else text


def _wires_a_path(text: str) -> bool:
    return any(p in text for p in (OUT, RUN, ROOT))


def step_overrides(step: StageStep, out: Path, variant: list[str] | None = None, run: Path | None = None) -> list[str]:
    """The step's settings, the variant's own overrides, then the step's output wiring.

    Settings without a placeholder (e.g. ``train.rounds=30`` for every variant) come first, so a
    variant may change them; wiring with ``{out}``/``{run}``/``{root}`` comes last, and a variant may
    not set those keys (its outputs would collide with another variant's).
    """
    variant = list(variant or [])
    settings = [s for s in step.set if not _wires_a_path(s)]
    wiring = [_fill(s, out, run) for s in step.set if _wires_a_path(s)]
    clash = sorted({_key(v) for v in variant} & {_key(w) for w in wiring})
    if clash:
        raise ConfigError(f"variant overrides set {clash}, which the ablation spec wires per variant: "
                          f"drop them from the variant")
    return settings + variant + wiring


def _input_fingerprint(value: Any, digest: Any, skip: tuple[str, ...]) -> None:
    """Fold (path, size, mtime) of every existing file a config names into ``digest``, so that a
    retrained input (a new base model, new prompts) never lets a stale training run be reused.
    Paths starting with ``skip`` (the variant's own outputs) are left out."""
    if isinstance(value, dict):
        for v in value.values():
            _input_fingerprint(v, digest, skip)
    elif isinstance(value, list):
        for v in value:
            _input_fingerprint(v, digest, skip)
    elif (isinstance(value, str) and value and len(value) < 1000 and not value.startswith(skip)
          and Path(value).exists()):
        p = Path(value)
        for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
            st = f.stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())


def run_dir(spec: AblationSpec, variant: str) -> Path:
    """``<output_root>/runs/<stage>-<hash>``: the training run's folder, addressed by its resolved
    configuration and its inputs' fingerprint, so equal configurations share one run."""
    import hashlib

    stage = spec.train_stage(variant)
    placeholder = Path("RUN_PLACEHOLDER")
    overrides = step_overrides(spec.train, variant_dir(spec, variant), spec.variants[variant].set, placeholder)
    cfg_cls, _ = stage_entry(stage)
    cfg = load_section(spec.params, stage, cfg_cls, overrides)
    dump = cfg.model_dump(mode="json")
    # The variant's own folder ({out}) must not split otherwise equal runs.
    out = variant_dir(spec, variant).as_posix()
    text = json.dumps(dump, sort_keys=True).replace(out, "@out@")
    digest = hashlib.sha256(f"{stage}\n{text}".encode())
    _input_fingerprint(dump, digest, (out, placeholder.as_posix()))
    return Path(spec.output_root) / "runs" / f"{stage}-{digest.hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------
# Running


def _uses_run(spec: AblationSpec) -> bool:
    texts = [*spec.train.set, *(spec.evaluate.set if spec.evaluate else []),
             *([spec.compare.lora, *spec.compare.set] if spec.compare else [])]
    return any(RUN in t for t in texts)


def variant_plan(spec: AblationSpec, variant: str) -> list[tuple[str, BaseModel, Callable[[Any], dict]]]:
    """``(stage, validated config, run)`` per step of one variant: bad overrides fail here, before any run."""
    if variant not in spec.variants:
        raise ConfigError(f"ablation '{spec.table}' has no variant '{variant}': choose one of {sorted(spec.variants)}")
    out = variant_dir(spec, variant)
    run = run_dir(spec, variant) if _uses_run(spec) else None
    plan = []
    for i, step in enumerate(spec.steps):
        stage = spec.train_stage(variant) if i == 0 else step.stage
        overrides = step_overrides(step, out, spec.variants[variant].set if i == 0 else None, run)
        cfg_cls, run_fn = stage_entry(stage)
        plan.append((stage, load_section(spec.params, stage, cfg_cls, overrides), run_fn))
    return plan


def run_variant(spec: AblationSpec, variant: str, parent_run_id: str | None = None) -> dict[str, float]:
    """Run the spec's stages for one variant; return its metrics as ``<stage>.<metric>``.

    Stage metrics files go to ``<variant dir>/metrics``; the MLflow runs are ``<variant>`` (nested
    under ``parent_run_id``) with one child per stage. With ``{run}`` wiring a finished training run
    of the same configuration is reused (tag ``reused``). Safe in a worker process; not in parallel
    threads of one process (the environment and the global RNGs are per process).
    """
    from .stages.common import execute

    plan = variant_plan(spec, variant)
    out = variant_dir(spec, variant)
    shared = run_dir(spec, variant) if _uses_run(spec) else None
    done = shared / DONE if shared is not None else None
    reused = done is not None and done.is_file()
    tags = {"stage": "ablation_variant", "ablation": spec.table, "variant": variant, "reused": str(reused).lower(),
            "host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if shared is not None:
        tags["run_dir"] = shared.as_posix()
    row: dict[str, float] = {}
    with tracking.stage_run(variant, params={"overrides": spec.overrides(variant)},
                            nested_parent=parent_run_id, tags=tags,
                            system_metrics=False) as run:
        with scoped_env(SPO_METRICS_DIR=str(out / "metrics"), SPO_PARENT_RUN_ID=run.info.run_id if run else None,
                         SPO_RUN_LABEL=f"{spec.table} {variant}"):  # stage runs named `train_spo [toy_k k2]`
            for i, (stage, cfg, run_fn) in enumerate(plan):
                if i == 0 and reused:
                    log.info("ablation %s, variant %s: reusing the finished run %s", spec.table, variant, shared)
                    metrics = json.loads(done.read_text())
                else:
                    log.info("ablation %s, variant %s: stage %s", spec.table, variant, stage)
                    metrics = execute(stage, cfg, run_fn)
                    if i == 0 and done is not None:
                        with atomic_file(done, "w") as fh:
                            json.dump(metrics, fh, indent=1, default=float)
                row.update({f"{stage}.{k}": v for k, v in metrics.items()})
        tracking.log_metrics(row)
    return row


def run_sequential(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    """The plain scheduler: the variants one after another in this process."""
    return {v: run_variant(spec, v, parent_run_id) for v in variants}


def compare_plan(spec: AblationSpec, variants: list[str]) -> tuple[str, BaseModel, Callable[[Any], dict]]:
    """The joint evaluation of the base and every variant's LoRA (same prompts and seeds)."""
    import yaml

    assert spec.compare is not None
    root = table_dir(spec)
    loras = {}
    for v in variants:
        run = run_dir(spec, v) if RUN in spec.compare.lora else None
        loras[v] = _fill(spec.compare.lora, variant_dir(spec, v), run, root)
    overrides = [_fill(s, root, None, root) for s in spec.compare.set]
    overrides.append("loras=" + yaml.safe_dump(loras, default_flow_style=True).strip())
    cfg_cls, run_fn = stage_entry(spec.compare.stage)
    return spec.compare.stage, load_section(spec.params, spec.compare.stage, cfg_cls, overrides), run_fn


def run_compare(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, float]:
    from .stages.common import execute

    stage, cfg, run_fn = compare_plan(spec, variants)
    with tracking.stage_run("compare", params={"variants": " ".join(variants)}, nested_parent=parent_run_id,
                            tags={"stage": "ablation_compare", "ablation": spec.table}, system_metrics=False) as run:
        with scoped_env(SPO_METRICS_DIR=str(table_dir(spec) / "metrics"),
                         SPO_PARENT_RUN_ID=run.info.run_id if run else None):
            return execute(stage, cfg, run_fn)


def _select(spec: AblationSpec, df: pd.DataFrame, fixed: list[str]) -> pd.DataFrame:
    if spec.columns is None:
        return df
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        have = sorted(c for c in df.columns if c not in fixed)
        raise ConfigError(f"ablation '{spec.table}': columns {missing} are not among the metrics {have}: "
                          "fix 'columns' in the spec")
    return df[[*fixed, *spec.columns]]


def build_table(spec: AblationSpec, rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per variant (in spec order): ``variant``, ``overrides``, then the metric columns."""
    records = [{"variant": v, "overrides": spec.overrides(v), **rows[v]} for v in spec.variants if v in rows]
    return _select(spec, pd.DataFrame.from_records(records), ["variant", "overrides"])


def build_compare_table(spec: AblationSpec, rows: dict[str, dict[str, float]], compared: dict[str, float],
                        extra: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per model (``base``, then the variants): the compare step's ``<scorer>/<statistic>``
    and the variant's training metrics as ``train.<metric>`` (the stage name dropped, so methods
    with different training stages share columns); ``extra`` adds columns per variant."""
    records = []
    for model in ["base", *[v for v in spec.variants if v in rows]]:
        rec: dict[str, Any] = {"variant": model, "overrides": "" if model == "base" else spec.overrides(model)}
        prefix = f"{model}/"
        rec.update({k[len(prefix):]: v for k, v in compared.items() if k.startswith(prefix)})
        if model != "base":
            stage = spec.train_stage(model)
            rec.update({f"train.{k[len(stage) + 1:]}": v for k, v in rows[model].items() if k.startswith(stage + ".")})
            rec.update((extra or {}).get(model, {}))
        records.append(rec)
    return _select(spec, pd.DataFrame.from_records(records), ["variant", "overrides"])


def seed_summary(spec: AblationSpec, df: pd.DataFrame) -> pd.DataFrame | None:
    """Per seed-expanded variant: ``mean ± sd`` over its seeds of every numeric column (confidence
    bounds left out: they do not average); None for a spec without seeds."""
    if not spec.seed_groups:
        return None
    metrics = [c for c in df.columns if c not in ("variant", "overrides") and pd.api.types.is_numeric_dtype(df[c])
               and not c.endswith(("ci_low", "ci_high"))]
    records = []
    for name, runs in spec.seed_groups.items():
        part = df[df["variant"].isin(runs)]
        if part.empty:
            continue
        rec: dict[str, Any] = {"variant": name, "seeds": len(part)}
        for c in metrics:
            x = part[c].dropna()
            rec[c] = "" if x.empty else (f"{x.mean():.4g} ± {x.std(ddof=1):.2g}" if len(x) > 1 else f"{x.mean():.4g}")
        records.append(rec)
    return pd.DataFrame.from_records(records) if records else None


def contrasts_of(spec: AblationSpec, scores_path: Path, names: list[str]) -> pd.DataFrame:
    """The spec's contrasts on the joint evaluation's item scores (only the variants that ran)."""
    from .contrasts import COLUMNS, contrast_table, parse_contrast
    from .evaluation import ITEM_KEYS

    wanted = [c for c in spec.contrasts if all(r in names for v in parse_contrast(c) for r in spec.runs_of(v))]
    if not wanted:
        return pd.DataFrame(columns=COLUMNS)
    scores = pd.read_parquet(scores_path)
    columns = [c for c in scores.columns if c not in (*ITEM_KEYS, "seed") and pd.api.types.is_numeric_dtype(scores[c])]
    return contrast_table(scores, wanted, spec.runs_of, columns)


def contrast_section(table: pd.DataFrame) -> str:
    def ci(lo: float, hi: float) -> str:
        return "n/a" if pd.isna(lo) else f"[{lo:+.4f}, {hi:+.4f}]"

    shown = pd.DataFrame({
        "contrast": table["contrast"], "scorer": table["scorer"], "seeds": table["seeds"], "prompts": table["prompts"],
        "diff": [f"{d:+.4f}" for d in table["diff"]],
        "95% CI over seeds": [ci(lo, hi) for lo, hi in zip(table["seeds_ci_low"], table["seeds_ci_high"])],
        "95% CI over prompts": [ci(lo, hi) for lo, hi in zip(table["prompts_ci_low"], table["prompts_ci_high"])],
        "both exclude 0": ["yes" if x else "no" for x in table["excludes_zero"]],
    })
    return ("## Contrasts (A - B, paired by seed and by item; `spo_core/contrasts.py`)\n\n"
            "The interval over seeds is Student t over the per-seed mean differences; the one over prompts is "
            "Student t over each prompt's difference averaged over its images and the seeds.\n\n"
            + (markdown_table(shown) if len(shown) else "No contrast had all its runs in this invocation.\n"))


def write_report(spec: AblationSpec, df: pd.DataFrame, sections: list[str] | None = None) -> Path:
    """``<report_dir>/<table>.md``: a title, what was varied, the table, extra sections, the paper's numbers."""
    stages = " + ".join(sorted({spec.train_stage(v) for v in spec.variants}) + [s.stage for s in spec.steps[1:]]
                        + ([f"{spec.compare.stage} (joint)"] if spec.compare else []))
    text = (f"# Ablation: {spec.table}\n\n" + (f"{spec.description.strip()}\n\n" if spec.description.strip() else "")
            + f"Stages: {stages}; base parameters: `{spec.params}`; outputs under `{table_dir(spec)}`.\n\n"
            + markdown_table(df))
    for section in sections or []:
        text += "\n" + section.strip() + "\n"
    if spec.paper.strip():
        text += "\n## The paper's numbers\n\n" + spec.paper.strip() + "\n"
    return write_text_atomic(text, Path(spec.report_dir) / f"{spec.table}.md")


def run_ablation(spec: AblationSpec, map_variants: MapVariants = run_sequential,
                 variants: list[str] | None = None) -> pd.DataFrame:
    """Run the variants (all, or the named ones) under one MLflow run; log and write the table."""
    from .efficiency import efficiency

    names = list(spec.variants) if variants is None else [r for v in variants for r in spec.runs_of(v)]
    unknown = [v for v in names if v not in spec.variants]
    if unknown:
        raise ConfigError(f"ablation '{spec.table}' has no variants {unknown}: choose from {sorted(spec.variants)}")
    for v in names:  # a bad override or a missing section fails before anything runs
        variant_plan(spec, v)
    compare_md = None
    if spec.compare is not None:
        compare_md = Path(compare_plan(spec, names)[1].output_dir) / "table.md"
    tags = {"stage": "ablation", "ablation": spec.table}
    with tracking.stage_run(f"ablation-{spec.table}", params=spec.model_dump(mode="json"), tags=tags,
                            system_metrics=False) as run:
        parent = run.info.run_id if run else None
        rows = map_variants(spec, names, parent)
        sections: list[str] = []
        if compare_md is None:
            df = build_table(spec, rows)
        else:
            compared = run_compare(spec, names, parent)
            eff = efficiency(spec, names, rows)
            df = build_compare_table(spec, rows, compared, eff.columns)
            if compare_md.is_file():
                sections.append("## Evaluation (paired: the same prompts and seeds for every model)\n\n"
                                + compare_md.read_text())
            sections.extend(eff.sections)
            if spec.contrasts:
                table = contrasts_of(spec, compare_md.parent / "scores.parquet", names)
                sections.append(contrast_section(table))
                tracking.log_table(table, f"{spec.table}_contrasts")
            for image in eff.images:
                tracking.log_artifact(image)
        summary = seed_summary(spec, df)
        if summary is not None:
            sections.insert(0, f"## Across seeds (mean ± standard deviation over the seeds {spec.seed_values()})\n\n"
                            "Each variant trained once per seed (the rows `<variant>.s<seed>` above).\n\n"
                            + markdown_table(summary))
            tracking.log_table(summary, f"{spec.table}_seeds")
        path = write_report(spec, df, sections)
        tracking.log_table(df, spec.table)
        tracking.log_artifact(path)
    log.info("ablation %s written to %s\n%s", spec.table, path, markdown_table(df))
    return df
