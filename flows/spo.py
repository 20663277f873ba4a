"""Prefect flows ``spo`` (the DVC pipeline as a graph of stage tasks) and ``stage`` (one stage).

dvc.yaml owns the DAG and the cache: the flow asks DVC for the stages and their edges
(:func:`spo_core.dvc_graph.stage_graph`) and submits one task per stage with its upstream stages as
``wait_for``, so independent stages run at once and the Prefect UI draws DVC's graph. A task runs
``dvc repro --single-item STAGE`` in the repository root, so DVC still skips up-to-date stages and
records dvc.lock. GPU stages hold a lease of ``launch.num_processes`` devices of the host
(flows/gpus.py: ``CUDA_VISIBLE_DEVICES`` for the stage, tasks wait while none is free) and carry
the task tag ``gpu`` (``prefect concurrency-limit create gpu N`` bounds them across hosts). Stage
output keeps its levels in the Prefect log (flows/stage_output.py); the result tables the stages
write (the evaluation table, the preference-model accuracy table) become Prefect artifacts that
link to the stage's MLflow run, which nests under one pipeline run (``SPO_PARENT_RUN_ID``).

With ``dispatch="pool"`` each stage is instead a ``stage/single`` flow run on the work pool, taken
by whichever host's worker is free; the outputs travel through the DVC remote (flows/dvc_sync.py).

    prefect deployment run spo/full --watch                   # executed by flows/serve.py or a worker
    python -m flows.spo --target train_spo [--force] [--params tiny]   # in this process

Both need the Prefect server that prefect.toml names (``bash scripts/services.sh start``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.futures import wait
from prefect.logging import get_run_logger

from flows import dvc_sync
from flows.gpus import gpu_lease
from flows.stage_output import run_logged
from spo_core import tracking
from spo_core.dvc_graph import base_name, is_gpu_stage, locked_repo, stage_graph, stage_order
from spo_core.errors import InputError, SpoError
from spo_core.runner import run_entrypoint
from spo_core.utils import scoped_env

log = logging.getLogger(__name__)

GPU_TAG = "gpu"
# stderr text of failures that a second attempt can get past (another dvc process held the lock,
# SQLite was busy); anything else fails at once.
TRANSIENT_ERRORS = ("Unable to acquire lock", "database is locked")
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
    # --wait-for-lock: stages that run at once in one clone each take DVC's repository lock briefly
    # (DVC releases it while the stage's command runs).
    dvc = shutil.which("dvc") or "dvc"
    return [dvc, "--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), stage]


def run_dvc_stage(stage: str, root: str | os.PathLike, force: bool = False,
                  env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run ``dvc repro --single-item [--force] STAGE`` in ``root``, streaming its output to the log.

    ``pass_fds`` (a GPU lease's lock files) stay open in the stage process, so that its devices stay
    leased while it runs even if this process dies. Raises :class:`StageFailed` (with the last
    stderr lines) when it exits non-zero.
    """
    logger = _logger()
    cmd = repro_command(stage, force)
    logger.info("running %s in %s", " ".join(cmd[1:]), root)
    t0 = time.perf_counter()
    ran: list[str] = []  # DVC says "Running stage 'X'" when it does not skip the stage
    rc, tails = run_logged(cmd, stage, logger, cwd=root, env=env, pass_fds=pass_fds,
                           watch=lambda m: m.startswith("Running stage '") and ran.append(m))
    seconds = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise StageFailed(stage, rc, "\n".join(tails["stderr"]) or "\n".join(tails["stdout"]))
    ran = bool(ran)
    logger.info("stage %s %s in %.1f s", stage, "done" if ran else "up to date", seconds)
    return {"stage": stage, "seconds": seconds, "ran": ran}


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only failures another attempt can fix (a busy database)."""
    exc = state.data
    if isinstance(exc, StageFailed):
        return exc.transient
    return any(p in (state.message or "") for p in TRANSIENT_ERRORS)


def stage_gpus(stage: str, root: str | os.PathLike, gpu: list[str] | None = None) -> int:
    """GPUs a stage asks for: its ``launch.num_processes`` in params.yaml (1 without one); 0 for CPU stages."""
    import yaml

    if not is_gpu_stage(stage, gpu):
        return 0
    params_file = Path(root) / "params.yaml"
    params = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    launch = (params.get(base_name(stage)) or {}).get("launch") or {}
    return max(1, int(launch.get("num_processes") or 1))


def run_leased(stage: str, root: str | os.PathLike, force: bool, env: dict[str, str] | None,
               gpus: int) -> dict[str, Any]:
    """One stage under a lease of ``gpus`` devices of this host (none on a host without GPUs)."""
    with gpu_lease(gpus, label=f"stage {stage}") as lease:
        if lease.devices:
            _logger().info("stage %s on GPU(s) %s", stage, ",".join(lease.devices))
        result = run_dvc_stage(stage, root, force, {**(env or {}), **lease.env}, pass_fds=lease.fds)
    result.update(devices=",".join(lease.devices), host=socket.gethostname(), repo=str(Path(root).resolve()))
    if result["ran"]:
        publish_tables(stage, root, (env or {}).get("SPO_PARENT_RUN_ID"))
    return result


@task(name="dvc-repro", task_run_name="{stage}", retries=1, retry_delay_seconds=RETRY_DELAY_S,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def repro_stage(stage: str, root: str, force: bool = False, env: dict[str, str] | None = None,
                gpus: int = 0) -> dict[str, Any]:
    return run_leased(stage, root, force, env, gpus)


@task(name="stage-run", task_run_name="{stage}", cache_policy=NO_CACHE)
def dispatch_stage(stage: str, force: bool, upstream: dict[str, dict[str, Any]], env: dict[str, str],
                   deployment: str) -> dict[str, Any]:
    """Run one stage as a flow run of ``deployment`` on the work pool (any host) and wait for it."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, timeout=None, poll_interval=2, parameters={
        "stage": stage, "force": force, "upstream": upstream, "parent_run_id": env.get("SPO_PARENT_RUN_ID"),
        "run_label": env.get("SPO_RUN_LABEL")}, flow_run_name=f"{stage} [{env.get('SPO_FLOW_RUN', 'pipeline')}]")
    if not flow_run.state.is_completed():
        raise StageFailed(stage, -1, f"flow run {flow_run.name} ({deployment}) ended {flow_run.state.name}: "
                                     f"{flow_run.state.message}")
    return read_artifact_json(flow_run.id, RESULT_KEY)


# -- Prefect artifacts ---------------------------------------------------------------------------

TABLE_FILES = ("table.md", "accuracy.md")  # evaluate's table, train_pm's accuracy per timestep
RESULT_KEY = "dvc-stage-result"
PIPELINE_KEY = "spo-pipeline-result"  # dispatch=pool: which clone took in every stage
JSON_BLOCK = re.compile(r"```json\n(.*)\n```", re.DOTALL)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _mlflow_link(parent_run_id: str | None, stage: str) -> str:
    """Where the stage's MLflow run is (the newest run of that stage under the pipeline run)."""
    if not parent_run_id or os.environ.get("SPO_DISABLE_MLFLOW") == "1":
        return ""
    try:
        import mlflow

        runs = mlflow.search_runs(search_all_experiments=True, max_results=1, order_by=["start_time DESC"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                f"tags.stage = '{base_name(stage)}'", output_format="list")
    except Exception as exc:  # noqa: BLE001 - a link is a convenience; the table matters
        log.debug("no MLflow run found for %s: %s", stage, exc)
        return ""
    if not runs:
        return ""
    run, uri = runs[0], mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return f"\n\nMLflow run: [{run.info.run_name}]({uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})\n"
    return f"\n\nMLflow run `{run.info.run_name}` ({run.info.run_id}) in `{uri}`\n"


def publish_tables(stage: str, root: str | os.PathLike, parent_run_id: str | None) -> list[str]:
    """The result tables a stage wrote into its output folders, as Prefect markdown artifacts keyed
    ``<stage>-<table>`` (each a new version of that key), with a link to the stage's MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    try:
        from prefect.context import get_run_context

        get_run_context()
    except MissingContextError:
        return []
    root = Path(root).resolve()
    with locked_repo(root) as repo:
        outs = [Path(o.fs_path) for o in dvc_sync._stage(repo, stage).outs]
    keys = []
    link = None
    for out in outs:
        for name in TABLE_FILES:
            path = out / name
            if not path.is_file():
                continue
            link = _mlflow_link(parent_run_id, stage) if link is None else link
            key = _slug(f"{stage}-{path.stem}")
            create_markdown_artifact(markdown=path.read_text() + link, key=key,
                                     description=f"{stage}: {path.relative_to(root)}")
            keys.append(key)
    return keys


def publish_json(key: str, data: dict[str, Any], summary: str) -> None:
    """A record for the dispatching flow (which reads it back with :func:`read_artifact_json`) and for
    people: a markdown artifact of this flow run with a summary line and the data as JSON."""
    from prefect.artifacts import create_markdown_artifact

    text = f"{summary}\n\n```json\n{json.dumps(data, indent=1, sort_keys=True, default=str)}\n```\n"
    create_markdown_artifact(markdown=text, key=key, description=summary)


def read_artifact_json(flow_run_id, key: str) -> dict[str, Any]:
    """The data of the ``key`` artifact that flow run ``flow_run_id`` published (on any host)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if not found:
        raise SpoError(f"flow run {flow_run_id} left no '{key}' artifact: see its logs in the Prefect UI")
    return json.loads(JSON_BLOCK.search(str(found[-1].data)).group(1))


# -- the flows -----------------------------------------------------------------------------------


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


DISPATCH = ("local", "pool")
STAGE_DEPLOYMENT = "stage/single"


@flow(name="spo")
def spo(target: str | None = None, force: bool = False, params: str | None = None, repo: str | None = None,
        gpu_stages: list[str] | None = None, dispatch: str = "local") -> dict[str, dict[str, Any]]:
    """Run the DVC pipeline (or the ancestors of ``target``) as a graph of stage tasks.

    Args:
        target: last stage to run (with its ancestors); None runs every stage.
        force: rerun stages even when DVC finds them up to date (``dvc repro --force``).
        params: a YAML file or profile name (tiny, toy, sd15, sdxl) to install as params.yaml first.
        repo: repository root (default: ``SPO_REPO_ROOT`` or the working directory).
        gpu_stages: stage names that lease GPUs (default: ``SPO_GPU_STAGES`` or the training stages).
        dispatch: ``local`` runs every stage on this host; ``pool`` runs each as a ``stage/single`` flow
            run on the work pool (any host) and passes outputs through the DVC remote.
    """
    if dispatch not in DISPATCH:
        raise InputError(f"dispatch={dispatch!r}: choose one of {list(DISPATCH)}")
    root = _repo_root(repo)
    if params:
        install_params(params, root)
    graph = stage_graph(root, target)
    logger = _logger()
    logger.info("stages in DVC order: %s", ", ".join(graph) or "(none)")
    meta = {"target": target or "all", "force": force, "params": params or "params.yaml", "stages": ",".join(graph),
            "dispatch": dispatch}
    with _parent_run("pipeline", meta) as ctx:
        futures: dict[str, Any] = {}
        for st, upstream in graph.items():
            after = [futures[u] for u in upstream]
            if dispatch == "local":
                futures[st] = _stage_task(st, gpu_stages).submit(st, str(root), force, ctx["env"],
                                                                 stage_gpus(st, root, gpu_stages), wait_for=after)
            else:  # the upstream records are inputs: Prefect passes them on and draws the edges
                futures[st] = dispatch_stage.with_options(tags=_tags(st, gpu_stages)).submit(
                    st, force, {u: futures[u] for u in upstream}, ctx["env"], STAGE_DEPLOYMENT)
        results = _gather(futures)
        if dispatch == "pool":
            dvc_sync.absorb(root, {s: r["record"] for s, r in results.items()})
            where = {s: {k: r[k] for k in ("host", "repo", "devices", "seconds", "ran")} for s, r in results.items()}
            publish_json(PIPELINE_KEY, {"host": socket.gethostname(), "repo": str(root), "stages": where},
                         f"pipeline complete in {root} on {socket.gethostname()}: commit its dvc.lock and metrics/")
        ctx["empty"] = _summarise(results, root)
    return results


def _tags(stage: str, gpu: list[str] | None) -> list[str]:
    return [GPU_TAG] if is_gpu_stage(stage, gpu) else []


def _stage_task(stage: str, gpu: list[str] | None):
    return repro_stage.with_options(tags=_tags(stage, gpu))


def _gather(futures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Wait for every stage; raise the first failure in DVC order (stages after it never started)."""
    wait(list(futures.values()))
    for fut in futures.values():
        if fut.state.is_failed() or fut.state.is_crashed():
            fut.result()  # raises the stage's own exception (StageFailed with its stderr)
    return {name: fut.result() for name, fut in futures.items()}


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
            tracking.log_metrics(json.loads(headline.read_text()), prefix="evaluate")  # as the evaluate run names them
    return False


@flow(name="stage")
def stage(stage: str, force: bool = False, repo: str | None = None, gpu_stages: list[str] | None = None,
          upstream: dict[str, dict[str, Any]] | None = None, parent_run_id: str | None = None,
          run_label: str | None = None) -> dict[str, Any]:
    """Run one stage (``dvc repro --single-item``) on this host.

    Started by hand, its inputs must already be up to date. Dispatched by the ``spo`` flow
    (``dispatch="pool"``), ``upstream`` holds the results of the stages it reads from: their
    dvc.lock entries are written into this clone and their outputs pulled from the DVC remote first,
    and this stage's outputs are pushed after it; ``parent_run_id`` is the pipeline's MLflow run.
    """
    root = _repo_root(repo)
    addressed = stage_order(root, stage)[-1]  # validates the name against dvc.yaml
    gpus = stage_gpus(addressed, root, gpu_stages)
    if upstream is None and parent_run_id is None:
        with _parent_run(f"single {addressed}", {"stage": addressed, "force": force}) as ctx:
            result = _stage_task(addressed, gpu_stages)(addressed, str(root), force, ctx["env"], gpus)
            ctx["empty"] = _summarise({addressed: result}, root)
        return result
    dvc_sync.absorb(root, {u: r["record"] for u, r in (upstream or {}).items()})
    env = {"SPO_PARENT_RUN_ID": parent_run_id, "SPO_RUN_LABEL": run_label}
    env = {k: v for k, v in env.items() if v}
    import mlflow

    if parent_run_id and os.environ.get("SPO_DISABLE_MLFLOW") != "1":
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    result = _stage_task(addressed, gpu_stages)(addressed, str(root), force, env, gpus)
    dvc_sync.push(root, addressed)
    result["record"] = dvc_sync.stage_record(root, addressed)
    publish_json(RESULT_KEY, result, f"stage `{addressed}` {'ran' if result['ran'] else 'was up to date'} on "
                                     f"{result['host']} ({result['repo']}) in {result['seconds']} s, GPUs: "
                                     f"{result['devices'] or 'none'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.spo", description="Run the SPO pipeline flow locally.")
    parser.add_argument("--target", help="last stage to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages DVC finds up to date")
    parser.add_argument("--params", help="YAML file or profile to install as params.yaml first")
    parser.add_argument("--repo", help="repository root (default: working directory)")
    parser.add_argument("--dispatch", choices=DISPATCH, default="local",
                        help="local: every stage on this host; pool: each stage a stage/single flow run on the work "
                             "pool (deployments registered by `python -m flows.deploy`)")
    args = parser.parse_args(argv)
    return run_entrypoint(lambda: spo(target=args.target, force=args.force, params=args.params, repo=args.repo,
                                      dispatch=args.dispatch) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
