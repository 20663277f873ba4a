"""Ablation tables: spec validation, per-variant wiring, the sequential runner on a real (cheap)
stage, and the Prefect flow (parallel variant tasks) on the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from spo_core.ablation import (
    AblationSpec,
    StageStep,
    available_specs,
    build_table,
    load_spec,
    run_ablation,
    stage_entry,
    step_overrides,
    variant_plan,
)
from spo_core.config import ConfigError, SPOConfig


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """MLflow on, into tmp_path; yields a function returning the runs of experiment ``spo``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("SPO_DISABLE_MLFLOW", raising=False)
    monkeypatch.delenv("SPO_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    import mlflow

    mlflow.set_tracking_uri(uri)  # mlflow's process-global URI wins over the environment variable
    yield lambda: mlflow.search_runs(experiment_names=["spo"], order_by=["start_time ASC"])
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


PROMPTS_PARAMS = {"prompts": {"train": {"source": "list", "prompts": ["a", "b", "c", "d"]},
                              "eval": {"source": "list", "prompts": ["e", "f"]}}}


def prompts_spec(**kw) -> AblationSpec:
    """An ablation over the cheap ``prompts`` stage (no model): how many training prompts to keep."""
    data = {"table": "n_train", "params": "params.yaml",
            "train": {"stage": "prompts", "set": ["output_dir={out}/prompts"]},
            "variants": {"n1": ["num_train=1"], "n3": ["num_train=3", "seed=5"]}}
    data.update(kw)
    return AblationSpec.model_validate(data)


# ----------------------------------------------------------------------------------------------
# specs and wiring


def test_load_spec_by_name_path_and_errors(tmp_path):
    assert "tiny_k" in available_specs()
    spec = load_spec("tiny_k")
    assert spec.train.stage == "train_spo" and list(spec.variants) == ["k2", "k4"] and spec.params == "tiny"
    with pytest.raises(ConfigError, match=r"unknown ablation 'nope'.*tiny_k"):
        load_spec("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"table": "t", "variants": {"a b": ["x=1"]}, "colums": []}))
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    assert "unknown key 'colums'" in str(err.value) and "'a b'" in str(err.value)
    bad.write_text(yaml.safe_dump({"table": "t", "variants": {}}))
    with pytest.raises(ConfigError, match="variants"):
        load_spec(bad)


def test_step_overrides_fill_in_the_variant_folder_and_reject_clashes():
    step = StageStep(stage="evaluate", set=["loras={lora: '{out}/train/lora'}", "output_dir={out}/eval"])
    assert step_overrides(step, Path("art/t/v1")) == ["loras={lora: 'art/t/v1/train/lora'}", "output_dir=art/t/v1/eval"]
    train = StageStep(stage="train_spo", set=["train.output_dir={out}/train"])
    assert step_overrides(train, Path("o"), ["sampler.k=2"]) == ["sampler.k=2", "train.output_dir=o/train"]
    with pytest.raises(ConfigError, match=r"\['train.output_dir'\]"):
        step_overrides(train, Path("o"), ["train.output_dir=elsewhere"])


def test_stage_entry_and_variant_plan_validate_before_running():
    cfg_cls, run = stage_entry("train_spo")
    assert cfg_cls is SPOConfig and run.__module__ == "spo_core.stages.train_spo"
    with pytest.raises(ConfigError, match="no stage module spo_core.stages.nope"):
        stage_entry("nope")
    (stage, cfg, _), = variant_plan(load_spec("tiny_k"), "k4")
    assert stage == "train_spo" and cfg.sampler.k == 4 and cfg.train.output_dir == "artifacts/ablations/tiny_k/k4/train"
    spec = load_spec("tiny_k").model_copy(update={"variants": {"bad": ["sampler.k=1"]}})
    with pytest.raises(ConfigError, match="sampler.k"):
        variant_plan(spec, "bad")
    with pytest.raises(ConfigError, match="no variant 'zz'"):
        variant_plan(spec, "zz")


def test_build_table_orders_rows_and_selects_columns():
    spec = prompts_spec(columns=["prompts.num_train"])
    rows = {"n3": {"prompts.num_train": 3, "prompts.wall_time_s": 0.1}, "n1": {"prompts.num_train": 1}}
    df = build_table(spec, rows)
    assert df.columns.tolist() == ["variant", "overrides", "prompts.num_train"]
    assert df["variant"].tolist() == ["n1", "n3"] and df["overrides"].tolist() == ["num_train=1", "num_train=3 seed=5"]
    with pytest.raises(ConfigError, match=r"columns \['prompts.nope'\].*prompts.num_train"):
        build_table(prompts_spec(columns=["prompts.nope"]), rows)


# ----------------------------------------------------------------------------------------------
# running


def test_sequential_ablation_on_a_real_stage(workdir, tracked):
    (workdir / "params.yaml").write_text(yaml.safe_dump(PROMPTS_PARAMS))
    df = run_ablation(prompts_spec())

    assert df["variant"].tolist() == ["n1", "n3"] and df["prompts.num_train"].tolist() == [1, 3]
    for v, n in (("n1", 1), ("n3", 3)):
        out = workdir / "artifacts/ablations/n_train" / v
        assert len((out / "prompts/train.txt").read_text().splitlines()) == n
        assert json.loads((out / "metrics/prompts.json").read_text())["num_train"] == n
    assert not (workdir / "metrics").exists()  # the pipeline's own metrics/ is untouched
    report = (workdir / "reports/n_train.md").read_text()
    assert report.startswith("# Ablation: n_train") and "| n3      | num_train=3 seed=5 |" in report

    runs = tracked().set_index("tags.mlflow.runName")
    parent = runs.loc["ablation-n_train"]
    assert parent["status"] == "FINISHED" and pd.isna(parent["tags.mlflow.parentRunId"])
    variants = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(variants.index) == ["n1", "n3"] and variants.loc["n3", "metrics.prompts.num_train"] == 3
    stage_runs = runs.loc["prompts"]
    assert sorted(stage_runs["tags.mlflow.parentRunId"]) == sorted(variants["run_id"])
    import mlflow

    table = mlflow.load_table("n_train.json", run_ids=[parent["run_id"]])
    assert table["variant"].tolist() == ["n1", "n3"]


def test_a_bad_variant_fails_before_anything_runs(workdir, tracked):
    (workdir / "params.yaml").write_text(yaml.safe_dump(PROMPTS_PARAMS))
    spec = prompts_spec(variants={"ok": ["num_train=1"], "typo": ["num_trian=2"]})
    with pytest.raises(ConfigError, match="num_trian"):
        run_ablation(spec)
    assert not (workdir / "artifacts").exists() and tracked().empty


@pytest.mark.slow
def test_ablation_flow_runs_variants_as_parallel_tasks_on_the_tiny_profile(workdir, tracked, monkeypatch, prefect_api):
    from flows.ablation import ablation
    from spo_core.config import read_profile

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two training processes on a 2-core machine
    spo = read_profile("tiny")["train_spo"]
    spo["sampler"].update(num_steps=2)
    spo["train"].update(rounds=1, prompts_per_round=1, export_kohya=False)
    evaluate = {"model": spo["model"], "prompts": {"source": "list", "prompts": ["a red circle", "a blue square"]},
                "sampler": {"num_steps": 2}, "scorers": [{"name": "brightness"}], "n_boot": 100, "grid_prompts": 0,
                "device": "cpu"}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"train_spo": spo, "evaluate": evaluate}))
    spec = {"table": "k_tiny", "evaluate": {"stage": "evaluate", "set": ["loras={lora: '{out}/train/lora'}",
                                                                        "output_dir={out}/eval"]},
            "variants": {"k2": ["sampler.k=2"], "k3": ["sampler.k=3"]},
            "columns": ["train_spo.final_loss", "train_spo.total_unet_evals", "evaluate.lora/brightness/mean"]}
    (workdir / "k_tiny.yaml").write_text(yaml.safe_dump(spec))

    rows = ablation(spec="k_tiny.yaml")

    assert [r["variant"] for r in rows] == ["k2", "k3"]
    assert rows[1]["train_spo.total_unet_evals"] > rows[0]["train_spo.total_unet_evals"]  # k=3 samples more
    assert all(0 <= r["evaluate.lora/brightness/mean"] <= 1 for r in rows)
    assert "| k3      | sampler.k=3 |" in (workdir / "reports/k_tiny.md").read_text()
    for v in ("k2", "k3"):
        assert (workdir / f"artifacts/ablations/k_tiny/{v}/train/lora").is_dir()
        assert (workdir / f"artifacts/ablations/k_tiny/{v}/eval/summary.csv").exists()
    runs = tracked()
    parent_id = runs.loc[runs["tags.mlflow.runName"] == "ablation-k_tiny", "run_id"].item()
    variants = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert sorted(variants["tags.mlflow.runName"]) == ["k2", "k3"]
    stages = runs[runs["tags.mlflow.parentRunId"].isin(variants["run_id"])]
    assert sorted(stages["tags.mlflow.runName"]) == ["evaluate", "evaluate", "train_spo", "train_spo"]
    assert (runs["status"] == "FINISHED").all()
