"""MLflow helpers: one run per stage, nested runs for ablation rows, tables and images.

The tracking store defaults to a SQLite database under ``mlruns/`` (the plain file store is
deprecated); ``MLFLOW_TRACKING_URI`` overrides it. A parent run id in ``SPO_PARENT_RUN_ID`` (set by
the Prefect flow) nests stage runs under the pipeline run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "spo"


# An unreachable tracking server fails within about a minute instead of MLflow's ~4 minutes of
# retries; users who want more set these variables themselves.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def default_tracking_uri(create: bool = True) -> str:
    root = Path(os.environ.get("SPO_MLRUNS_DIR", "mlruns")).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def setup_mlflow(experiment: str | None = None):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import mlflow

    # Always set it: a URI set earlier in this process would otherwise beat the environment.
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    name = experiment or os.environ.get("SPO_EXPERIMENT", DEFAULT_EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        # Keep artifacts beside the database so that mlruns/ is self-contained.
        art = Path(os.environ.get("SPO_MLRUNS_DIR", "mlruns")).resolve() / "artifacts"
        mlflow.create_experiment(name, artifact_location=art.as_uri())
    mlflow.set_experiment(name)
    return mlflow


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and not all(isinstance(x, (int, float, str)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict | None = None, nested_parent: str | None = None,
              tags: dict | None = None) -> Iterator[Any]:
    """Open an MLflow run for a stage; it is marked FAILED if the block raises.

    Set ``SPO_DISABLE_MLFLOW=1`` to run without tracking (yields None).
    """
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        yield None
        return
    mlflow = setup_mlflow()
    parent = nested_parent or os.environ.get("SPO_PARENT_RUN_ID")
    close_orphans(mlflow, stage)
    run_tags = {"stage": stage, "host": socket.gethostname(), "pid": str(os.getpid()), **(tags or {})}
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(run_name=stage, tags=run_tags, nested=mlflow.active_run() is not None)
    try:
        if params:
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
        yield run
    except BaseException as exc:
        mlflow.end_run(status="KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_orphans(mlflow, stage: str) -> int:
    """Mark KILLED the RUNNING runs of ``stage`` whose process (on this host) no longer exists.

    A SIGKILLed stage cannot end its run; without this it would show as running for ever.
    """
    host = socket.gethostname()
    exp = mlflow.get_experiment_by_name(os.environ.get("SPO_EXPERIMENT", DEFAULT_EXPERIMENT))
    if exp is None:
        return 0
    stale = mlflow.search_runs([exp.experiment_id], output_format="list", filter_string=(
        f"attributes.status = 'RUNNING' and tags.stage = '{stage}' and tags.host = '{host}'"))
    n = 0
    for r in stale:
        pid = int(r.data.tags.get("pid", "0") or 0)
        if pid and pid != os.getpid() and not _alive(pid):
            mlflow.MlflowClient().set_terminated(r.info.run_id, status="KILLED")
            n += 1
    if n:
        log.info("marked %d orphaned '%s' run(s) KILLED (their process had died)", n, stage)
    return n


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table(df, name: str) -> None:
    """Log a pandas DataFrame as an MLflow table (JSON) and as markdown."""
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_table(df, artifact_file=f"{name}.json")
    try:
        md = df.to_markdown(index=False)
    except ImportError:
        md = df.to_string(index=False)
    mlflow.log_text(md, f"{name}.md")


def log_image(image, name: str) -> None:
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_image(image, artifact_file=name)
