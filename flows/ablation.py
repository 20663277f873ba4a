"""Prefect flow ``ablation``: the variants of an ablation spec as parallel tasks, one per free GPU.

Each variant is one task that leases the GPUs its training stage asks for (``launch.num_processes``;
flows/gpus.py), then runs the variant in a fresh process (``python -m flows.variant_process``) that
sees only those devices in ``CUDA_VISIBLE_DEVICES``: variants share no environment, global RNG state
or accelerator context, and a variant that crashes releases its devices with its process. Variants
wait while no device is free, so an ablation of 5 variants on 4 GPUs runs 4 at once and the fifth
when one ends. The task tag ``gpu`` still lets ``prefect concurrency-limit create gpu N`` bound them
across flows. With ``dispatch="pool"`` each variant is an ``ablation-variant/variant`` flow run on the work
pool instead, leased on whichever host takes it. The work itself is
:func:`spo_core.ablation.run_variant` / :func:`spo_core.ablation.run_ablation`, which a script or a
test can call without Prefect.

    prefect deployment run ablation/table -p spec=tiny_k --watch       # executed by flows/serve.py or a worker
    python -m flows.ablation tiny_k [--params FILE] [--variant k2 ...]  # same options as `spo ablation` (server needed)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.gpus import gpu_lease
from flows.stage_output import run_logged
from spo_core.ablation import AblationSpec, load_spec, run_ablation, variant_plan
from spo_core.dvc_graph import is_gpu_stage
from spo_core.errors import InputError, SpoError
from spo_core.tables import main as tables_main

log = logging.getLogger(__name__)

GPU_TAG = "gpu"
DISPATCH = ("local", "pool")
VARIANT_DEPLOYMENT = "ablation-variant/variant"
RESULT_KEY = "ablation-variant-result"


class VariantFailed(SpoError, RuntimeError):
    """A variant's process exited non-zero; the message ends with its stderr tail."""


def _logger():
    from flows.spo import _logger

    return _logger()


def variant_gpus(spec: AblationSpec, variant: str) -> int:
    """GPUs a variant asks for: its training stage's ``launch.num_processes`` (1 without); 0 for a
    stage that is not GPU work (``SPO_GPU_STAGES``)."""
    stage, cfg, _ = variant_plan(spec, variant)[0]
    if not is_gpu_stage(stage):
        return 0
    launch = getattr(cfg, "launch", None)
    return max(1, launch.num_processes if launch is not None else 1)


def run_variant_leased(spec: AblationSpec, variant: str, parent_run_id: str | None,
                       cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """One variant in its own process on leased GPUs of this host; returns its metrics row."""
    logger = _logger()
    label = f"{spec.table} {variant}"
    with gpu_lease(variant_gpus(spec, variant), label=label) as lease, tempfile.TemporaryDirectory() as tmp:
        spec_file, row_file = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        spec_file.write_text(spec.model_dump_json())
        env = dict(lease.env)
        if os.environ.get("SPO_DISABLE_MLFLOW") != "1":
            import mlflow

            env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # the process-global URI, not only the env's
        cmd = [sys.executable, "-m", "flows.variant_process", str(spec_file), variant, str(row_file),
               parent_run_id or ""]
        logger.info("variant %s%s", label, f" on GPU(s) {','.join(lease.devices)}" if lease.devices else "")
        rc, tails = run_logged(cmd, variant, logger, cwd=cwd, env=env, pass_fds=lease.fds)
        if rc != 0:
            raise VariantFailed(f"ablation '{spec.table}', variant '{variant}' failed (exit code {rc}); last lines of "
                                "its stderr:\n" + "\n".join(tails["stderr"] or tails["stdout"]))
        row = json.loads(row_file.read_text())
    return {"row": row, "devices": ",".join(lease.devices), "host": socket.gethostname(),
            "repo": str(Path(cwd or os.getcwd()).resolve())}


@task(name="ablation-variant", task_run_name="{variant}", tags=[GPU_TAG], cache_policy=NO_CACHE)
def variant_task(spec: AblationSpec, variant: str, parent_run_id: str | None) -> dict[str, Any]:
    return run_variant_leased(spec, variant, parent_run_id)


@task(name="ablation-variant-run", task_run_name="{variant}", tags=[GPU_TAG], cache_policy=NO_CACHE)
def dispatch_variant(spec: AblationSpec, variant: str, parent_run_id: str | None) -> dict[str, Any]:
    """The variant as a flow run of ``ablation/variant`` on the work pool (any host); waits for it."""
    from prefect.deployments import run_deployment

    from flows.spo import read_artifact_json

    fr = run_deployment(name=VARIANT_DEPLOYMENT, timeout=None, poll_interval=2, flow_run_name=f"{spec.table} {variant}",
                        parameters={"spec": spec.model_dump(mode="json"), "variant": variant,
                                    "parent_run_id": parent_run_id})
    if not fr.state.is_completed():
        raise VariantFailed(f"ablation '{spec.table}', variant '{variant}': flow run {fr.name} ended "
                            f"{fr.state.name}: {fr.state.message}")
    return read_artifact_json(fr.id, RESULT_KEY)


def _submit(task_fn, spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    """Submit every variant, wait for all of them, then fail naming the variants that failed."""
    futures = {v: task_fn.submit(spec, v, parent_run_id) for v in variants}
    wait(list(futures.values()))
    failed = {v: f.state for v, f in futures.items() if not f.state.is_completed()}
    if failed:
        detail = "; ".join(f"{v}: {s.message}" for v, s in failed.items())
        raise RuntimeError(f"ablation '{spec.table}': {len(failed)} of {len(variants)} variants failed ({detail})")
    results = {v: f.result() for v, f in futures.items()}
    for v, r in results.items():
        _logger().info("variant %s ran on %s (%s), GPUs %s", v, r["host"], r["repo"], r["devices"] or "none")
    return {v: r["row"] for v, r in results.items()}


def submit_variants(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    return _submit(variant_task, spec, variants, parent_run_id)


def dispatch_variants(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    if spec.compare is not None:
        raise InputError(f"ablation '{spec.table}' has a compare step, which reads every variant's LoRA from one "
                         "checkout: run it with dispatch=local (its variants still run one per free GPU of that host)")
    return _submit(dispatch_variant, spec, variants, parent_run_id)


# Threads are enough: every variant runs in its own process. PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS
# bounds them on a host without GPUs (with GPUs the leases do).
@flow(name="ablation", task_runner=ThreadPoolTaskRunner())
def ablation(spec: str, params: str | None = None, variants: list[str] | None = None,
             dispatch: str = "local", repo: str | None = None) -> list[dict[str, Any]]:
    """Run an ablation table.

    Args:
        spec: a spec name under spo_core/ablations or a YAML path.
        params: params file or profile to use instead of the spec's ``params``.
        variants: run only these variants (default: all).
        dispatch: ``local`` runs the variants on this host, one per free GPU; ``pool`` runs each as an
            ``ablation-variant/variant`` flow run on the work pool (specs without a compare step).
        repo: the checkout whose paths the spec names (default: ``SPO_REPO_ROOT`` or the working
            directory; a worker starts flow runs in a temporary folder).
    """
    from flows.spo import _repo_root

    if dispatch not in DISPATCH:
        raise InputError(f"dispatch={dispatch!r}: choose one of {list(DISPATCH)}")
    with contextlib.chdir(_repo_root(repo)):
        s = load_spec(spec)
        if params:
            s = s.model_copy(update={"params": params})
        mapper = submit_variants if dispatch == "local" else dispatch_variants
        return run_ablation(s, mapper, variants).to_dict("records")


@flow(name="ablation-variant")
def variant(spec: dict[str, Any], variant: str, parent_run_id: str | None = None,
            repo: str | None = None) -> dict[str, Any]:
    """One variant of an ablation on this host (dispatched by ``ablation`` with ``dispatch="pool"``)."""
    from flows.spo import _repo_root, publish_json

    root = _repo_root(repo)
    result = run_variant_leased(AblationSpec.model_validate(spec), variant, parent_run_id, cwd=root)
    publish_json(RESULT_KEY, result, f"variant `{variant}` ran on {result['host']} ({result['repo']}), "
                                     f"GPUs: {result['devices'] or 'none'}")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.ablation SPEC [SPEC ...]``: the same command line as ``spo ablation``, each
    table run by this flow (a Prefect server must be reachable)."""
    return tables_main(argv, prog="python -m flows.ablation",
                       run_table=lambda spec, params, variants: ablation(spec=spec, params=params, variants=variants))


if __name__ == "__main__":
    raise SystemExit(main())
