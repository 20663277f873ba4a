"""Small shared helpers: atomic writes, seeding, devices."""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class Transaction:
    """Writes kept aside until :meth:`commit`, so that a stage's outputs and metrics appear together.

    While :func:`deferred_commits` is active, :func:`atomic_dir` / :func:`atomic_path` onto a root
    (a stage's output folder) or directly into one (a file in the metrics folder, the LoRA folder
    of a training output) finish into their temporary path; :meth:`commit` then renames them all
    into place, and :meth:`discard` (on any error) deletes them, leaving the previous outputs.
    """

    def __init__(self, roots: list[str | Path]):
        self.roots = {Path(r).resolve() for r in roots}
        self.pending: dict[Path, Path] = {}  # final path -> finished temporary path

    def covers(self, path: Path) -> bool:
        p = path.resolve()
        return p in self.roots or p.parent in self.roots

    def stage(self, tmp: Path, path: Path) -> None:
        prev = self.pending.pop(path.resolve(), None)
        if prev is not None:
            _remove(prev)
        self.pending[path.resolve()] = tmp

    def staged(self, path: str | Path) -> Path:
        return self.pending.get(Path(path).resolve(), Path(path))

    def commit(self) -> None:
        for path, tmp in self.pending.items():
            _replace(tmp, path)
        self.pending.clear()

    def discard(self) -> None:
        for tmp in self.pending.values():
            _remove(tmp)
        self.pending.clear()


_TRANSACTION: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("spo_transaction", default=None)


@contextlib.contextmanager
def deferred_commits(roots: list[str | Path]) -> Iterator[Transaction]:
    """Defer the atomic writes onto or directly into ``roots`` until the caller's ``commit()``."""
    tx = Transaction(roots)
    token = _TRANSACTION.set(tx)
    try:
        yield tx
    except BaseException:
        tx.discard()
        raise
    finally:
        _TRANSACTION.reset(token)
        tx.discard()  # anything not committed by the caller


def staged(path: str | Path) -> Path:
    """Where ``path``'s new content is now: its temporary path while a transaction holds it."""
    tx = _TRANSACTION.get()
    return tx.staged(path) if tx is not None else Path(path)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _replace(tmp: Path, path: Path) -> None:
    if tmp.is_dir():
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _plain_modes(folder: Path) -> None:
    # Some writers (safetensors) create files 0600; outputs get what plain open() would give.
    mask = _umask()
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, (os.stat(p).st_mode & 0o111 | 0o666) & ~mask)


def _tmp_prefix(path: Path) -> str:
    # The pid lets a later run remove what a killed one left behind.
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_orphaned_temporaries(path: Path) -> None:
    """Delete ``.NAME.tmp-PID-*`` siblings of ``path`` whose process no longer runs on this host."""
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = p.name[len(f".{path.name}.tmp-"):].split("-", 1)[0].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            _remove(p)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Set (or with None, unset) environment variables for the block; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def atomic_dir(path: str | Path, defer: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and an existing ``path`` is left intact.
    Inside a stage's transaction (see :class:`Transaction`) the rename waits for the stage's commit,
    unless ``defer`` is False (resumable parts that must survive a later failure).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; finished outputs get normal permissions
    try:
        yield tmp
        _plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tx = _TRANSACTION.get()
    if defer and tx is not None and tx.covers(path):
        tx.stage(tmp, path)
    else:
        _replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error deleted.

    The temporary file lives in the same folder, so ``os.replace`` is an atomic rename. Inside a
    stage's transaction the rename waits for the stage's commit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get plain open()'s permissions
        tx = _TRANSACTION.get()
        if tx is not None and tx.covers(path):
            tx.stage(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temp file beside ``path``; it replaces ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_EDGE_BYTES = 1 << 20


def path_digest(path: str | None) -> str | None:
    """A short fingerprint of a local file or folder (sizes plus the first and last MiB of each file:
    cheap on multi-GB weights, and any retraining changes them); a hub id or None as it is."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    h = hashlib.blake2b(digest_size=16)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                fh.seek(-_EDGE_BYTES, 2)
                h.update(fh.read(_EDGE_BYTES))
    return h.hexdigest()
