"""scripts/services.sh: refusals to bind without authentication, and one real MLflow tracking server.

Every test runs the script with its own run folder (SPO_SERVICES_RUN), PREFECT_HOME and stores under
tmp_path, so nothing touches ~/.prefect, the repository's mlruns/ or services a developer has running.
The Prefect server is not started here (one server start per file keeps the suite fast): its auth
check was verified by hand, see /work/notes/readme_services.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "services.sh"

# Settings from the developer's shell that would change what the script does.
_SCRUB = (
    "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "PREFECT_API_URL",
    "SPO_MLFLOW_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "SPO_MLFLOW_ALLOWED_HOSTS",
    "SPO_PREFECT_HOST", "SPO_MLFLOW_HOST", "SPO_WORKER_LIMIT",
    # mlflow.set_experiment() in an earlier test of the session exports the experiment's id: a fresh
    # server has no such experiment.
    "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(SPO_SERVICES_RUN=str(tmp_path / "run"), PREFECT_HOME=str(tmp_path / "prefect"),
               SPO_SERVICES_TIMEOUT="120")
    env.update(extra)
    return env


def _services(tmp_path: Path, command: str, timeout: float = 30, **extra: str):
    return subprocess.run(["bash", str(SCRIPT), command], env=_env(tmp_path, **extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line, line  # one clear line
    for needle in needles:
        assert needle in line, line


def test_prefect_server_refuses_wildcard_without_auth(tmp_path):
    result = _services(tmp_path, "server", SPO_PREFECT_HOST="0.0.0.0", SPO_PREFECT_PORT=str(_free_port()))
    _refused(result, "refusing to bind the Prefect server to 0.0.0.0 without authentication: "
                     "set PREFECT_SERVER_API_AUTH_STRING=user:password (and PREFECT_API_AUTH_STRING on the clients)")
    assert not (tmp_path / "run" / "prefect-server.pid").exists()  # refused before starting anything


def test_prefect_server_refuses_auth_string_without_password(tmp_path):
    result = _services(tmp_path, "server", SPO_PREFECT_HOST="10.1.2.3",
                       PREFECT_SERVER_API_AUTH_STRING="just-a-user")
    _refused(result, "PREFECT_SERVER_API_AUTH_STRING must have the form user:password")


def test_tracking_refuses_wildcard_without_auth(tmp_path):
    result = _services(tmp_path, "tracking", SPO_MLFLOW_HOST="0.0.0.0", MLFLOW_PORT=str(_free_port()))
    _refused(result, "refusing to bind the MLflow tracking server to 0.0.0.0 without authentication",
             "SPO_MLFLOW_ADMIN_PASSWORD")
    assert not (tmp_path / "run" / "tracking.pid").exists()


def test_tracking_refuses_short_admin_password(tmp_path):
    # MLflow would reject it inside the server; the script names the variable instead.
    result = _services(tmp_path, "tracking", SPO_MLFLOW_HOST="0.0.0.0", SPO_MLFLOW_ADMIN_PASSWORD="short")
    _refused(result, "SPO_MLFLOW_ADMIN_PASSWORD is too short")


def test_worker_refuses_bad_limit(tmp_path):
    _refused(_services(tmp_path, "worker", SPO_WORKER_LIMIT="two"), "SPO_WORKER_LIMIT must be a positive integer")


def test_unknown_command_prints_usage(tmp_path):
    result = _services(tmp_path, "bogus")
    assert result.returncode == 2 and "server|tracking|worker" in result.stderr


_CLIENT = """
import json, pathlib, mlflow
pathlib.Path("note.txt").write_text("shared store")
with mlflow.start_run() as run:
    mlflow.log_metric("loss", 0.25)
    mlflow.log_artifact("note.txt")
got = mlflow.get_run(run.info.run_id)
print(json.dumps({"run_id": run.info.run_id, "artifact_uri": got.info.artifact_uri,
                  "loss": got.data.metrics["loss"]}))
"""


@pytest.fixture
def tracking_server(tmp_path):
    """A tracking server started by the script on a free port, stopped by the script afterwards."""
    port = _free_port()
    settings = dict(MLFLOW_PORT=str(port), SPO_MLFLOW_WORKERS="1",
                    SPO_MLFLOW_BACKEND=f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}",
                    SPO_MLFLOW_ARTIFACTS=str(tmp_path / "store"))
    try:
        started = _services(tmp_path, "tracking", timeout=150, **settings)
        assert started.returncode == 0, started.stdout + started.stderr
        yield port, started.stdout
    finally:
        stopped = _services(tmp_path, "stop", timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.mark.slow  # ~25 s: the server start, a client process, stop
def test_tracking_server_stores_artifacts_in_the_shared_destination(tmp_path, tracking_server):
    port, out = tracking_server
    uri = f"http://127.0.0.1:{port}"
    assert f"MLFLOW_TRACKING_URI={uri}" in out
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["MLFLOW_TRACKING_URI"] = uri
    done = subprocess.run([sys.executable, "-c", _CLIENT], cwd=client_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["loss"] == 0.25
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")  # uploaded through the server
    stored = list((tmp_path / "store").rglob("note.txt"))
    assert len(stored) == 1 and run["run_id"] in stored[0].as_posix()
    assert stored[0].read_text() == "shared store"
    assert not (client_dir / "mlruns").exists() and not (client_dir / "mlartifacts").exists()
    status = _services(tmp_path, "status")
    assert "tracking: running" in status.stdout and uri in status.stdout


@pytest.mark.slow  # ~25 s: the worker's start (Prefect import, retries) and its clean shutdown
def test_stop_ends_a_worker_promptly(tmp_path):
    """Regression: background jobs of a non-interactive bash ignore SIGINT, and Prefect's worker turns
    SIGTERM into SIGINT, so `stop` used to wait 20 s and KILL it (its flow runs got no clean shutdown).
    The worker needs no server for this: it keeps retrying an API that is not there."""
    dead_api = f"http://127.0.0.1:{_free_port()}/api"
    try:
        started = _services(tmp_path, "worker", timeout=150, PREFECT_API_URL=dead_api,
                            SPO_WORKER_NAME="test-worker")
        assert started.returncode == 0, started.stdout + started.stderr
        # The script returns once the worker reports started, i.e. Prefect's signal handlers are set.
        assert "Worker 'test-worker' started" in (tmp_path / "run" / "worker.log").read_text()
    finally:
        t0 = time.monotonic()
        stopped = _services(tmp_path, "stop", timeout=60, PREFECT_API_URL=dead_api)
        elapsed = time.monotonic() - t0
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "worker stopped" in stopped.stdout and elapsed < 19, (elapsed, stopped.stdout)
