"""GPU leases (flows/gpus.py) and the ablation flow on a fake inventory of 4 GPUs on one host: each
variant process sees its own device in CUDA_VISIBLE_DEVICES, the fifth waits for a free one, a
crashed variant gives its device back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from flows.gpus import GpuLeaseError, gpu_lease, holders, inventory


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SPO_GPUS", "0,1,2,3")
    monkeypatch.setenv("SPO_GPU_LOCK_DIR", str(tmp_path / "leases"))
    return tmp_path / "leases"


def test_inventory_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPO_GPUS", "0, 2,3")
    assert inventory() == ["0", "2", "3"]
    monkeypatch.setenv("SPO_GPUS", "")
    assert inventory() == []
    monkeypatch.setenv("SPO_GPUS", "1,1")
    with pytest.raises(GpuLeaseError, match="names a device twice"):
        inventory()


def test_leases_are_disjoint_wait_and_end_with_the_block(gpus):
    with gpu_lease(2, "a") as a, gpu_lease(1, "b") as b:
        assert len(a.devices) == 2 and len(b.devices) == 1 and not set(a.devices) & set(b.devices)
        assert a.env == {"CUDA_VISIBLE_DEVICES": ",".join(a.devices)}
        assert holders()[a.devices[0]].startswith("a pid")
        got = []
        waiter = threading.Thread(target=lambda: got.append(gpu_lease(2, "c").__enter__().devices))
        waiter.start()
        waiter.join(1.5)
        assert waiter.is_alive() and not got  # one GPU free, c needs two
    waiter.join(10)
    assert len(got[0]) == 2  # granted once a and b ended
    with gpu_lease(0, "cpu") as none:
        assert none.devices == () and none.env == {}
    with pytest.raises(GpuLeaseError, match="needs 5 GPUs, this host has 4"):
        gpu_lease(5, "big").__enter__()


def test_holders_never_see_a_lease_before_its_label(gpus, monkeypatch):
    # A grab that is slow to write its label (as under load): holders() must wait for it, not report
    # the device as held by nobody in particular (CI once saw "leased" here, mid-grab).
    writing, real_pwrite = threading.Event(), os.pwrite

    def slow_pwrite(fd, data, offset):
        writing.set()
        time.sleep(0.5)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    lease_cm, leases = gpu_lease(1, "slow"), []  # kept referenced: a collected generator would release it
    grabber = threading.Thread(target=lambda: leases.append(lease_cm.__enter__()))
    grabber.start()
    assert writing.wait(10)
    seen = holders()
    grabber.join(10)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert seen[leases[0].devices[0]].startswith("slow pid")
    lease_cm.__exit__(None, None, None)
    assert not any(holders().values())


def test_a_killed_holder_releases_its_lease_and_a_child_keeps_it(gpus):
    # A process that holds all four GPUs, killed with SIGKILL (no cleanup code runs).
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from flows.gpus import gpu_lease
        with gpu_lease(4, "doomed"):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert holder.stdout.readline().strip() == "held"
    assert all(holders().values())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert not any(holders().values())
    # The lease's lock files passed to a child keep the devices leased while the child runs.
    with gpu_lease(1, "parent") as lease:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=lease.fds)
    try:
        assert holders()[lease.devices[0]] is not None  # the parent's block ended; the child still runs
    finally:
        child.kill()
        child.wait()
    assert holders()[lease.devices[0]] is None


# ----------------------------------------------------------------------------------------------
# the ablation flow


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"prompts": {"train": {"source": "list", "prompts": ["a", "b", "c", "d"]},
                     "eval": {"source": "list", "prompts": ["e", "f"]}}}))
    return tmp_path


def _spec(workdir, table: str, variants: dict) -> str:
    spec = {"table": table, "params": "params.yaml",
            "train": {"stage": "prompts", "set": ["output_dir={out}/prompts"]}, "variants": variants}
    (workdir / f"{table}.yaml").write_text(yaml.safe_dump(spec))
    return f"{table}.yaml"


@pytest.mark.slow
def test_five_variants_on_four_gpus_run_four_at_once_on_distinct_devices(gpus, workdir, tracked, monkeypatch,
                                                                        prefect_api):
    from flows.ablation import ablation

    monkeypatch.setenv("SPO_GPU_STAGES", "prompts")  # the cheap stage stands in for GPU training
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _spec(workdir, "five", {f"n{i}": [f"num_train={i}"] for i in range(1, 6)})
    snapshots: list[dict[str, str]] = []  # device -> variant, while the flow runs
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            held = {d: who.split(" pid")[0].split()[-1] for d, who in holders().items() if who}
            if not snapshots or held != snapshots[-1]:
                snapshots.append(held)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        rows = ablation(spec=spec)
    finally:
        done.set()
        sampler.join()

    assert [r["prompts.num_train"] for r in rows] == [1, 2, 3, 4, 4]  # 4 training prompts exist
    full = [s for s in snapshots if len(s) == 4]
    assert full and max(len(s) for s in snapshots) == 4  # four at once, never more
    first = set(full[0].values())
    fifth = ({f"n{i}" for i in range(1, 6)} - first).pop()
    when = next(i for i, s in enumerate(snapshots) if fifth in s.values())
    assert when > snapshots.index(full[0])  # the fifth got a device only after the four had theirs
    runs = tracked()
    variants = runs[runs["tags.stage"] == "ablation_variant"].set_index("tags.mlflow.runName")
    assert len(variants) == 5 and (variants["status"] == "FINISHED").all()
    seen = variants["tags.cuda_visible_devices"].to_dict()  # what each variant's process saw
    for snap in snapshots:
        for device, v in snap.items():
            assert seen[v] == device  # a single device: the one its lease held
    assert len({seen[v] for v in first}) == 4
    assert not any(holders().values())  # every lease ended with its variant


@pytest.mark.slow
def test_a_crashed_variant_releases_its_gpu(gpus, workdir, tracked, monkeypatch, prefect_api):
    from flows.ablation import ablation

    monkeypatch.setenv("SPO_GPUS", "0")  # one device: the good variant can only run once the other let go
    monkeypatch.setenv("SPO_GPU_STAGES", "prompts")
    spec = _spec(workdir, "crash", {"bad": ["train.source=text", "train.path=missing.txt"], "good": ["num_train=2"]})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 variants failed.*bad.*missing\.txt"):
        ablation(spec=spec)
    assert time.monotonic() - t0 < 120
    runs = tracked()
    good = runs[runs["tags.mlflow.runName"] == "good"]
    assert good["status"].item() == "FINISHED" and good["tags.cuda_visible_devices"].item() == "0"
    assert holders() == {"0": None}
