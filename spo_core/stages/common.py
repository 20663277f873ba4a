"""What every stage entrypoint shares: argument parsing, config loading, metrics, tracking.

A stage is a plain function ``run(cfg) -> dict`` (metrics) in ``spo_core/stages/<name>.py``.
DVC calls ``python -m spo_core.stages.<name>``, Prefect tasks and tests call :func:`execute`;
no caller re-implements any of it. Errors reach the user through :mod:`spo_core.runner`.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import fcntl
import fnmatch
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel

from .. import tracking
from ..config import load_section
from ..errors import InputError
from ..runner import INTERRUPTED, run_entrypoint
from ..utils import atomic_dir, atomic_file, deferred_commits, staged

log = logging.getLogger(__name__)

DEFAULT_PARAMS = "params.yaml"


_METRICS_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("spo_metrics_dir", default=None)


def output_root(cfg: BaseModel) -> Path | None:
    """The folder a stage writes: ``output_dir`` (or the field its class names in ``OUTPUT_FIELD``),
    or ``train.output_dir`` for the training stages."""
    for holder, name in ((cfg, getattr(cfg, "OUTPUT_FIELD", "output_dir")), (getattr(cfg, "train", None), "output_dir")):
        out = getattr(holder, name, None)
        if isinstance(out, str):
            return Path(out)
    return None


def metrics_dir(cfg: BaseModel | None = None) -> Path:
    """Where a stage's metrics files go.

    The pipeline's tracked ``metrics/`` is written only by the pipeline: under ``dvc repro`` (which
    sets ``DVC_STAGE``) or where ``SPO_METRICS_DIR`` says (ablations, tests). An ad-hoc run
    (``spo train-spo --config tiny``) writes ``metrics/`` beside its output folder instead.
    """
    if os.environ.get("SPO_METRICS_DIR"):
        return Path(os.environ["SPO_METRICS_DIR"])
    active = _METRICS_DIR.get()
    if active is not None:
        return active
    root = output_root(cfg) if cfg is not None else None
    if os.environ.get("DVC_STAGE") or root is None:
        return Path("metrics")
    return root.parent / "metrics"


def metrics_path(stage: str) -> Path:
    return metrics_dir() / f"{stage}.json"


def _finite(v: Any) -> Any:
    # JSON has no NaN: a metric that is undefined (no pair kept, say) is written as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_json(path: Path, data: Any, indent: int = 2) -> Path:
    with atomic_file(path, "w") as fh:
        json.dump(_finite(data), fh, indent=indent, sort_keys=indent == 2, default=float, allow_nan=False)
        fh.write("\n")
    return path


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    return write_json(metrics_path(stage), metrics)


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
    write_json(metrics_dir(cfg) / f"{stage}.json", metrics)
    log.info("stage %s is disabled by the profile: wrote %s", stage, out / SKIPPED_MARKER)
    return metrics


def _check_writable(folder: Path) -> None:
    """Fail before any compute if ``folder`` (or the folder it would be created in) is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"output folder '{folder}' is not writable ({exc.strerror}). Fix: make it writable, or "
                         "choose another output_dir (metrics: SPO_METRICS_DIR)") from None


@contextlib.contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``root`` for the whole run: a second run into it is refused."""
    lock = root.parent / f".{root.name}.lock"
    fh = open(lock, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise InputError(f"output folder '{root}' is in use by another run ({holder}). Fix: wait for that run to "
                             "end, or choose another output_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


DETAILS_FILE = "metrics.json"


def headline_of(metrics: dict[str, Any], patterns: list[str] | None) -> dict[str, Any]:
    """The metrics whose names match one of ``patterns`` (fnmatch), plus the wall time; all if None."""
    if patterns is None:
        return metrics
    keep = [*patterns, "wall_time_s"]
    return {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in keep)}


Headline = list[str] | Callable[[Any], list[str]] | None


def execute(stage: str, cfg: BaseModel, run_fn: Callable[[Any], dict[str, Any]],
            headline: Headline = None) -> dict[str, Any]:
    """Run ``run_fn(cfg)`` inside an MLflow stage run; write ``<metrics dir>/<stage>.json``.

    ``headline``: name patterns (or a function of ``cfg`` returning them) of the metrics that go to
    ``<metrics dir>/<stage>.json`` (what ``dvc metrics show`` prints); every metric goes to MLflow and
    to ``metrics.json`` in the stage's output folder.

    Outputs, metrics and the MLflow record are committed together: the stage's output folder (or
    the files directly in it) and its metrics files are renamed into place only after the stage and
    its MLflow logging succeeded; on any failure the previous outputs and metrics stay.
    """
    if getattr(cfg, "enabled", True) is False:
        return skip_stage(stage, cfg) if is_main_process() else {}
    t0 = time.perf_counter()
    if callable(headline):
        headline = headline(cfg)
    if not is_main_process():
        return dict(run_fn(cfg) or {})
    root, mdir = output_root(cfg), metrics_dir(cfg)
    folders = [mdir]
    if root is not None:
        # Stages replace their folder from beside it; trainers also write checkpoints inside it.
        folders += [root.parent, *([root] if root.is_dir() else [])]
    for folder in folders:
        _check_writable(folder)
    token = _METRICS_DIR.set(mdir)
    try:
        with contextlib.ExitStack() as stack:
            if root is not None:
                stack.enter_context(output_lock(root))
            tx = stack.enter_context(deferred_commits([r for r in (root, mdir) if r is not None]))
            stack.enter_context(tracking.stage_run(stage, params=cfg.model_dump(mode="json")))
            metrics = dict(run_fn(cfg) or {})
            metrics["wall_time_s"] = round(time.perf_counter() - t0, 3)
            tracking.log_metrics(metrics)
            if root is not None and headline is not None:
                write_json(staged(root) / DETAILS_FILE, metrics)
            path = write_metrics(stage, headline_of(metrics, headline))
            tx.commit()
    finally:
        _METRICS_DIR.reset(token)
    log.info("stage %s done in %.1f s; metrics in %s", stage, metrics["wall_time_s"], path)
    return metrics


def load_stage_config(stage: str, cfg_cls: type[BaseModel], params: str | Path = DEFAULT_PARAMS,
                      overrides: list[str] | None = None) -> BaseModel:
    return load_section(params, stage, cfg_cls, overrides)


def stage_parser(stage: str, doc: str | None = None, section: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m spo_core.stages.{stage}",
                                     description=(doc or "").strip() or f"Run the '{stage}' stage.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", "--config", dest="params", default=DEFAULT_PARAMS, metavar="FILE_OR_PROFILE",
                        help="params file or profile name (`spo profiles` lists them: toy, toy_flow, sd15, ...); "
                             "default params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a value of section '{section or stage}', e.g. --set train.rounds=3 (repeatable)")
    return parser


def launched() -> bool:
    """Whether this process is one of several that ``accelerate launch`` / ``torchrun`` started."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _mixed_precision(cfg: BaseModel) -> str:
    # The stage's own setting (train.mixed_precision, or mixed_precision): launch settings do not repeat it.
    for holder in (cfg, getattr(cfg, "train", None)):
        value = getattr(holder, "mixed_precision", None)
        if isinstance(value, str):
            return value
    return "no"


def relaunch(stage: str, argv: list[str], cfg: BaseModel) -> int:
    """Run this stage's command again as ``cfg.launch.num_processes`` processes through accelerate's
    launcher (torchrun underneath: one process per GPU, gloo processes on CPUs); returns the exit
    status. Each process prints its own errors; the first failing one's status is returned."""
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    n, port = cfg.launch.num_processes, cfg.launch.main_process_port
    device = str(getattr(cfg, "device", "auto"))
    on_cpu = device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu and torch.cuda.device_count() < n:
        raise InputError(f"launch.num_processes={n} needs {n} GPUs, this machine has {torch.cuda.device_count()}. Fix: "
                         f"set {stage}.launch.num_processes to the number of GPUs (budgets are global: the result is the "
                         f"same, and DVC does not rerun the stage for it), or device=cpu")
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--main_process_port", str(port),
        "--mixed_precision", _mixed_precision(cfg), "--dynamo_backend", "no",
        "-m", f"spo_core.stages.{stage}", *argv])
    log.info("stage %s: starting %d processes (accelerate launch, %s)", stage, n, "CPU/gloo" if on_cpu else "GPUs")
    try:
        launch_command(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        first = next((c for c in codes if c > 0), None)
        return first if first is not None else INTERRUPTED  # negative: ended by a signal
    except SignalException as exc:  # this launcher was stopped (the processes were stopped with it)
        raise KeyboardInterrupt(f"stopped by signal {exc.sigval.name}") from None
    return 0


def stage_main(stage: str, cfg_cls: type[BaseModel], run_fn: Callable[[Any], dict[str, Any]],
               argv: list[str] | None = None, headline: Headline = None, section: str | None = None) -> int:
    """The command line of a stage (DVC's ``python -m spo_core.stages.<stage>`` and ``spo <stage>``).

    It reads section ``section`` of the params file (default: the stage's name).

    With ``launch.num_processes`` > 1 (and not already inside a launched process) it starts the stage
    again as that many processes through ``accelerate launch`` (:func:`relaunch`); with 1 it runs here.
    """
    parser = stage_parser(stage, getattr(sys.modules.get(getattr(run_fn, "__module__", "")), "__doc__", None), section)
    train_field = getattr(cfg_cls, "model_fields", {}).get("train")
    if train_field is not None and "resume" in getattr(train_field.annotation, "model_fields", {}):  # the trainers
        parser.add_argument("--resume", action="store_true",
                            help="continue from the last checkpoint in train.output_dir/checkpoints (same as "
                                 "--set train.resume=true); the configuration must match it except the keys it lists")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["train.resume=true"] if getattr(args, "resume", False) else [])

    def body() -> int:
        cfg = load_stage_config(section or stage, cfg_cls, args.params, overrides)
        launch = getattr(cfg, "launch", None)
        if launch is not None and launch.num_processes > 1 and not launched():
            return relaunch(stage, argv, cfg)
        execute(stage, cfg, run_fn, headline)
        return 0

    return run_entrypoint(body)
