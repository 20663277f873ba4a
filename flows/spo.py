"""Prefect flows ``spo`` (the DVC pipeline, stage by stage) and ``stage`` (one stage).

dvc.yaml owns the DAG and the cache: the flow asks DVC for the stage order
(:func:`spo_core.dvc_graph.stage_order`) and runs ``dvc repro --single-item STAGE`` for each stage
in the repository root, so DVC still skips up-to-date stages and records dvc.lock. The stage
processes log to MLflow under one parent run (``SPO_PARENT_RUN_ID``); GPU stages carry the task
tag ``gpu`` so that ``prefect concurrency-limit create gpu N`` bounds them.

    prefect deployment run spo/full --watch                   # executed by flows/serve.py
    python -m flows.spo --target train_spo [--force] [--params tiny]   # in this process

Both need the Prefect server that prefect.toml names (``bash scripts/services.sh start``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from spo_core import tracking
from spo_core.dvc_graph import is_gpu_stage, stage_order
from spo_core.errors import SpoError
from spo_core.runner import run_entrypoint
from spo_core.utils import scoped_env

log = logging.getLogger(__name__)

GPU_TAG = "gpu"
# stderr text of failures that a second attempt can get past (another dvc process held the lock,
# SQLite was busy); anything else fails at once.
TRANSIENT_ERRORS = ("Unable to acquire lock", "database is locked")
TAIL_LINES = 40
RETRY_DELAY_S = 10


class StageFailed(SpoError, RuntimeError):
    """``dvc repro`` of one stage exited non-zero; the message ends with its stderr tail."""

    def __init__(self, stage: str, returncode: int, stderr_tail: str):
        self.stage, self.returncode, self.stderr_tail = stage, returncode, stderr_tail
        super().__init__(f"stage '{stage}' failed (dvc repro exit code {returncode}); last lines of its stderr:\n"
                         f"{stderr_tail}")

    @property
    def transient(self) -> bool:
        return any(p in self.stderr_tail for p in TRANSIENT_ERRORS)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as a plain function (task.fn, tests, scripts)
        return log


def repro_command(stage: str, force: bool = False) -> list[str]:
    dvc = shutil.which("dvc") or "dvc"
    return [dvc, "repro", "--single-item", *(["--force"] if force else []), stage]


def run_dvc_stage(stage: str, root: str | os.PathLike, force: bool = False,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``dvc repro --single-item [--force] STAGE`` in ``root``, streaming its output to the log.

    Raises :class:`StageFailed` (with the last stderr lines) when it exits non-zero.
    """
    logger = _logger()
    cmd = repro_command(stage, force)
    logger.info("running %s in %s", " ".join(cmd[1:]), root)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    tails = {"stdout": collections.deque(maxlen=TAIL_LINES), "stderr": collections.deque(maxlen=TAIL_LINES)}
    ran = []  # DVC says "Running stage 'X'" when it does not skip the stage

    def pump(name: str, stream) -> None:
        for line in stream:
            line = line.rstrip()
            if line:
                tails[name].append(line)
                if line.startswith("Running stage '"):
                    ran.append(line)
                logger.info("[%s] %s", stage, line)

    readers = [threading.Thread(target=pump, args=(n, getattr(proc, n)), daemon=True) for n in tails]
    for r in readers:
        r.start()
    try:
        rc = proc.wait()
    except BaseException:  # cancelled or interrupted: do not leave the stage running
        proc.kill()
        proc.wait()
        raise
    finally:
        for r in readers:
            r.join(timeout=5)
    seconds = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise StageFailed(stage, rc, "\n".join(tails["stderr"]) or "\n".join(tails["stdout"]))
    ran = bool(ran)
    logger.info("stage %s %s in %.1f s", stage, "done" if ran else "up to date", seconds)
    return {"stage": stage, "seconds": seconds, "ran": ran}


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only failures another attempt can fix (a held lock)."""
    exc = state.data
    if isinstance(exc, StageFailed):
        return exc.transient
    return any(p in (state.message or "") for p in TRANSIENT_ERRORS)


@task(name="dvc-repro", task_run_name="{stage}", retries=1, retry_delay_seconds=RETRY_DELAY_S,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def repro_stage(stage: str, root: str, force: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    return run_dvc_stage(stage, root, force, env)


def _stage_task(stage: str, gpu: list[str] | None):
    return repro_stage.with_options(tags=[GPU_TAG]) if is_gpu_stage(stage, gpu) else repro_stage


def install_params(params: str, root: Path) -> None:
    """Make ``params`` (a YAML file or a profile name) the pipeline's ``params.yaml`` (DVC-tracked),
    written as ``spo params`` writes it: every value spelled out (dvc.yaml lists single keys)."""
    from spo_core.params_file import params_text

    text = params_text(params)  # validates; raises ConfigError naming the profiles / the missing file / bad keys
    dst = root / "params.yaml"
    if dst.exists() and dst.read_text() == text:
        return
    _logger().warning("replacing %s with %s", dst, params)
    tmp = dst.with_name(".params.yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)


def _repo_root(repo: str | None) -> Path:
    return Path(repo or os.environ.get("SPO_REPO_ROOT") or os.getcwd()).resolve()


@flow(name="spo")
def spo(target: str | None = None, force: bool = False, params: str | None = None, repo: str | None = None,
        gpu_stages: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the DVC pipeline (or the ancestors of ``target``) stage by stage in DVC's order.

    Args:
        target: last stage to run (with its ancestors); None runs every stage.
        force: rerun stages even when DVC finds them up to date (``dvc repro --force``).
        params: a YAML file or profile name (tiny, toy, sd15, sdxl) to install as params.yaml first.
        repo: repository root (default: ``SPO_REPO_ROOT`` or the working directory).
        gpu_stages: stage names tagged ``gpu`` (default: ``SPO_GPU_STAGES`` or the training stages).
    """
    root = _repo_root(repo)
    if params:
        install_params(params, root)
    order = stage_order(root, target)
    logger = _logger()
    logger.info("stages in DVC order: %s", ", ".join(order) or "(none)")
    results: dict[str, dict[str, Any]] = {}
    meta = {"target": target or "all", "force": force, "params": params or "params.yaml", "stages": ",".join(order)}
    with _parent_run("pipeline", meta) as ctx:
        for st in order:
            results[st] = _stage_task(st, gpu_stages)(st, str(root), force, ctx["env"])
        ctx["empty"] = _summarise(results, root)
    return results


@contextlib.contextmanager
def _parent_run(name: str, meta: dict[str, Any]):
    """The MLflow run the stage runs nest under, named after the Prefect flow run.

    Yields ``{"env": <the stages' environment>}``; set ``"empty": True`` to delete the run at the end.
    """
    flow_run = _flow_run_name()
    label = {"SPO_RUN_LABEL": f"flow {flow_run}", "SPO_FLOW_RUN": flow_run} if flow_run else {}
    ctx: dict[str, Any] = {"env": dict(label), "empty": False}
    with scoped_env(**label):
        with tracking.stage_run(name, params=meta, system_metrics=False) as run:  # its stages have their own
            if run is not None:
                import mlflow

                # Stage processes log to this store under this run, whatever their working directory.
                ctx["env"].update(SPO_PARENT_RUN_ID=run.info.run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
                _logger().info("MLflow parent run %s in %s", run.info.run_id, mlflow.get_tracking_uri())
            yield ctx
        if run is not None and ctx["empty"]:
            _logger().info("every stage was up to date: no pipeline run recorded")
            mlflow.MlflowClient().delete_run(run.info.run_id)


def _flow_run_name() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.name
    except Exception:  # noqa: BLE001 - outside a flow run there is no name
        return None


def _summarise(results: dict[str, dict[str, Any]], root: Path) -> bool:
    """Describe the pipeline run (the evaluation table and its headline metrics when evaluate ran);
    True when no stage ran, so that the run, which recorded nothing, is deleted."""
    import mlflow

    ran = [s for s, r in results.items() if r.get("ran")]
    if os.environ.get("SPO_DISABLE_MLFLOW") == "1" or mlflow.active_run() is None or not ran:
        return not ran
    mlflow.set_tag("stages_run", ",".join(ran))
    table = root / "artifacts" / "evaluate" / "table.md"
    if "evaluate" in ran and table.is_file():
        tracking.set_description(table.read_text())
        headline = root / "metrics" / "evaluate.json"
        if headline.is_file():
            tracking.log_metrics(json.loads(headline.read_text()))
    return False


@flow(name="stage")
def stage(stage: str, force: bool = False, repo: str | None = None,
          gpu_stages: list[str] | None = None) -> dict[str, Any]:
    """Run one stage (``dvc repro --single-item``): its inputs must already be up to date."""
    root = _repo_root(repo)
    addressed = stage_order(root, stage)[-1]  # validates the name against dvc.yaml
    with _parent_run(f"single {addressed}", {"stage": addressed, "force": force}) as ctx:
        result = _stage_task(addressed, gpu_stages)(addressed, str(root), force, ctx["env"])
        ctx["empty"] = _summarise({addressed: result}, root)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.spo", description="Run the SPO pipeline flow locally.")
    parser.add_argument("--target", help="last stage to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages DVC finds up to date")
    parser.add_argument("--params", help="YAML file or profile to install as params.yaml first")
    parser.add_argument("--repo", help="repository root (default: working directory)")
    args = parser.parse_args(argv)
    return run_entrypoint(lambda: spo(target=args.target, force=args.force, params=args.params, repo=args.repo) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
