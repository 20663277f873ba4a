"""The Prefect flows on temporary git + DVC repositories: DVC's stage order, retries, failures,
metrics files and MLflow runs nested under the pipeline run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spo_core.dvc_graph import (
    DEFAULT_GPU_STAGES,
    DvcGraphError,
    base_name,
    gpu_stages,
    is_gpu_stage,
    stage_order,
)

PY = sys.executable


def make_repo(root: Path, stages: dict, params: dict | None = None) -> Path:
    """A git + DVC repository at ``root`` with ``dvc.yaml`` holding ``stages`` (in the given order)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    with open(root / ".dvc" / "config", "a") as fh:  # `dvc config core.analytics false` etc., without 2 more processes
        fh.write("[core]\n    analytics = false\n    check_update = false\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def shell_stage(script: str, deps=(), outs=(), params=()) -> dict:
    stage = {"cmd": f"{PY} -c {json.dumps(script)}", "deps": list(deps), "outs": list(outs)}
    return {**stage, "params": list(params)} if params else stage


def write(path: str, text: str) -> str:
    return f"import pathlib; pathlib.Path({path!r}).write_text({text!r})"


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    # Listed out of order: DVC's graph, not the file, decides. d is independent of the rest.
    stages = {
        "c": shell_stage(write("c.txt", "c"), deps=["a.txt", "b.txt"], outs=["c.txt"]),
        "a": shell_stage(write("a.txt", "a"), outs=["a.txt"]),
        "b": shell_stage(write("b.txt", "b"), deps=["a.txt"], outs=["b.txt"]),
        "d": shell_stage(write("d.txt", "d") + "; open('d.count', 'a').write('x')", outs=["d.txt"]),
    }
    return make_repo(tmp_path_factory.mktemp("toy"), stages)


# ----------------------------------------------------------------------------------------------
# spo_core.dvc_graph


def test_stage_order_is_dvcs_own(toy_repo):
    assert stage_order(toy_repo) == ["a", "b", "c", "d"]
    assert stage_order(toy_repo, "c") == ["a", "b", "c"]  # the target's ancestors only
    assert stage_order(toy_repo, "b") == ["a", "b"]
    log = subprocess.run(["dvc", "repro", "c"], cwd=toy_repo, capture_output=True, text=True, check=True).stdout
    ran = [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")]
    assert ran == ["a", "b", "c"]  # what `dvc repro` itself does


def test_stage_order_errors_name_the_fix(toy_repo, tmp_path):
    with pytest.raises(DvcGraphError, match=r"unknown stage 'nope'.*\['a', 'b', 'c', 'd'\]"):
        stage_order(toy_repo, "nope")
    with pytest.raises(DvcGraphError, match="no dvc.yaml"):
        stage_order(tmp_path)


def test_the_graph_is_read_under_dvcs_lock_never_from_a_half_written_dvc_lock(toy_repo):
    import threading

    from dvc.repo import Repo, lock_repo

    from flows.dvc_sync import stage_record

    subprocess.run(["dvc", "repro", "a"], cwd=toy_repo, capture_output=True, check=True)
    lock_file = toy_repo / "dvc.lock"
    good = lock_file.read_text()
    got, held = {}, threading.Event()

    def writer() -> None:  # another stage of this clone, committing its dvc.lock entry
        with Repo(str(toy_repo)) as repo, lock_repo(repo):
            lock_file.write_text("stages:\n  a:\n")  # half-written: DVC's schema check rejects it
            held.set()
            time.sleep(1.5)
            lock_file.write_text(good)

    def reader(name, fn) -> None:
        try:
            got[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            got[name] = exc

    t = threading.Thread(target=writer)
    t.start()
    assert held.wait(10)
    readers = [threading.Thread(target=reader, args=("order", lambda: stage_order(toy_repo, "b"))),
               threading.Thread(target=reader, args=("record", lambda: stage_record(toy_repo, "a")))]
    for r in readers:
        r.start()
    for r in [t, *readers]:
        r.join(30)
    assert got["order"] == ["a", "b"], got
    assert isinstance(got["record"], dict) and got["record"]["lock"]["cmd"], got


def test_gpu_stages_argument_environment_default(monkeypatch):
    monkeypatch.delenv("SPO_GPU_STAGES", raising=False)
    assert gpu_stages() == DEFAULT_GPU_STAGES and {"train_spo", "noisy_pairs", "evaluate"} <= DEFAULT_GPU_STAGES
    assert is_gpu_stage("train_spo") and is_gpu_stage("train_spo@k2") and not is_gpu_stage("prompts")
    assert base_name("sub/dvc.yaml:evaluate@sd15") == "evaluate"
    monkeypatch.setenv("SPO_GPU_STAGES", "toy_pretrain, evaluate")
    assert gpu_stages() == {"toy_pretrain", "evaluate"} and not is_gpu_stage("train_spo")
    monkeypatch.setenv("SPO_GPU_STAGES", "")
    assert gpu_stages() == frozenset()
    assert gpu_stages(["a"]) == {"a"} and gpu_stages("a,b") == {"a", "b"}
    assert is_gpu_stage("x", gpu=["x"]) and not is_gpu_stage("x", gpu=[])


# ----------------------------------------------------------------------------------------------
# running one stage


def test_failed_stage_reports_stderr_tail_and_a_held_lock_is_waited_for(toy_repo):
    import threading
    import time

    from dvc.lock import make_lock

    from flows.spo import StageFailed, run_dvc_stage

    broken = make_repo(toy_repo.parent / "broken", {
        "bad": {"cmd": f"{PY} -c \"import sys; print('some output'); sys.exit('boom: disk on fire')\"", "outs": ["x"]}})
    with pytest.raises(StageFailed) as err:
        run_dvc_stage("bad", broken)
    assert err.value.returncode != 0 and "boom: disk on fire" in str(err.value) and "'bad'" in str(err.value)
    assert not err.value.transient
    # Another dvc process holds the repository lock (stages running at once in one clone take it in
    # turn): the stage waits for it instead of failing.
    lock = make_lock(str(toy_repo / ".dvc" / "tmp" / "lock"), tmp_dir=str(toy_repo / ".dvc" / "tmp"))
    lock.lock()
    threading.Timer(4, lock.unlock).start()
    t0 = time.monotonic()
    assert run_dvc_stage("a", toy_repo, force=True)["ran"]
    assert time.monotonic() - t0 >= 3.5


# ----------------------------------------------------------------------------------------------
# the flows, against a temporary Prefect server


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """MLflow on, into tmp_path; stage subprocesses single-threaded (a busy 2-core machine).

    Yields a function returning this store's runs (experiment ``spo``) as a DataFrame.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("SPO_DISABLE_MLFLOW", raising=False)
    monkeypatch.delenv("SPO_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import mlflow

    mlflow.set_tracking_uri(uri)  # mlflow's process-global URI wins over the environment variable
    yield lambda: mlflow.search_runs(experiment_names=["spo"], order_by=["start_time ASC"])
    mlflow.set_tracking_uri(None)


def _task_runs(flow_result_stages: list[str]) -> dict[str, set[str]]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return {tr.name: set(tr.tags) for tr in client.read_task_runs() if tr.name in flow_result_stages}


def micro_params() -> dict:
    from spo_core.config import read_profile

    spo = read_profile("tiny")["train_spo"]
    spo["sampler"].update(num_steps=2, k=2)
    spo["train"].update(rounds=1, prompts_per_round=1, export_kohya=False, output_dir="artifacts/spo")
    spo["prompts"] = {"source": "text", "path": "artifacts/prompts/train.txt"}
    prompts = {"train": {"source": "list", "prompts": ["a red circle", "a blue square"]},
               "eval": {"source": "list", "prompts": ["a green star"]}, "output_dir": "artifacts/prompts"}
    return {"prompts": prompts, "train_spo": spo}


@pytest.mark.slow
def test_spo_flow_runs_the_micro_pipeline_in_dvc_order(prefect_api, tracked, tmp_path):
    from flows.spo import spo

    stages = {  # train_spo first in the file; it needs the prompts stage's output
        "train_spo": {"cmd": "python -m spo_core.stages.train_spo", "deps": ["artifacts/prompts/train.txt"],
                      "params": ["train_spo"], "outs": ["artifacts/spo"],
                      "metrics": [{"metrics/train_spo.json": {"cache": False}}]},
        "prompts": {"cmd": "python -m spo_core.stages.prompts", "params": ["prompts"], "outs": ["artifacts/prompts"],
                    "metrics": [{"metrics/prompts.json": {"cache": False}}]},
    }
    repo = make_repo(tmp_path / "repo", stages, micro_params())
    result = spo(repo=str(repo))

    assert list(result) == ["prompts", "train_spo"]
    assert json.loads((repo / "metrics/prompts.json").read_text())["num_train"] == 2
    assert json.loads((repo / "artifacts/spo/metrics.json").read_text())["rounds"] == 1  # all figures (metrics/: headline)
    assert "final_loss" in json.loads((repo / "metrics/train_spo.json").read_text())
    assert (repo / "artifacts/spo/lora").is_dir() and "train_spo" in (repo / "dvc.lock").read_text()
    runs = tracked()
    parent = runs[runs["tags.stage"] == "pipeline"]
    assert len(parent) == 1 and parent["status"].item() == "FINISHED"
    assert parent["params.stages"].item() == "prompts,train_spo"
    flow_run = parent["tags.prefect.flow_run"].item()
    assert flow_run and parent["tags.mlflow.runName"].item() == f"pipeline [flow {flow_run}]"
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].item()]
    assert children["tags.stage"].tolist() == ["prompts", "train_spo"]  # by start time
    assert children["tags.mlflow.runName"].tolist() == [f"prompts [flow {flow_run}]", f"train_spo [flow {flow_run}]"]
    assert (children["status"] == "FINISHED").all() and children["metrics.train_spo/rounds"].iloc[1] == 1
    # Nothing to do: every stage is up to date, and no empty pipeline run is left behind.
    assert not any(r["ran"] for r in spo(repo=str(repo)).values())
    assert len(tracked()) == len(runs)
    tags = _task_runs(["prompts", "train_spo"])
    assert "gpu" in tags["train_spo"] and "gpu" not in tags["prompts"]


def test_spo_flow_retries_a_lock_failure_and_fails_with_the_stage_stderr(prefect_api, tracked, tmp_path, monkeypatch):
    import flows.spo as spo_mod

    monkeypatch.setattr(spo_mod, "repro_stage", spo_mod.repro_stage.with_options(retry_delay_seconds=0))
    flaky = ("import pathlib, sys; n = pathlib.Path('attempts'); n.write_text(n.read_text() + 'x' if n.exists() else 'x');"
             "sys.exit('ERROR: Unable to acquire lock (simulated)') if n.read_text() == 'x' else "
             "pathlib.Path('one.txt').write_text('1')")
    broken = "import sys; open('tries', 'a').write('x'); sys.exit('stage two: out of cheese')"
    repo = make_repo(tmp_path / "repo", {
        "two": {"cmd": f"{PY} -c {json.dumps(broken)}", "deps": ["one.txt"], "outs": ["two.txt"]},
        "one": {"cmd": f"{PY} -c {json.dumps(flaky)}", "outs": ["one.txt"]},
        "three": shell_stage(write("three.txt", "3"), deps=["two.txt"], outs=["three.txt"]),
    })
    with pytest.raises(spo_mod.StageFailed, match="out of cheese") as err:
        spo_mod.spo(repo=str(repo))
    assert err.value.stage == "two"
    assert (repo / "attempts").read_text() == "xx"  # the lock failure was retried once
    assert (repo / "tries").read_text() == "x"  # a real failure is not retried
    assert not (repo / "three.txt").exists()  # nothing after the failed stage ran
    parent = tracked().set_index("tags.stage").loc["pipeline"]
    assert parent["status"] == "FAILED" and parent["params.stages"] == "one,two,three"


def test_stage_flow_runs_one_stage_skips_it_when_up_to_date_and_forces_it(prefect_api, toy_repo):
    from flows.spo import stage

    def runs() -> int:  # how often d's command ran
        count = toy_repo / "d.count"
        return len(count.read_text()) if count.exists() else 0

    before = runs()
    assert stage(stage="d", repo=str(toy_repo))["stage"] == "d"
    assert (toy_repo / "d.txt").read_text() == "d" and runs() == before + 1
    stage(stage="d", repo=str(toy_repo))  # DVC finds it up to date: the command does not run
    assert runs() == before + 1
    stage(stage="d", force=True, repo=str(toy_repo))
    assert runs() == before + 2
    with pytest.raises(DvcGraphError, match="unknown stage 'zz'"):
        stage(stage="zz", repo=str(toy_repo))


def test_install_params_writes_a_profile_or_file_over_params_yaml(tmp_path):
    from flows.spo import install_params
    from spo_core.config import ConfigError
    from spo_core.params_file import params_text

    install_params("tiny", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == params_text("tiny")  # as `spo params tiny` writes it
    own = tmp_path / "mine.yaml"
    own.write_text("other: {a: 1}\n")
    install_params(str(own), tmp_path)
    mine = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(mine) == {"other": {"a": 1}}
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        install_params("nope", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == mine  # untouched after an error


def _stamp(name: str, body: str = "") -> str:
    """A stage script that records its start and end times in <name>.span and runs ``body`` between."""
    return (f"import os, pathlib, time; t0 = time.time(); {body}; "
            f"pathlib.Path('{name}.span').write_text(f'{{t0}} {{time.time()}}')")


@pytest.mark.slow
def test_spo_flow_is_dvcs_graph_runs_independent_stages_at_once_and_publishes_tables(
        prefect_api, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.spo import spo

    monkeypatch.setenv("SPO_GPUS", "0,1,2,3")
    monkeypatch.setenv("SPO_GPU_LOCK_DIR", str(tmp_path / "leases"))
    # slow and fast are independent; gpu2 asks for 2 GPUs (launch.num_processes); report needs both
    # and writes a result table.
    devices = "pathlib.Path('gpu2.txt').write_text(os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))"
    table = ("os.makedirs('report', exist_ok=True); "
             "pathlib.Path('report/table.md').write_text('| model | reward |\\n|---|---|\\n| lora | 0.9 |\\n')")
    repo = make_repo(tmp_path / "repo", {
        "report": shell_stage(_stamp("report", table), deps=["slow.txt", "gpu2.txt"], outs=["report"]),
        "slow": shell_stage(_stamp("slow", "time.sleep(4); " + write("slow.txt", "s")), outs=["slow.txt"]),
        "gpu2": shell_stage(_stamp("gpu2", "time.sleep(4); " + devices), params=["gpu2.launch"], outs=["gpu2.txt"]),
    }, params={"gpu2": {"launch": {"num_processes": 2}}})

    state = spo(repo=str(repo), gpu_stages=["gpu2"], return_state=True)
    result, flow_run_id = state.result(), state.state_details.flow_run_id

    assert set(result) == {"slow", "gpu2", "report"} and all(r["ran"] for r in result.values())
    spans = {s: tuple(map(float, (repo / f"{s}.span").read_text().split())) for s in result}
    assert spans["slow"][0] < spans["gpu2"][1] and spans["gpu2"][0] < spans["slow"][1]  # they overlapped
    assert spans["report"][0] >= max(spans["slow"][1], spans["gpu2"][1])  # after both
    seen = (repo / "gpu2.txt").read_text().split(",")
    assert len(seen) == 2 and len(set(seen)) == 2 and set(seen) <= {"0", "1", "2", "3"}
    assert result["gpu2"]["devices"] == ",".join(seen) and result["slow"]["devices"] == ""

    with get_client(sync_client=True) as client:
        runs = {tr.id: tr for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run_id])))}
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    edges = {tr.name: sorted(runs[i.id].name for i in tr.task_inputs.get("wait_for", [])) for tr in runs.values()}
    assert edges == {"slow": [], "gpu2": [], "report": ["gpu2", "slow"]}  # DVC's edges, drawn by the Prefect UI
    tables = [a for a in artifacts if a.key == "report-table"]
    assert len(tables) == 1 and "| lora | 0.9 |" in tables[0].data
