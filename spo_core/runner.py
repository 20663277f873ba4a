"""The one runner of every entry point (stage modules, ``spo`` sub-commands, flows).

It sets up logging, turns SIGTERM into a clean stop (open MLflow runs are closed as KILLED,
temporary folders removed), and turns errors into one line on stderr:

- a :class:`~spo_core.errors.SpoError` prints its message; exit 2 for bad input, 1 for failures;
- infrastructure faults (full disk, read-only folder, a locked or corrupt MLflow database, an
  unreachable tracking or Prefect server, GPU out of memory) print what happened and what to do;
- anything else is a bug: its traceback is kept, exit 1.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import FAILURE, SpoError

log = logging.getLogger(__name__)

INTERRUPTED = 130
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NO_TRACKING = "or run without tracking (SPO_DISABLE_MLFLOW=1)"


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("SPO_LOG_LEVEL", "INFO"), format=LOG_FORMAT)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _tracking_uri() -> str:
    from .tracking import default_tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(create=False)


def _free_space(path: str | None) -> str:
    probe = Path(path or ".").resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free on {probe}"
    except OSError:
        return "free space unknown"


def describe_fault(exc: BaseException) -> str | None:
    """One line for an infrastructure fault anywhere in ``exc``'s chain, or None if it is not one."""
    for e in _chain(exc):
        text = str(e)
        mod = type(e).__module__
        name = getattr(e, "filename", None)
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text \
                or "unexpected pos" in text:  # the last: torch.save's zip writer on a full disk
            where = f" while writing {name}" if name else ""
            return (f"the disk is full{where} ({_free_space(name)}). Fix: free space, or point output_dir (and TMPDIR) "
                    "at a larger disk; training continues from its last checkpoint with --resume")
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (f"cannot write {name or 'a file'}: {e.strerror}. Fix: make the folder writable, or choose another "
                    "output folder (output_dir / SPO_METRICS_DIR / SPO_MLRUNS_DIR)")
        if mod.startswith(("mlflow", "sqlalchemy", "sqlite3")):
            uri = _tracking_uri()
            if "database is locked" in text:
                return (f"MLflow's tracking database ({uri}) is locked by another process. Fix: wait for it and rerun, "
                        f"point MLFLOW_TRACKING_URI at another store, {NO_TRACKING}")
            if any(s in text for s in ("file is not a database", "malformed", "no such table", "no such column")):
                return (f"MLflow's tracking database ({uri}) is unreadable (corrupt or from another MLflow version). "
                        f"Fix: move the file aside to start a new one, point MLFLOW_TRACKING_URI elsewhere, {NO_TRACKING}")
            if any(s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish", "timed out")):
                return (f"the MLflow tracking server {uri} is unreachable. Fix: start it (bash scripts/services.sh start), "
                        f"correct MLFLOW_TRACKING_URI, {NO_TRACKING}")
        if mod.startswith(("httpx", "prefect")) and any(s in text for s in (
                "Connect", "connect", "Connection refused", "Failed to reach API")):
            api = os.environ.get("PREFECT_API_URL") or "the URL in prefect.toml"
            return (f"the Prefect server ({api}) is unreachable. Fix: start it with `bash scripts/services.sh start`, "
                    "or set PREFECT_API_URL to a running server")
        if type(e).__name__ == "OutOfMemoryError" and mod.startswith("torch"):
            return ("out of GPU memory. Fix: lower train.train_batch_size or sampler.decode_batch_size, turn on "
                    "train.gradient_checkpointing, or use mixed precision (bf16)")
    return None


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def run_entrypoint(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` as a command: its return value (default 0) or the error's exit code."""
    configure_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(fn() or 0)
    except SpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"interrupted{': ' + str(exc) if str(exc) else ''}; outputs of this run were not written "
              "(training continues from its last checkpoint with --resume)", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        line = describe_fault(exc)
        if line is None:
            raise
        log.debug("fault", exc_info=True)
        print(f"error: {line}", file=sys.stderr)
        return FAILURE
