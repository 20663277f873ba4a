"""GPU leases on one host: a task asks for n devices and gets concrete ones for its processes.

Prefect bounds how many tasks run (global concurrency limits, the ``gpu`` tag limit, work-pool
concurrency) but assigns no device. A lease does: the host's inventory is ``SPO_GPUS`` (``0,1,2,3``;
empty for none) or, when that is unset, the devices ``nvidia-smi -L`` lists. Each device is an
exclusive ``flock`` on ``<lock dir>/gpu<id>.lock`` (``SPO_GPU_LOCK_DIR``, default a per-user folder
under the temp dir), so every process on the host, whatever flow it belongs to, sees the same leases.
The kernel drops a flock when the last process holding its file closes it: a lease ends when its
task ends, fails or is cancelled, and also when its process is killed. :func:`stage_env` passes the
lock files to the stage process, so a lease outlives a killed flow process as long as the stage
still runs on the device.

    with gpu_lease(2, label="train_spo") as lease:
        subprocess.run(cmd, env={**os.environ, **lease.env}, pass_fds=lease.fds)

    python -m flows.gpus          # the inventory and who holds which device
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from spo_core.errors import InputError

log = logging.getLogger(__name__)

GPUS_ENV = "SPO_GPUS"
LOCK_DIR_ENV = "SPO_GPU_LOCK_DIR"
POLL_S = 0.5


class GpuLeaseError(InputError, RuntimeError):
    """A lease that can never be granted (more devices than the host has) or a bad inventory."""


@dataclasses.dataclass(frozen=True)
class Lease:
    devices: tuple[str, ...]
    fds: tuple[int, ...]

    @property
    def env(self) -> dict[str, str]:
        """For the leased process; empty without devices (a CPU host), so nothing is hidden there."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)} if self.devices else {}


def inventory() -> list[str]:
    """This host's GPU ids: ``SPO_GPUS`` (comma-separated, empty for none), else what ``nvidia-smi -L`` lists."""
    configured = os.environ.get(GPUS_ENV)
    if configured is not None:
        ids = [g.strip() for g in configured.split(",") if g.strip()]
        if len(set(ids)) != len(ids):
            raise GpuLeaseError(f"{GPUS_ENV}={configured!r} names a device twice: list each GPU id once, e.g. 0,1,2,3")
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("nvidia-smi -L failed (%s): no GPUs assumed; set %s=0,1,... to name them", exc, GPUS_ENV)
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def lock_dir() -> Path:
    path = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"spo-gpu-leases-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _release(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor of the file drops its flock


def _grab(devices: list[str], n: int, label: str) -> Lease | None:
    """Take n free devices at once (under the allocation lock, so that two waiting tasks never each hold
    half of what they need), or none."""
    folder = lock_dir()
    alloc = os.open(folder / "alloc.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(alloc, fcntl.LOCK_EX)
        got: list[tuple[str, int]] = []
        for dev in devices:
            fd = _try_lock(folder / f"gpu{dev}.lock")
            if fd is not None:
                got.append((dev, fd))
                if len(got) == n:
                    break
        if len(got) < n:
            _release(fd for _, fd in got)
            return None
        for _, fd in got:  # who holds it, for `python -m flows.gpus`
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{label} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        return Lease(tuple(d for d, _ in got), tuple(fd for _, fd in got))
    finally:
        os.close(alloc)


@contextlib.contextmanager
def gpu_lease(n: int, label: str = "task", devices: list[str] | None = None,
              poll_s: float = POLL_S) -> Iterator[Lease]:
    """Hold ``n`` of this host's GPUs for the ``with`` body, waiting while fewer are free.

    ``n = 0``, or a host without GPUs, gives an empty lease (the task runs on the CPU as configured).
    Raises :class:`GpuLeaseError` when ``n`` exceeds the inventory: such a wait would never end.
    """
    devices = inventory() if devices is None else list(devices)
    if n <= 0 or not devices:
        yield Lease((), ())
        return
    if n > len(devices):
        raise GpuLeaseError(f"{label} needs {n} GPUs, this host has {len(devices)} ({GPUS_ENV}={','.join(devices)}): "
                            f"lower its launch.num_processes or run it on a host with {n}")
    t0, lease, said = time.monotonic(), None, False
    while lease is None:
        lease = _grab(devices, n, label)
        if lease is None:
            if not said:
                log.info("%s waits for %d free GPU(s) of %s", label, n, ",".join(devices))
                said = True
            time.sleep(poll_s)
    log.info("%s leased GPU(s) %s%s", label, ",".join(lease.devices),
             f" after {time.monotonic() - t0:.0f} s" if said else "")
    try:
        yield lease
    finally:
        _release(lease.fds)
        log.info("%s released GPU(s) %s", label, ",".join(lease.devices))


def holders() -> dict[str, str | None]:
    """Per device of the inventory: who holds it (the label written at lease time), None when free.

    Read under the allocation lock (shared): a grab in progress holds it, so this never sees a device
    locked before its label is written, nor the brief locks of a grab that fails, and never makes a
    grab fail by probing a free device at the same moment."""
    folder, out = lock_dir(), {}
    alloc = os.open(folder / "alloc.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(alloc, fcntl.LOCK_SH)
        for dev in inventory():
            path = folder / f"gpu{dev}.lock"
            fd = _try_lock(path)
            if fd is None:
                out[dev] = path.read_text().strip() or "leased"
            else:
                _release([fd])
                out[dev] = None
    finally:
        os.close(alloc)
    return out


def main() -> int:
    devices = holders()
    if not devices:
        print(f"no GPUs on this host (set {GPUS_ENV}=0,1,... to name them)")
    for dev, who in devices.items():
        print(f"GPU {dev}: {who or 'free'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
