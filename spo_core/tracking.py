"""MLflow helpers: one run per stage, nested runs for ablation rows, tables and images.

The tracking store defaults to a SQLite database under ``mlruns/`` (the plain file store is
deprecated); ``MLFLOW_TRACKING_URI`` overrides it. A parent run id in ``SPO_PARENT_RUN_ID`` (set by
the Prefect flow) nests stage runs under the pipeline run.

Metric keys start with the run's stage (``train_spo/loss``, ``evaluate/spo/toy_reward/mean``):
MLflow's chart view groups charts by that first segment, so one stage's bars are never drawn
beside another's.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

from .utils import process_alive

log = logging.getLogger(__name__)

_METRIC_PREFIX: contextvars.ContextVar[str | None] = contextvars.ContextVar("spo_metric_prefix", default=None)

DEFAULT_EXPERIMENT = "spo"
# MLflow 3 opens an experiment in its model-training view only when told so (else: GenAI traces).
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": ("SPO pipeline runs: one run per DVC stage, nested under the pipeline (Prefect flow) "
                            "or ablation run that started it. The headline result is the description of each "
                            "`evaluate` run; trained LoRAs are registered models."),
}


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
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        if mlflow.get_tracking_uri().startswith(("http://", "https://")):
            # A tracking server: its artifact store (shared by every host), not this host's folder.
            mlflow.create_experiment(name, tags=EXPERIMENT_TAGS)
        else:
            # Keep artifacts beside the database so that mlruns/ is self-contained.
            art = Path(os.environ.get("SPO_MLRUNS_DIR", "mlruns")).resolve() / "artifacts"
            mlflow.create_experiment(name, artifact_location=art.as_uri(), tags=EXPERIMENT_TAGS)
    elif any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for k, v in EXPERIMENT_TAGS.items():
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
    mlflow.set_experiment(name)
    return mlflow


def run_label() -> str:
    """What tells runs of one stage apart: the DVC experiment, the ablation variant, the flow run."""
    parts = [f"exp {os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else "",
             os.environ.get("SPO_RUN_LABEL", "")]
    return ", ".join(p for p in parts if p)


def run_name(stage: str) -> str:
    label = run_label()
    return f"{stage} [{label}]" if label else stage


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
              tags: dict | None = None, system_metrics: bool = True) -> Iterator[Any]:
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
    for key, env in (("dvc.experiment", "DVC_EXP_NAME"), ("label", "SPO_RUN_LABEL"), ("prefect.flow_run", "SPO_FLOW_RUN")):
        if os.environ.get(env):
            run_tags[key] = os.environ[env]
    run = mlflow.start_run(run_name=run_name(stage), tags=run_tags, nested=mlflow.active_run() is not None,
                           log_system_metrics=system_metrics and os.environ.get("SPO_SYSTEM_METRICS", "1") != "0")
    token = _METRIC_PREFIX.set(run_tags["stage"])
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
    finally:
        _METRIC_PREFIX.reset(token)


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
        if pid and pid != os.getpid() and not process_alive(pid):
            mlflow.MlflowClient().set_terminated(r.info.run_id, status="KILLED")
            n += 1
    if n:
        log.info("marked %d orphaned '%s' run(s) KILLED (their process had died)", n, stage)
    return n


def metric_key(name: str, prefix: str | None = None) -> str:
    """``<stage>/<name>``: the MLflow key of a metric logged in a stage's run (or under ``prefix``)."""
    prefix = prefix or _METRIC_PREFIX.get()
    return f"{prefix}/{name}" if prefix else name


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str | None = None) -> None:
    """Log numeric ``metrics`` to the active run under :func:`metric_key` names."""
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {metric_key(k, prefix): float(v) for k, v in flatten(metrics).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
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


def _active():
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return None
    import mlflow

    return mlflow if mlflow.active_run() is not None else None


def set_description(text: str) -> None:
    """The run's description in the MLflow UI (markdown)."""
    if (mlflow := _active()) is not None:
        mlflow.set_tag("mlflow.note.content", text[:5000])


def log_dict(obj: Any, name: str) -> None:
    if (mlflow := _active()) is not None:
        mlflow.log_dict(obj, name)


def log_image_at(image, key: str, step: int) -> None:
    """An image per step (a round): MLflow's image slider."""
    if (mlflow := _active()) is not None:
        mlflow.log_image(image, key=key, step=int(step))


def log_dataset(df, source: str, name: str, context: str) -> None:
    """Record a dataset (e.g. the prompts) as an input of the run, with its source and digest."""
    if (mlflow := _active()) is not None:
        import mlflow.data

        src = str(Path(source).resolve()) if Path(source).exists() else None  # else: this code is the source
        with warnings.catch_warnings():
            # MLflow registers its local-file source type twice and warns that a path matches both.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(df, source=src, name=name)
        mlflow.log_input(dataset, context=context)


def register_lora(lora_dir: str | Path, name: str, params: dict[str, Any], tags: dict[str, str]) -> Any:
    """Log a LoRA folder as an MLflow logged model of this run and register a new version of ``name``.

    ``tags`` carry the lineage (base model, data); the version links back to the run.
    """
    if (mlflow := _active()) is None:
        return None
    run_id = mlflow.active_run().info.run_id
    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, model_type="lora",
                                           params={k: str(v)[:500] for k, v in params.items()}, tags=tags)
    mlflow.MlflowClient().log_model_artifacts(model.model_id, str(lora_dir))
    mlflow.finalize_logged_model(model.model_id, "READY")
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    log.info("LoRA registered in MLflow as %s version %s", name, version.version)
    return version


def log_image(image, name: str) -> None:
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_image(image, artifact_file=name)
