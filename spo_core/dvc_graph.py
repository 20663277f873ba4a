"""The pipeline's stage order, read from DVC's own graph (never a copied DAG), and its GPU stages.

:func:`stage_order` asks DVC for the order in which ``dvc repro [TARGET]`` would visit the
``dvc.yaml`` stages (``dvc.repo.reproduce.plan_repro`` on the active graph, the same call ``dvc
repro`` makes), so that a caller running ``dvc repro --single-item STAGE`` stage by stage does
what one ``dvc repro`` would do. :func:`gpu_stages` says which stages need an accelerator (a
Prefect task tag, a GPU work pool): an explicit list, else ``SPO_GPU_STAGES``, else the default.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GPU_STAGES", "DvcGraphError", "base_name", "gpu_stages", "is_gpu_stage", "locked_repo",
           "stage_address", "stage_graph", "stage_order"]

# Stages that run a diffusion model or train one (the toy world's pretraining and its scorer too).
DEFAULT_GPU_STAGES = frozenset({
    "toy_pretrain", "toy_pickscore", "noisy_pairs", "train_pm",
    "train_spo", "train_diffusion_dpo", "train_d3po", "train_ddpo", "train_grpo", "evaluate_base",
    "evaluate",
})
GPU_STAGES_ENV = "SPO_GPU_STAGES"


class DvcGraphError(InputError, RuntimeError):
    """The DVC project or the target cannot be read; the message names the problem and the fix."""


def base_name(stage: str) -> str:
    """``sub/dvc.yaml:train_spo@k2`` -> ``train_spo`` (the params section / stage module name)."""
    return stage.rsplit(":", 1)[-1].split("@", 1)[0]


def stage_address(stage, root: Path) -> str:
    """How ``dvc repro`` run in ``root`` names the stage: ``name``, or ``sub/dvc.yaml:name``."""
    dvcfile = Path(os.path.relpath(stage.path, root)).as_posix()
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _absolute_target(target: str | None, root: Path) -> str:
    """DVC resolves targets against the working directory; make them absolute under ``root``."""
    if not target:
        return str(root / "dvc.yaml")
    dvcfile, sep, name = target.rpartition(":")
    return f"{root / (dvcfile if sep else 'dvc.yaml')}:{name}"


def stage_order(root: str | os.PathLike = ".", target: str | None = None) -> list[str]:
    """Names (DVC addressing) of the ``dvc.yaml`` stages ``dvc repro [target]`` would run, in order.

    With ``target`` the list ends with it and holds only its ancestors; ``.dvc`` data sources
    (``data.dvc``) are dependencies, not stages to run, and are left out. Frozen stages are cut
    from their dependencies as ``dvc repro`` does.
    """
    return list(stage_graph(root, target))


@contextlib.contextmanager
def locked_repo(root: str | os.PathLike) -> Iterator:
    """DVC's ``Repo`` at ``root`` under DVC's repository lock, waiting for it. Stages that run at once in
    one clone rewrite ``dvc.lock`` in place (taking the lock for that): read without the lock, it can
    be half-written (CI saw "dvc.lock validation failed: required key not provided @ data['schema']")."""
    from dvc.repo import Repo, lock_repo

    with Repo(str(root), _wait_for_lock=True) as repo, lock_repo(repo):
        yield repo


def stage_graph(root: str | os.PathLike = ".", target: str | None = None) -> dict[str, list[str]]:
    """``{stage: [the stages whose outputs it reads]}`` in :func:`stage_order`'s order: DVC's own edges
    (``dvc dag``), restricted to the stages ``dvc repro [target]`` would run."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro
    from dvc.stage import PipelineStage

    root = Path(root).resolve()
    if not (root / "dvc.yaml").exists():
        raise DvcGraphError(f"no dvc.yaml in {root}: run from the repository root or pass its path")
    try:
        with locked_repo(root) as repo:
            targets = [_absolute_target(target, root)]
            try:
                stages = collect_stages(repo, targets)
            except DvcException as exc:
                known = sorted(stage_address(s, root) for s in repo.index.stages if isinstance(s, PipelineStage))
                raise DvcGraphError(f"unknown stage '{target}' ({exc}): choose one of {known}") from None
            graph = get_active_graph(repo.index.graph)
            steps = [s for s in plan_repro(graph, stages) if isinstance(s, PipelineStage)]
            names = {s: stage_address(s, root) for s in steps}
            # An edge stage -> dependency (DVC draws the dependency above); .dvc sources are not stages.
            out = {names[s]: [names[d] for d in steps if graph.has_edge(s, d)] for s in steps}
    except NotDvcRepoError as exc:
        raise DvcGraphError(f"{root} is not a DVC repository ({exc}): run `dvc init` there") from None
    except DvcException as exc:
        raise DvcGraphError(f"cannot read the DVC pipeline in {root}: {exc}") from exc
    log.debug("DVC graph for %s: %s", target or "all stages", out)
    return out


def gpu_stages(configured: Iterable[str] | str | None = None) -> frozenset[str]:
    """The GPU stage names: ``configured`` (a list or a comma-separated string), else the
    ``SPO_GPU_STAGES`` environment variable (comma-separated; empty means none), else the default."""
    if configured is None:
        configured = os.environ.get(GPU_STAGES_ENV)
        if configured is None:
            return DEFAULT_GPU_STAGES
    if isinstance(configured, str):
        configured = configured.split(",")
    return frozenset(s.strip() for s in configured if s.strip())


def is_gpu_stage(stage: str, gpu: Iterable[str] | None = None) -> bool:
    """Whether ``stage`` (a DVC address such as ``train_spo@k2``) is one of the GPU stages."""
    names = gpu_stages() if gpu is None else frozenset(gpu)
    return stage in names or base_name(stage) in names
