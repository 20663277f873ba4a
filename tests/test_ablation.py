"""Ablation tables: spec validation, per-variant wiring, the sequential runner on a real (cheap)
stage, and the Prefect flow (parallel variant tasks) on the tiny profile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
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
    spec = AblationSpec.model_validate({**load_spec("tiny_k").model_dump(), "variants": {"bad": ["sampler.k=1"]}})
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
    assert sorted(variants.index) == ["n1", "n3"] and variants.loc["n3", "metrics.ablation_variant/prompts.num_train"] == 3
    stage_runs = runs[runs["tags.stage"] == "prompts"]
    assert sorted(stage_runs["tags.mlflow.parentRunId"]) == sorted(variants["run_id"])
    assert sorted(stage_runs.index) == ["prompts [n_train n1]", "prompts [n_train n3]"]  # which variant's stage
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
    assert sorted(stages["tags.stage"]) == ["evaluate", "evaluate", "train_spo", "train_spo"]
    assert sorted(stages["tags.mlflow.runName"])[:2] == ["evaluate [k_tiny k2]", "evaluate [k_tiny k3]"]
    assert (runs["status"] == "FINISHED").all()


# ----------------------------------------------------------------------------------------------
# variants of other stages, shared training runs, joint comparison


def test_variant_forms_and_spec_checks():
    spec = prompts_spec(variants={"a": ["num_train=1"], "b": {"stage": "noisy_pairs", "set": ["x=1"]}})
    assert spec.variants["a"].stage is None and spec.variants["a"].set == ["num_train=1"]
    assert spec.train_stage("a") == "prompts" and spec.train_stage("b") == "noisy_pairs"
    assert spec.overrides("b") == "stage=noisy_pairs x=1"
    with pytest.raises(ValueError, match="'base'"):
        prompts_spec(variants={"base": []})
    with pytest.raises(ValueError, match="efficiency_reference 'zz'"):
        prompts_spec(efficiency_reference="zz")


def test_equal_configurations_share_one_training_run(workdir, tracked):
    from spo_core.ablation import run_dir

    (workdir / "params.yaml").write_text(yaml.safe_dump(PROMPTS_PARAMS))
    train = {"stage": "prompts", "set": ["output_dir={run}"]}
    first = prompts_spec(table="t1", train=train, variants={"n1": ["num_train=1"], "n3": ["num_train=3"]})
    second = prompts_spec(table="t2", train=train, variants={"one": ["num_train=1"]})
    assert run_dir(first, "n1") == run_dir(second, "one") != run_dir(first, "n3")
    assert run_dir(first, "n1").parent == workdir.joinpath("artifacts/ablations/runs").relative_to(workdir)

    run_ablation(first)
    done = workdir / run_dir(first, "n1") / "done.json"
    stamp = done.stat().st_mtime_ns
    df = run_ablation(second)
    assert df["prompts.num_train"].tolist() == [1] and done.stat().st_mtime_ns == stamp  # not rerun
    runs = tracked().set_index("tags.mlflow.runName")
    assert runs.loc["one", "tags.reused"] == "true" and runs.loc["n3", "tags.reused"] == "false"
    # A changed input (here the prompt source file's content) gives a new run folder.
    (workdir / "p.txt").write_text("x\ny\n")
    (workdir / "params.yaml").write_text(yaml.safe_dump({"prompts": {"train": {"source": "text", "path": "p.txt"},
                                                                     "eval": {"source": "list", "prompts": ["e", "f"]}}}))
    before = run_dir(second, "one")
    (workdir / "p.txt").write_text("x\ny\nz\n")
    assert run_dir(second, "one") != before


def test_efficiency_curve_and_compute_to_reach():
    from spo_core.efficiency import compute_to_reach, curve

    hist = [{"round": 0, "seconds": 2.0, "cumulative_unet_evals": 10},
            {"round": 1, "seconds": 3.0, "cumulative_unet_evals": 20, "monitor_r": 0.5},
            {"round": 2, "seconds": 1.0, "cumulative_unet_evals": 30},
            {"round": 3, "seconds": 4.0, "cumulative_unet_evals": 40, "monitor_r": 0.7}]
    c = curve(hist, start=0.4)
    assert c["unet_evals"].tolist() == [0, 20, 40] and c["seconds"].tolist() == [0, 5, 10]
    assert c["reward"].tolist() == [0.4, 0.5, 0.7]
    assert compute_to_reach(c, 0.45) == (20.0, 5.0) and compute_to_reach(c, 0.7) == (40.0, 10.0)
    assert all(np.isnan(compute_to_reach(c, 0.8)))


@pytest.mark.slow
def test_method_table_compares_every_variant_with_the_base_on_the_same_seeds(workdir, tracked):
    from spo_core.config import read_profile

    spo = read_profile("tiny")["train_spo"]
    spo["sampler"].update(num_steps=2)
    spo["train"].update(rounds=2, prompts_per_round=1, export_kohya=False)
    spo["monitor"] = {"scorer": {"name": "brightness"}, "prompts": {"source": "list", "prompts": ["a", "b"]},
                      "num_prompts": 2, "every": 1}
    d3po = {k: v for k, v in spo.items() if k not in ("sampler", "loss")}
    d3po["sampler"] = {"num_steps": 2, "guidance_scale": spo["sampler"].get("guidance_scale", 5.0)}
    evaluate = {"model": spo["model"], "prompts": {"source": "list", "prompts": ["a red circle", "a blue square"]},
                "sampler": {"num_steps": 2}, "scorers": [{"name": "brightness"}], "n_boot": 100, "grid_prompts": 0,
                "device": "cpu"}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"train_spo": spo, "train_d3po": d3po, "evaluate": evaluate}))
    spec = AblationSpec.model_validate({
        "table": "methods", "train": {"stage": "train_spo", "set": ["train.output_dir={run}"]},
        "compare": {"stage": "evaluate", "lora": "{run}/lora", "set": ["output_dir={root}/compare"]},
        "variants": {"d3po": {"stage": "train_d3po"}, "spo": []}, "efficiency_reference": "d3po",
        "contrasts": ["spo - d3po"],
        "paper": "| method | PickScore |\n|---|---|\n| SPO | 21.43 |"})

    df = run_ablation(spec)

    assert df["variant"].tolist() == ["base", "d3po", "spo"]
    assert df.loc[0, "overrides"] == "" and np.isnan(df.loc[0, "train.total_unet_evals"])
    assert (df.loc[1:, "train.total_unet_evals"] > 0).all()
    for col in ("brightness/mean", "brightness/ci_low", "brightness/ci_high"):
        assert df[col].notna().all()
    assert df.loc[1:, "brightness/winrate_vs_base"].between(0, 1).all()
    assert df.loc[1, "efficiency.unet_evals_to_reference"] <= df.loc[1, "efficiency.unet_evals"]
    report = (workdir / "reports/methods.md").read_text()
    assert "## Evaluation (paired" in report and "## Training efficiency" in report and "21.43" in report
    # One seed per variant: the contrast has its interval over prompts only, and is not called.
    assert re.search(r"\| spo - d3po +\| brightness +\| +1 +\| +2 +\| [+-]\d\.\d{4} +\| n/a +\| \[.*\] +\| no ", report)
    assert (workdir / "reports/methods_efficiency.png").stat().st_size > 1000
    assert (workdir / "artifacts/ablations/methods/compare/summary.csv").exists()
    runs = tracked()
    assert "compare" in runs["tags.mlflow.runName"].tolist()


def test_variants_may_change_the_specs_settings_but_not_its_wiring():
    step = StageStep(stage="train_spo", set=["train.rounds=3", "train.output_dir={run}"])
    got = step_overrides(step, Path("o"), ["train.rounds=5"], Path("r"))
    assert got == ["train.rounds=3", "train.rounds=5", "train.output_dir=r"]  # the later value wins


def test_spo_ablation_command_runs_tables_one_after_another(workdir, tracked, capsys):
    from spo_core.cli import main

    (workdir / "params.yaml").write_text(yaml.safe_dump(PROMPTS_PARAMS))
    for table in ("ta", "tb"):
        (workdir / f"{table}.yaml").write_text(yaml.safe_dump(prompts_spec(table=table).model_dump(mode="json")))
    assert main(["ablation", "ta.yaml", "tb.yaml", "--variant", "n1"]) == 0
    for table in ("ta", "tb"):
        assert "| n1 " in (workdir / f"reports/{table}.md").read_text()
    assert not (workdir / "artifacts/ablations/ta/n3").exists()
    assert main(["ablation", "ta.yaml", "nope"]) == 2
    assert "unknown ablation 'nope'" in capsys.readouterr().err
    from flows.ablation import (
        main as flow_main,  # the Prefect flow's command line shares the parsing
    )

    assert flow_main(["ta.yaml", "nope"]) == 2 and not (workdir / "artifacts/ablations/ta/n3").exists()


def test_seeds_expand_every_variant_into_one_run_per_seed():
    spec = prompts_spec(seeds=[0, 2], seed_key="seed", efficiency_reference="n1",
                        variants={"n1": ["num_train=1"], "n2": {"set": ["num_train=2"]}})
    assert list(spec.variants) == ["n1.s0", "n1.s2", "n2.s0", "n2.s2"]
    assert spec.overrides("n2.s2") == "num_train=2 seed=2"
    assert spec.seed_groups == {"n1": ["n1.s0", "n1.s2"], "n2": ["n2.s0", "n2.s2"]}
    assert spec.seed_values() == [0, 2] and spec.runs_of("n1") == ["n1.s0", "n1.s2"] and spec.runs_of("x") == ["x"]
    again = AblationSpec.model_validate(spec.model_dump(mode="json"))  # no second expansion
    assert list(again.variants) == list(spec.variants) and again.seed_groups == spec.seed_groups
    with pytest.raises(ValueError, match="variant 'n3' sets seed"):
        prompts_spec(seeds=[0, 1], seed_key="seed")  # n3 sets seed=5 itself
    with pytest.raises(ValueError, match="distinct integers"):
        prompts_spec(seeds=[1, 1], variants={"a": []})


def test_a_seeded_table_runs_each_seed_and_summarises_across_seeds(workdir, tracked):
    (workdir / "params.yaml").write_text(yaml.safe_dump(PROMPTS_PARAMS))
    spec = prompts_spec(seeds=[0, 1], seed_key="seed", variants={"n1": ["num_train=1"], "n3": ["num_train=3"]},
                        columns=["prompts.num_train"])

    df = run_ablation(spec, variants=["n3"])  # a variant name selects all its seeds

    assert df["variant"].tolist() == ["n3.s0", "n3.s1"]
    assert (workdir / "artifacts/ablations/n_train/n3.s1/prompts/train.txt").read_text().count("\n") == 3
    report = (workdir / "reports/n_train.md").read_text()
    assert "## Across seeds (mean ± standard deviation over the seeds [0, 1])" in report
    assert re.search(r"\| n3 +\| +2 \| 3 ± 0 +\|", report)
    runs = tracked()
    assert sorted(runs["tags.mlflow.runName"])[:2] == ["ablation-n_train", "n3.s0"]


def test_seed_summary_is_the_mean_and_sd_over_seeds():
    from spo_core.ablation import seed_summary

    spec = prompts_spec(seeds=[0, 1], seed_key="seed", variants={"a": [], "b": []})
    df = pd.DataFrame({"variant": ["base", "a.s0", "a.s1", "b.s0"], "overrides": "",
                       "r/diff_vs_base": [np.nan, 0.1, 0.3, 0.05], "r/diff_ci_low": [np.nan, 0.0, 0.1, 0.0]})
    got = seed_summary(spec, df).set_index("variant")
    assert got.loc["a", "seeds"] == 2 and got.loc["a", "r/diff_vs_base"] == "0.2 ± 0.14"
    assert got.loc["b", "r/diff_vs_base"] == "0.05" and "r/diff_ci_low" not in got.columns
    assert seed_summary(prompts_spec(), df) is None
