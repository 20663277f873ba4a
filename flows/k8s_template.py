"""The Kubernetes work-pool base job template (deploy/kubernetes/base-job-template.json) and its job variables.

A pod sees its ``nvidia.com/gpu`` devices renumbered from 0, so a flow run asking for ``gpus=n`` must
have ``SPO_GPUS=0,...,n-1`` (flows/gpus.py leases from it). Prefect's templating substitutes values and
cannot build that range, so :func:`gpu_job_variables` sets both together and :func:`render` refuses
job variables where they disagree.

    python -m flows.k8s_template variables --gpus 4          # job variables for a 4-GPU deployment
    python -m flows.k8s_template render --image IMG --gpus 4 | kubectl apply --dry-run=server -f -
    python -m flows.k8s_template deploy --image IMG [--pool spo-k8s] [--gpus N]   # register the deployments
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from flows.deploy import DEPLOYMENTS as _DEPLOYMENTS
from spo_core.errors import InputError

log = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "base-job-template.json"
DEFAULT_POOL = "spo-k8s"
# What the worker runs when the deployment sets no command (prefect.workers.base).
FLOW_RUN_COMMAND = "prefect flow-run execute"
# The deployments (module-path entrypoints: the image has the repository installed, so no code is pulled).
DEPLOYMENTS = sorted(_DEPLOYMENTS)


class K8sTemplateError(InputError):
    """A base job template or job variables that Prefect or Kubernetes would reject."""


def load_template(path: str | Path = TEMPLATE_PATH) -> dict[str, Any]:
    path = Path(path)
    try:
        template = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise K8sTemplateError(f"cannot read the base job template {path}: {exc}; pass a JSON file "
                               f"like {TEMPLATE_PATH.name}") from exc
    if not isinstance(template, dict) or not {"job_configuration", "variables"} <= template.keys():
        raise K8sTemplateError(f"{path} is not a base job template: it needs the keys job_configuration and variables")
    return template


def gpu_ids(gpus: int) -> str:
    """The pod's device ids for ``gpus`` devices: ``"0,1,2,3"`` for 4, ``""`` for none."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise K8sTemplateError(f"gpus={gpus!r} is not a GPU count: use a whole number >= 0")
    return ",".join(str(i) for i in range(gpus))


def gpu_job_variables(gpus: int, **extra: Any) -> dict[str, Any]:
    """Job variables requesting ``gpus`` devices with the matching ``SPO_GPUS``; ``extra`` adds others (image, ...)."""
    env = {**extra.pop("env", {}), "SPO_GPUS": gpu_ids(gpus)}
    return {**extra, "gpus": gpus, "env": env}


def defaults(template: dict[str, Any]) -> dict[str, Any]:
    """The variables' defaults, without null ones (Prefect drops those so the keys are left out)."""
    props = template["variables"].get("properties", {})
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if v.get("default") is not None}


def job_values(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``job_variables`` as a worker does: ``env`` is merged key by key, not replaced."""
    values = defaults(template)
    env = {**values.get("env", {}), **job_variables.get("env", {})}
    values.update(job_variables)
    values["env"] = env
    return values


def check_gpus(values: dict[str, Any]) -> None:
    gpus, listed = values.get("gpus"), values.get("env", {}).get("SPO_GPUS")
    if listed is not None and isinstance(gpus, int) and listed != gpu_ids(gpus):
        raise K8sTemplateError(f"gpus={gpus} but SPO_GPUS={listed!r}: a pod sees its GPUs as 0..gpus-1, so set "
                               f"SPO_GPUS={gpu_ids(gpus)!r} (flows.k8s_template.gpu_job_variables does both)")


def render(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The job configuration a worker would build: Prefect's ``apply_values`` over the merged values."""
    from prefect.utilities.templating import apply_values

    values = job_values(template, job_variables)
    check_gpus(values)
    return apply_values(copy.deepcopy(template["job_configuration"]), values)


def manifest(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The Job as the worker submits it: the rendered manifest, env as a list, args split (prefect-kubernetes)."""
    config = render(template, {"command": FLOW_RUN_COMMAND, **job_variables})
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in config.get("env", {}).items()]
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    if job["metadata"].get("generateName", "-") == "-":  # no name: the worker's fallback
        job["metadata"]["generateName"] = "prefect-job-"
    return job


def deploy(image: str, pool: str = DEFAULT_POOL, gpus: int = 1, names: list[str] | None = None) -> list[str]:
    """Register the SPO deployments on ``pool`` to run in ``image`` with ``gpus`` GPUs; returns their ids."""
    from flows.deploy import deploy as deploy_on_pool

    # build/push False (in flows.deploy): the image is built from deploy/kubernetes/Dockerfile beforehand.
    return deploy_on_pool(pool, names, image=image, job_variables=gpu_job_variables(gpus, image=image))


def main(argv: list[str] | None = None) -> int:
    from spo_core.runner import run_entrypoint

    parser = argparse.ArgumentParser(prog="python -m flows.k8s_template", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("variables", "render", "deploy"):
        p = sub.add_parser(cmd)
        p.add_argument("--gpus", type=int, default=1, help="GPUs per flow run (default 1)")
        if cmd != "variables":
            p.add_argument("--image", required=True, help="image built from deploy/kubernetes/Dockerfile")
        if cmd == "render":
            p.add_argument("--namespace", help="namespace (default: the template's)")
            p.add_argument("--template", default=str(TEMPLATE_PATH))
        if cmd == "deploy":
            p.add_argument("--pool", default=DEFAULT_POOL)
            p.add_argument("--names", nargs="+", choices=sorted(DEPLOYMENTS), help="default: all")
    args = parser.parse_args(argv)

    def _run() -> None:
        if args.cmd == "variables":
            print(json.dumps(gpu_job_variables(args.gpus)))
        elif args.cmd == "render":
            extra = {"image": args.image, **({"namespace": args.namespace} if args.namespace else {})}
            print(json.dumps(manifest(load_template(args.template), gpu_job_variables(args.gpus, **extra)), indent=2))
        else:
            for i in deploy(args.image, args.pool, args.gpus, args.names):
                print(i)

    return run_entrypoint(_run)


if __name__ == "__main__":
    raise SystemExit(main())
