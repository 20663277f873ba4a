"""Two hosts simulated on one machine: two clones in separate folders, one Prefect server and one MLflow
tracking server on 127.0.0.1 (started by scripts/services.sh), one process worker per clone on one
work pool, a local folder as the shared DVC remote. The micro pipeline and a 4-variant ablation run
with ``dispatch=pool``; their stages and variants spread over both workers, every run lands in one
MLflow experiment under its parent run, and a third clone reproduces the outputs from the remote."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

STAGES = ["toy_world", "toy_pretrain", "toy_prefs", "toy_pickscore", "prompts", "noisy_pairs", "train_pm",
          "train_spo", "evaluate_base", "evaluate"]
SPEC = {"table": "multihost_k", "description": "SPO on the tiny profile, k = 2..5, over the work pool.",
        "params": "tiny",
        "train": {"stage": "train_spo", "set": ["train.output_dir={out}/train", "train.rounds=1",
                                                "train.prompts_per_round=1", "sampler.num_steps=2",
                                                "train.export_kohya=false"]},
        "variants": {f"k{k}": [f"sampler.k={k}"] for k in (2, 3, 4, 5)},
        "columns": ["train_spo.total_unet_evals"]}


def _sh(cmd, cwd, env, timeout=900) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def _origin(origin: Path, env: dict) -> Path:
    """A git repository of this checkout's files with the micro profile, the ablation spec and the
    shared DVC remote (holding the input data) as its default."""
    tmp = origin.parent
    _sh(["python", "-m", "spo_core.cli", "params", "micro", "-o", "params.yaml"], origin, env)
    (origin / "multihost_k.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    _sh(["git", "init", "-q", "-b", "main"], origin, env)
    _sh(["dvc", "pull", "-q", "data.dvc"], origin, env)  # from the repository's own store
    _sh(["dvc", "remote", "add", "-d", "shared", str(tmp / "remote")], origin, env)
    _sh(["dvc", "push", "-q", "data.dvc"], origin, env)
    _sh(["git", "add", "-A"], origin, env)
    _sh(["git", "commit", "-qm", "micro"], origin, env)
    return origin


def _clone(origin: Path, dst: Path, env: dict) -> Path:
    _sh(["git", "clone", "-q", str(origin), str(dst)], dst.parent, env)
    _sh(["dvc", "pull", "-q", "data.dvc"], dst, env)  # from the shared remote
    return dst


@pytest.mark.slow
def test_two_hosts_share_one_pool_one_tracking_server_and_one_dvc_remote(tmp_path, copy_checkout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("SPO_DISABLE_MLFLOW", None)
    for k in ("SPO_REPO_ROOT", "SPO_PARENT_RUN_ID", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "SPO_GPUS",
              "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # set by mlflow.set_experiment in earlier tests
        env.pop(k, None)
    origin = _origin(copy_checkout(tmp_path / "origin"), env)
    hosts = {h: _clone(origin, tmp_path / h, env) for h in ("host1", "host2")}

    prefect_port, mlflow_port = _free_port(), _free_port()
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    services = hosts["host1"] / "scripts" / "services.sh"
    started = []  # (script, its environment) to stop at the end

    def service(cmd: str, script: Path, **extra: str) -> None:
        e = {**env, **extra}
        started.append((script, e))
        _sh(["bash", str(script), cmd], script.parents[1], e, timeout=300)

    try:
        service("server", services, SPO_PREFECT_PORT=str(prefect_port), SPO_SERVICES_RUN=str(tmp_path / "svc-server"))
        service("tracking", services, MLFLOW_PORT=str(mlflow_port), SPO_SERVICES_RUN=str(tmp_path / "svc-tracking"),
                SPO_MLFLOW_BACKEND=f"sqlite:///{tmp_path / 'mlflow.db'}",
                SPO_MLFLOW_ARTIFACTS=str(tmp_path / "mlflow-artifacts"))
        for name, clone in hosts.items():  # one worker per host; each host has one (fake) GPU
            service("worker", clone / "scripts" / "services.sh", SPO_SERVICES_RUN=str(tmp_path / f"svc-{name}"),
                    SPO_WORKER_NAME=name, SPO_WORKER_LIMIT="4", SPO_GPUS="0",
                    SPO_GPU_LOCK_DIR=str(tmp_path / f"leases-{name}"))
        _sh(["python", "-m", "flows.deploy", "--pool", "spo"], hosts["host1"], env)
        try:  # --watch shows only the flow's state: a failure needs the workers' logs, where the stage errors are
            _sh(["prefect", "deployment", "run", "spo/full", "-p", "dispatch=pool", "--watch",
                 "--watch-timeout", "1500"], tmp_path, env, timeout=1600)
            _sh(["prefect", "deployment", "run", "ablation/table", "-p", "spec=multihost_k.yaml", "-p",
                 "dispatch=pool", "--watch", "--watch-timeout", "900"], tmp_path, env, timeout=1000)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_worker_errors(tmp_path)}") from None
        coordinator = check_spread_and_tracking(env, hosts, tmp_path / "mlflow-artifacts")
        check_reproducible(tmp_path, origin, coordinator, env)
    finally:
        for script, e in reversed(started):
            subprocess.run(["bash", str(script), "stop"], cwd=script.parents[1], env=e, capture_output=True,
                           timeout=120)


def _worker_errors(tmp_path: Path, lines: int = 80) -> str:
    """The lines of each worker's log from its first error on (or its tail), for a failed deployment run."""
    out = []
    for log in sorted(tmp_path.glob("svc-host*/*.log")):
        text = log.read_text(errors="replace").splitlines()
        first = next((i for i, t in enumerate(text) if "ERROR" in t or "Traceback" in t), max(len(text) - 20, 0))
        out.append(f"--- {log.relative_to(tmp_path)} (from line {first + 1} of {len(text)}):")
        out.extend(text[first:first + lines])
    return "\n".join(out)


def _artifacts(api_url: str, key: str) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # temporary_settings, not the environment: in a full test run the session's test server
    # (prefect_test_harness) holds the settings context and would answer instead.
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))]


def _results(api_url: str, key: str) -> list[dict]:
    from flows.spo import JSON_BLOCK

    return [json.loads(JSON_BLOCK.search(data).group(1)) for data in _artifacts(api_url, key)]


def check_spread_and_tracking(env: dict, hosts: dict[str, Path], store: Path) -> Path:
    """Both workers took stages or variants; every run is in one experiment under its parent; returns
    the clone that ran ``spo/full`` (the one that took in every stage's dvc.lock entry and outputs)."""
    import mlflow

    api = env["PREFECT_API_URL"]
    stages = {r["stage"]: r for r in _results(api, "dvc-stage-result")}
    variants = _results(api, "ablation-variant-result")
    tables = _artifacts(api, "evaluate-table")
    (pipeline_run,) = _results(api, "spo-pipeline-result")
    assert sorted(stages) == sorted(STAGES) and all(r["ran"] for r in stages.values())
    # The evaluation table is a Prefect artifact, with a link to the evaluate stage's MLflow run.
    assert len(tables) == 1 and "toy_reward" in tables[0] and env["MLFLOW_TRACKING_URI"] in tables[0]
    assert len(variants) == 4
    where = [r["repo"] for r in [*stages.values(), *variants]]
    assert set(where) == {str(p.resolve()) for p in hosts.values()}, where  # both workers took work
    from spo_core.dvc_graph import DEFAULT_GPU_STAGES

    for r in stages.values():  # a GPU stage leased its host's one GPU, the others none
        assert r["devices"] == ("0" if r["stage"] in DEFAULT_GPU_STAGES else ""), r

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (exp,) = [e for e in client.search_experiments() if e.name == "spo"]
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    (pipeline,) = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    (table,) = [r for r in runs if r.data.tags.get("stage") == "ablation"]
    rows = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == table.info.run_id]
    assert sorted(r.info.run_name for r in rows) == ["k2", "k3", "k4", "k5"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("mlflow.parentRunId") in by_id for r in runs if r not in (pipeline, table))
    # Artifacts went through the server into its one store, not into a host's folder.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    evaluate = next(r for r in children if r.data.tags["stage"] == "evaluate")
    assert [a.path for a in client.list_artifacts(evaluate.info.run_id)] == ["evaluate"]
    assert any(evaluate.info.run_id in p.as_posix() for p in store.rglob("table.md"))
    assert {s: r["repo"] for s, r in pipeline_run["stages"].items()} == {s: r["repo"] for s, r in stages.items()}
    return Path(pipeline_run["repo"])


def check_reproducible(tmp: Path, origin: Path, coordinator: Path, env: dict) -> None:
    # The clone that ran spo/full took in every stage's dvc.lock entry and output.
    assert "up to date" in _sh(["dvc", "status"], coordinator, env)
    reports = [p for p in tmp.glob("host*/reports/multihost_k.md")]
    assert len(reports) == 1 and "| k5" in reports[0].read_text()
    # A third clone with what a commit would carry (dvc.lock, the metrics files) reproduces the
    # outputs from the DVC remote alone.
    third = _clone(origin, tmp / "host3", env)
    shutil.copy2(coordinator / "dvc.lock", third / "dvc.lock")
    for m in (coordinator / "metrics").glob("*.json"):
        shutil.copy2(m, third / "metrics" / m.name)
    _sh(["dvc", "pull"], third, env)
    assert "up to date" in _sh(["dvc", "status"], third, env)
    for out in ("artifacts/spo/lora", "artifacts/evaluate", "artifacts/pm", "artifacts/toy/base"):
        assert _digest(third / out) == _digest(coordinator / out), out


def test_a_stage_record_carries_its_lock_entry_and_outputs_to_another_clone(tmp_path):
    """What one host ran is up to date in another clone after absorb: params that YAML 1.1 and 1.2
    read differently (`no`, `1e-08`) survive the trip, the cached output comes from the remote and
    the uncached metrics file from the record."""
    from flows import dvc_sync

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    origin = tmp_path / "origin"
    origin.mkdir()
    script = ("import pathlib, yaml; p = yaml.safe_load(open('params.yaml'))['s']; "
              "pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/x.txt').write_text(str(p)); "
              "pathlib.Path('m.json').write_text('{\"n\": 1}')")
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": f"python -c {json.dumps(script)}", "params": ["s.mixed_precision", "s.eps"], "outs": ["out"],
        "metrics": [{"m.json": {"cache": False}}]}}}))
    (origin / "params.yaml").write_text("s:\n  mixed_precision: 'no'\n  eps: 1.0e-08\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "shared",
                                                                  str(tmp_path / "remote")],
                ["git", "add", "-A"], ["git", "commit", "-qm", "s"]):
        _sh(cmd, origin, env)
    a, b = (tmp_path / "a", tmp_path / "b")
    for clone in (a, b):
        _sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    _sh(["dvc", "repro"], a, env)
    dvc_sync.push(a, "s")
    record = dvc_sync.stage_record(a, "s")
    assert record["files"] == {"m.json": '{"n": 1}'}
    dvc_sync.absorb(b, {"s": record})
    assert (b / "out/x.txt").read_text() == (a / "out/x.txt").read_text()
    assert (b / "m.json").read_text() == '{"n": 1}'
    assert "up to date" in _sh(["dvc", "status"], b, env)
