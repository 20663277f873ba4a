"""Prefect flow ``ablation``: the variants of an ablation spec as parallel tasks on GPU slots.

Each variant is one task (tag ``gpu``: ``prefect concurrency-limit create gpu N`` lets N run at
once across all flows) in its own worker process of a process pool, so that variants do not share
environment variables, global RNG state or an accelerator context. The work itself is
:func:`spo_core.ablation.run_variant` / :func:`spo_core.ablation.run_ablation`, which a script or a
test can call without Prefect.

    prefect deployment run ablation/table -p spec=tiny_k --watch       # executed by flows/serve.py
    python -m flows.ablation tiny_k [--params FILE] [--variant k2 ...]  # same options as `spo ablation` (server needed)
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner

from spo_core.ablation import AblationSpec, load_spec, run_ablation, run_variant
from spo_core.tables import main as tables_main

GPU_TAG = "gpu"


@task(name="ablation-variant", task_run_name="{variant}", tags=[GPU_TAG], cache_policy=NO_CACHE)
def variant_task(spec: AblationSpec, variant: str, parent_run_id: str | None) -> dict[str, float]:
    return run_variant(spec, variant, parent_run_id)


def submit_variants(spec: AblationSpec, variants: list[str], parent_run_id: str | None) -> dict[str, dict[str, float]]:
    """Submit every variant, wait for all of them, then fail naming the variants that failed."""
    futures = {v: variant_task.submit(spec, v, parent_run_id) for v in variants}
    wait(list(futures.values()))
    failed = {v: f.state for v, f in futures.items() if not f.state.is_completed()}
    if failed:
        detail = "; ".join(f"{v}: {s.message}" for v, s in failed.items())
        raise RuntimeError(f"ablation '{spec.table}': {len(failed)} of {len(variants)} variants failed ({detail})")
    return {v: f.result() for v, f in futures.items()}


# Worker processes: PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS (default: the CPU count) bounds
# this host; the `gpu` tag limit bounds the GPU slots.
@flow(name="ablation", task_runner=ProcessPoolTaskRunner())
def ablation(spec: str, params: str | None = None, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Run an ablation table.

    Args:
        spec: a spec name under spo_core/ablations or a YAML path.
        params: params file or profile to use instead of the spec's ``params``.
        variants: run only these variants (default: all).
    """
    s = load_spec(spec)
    if params:
        s = s.model_copy(update={"params": params})
    return run_ablation(s, submit_variants, variants).to_dict("records")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.ablation SPEC [SPEC ...]``: the same command line as ``spo ablation``, each
    table run by this flow (a Prefect server must be reachable)."""
    return tables_main(argv, prog="python -m flows.ablation",
                       run_table=lambda spec, params, variants: ablation(spec=spec, params=params, variants=variants))


if __name__ == "__main__":
    raise SystemExit(main())
