"""What every stage entrypoint shares: argument parsing, config loading, metrics, tracking.

A stage is a plain function ``run(cfg) -> dict`` (metrics) in ``spo_core/stages/<name>.py``.
DVC calls ``python -m spo_core.stages.<name>``, Prefect tasks and tests call :func:`execute`;
no caller re-implements any of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from .. import tracking
from ..config import ConfigError, load_section
from ..utils import atomic_dir, atomic_file

log = logging.getLogger(__name__)

DEFAULT_PARAMS = "params.yaml"


def metrics_path(stage: str) -> Path:
    return Path(os.environ.get("SPO_METRICS_DIR", "metrics")) / f"{stage}.json"


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    path = metrics_path(stage)
    with atomic_file(path, "w") as fh:
        json.dump(metrics, fh, indent=2, sort_keys=True, default=float)
        fh.write("\n")
    return path


def is_main_process() -> bool:
    """False in the non-zero ranks of a torchrun / accelerate launch: they neither track nor write."""
    return int(os.environ.get("RANK", "0")) == 0


SKIPPED_MARKER = "SKIPPED.txt"


def skip_stage(stage: str, cfg: BaseModel) -> dict[str, Any]:
    """A stage the active profile turns off (``enabled: false``, e.g. the toy world under sd15):
    its output is a marker file (replacing whatever was there), so DVC's graph stays the same for
    every profile."""
    out = Path(cfg.output_dir)
    with atomic_dir(out) as tmp:
        (tmp / SKIPPED_MARKER).write_text(f"stage '{stage}' is disabled by the active profile (enabled: false)\n")
    metrics = {"skipped": 1}
    write_metrics(stage, metrics)
    log.info("stage %s is disabled by the profile: wrote %s", stage, out / SKIPPED_MARKER)
    return metrics


def execute(stage: str, cfg: BaseModel, run_fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run_fn(cfg)`` inside an MLflow stage run; write ``metrics/<stage>.json``."""
    if getattr(cfg, "enabled", True) is False:
        return skip_stage(stage, cfg) if is_main_process() else {}
    t0 = time.perf_counter()
    if not is_main_process():
        return dict(run_fn(cfg) or {})
    with tracking.stage_run(stage, params=cfg.model_dump(mode="json")):
        metrics = dict(run_fn(cfg) or {})
        metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
        tracking.log_metrics(metrics)
        write_metrics(stage, metrics)
    log.info("stage %s done in %.1f s", stage, metrics["wall_time_s"])
    return metrics


def load_stage_config(stage: str, cfg_cls: type[BaseModel], params: str | Path = DEFAULT_PARAMS,
                      overrides: list[str] | None = None) -> BaseModel:
    return load_section(params, stage, cfg_cls, overrides)


def stage_main(stage: str, cfg_cls: type[BaseModel], run_fn: Callable[[Any], dict[str, Any]],
               argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m spo_core.stages.{stage}", description=f"Run the '{stage}' stage.")
    parser.add_argument("--params", default=DEFAULT_PARAMS,
                        help="params file or profile name (toy, sd15, sdxl, tiny); default params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a value of section '{stage}', e.g. --set train.rounds=3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SPO_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_stage_config(stage, cfg_cls, args.params, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    execute(stage, cfg, run_fn)
    return 0
