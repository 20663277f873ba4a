"""Stage results passed between hosts through a DVC remote (the work-pool dispatch of flows/spo.py).

Each host has its own clone. A stage that ran on one host is known to the others by its
``dvc.lock`` entry (the hashes of what it read and wrote) and its outputs in the DVC remote:

- after the stage: ``dvc push STAGE`` uploads its cached outputs, and :func:`stage_record` gives its
  ``dvc.lock`` entry and the text of its uncached outputs (the metrics files git would carry);
- before a stage elsewhere: :func:`absorb` writes the upstream entries and files into that clone and
  ``dvc pull --force`` fetches the upstream outputs, so ``dvc repro --single-item`` finds its deps.

The flow's own clone absorbs every record at the end; its ``dvc.lock`` then describes the whole
pipeline and any other clone with it reproduces the outputs by ``dvc pull``. All commands wait for
DVC's repository lock (``--wait-for-lock``): other stages may be running in the same clone.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from spo_core.dvc_graph import locked_repo
from spo_core.errors import SpoError

log = logging.getLogger(__name__)

MAX_UNCACHED_BYTES = 1 << 20  # metrics files: small JSON; anything larger belongs in the DVC cache


class SyncFailed(SpoError, RuntimeError):
    """A dvc push/pull between hosts failed; the message has DVC's own error and the fix."""


def dvc(root: str | os.PathLike, *args: str) -> str:
    cmd = [shutil.which("dvc") or "dvc", "--wait-for-lock", *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise SyncFailed(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}): {tail}\n"
                         "Fix: check the DVC remote (`dvc remote list`, its credentials); every host needs the same "
                         "default remote")
    return proc.stdout


def _stage(repo, name: str):
    from dvc.stage import PipelineStage

    from spo_core.dvc_graph import stage_address

    root = Path(repo.root_dir)
    for st in repo.index.stages:
        if isinstance(st, PipelineStage) and stage_address(st, root) == name:  # st.addressing is relative to the cwd
            return st
    raise SyncFailed(f"no stage '{name}' in {repo.root_dir}: the hosts must check out the same commit")


def _lockfile(root: Path, name: str) -> tuple[Path, str]:
    dvcfile, sep, key = name.rpartition(":")
    folder = root / Path(dvcfile).parent if sep else root
    return folder / "dvc.lock", key


def stage_record(root: str | os.PathLike, name: str) -> dict[str, Any]:
    """``{"lock": <dvc.lock entry>, "files": {path: text}}`` for a stage that ran (or is up to date) here."""
    import json

    from dvc.utils.serialize import load_yaml

    root = Path(root).resolve()
    lock_path, key = _lockfile(root, name)
    files: dict[str, str] = {}
    with locked_repo(root) as repo:  # other stages of this clone may be rewriting dvc.lock
        # DVC's own YAML 1.2 reader: PyYAML (1.1) reads `no` as False and `1e-08` as a string, and the
        # entry would no longer match params.yaml on the other host.
        entry = (load_yaml(str(lock_path)) or {}).get("stages", {}).get(key) if lock_path.is_file() else None
        if entry is None:
            raise SyncFailed(f"stage '{name}' has no entry in {lock_path} after it ran: was it run with --no-commit?")
        for out in _stage(repo, name).outs:
            path = Path(out.fs_path)
            if out.use_cache or not path.is_file():
                continue
            if path.stat().st_size > MAX_UNCACHED_BYTES:
                raise SyncFailed(f"{path} (an uncached output of '{name}') is over 1 MiB: declare it cached in dvc.yaml "
                                 "so that it travels through the DVC remote")
            files[path.relative_to(root).as_posix()] = path.read_text()
    return {"lock": json.loads(json.dumps(entry)), "files": files}


def push(root: str | os.PathLike, name: str) -> None:
    log.info("dvc push %s", name)
    dvc(root, "push", name)


def absorb(root: str | os.PathLike, records: dict[str, dict[str, Any]], pull: bool = True) -> None:
    """Write the stages' ``dvc.lock`` entries and uncached files into this clone, then pull their outputs."""
    from dvc.utils.serialize import modify_yaml

    if not records:
        return
    root = Path(root).resolve()
    with locked_repo(root):  # stages in this clone write dvc.lock too
        for name, rec in records.items():
            lock_path, key = _lockfile(root, name)
            if not lock_path.is_file():
                lock_path.write_text("schema: '2.0'\nstages: {}\n")
            with modify_yaml(str(lock_path)) as data:
                data.setdefault("schema", "2.0")
                data.setdefault("stages", {})[key] = rec["lock"]
            for rel, text in rec.get("files", {}).items():
                dst = root / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.sync")
                tmp.write_text(text)
                os.replace(tmp, dst)
    if pull:
        log.info("dvc pull %s", " ".join(records))
        dvc(root, "pull", "--force", *records)
