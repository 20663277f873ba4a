"""Register the pipeline's deployments on a Prefect work pool (one worker per host takes their runs).

    python -m flows.deploy [--pool spo]                      # a process pool: `bash scripts/services.sh worker` per host
    python -m flows.k8s_template deploy --image IMG ...       # the Kubernetes pool (same deployments, in an image)

The entrypoints are module paths (``flows.spo.spo``): every host runs the code of its own checkout
(installed with ``pip install -e .``) in its repository root (``SPO_REPO_ROOT``, which the worker
sets), so no code is pulled and the hosts must check out the same commit. Deployments:
``spo/full`` (the pipeline; ``-p dispatch=pool`` spreads its stages over the pool), ``stage/single``,
``ablation/table`` (``-p dispatch=pool`` spreads its variants) and ``ablation-variant/variant``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

from spo_core.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_POOL = "spo"
# deployment name -> (module-path entrypoint, description)
DEPLOYMENTS = {
    "full": ("flows.spo.spo", "The DVC pipeline as a graph of stage tasks (dispatch=pool: over the work pool)."),
    "single": ("flows.spo.stage", "One DVC stage: -p stage=NAME."),
    "table": ("flows.ablation.ablation", "An ablation table: -p spec=NAME (dispatch=pool: variants over the pool)."),
    "variant": ("flows.ablation.variant", "One ablation variant (started by ablation/table with dispatch=pool)."),
}


class DeployError(InputError):
    """A deployment that cannot be registered (unknown name, missing pool)."""


def flows_to_deploy(names: list[str] | None = None) -> dict[str, tuple[Any, str, str]]:
    chosen = names or list(DEPLOYMENTS)
    unknown = sorted(set(chosen) - DEPLOYMENTS.keys())
    if unknown:
        raise DeployError(f"unknown deployment(s) {unknown}: choose from {sorted(DEPLOYMENTS)}")
    out = {}
    for name in chosen:
        path, description = DEPLOYMENTS[name]
        module, attr = path.rsplit(".", 1)
        out[name] = (getattr(importlib.import_module(module), attr), path, description)
    return out


def deploy(pool: str = DEFAULT_POOL, names: list[str] | None = None, image: str | None = None,
           job_variables: dict[str, Any] | None = None) -> list[str]:
    """Register the deployments on ``pool`` (in ``image`` for a container pool); returns their ids."""
    from prefect.deployments.runner import EntrypointType

    ids = []
    for name, (flow, path, description) in flows_to_deploy(names).items():
        try:
            ids.append(str(flow.deploy(name=name, work_pool_name=pool, image=image, build=False, push=False,
                                       job_variables=job_variables or {}, description=description,
                                       entrypoint_type=EntrypointType.MODULE_PATH, print_next_steps=False)))
        except ValueError as exc:  # prefect: "Could not find work pool ..."
            raise DeployError(f"cannot deploy {flow.name}/{name} on pool '{pool}': {exc} Fix: start a worker "
                              f"(`bash scripts/services.sh worker` creates the pool) or `prefect work-pool create "
                              f"{pool} --type process`") from None
        log.info("deployment %s/%s (%s) on pool %s", flow.name, name, path, pool)
    return ids


def main(argv: list[str] | None = None) -> int:
    from spo_core.runner import run_entrypoint

    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default=DEFAULT_POOL, help=f"work pool (default {DEFAULT_POOL})")
    parser.add_argument("--names", nargs="+", choices=sorted(DEPLOYMENTS), help="default: all")
    args = parser.parse_args(argv)

    def _run() -> None:
        for i in deploy(args.pool, args.names):
            print(i)

    return run_entrypoint(_run)


if __name__ == "__main__":
    raise SystemExit(main())
