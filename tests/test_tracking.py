"""spo_core.tracking against a real (temporary) SQLite MLflow store, read back with search_runs."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from pydantic import BaseModel


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    # One SQLite store per module: creating one runs MLflow's schema migrations (seconds).
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def mlflow_store(store_dir, monkeypatch, request):
    """Tracking on, into a temporary SQLite store, in an experiment of this test's own; yields mlflow."""
    monkeypatch.delenv("SPO_DISABLE_MLFLOW", raising=False)
    monkeypatch.delenv("SPO_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(store_dir / "mlruns"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'mlflow.db'}")
    monkeypatch.setenv("SPO_EXPERIMENT", request.node.name)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store_dir / 'mlflow.db'}")  # the process-global URI wins over the env
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _runs(mlflow) -> pd.DataFrame:
    import os

    return mlflow.search_runs(experiment_names=[os.environ["SPO_EXPERIMENT"]], order_by=["start_time ASC"])


def test_stage_run_logs_params_metrics_table_and_finishes(mlflow_store):
    from spo_core import tracking

    table = pd.DataFrame({"variant": ["a", "b"], "score": [0.5, 0.75]})
    with tracking.stage_run("train_spo", params={"sampler": {"k": 4, "kappa": 750}, "lr": 1e-3}) as run:
        tracking.log_metrics({"loss": 0.69, "nested": {"x": 2}, "flag": True, "name": "text"})
        tracking.log_metrics({"loss": 0.5}, step=1)
        tracking.log_table(table, "results")
    row = _runs(mlflow_store).iloc[0]
    assert row["run_id"] == run.info.run_id and row["status"] == "FINISHED"
    assert row["tags.mlflow.runName"] == "train_spo" and row["tags.stage"] == "train_spo"
    assert row["params.sampler.k"] == "4" and row["params.sampler.kappa"] == "750" and row["params.lr"] == "0.001"
    # Keys start with the stage: MLflow's chart view then draws each stage in a section of its own.
    assert row["metrics.train_spo/loss"] == 0.5 and row["metrics.train_spo/nested.x"] == 2.0
    assert not [c for c in row.index if c.startswith("metrics.") and not c.startswith("metrics.train_spo/")]
    assert "metrics.train_spo/flag" not in row and "metrics.train_spo/name" not in row  # only numbers become metrics
    history = mlflow_store.tracking.MlflowClient().get_metric_history(run.info.run_id, "train_spo/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.69), (1, 0.5)]
    loaded = mlflow_store.load_table("results.json", run_ids=[run.info.run_id])
    assert loaded["variant"].tolist() == ["a", "b"] and loaded["score"].tolist() == [0.5, 0.75]
    md = mlflow_store.artifacts.load_text(f"runs:/{run.info.run_id}/results.md")
    assert "| a " in md and "0.75" in md


def test_failing_stage_is_marked_failed_and_the_error_propagates(mlflow_store):
    from spo_core import tracking

    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("evaluate"):
        tracking.log_metrics({"partial": 1.0})
        raise RuntimeError("boom")
    row = _runs(mlflow_store).iloc[0]
    assert row["status"] == "FAILED" and row["metrics.evaluate/partial"] == 1.0
    assert mlflow_store.active_run() is None


def test_parent_from_environment_and_explicit_nesting(mlflow_store, monkeypatch):
    from spo_core import tracking

    with tracking.stage_run("pipeline") as parent:
        pass
    monkeypatch.setenv("SPO_PARENT_RUN_ID", parent.info.run_id)  # what the Prefect flow passes to stages
    with tracking.stage_run("prompts") as child, tracking.stage_run("inner", nested_parent=child.info.run_id) as grandchild:
        pass
    runs = _runs(mlflow_store).set_index("tags.mlflow.runName")
    assert runs.loc["prompts", "tags.mlflow.parentRunId"] == parent.info.run_id
    assert runs.loc["inner", "tags.mlflow.parentRunId"] == child.info.run_id
    assert grandchild.info.run_id == runs.loc["inner", "run_id"]
    assert pd.isna(runs.loc["pipeline", "tags.mlflow.parentRunId"])


def test_execute_writes_metrics_file_and_stage_run(mlflow_store, tmp_path, monkeypatch):
    from spo_core.stages.common import execute

    class Cfg(BaseModel):
        n: int = 3

    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "m"))
    out = execute("demo", Cfg(), lambda cfg: {"double": 2 * cfg.n})
    assert out["double"] == 6 and out["wall_time_s"] >= 0
    assert json.loads((tmp_path / "m" / "demo.json").read_text())["double"] == 6
    row = _runs(mlflow_store).iloc[0]
    assert (row["tags.mlflow.runName"], row["params.n"], row["metrics.demo/double"], row["status"]) == ("demo", "3", 6.0, "FINISHED")

    def fail(cfg):
        raise ValueError("bad stage")

    with pytest.raises(ValueError, match="bad stage"):
        execute("demo_fail", Cfg(), fail)
    assert _runs(mlflow_store).set_index("tags.mlflow.runName").loc["demo_fail", "status"] == "FAILED"
    assert not (tmp_path / "m" / "demo_fail.json").exists()


def test_disabled_tracking_yields_none_and_writes_nothing(tmp_path, monkeypatch):
    from spo_core import tracking

    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.stage_run("x", params={"a": 1}) as run:
        tracking.log_metrics({"m": 1.0})
        tracking.log_table(pd.DataFrame({"a": [1]}), "t")
    assert run is None and not (tmp_path / "mlruns").exists()


def test_a_training_run_records_images_config_history_data_and_a_registered_lora(mlflow_store, tmp_path, monkeypatch):
    from spo_core.config import load_spo_config
    from spo_core.stages import train_spo
    from spo_core.stages.common import execute

    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("SPO_RUN_LABEL", "variant k2")
    cfg = load_spo_config("tiny", ["train.rounds=2", "train.prompts_per_round=2", "sampler.num_steps=4",
                                   f"train.output_dir={tmp_path / 'spo'}", "monitor.scorer={name: brightness}",
                                   "monitor.prompts={source: list, prompts: [a cat, a dog]}", "monitor.every=1"])
    execute("train_spo", cfg, train_spo.run)
    client = mlflow_store.MlflowClient()
    exp = mlflow_store.get_experiment_by_name(os.environ["SPO_EXPERIMENT"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the training view
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.run_name == "train_spo [variant k2]" and run.info.status == "FINISHED"
    assert "log 2 = 0.693" in run.data.tags["mlflow.note.content"]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "history.json", "lora", "images"} <= files
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert len([p for p in images if p.startswith("images/monitor_samples") and p.endswith(".png")]) >= 3  # rounds -1, 0, 1
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train_prompts"]
    version = client.get_model_version("spo-lora", "1")
    assert version.run_id == run.info.run_id and version.tags["base_model"] == "tiny:sd15"


def test_an_experiment_on_a_tracking_server_keeps_its_artifacts_in_the_servers_store(tmp_path, monkeypatch):
    """Against http(s) the experiment is created without this host's folder as its artifact location,
    so that every host's artifacts go to the server's one store (mlflow-artifacts:/)."""
    import mlflow

    from spo_core import tracking

    created = {}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5999")
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)
    monkeypatch.setattr(mlflow, "create_experiment", lambda name, **kw: created.update(name=name, **kw))
    monkeypatch.setattr(mlflow, "set_experiment", lambda name: None)
    tracking.setup_mlflow("spo")
    assert created["name"] == "spo" and "artifact_location" not in created
    # A local store keeps its artifacts beside the database, as before.
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.setup_mlflow("spo")
    assert created["artifact_location"] == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
