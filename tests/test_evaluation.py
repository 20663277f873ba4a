"""Tests for spo_core.evaluation and the ``evaluate`` stage (tiny SD-1.5 model, weight-free scorers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError

from spo_core.config import LoraConfig, ModelConfig
from spo_core.evaluation import (
    EvalSamplerConfig,
    EvaluationError,
    ModelSpec,
    compare_to_base,
    comparison_grid,
    evaluate_models,
    flat_metrics,
    format_mean_ci,
    image_seed,
    item_table,
    model_specs,
    report_markdown,
    results_table,
    score_images,
    summarize,
    winrate_table,
)
from spo_core.models.diffusion import load_policy
from spo_core.models.lora import KOHYA_WEIGHT_NAME, attach_lora, save_lora
from spo_core.reporting import grid_layout
from spo_core.scorers.base import build_scorer
from spo_core.stages import evaluate as stage
from spo_core.stats import bootstrap_win_rate_ci, mean_ci, paired_diff_ci

PROMPTS = ["a red circle", "a blue square", "a green star"]
SAMPLER = EvalSamplerConfig(num_steps=3)
TINY = ModelConfig(pretrained="tiny:sd15")




@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")
    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))


def make_loras(root: Path) -> dict[str, Path]:
    """A zero-effect LoRA (gaussian init: A random, B = 0) and one with random B (a visible effect)."""
    policy = load_policy(TINY)
    cfg = LoraConfig(rank=4)
    attach_lora(policy, cfg)
    zero = save_lora(policy, root / "zero", cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    pert = save_lora(policy, root / "pert", cfg)
    return {"zero": zero, "pert": pert}


def scorers() -> dict:
    return {"brightness": build_scorer("brightness"), "red": build_scorer("channel", channel=0)}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    return make_loras(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def result(loras):
    policy = load_policy(TINY)
    models = model_specs({"zero": loras["zero"], "pert": loras["pert"]})
    return evaluate_models(policy, models, PROMPTS, scorers(), images_per_prompt=2, seed=7, sampler=SAMPLER,
                           batch_size=4, grid_prompts=2)


def _model(res, name: str) -> pd.DataFrame:
    return res.scores[res.scores["model"] == name].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- items


def test_item_table_seed_rule():
    items = item_table(["a", "b", "c"], images_per_prompt=2, seed=10)
    assert items["seed"].tolist() == [10, 11, 12, 13, 14, 15]
    assert items["prompt_idx"].tolist() == [0, 0, 1, 1, 2, 2]
    assert items["image_idx"].tolist() == [0, 1, 0, 1, 0, 1]
    assert items["prompt"].tolist() == ["a", "a", "b", "b", "c", "c"]
    assert image_seed(10, 2, 1, 2) == 15


# ---------------------------------------------------------------------------------------------- generation


def test_frames_are_consistent(result):
    s = result.scores
    assert list(s.columns) == ["model", "prompt", "prompt_idx", "image_idx", "seed", "brightness", "red"]
    assert result.models == ["base", "zero", "pert"]
    assert s["model"].value_counts().to_dict() == {"base": 6, "zero": 6, "pert": 6}
    items = item_table(PROMPTS, 2, 7)
    for m in result.models:
        pd.testing.assert_frame_equal(_model(result, m)[items.columns.tolist()], items)
    assert np.isfinite(s[["brightness", "red"]].to_numpy()).all()
    assert result.grid_prompts == PROMPTS[:2]
    assert {k: tuple(v.shape) for k, v in result.grid_images.items()} == {m: (2, 3, 32, 32) for m in result.models}


def test_zero_lora_equals_base_and_perturbed_lora_differs(result):
    base, zero, pert = (_model(result, m) for m in ("base", "zero", "pert"))
    np.testing.assert_array_equal(zero[["brightness", "red"]].to_numpy(), base[["brightness", "red"]].to_numpy())
    assert torch.equal(result.grid_images["zero"], result.grid_images["base"])
    assert not np.allclose(pert["brightness"].to_numpy(), base["brightness"].to_numpy())
    comp = compare_to_base(result.scores, ["brightness", "red"], n_boot=200)
    z = comp[comp["model"] == "zero"]
    assert z["winrate"].tolist() == [0.5, 0.5]
    assert z["winrate_ci_low"].tolist() == [0.5, 0.5] and z["winrate_ci_high"].tolist() == [0.5, 0.5]
    assert z["diff"].tolist() == [0.0, 0.0] and z["diff_ci_low"].tolist() == [0.0, 0.0]


def test_same_seeds_reproduce_base_across_runs_order_and_batch(result, loras):
    # A fresh run, another batch size, the LoRA (kohya export this time) loaded *before* the base:
    # the base must still equal the first run's base (the adapter is removed after use). Another batch
    # size changes the float summation order, so scores agree to rounding and 8-bit pixels to one level.
    policy = load_policy(TINY)
    models = [ModelSpec("pert", loras["pert"] / KOHYA_WEIGHT_NAME), ModelSpec("base")]
    again = evaluate_models(policy, models, PROMPTS, scorers(), images_per_prompt=2, seed=7, sampler=SAMPLER,
                            batch_size=5, grid_prompts=2)
    for m in ("base", "pert"):
        pd.testing.assert_frame_equal(_model(again, m), _model(result, m), rtol=1e-3, atol=1e-5)
        assert (again.grid_images[m] - result.grid_images[m]).abs().max() <= 1 / 255 + 1e-6
    assert not any("lora" in n for n, _ in policy.unet.named_parameters())


# ---------------------------------------------------------------------------------------------- statistics


def test_summary_and_comparisons_match_stats(result):
    cols = ["brightness", "red"]
    summary = summarize(result.scores, cols, level=0.9)
    assert summary[["model", "scorer"]].values.tolist() == [[m, c] for m in result.models for c in cols]
    for r in summary.itertuples():
        x = _model(result, r.model)[r.scorer].to_numpy()
        assert (r.mean, r.ci_low, r.ci_high) == pytest.approx(mean_ci(x, 0.9), abs=1e-12)
        assert r.half_width == pytest.approx((r.ci_high - r.ci_low) / 2)
        assert r.n == 6
    comp = compare_to_base(result.scores, cols, level=0.9, n_boot=300, seed=3)
    assert comp[["model", "scorer"]].values.tolist() == [["zero", "brightness"], ["zero", "red"],
                                                          ["pert", "brightness"], ["pert", "red"]]
    base = _model(result, "base")
    for r in comp.itertuples():
        a = _model(result, r.model)[r.scorer].to_numpy()
        b = base[r.scorer].to_numpy()
        assert (r.diff, r.diff_ci_low, r.diff_ci_high) == pytest.approx(paired_diff_ci(a, b, 0.9), abs=1e-12)
        expect = bootstrap_win_rate_ci(a, b, n_boot=300, level=0.9, seed=3, groups=base["prompt_idx"].to_numpy())
        assert (r.winrate, r.winrate_ci_low, r.winrate_ci_high) == pytest.approx(expect)
        assert (r.n_pairs, r.n_prompts) == (6, 3)
    metrics = flat_metrics(summary, comp)
    assert metrics["pert/red/mean"] == summary.query("model == 'pert' and scorer == 'red'")["mean"].item()
    assert metrics["zero/brightness/winrate_vs_base"] == 0.5
    assert "base/red/winrate_vs_base" not in metrics
    per_model = {"base": 3 * 2, "zero": 9 * 2, "pert": 9 * 2}  # mean/ci_low/ci_high (+ 6 comparison keys)
    for m, n in per_model.items():
        assert sum(k.startswith(f"{m}/") for k in metrics) == n


def test_compare_refuses_unpaired_items(result):
    broken = result.scores.copy()
    broken.loc[broken["model"] == "pert", "seed"] += 1
    with pytest.raises(EvaluationError, match="same .*items"):
        compare_to_base(broken, ["red"])


# ---------------------------------------------------------------------------------------------- tables and grid


def test_tables_have_the_papers_shape(result):
    cols = ["brightness", "red"]
    summary = summarize(result.scores, cols)
    comp = compare_to_base(result.scores, cols, n_boot=200)
    table = results_table(summary)
    assert list(table.columns) == ["model", "brightness", "red"]
    assert table["model"].tolist() == ["base", "zero", "pert"]
    cell = re.compile(r"^-?\d+\.\d+ ± \d+\.\d+$")
    assert all(cell.match(v) for v in table[cols].to_numpy().ravel())
    wr = winrate_table(comp)
    assert wr["model"].tolist() == ["zero", "pert"]
    assert wr.loc[0, "red"] == "0.500 [0.500, 0.500]"

    text = report_markdown(summary, comp, "desc")
    sections = text.split("\n## ")
    assert len(sections) == 4 and sections[0].startswith("# Evaluation") and "desc" in sections[0]
    means = [ln for ln in sections[1].splitlines() if ln.startswith("|")]
    assert len(means) == 2 + 3  # header, separator, one row per model
    assert all(ln.count("|") == 4 for ln in means)  # model + 2 scorers
    assert means[2].split("|")[1].strip() == "base"
    assert len([ln for ln in sections[2].splitlines() if ln.startswith("|")]) == 2 + 2
    assert "+0.0000 ± 0.0000" in sections[3]
    assert "nothing to compare" in report_markdown(summary[summary["model"] == "base"], comp.iloc[:0])


def test_format_mean_ci_shows_two_significant_digits_of_the_half_width():
    assert format_mean_ci(21.4312, 0.0512) == "21.431 ± 0.051"
    assert format_mean_ci(21.4312, 0.31) == "21.43 ± 0.31"
    assert format_mean_ci(-0.16, 0.0) == "-0.1600 ± 0.0000"
    assert format_mean_ci(0.5, 0.02, signed=True) == "+0.500 ± 0.020"


def test_grid_rows_are_prompts_and_columns_models(result):
    grid = comparison_grid(result.grid_images, result.grid_prompts, image_size=64)  # 32 px -> scale 2
    layout = grid_layout(2, 3, 32, 32, result.grid_prompts, result.models, scale=2)
    assert grid.size == (layout.width, layout.height)
    px = np.asarray(grid)

    def tile(r: int, c: int) -> np.ndarray:
        x0, y0, x1, y1 = layout.cell_box(r, c)
        return px[y0:y1, x0:x1]

    assert np.array_equal(tile(1, 0), tile(1, 1))  # base == zero LoRA
    assert not np.array_equal(tile(1, 0), tile(1, 2))  # the perturbed LoRA differs
    expect = (result.grid_images["pert"][1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(tile(1, 2)[::2, ::2], expect)
    small = comparison_grid(result.grid_images, result.grid_prompts, image_size=20)  # downscaled tiles
    small_layout = grid_layout(2, 3, 20, 20, result.grid_prompts, result.models)
    assert small.size == (small_layout.width, small_layout.height)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_lora_names_the_training_stage(tmp_path):
    with pytest.raises(EvaluationError, match=r"train_spo.*spo train-spo"):
        model_specs({"spo": tmp_path / "artifacts/toy/spo/lora"})
    with pytest.raises(EvaluationError, match="train_d3po"):
        model_specs({"d3po": tmp_path / "nope"})
    with pytest.raises(EvaluationError, match="train_diffusion_dpo"):
        model_specs({"baseline": tmp_path / "artifacts/sd15/diffusion_dpo/lora"})
    with pytest.raises(EvaluationError, match="may not be named 'base'"):
        model_specs({"base": tmp_path})


def test_score_images_rejects_bad_scorer_output():
    class Bad:
        name = "bad"

        def score(self, images, prompts, timesteps=None):
            return torch.zeros(images.shape[0], 2)

    with pytest.raises(EvaluationError, match="scorer 'twice' returned shape"):
        score_images(torch.rand(3, 3, 8, 8), ["a", "b", "c"], {"twice": Bad()})


def _stage_cfg(loras: dict, out: Path, **extra) -> dict:
    return {
        "model": {"pretrained": "tiny:sd15"},
        "loras": {k: str(v) for k, v in loras.items()},
        "prompts": {"source": "list", "prompts": PROMPTS},
        "num_prompts": 3,
        "images_per_prompt": 1,
        "sampler": {"num_steps": 2},
        "scorers": [{"name": "brightness"}, {"name": "channel", "label": "red", "options": {"channel": 0}}],
        "n_boot": 200,
        "grid_image_size": 32,
        "output_dir": str(out),
        "device": "cpu",
        **extra,
    }


def test_config_validation(tmp_path):
    ok = _stage_cfg({}, tmp_path)
    cfg = stage.EvaluateConfig.model_validate(ok)
    assert (cfg.sampler.num_steps, cfg.sampler.guidance_scale, cfg.sampler.eta) == (2, 5.0, 1.0)
    assert stage.EvaluateConfig.model_validate({**ok, "sampler": {}}).sampler.num_steps == 20
    dup = {**ok, "scorers": [{"name": "channel"}, {"name": "channel", "options": {"channel": 1}}]}
    with pytest.raises(ValidationError, match="distinct 'label'"):
        stage.EvaluateConfig.model_validate(dup)
    with pytest.raises(ValidationError, match="may not be named 'base'"):
        stage.EvaluateConfig.model_validate({**ok, "loras": {"base": "x"}})
    with pytest.raises(ValidationError, match="letters, digits"):
        stage.EvaluateConfig.model_validate({**ok, "loras": {"my lora": "x"}})
    with pytest.raises(ValidationError, match="extra"):
        stage.EvaluateConfig.model_validate({**ok, "num_images": 3})


# ---------------------------------------------------------------------------------------------- the stage


def test_stage_cli_writes_outputs(loras, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": _stage_cfg({"zero": loras["zero"]}, out)}))
    assert stage.main(["--params", str(params), "--set", "save_images=true"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["grid.png", "images", "metrics.json", "scores.parquet", "summary.csv", "table.md", "winrates.csv"]
    assert "base/brightness/ci_low" in json.loads((out / "metrics.json").read_text())  # every figure, not only the headline
    assert sorted(p.name for p in (out / "images" / "zero").iterdir()) == [
        "00000_00_seed0.png", "00001_00_seed1.png", "00002_00_seed2.png"]
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 6 and set(scores["model"]) == {"base", "zero"}
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert metrics["zero/brightness/winrate_vs_base"] == 0.5 and metrics["zero/brightness/diff_vs_base"] == 0.0
    # The headline (dvc metrics show) is the first scorer's; every scorer's figures are in metrics.json.
    assert not [k for k in metrics if "/red/" in k]
    assert json.loads((out / "metrics.json").read_text())["zero/red/winrate_vs_base"] == 0.5
    assert metrics["base/brightness/mean"] == pytest.approx(scores.query("model == 'base'")["brightness"].mean())
    wr = pd.read_csv(out / "winrates.csv")
    assert wr["model"].tolist() == ["zero", "zero"]

    # A missing LoRA fails before any model is loaded, naming the stage that writes it.
    bad = stage.EvaluateConfig.model_validate(_stage_cfg({"spo": tmp_path / "artifacts/spo/lora"}, out))
    with pytest.raises(EvaluationError, match="train_spo"):
        stage.run(bad)
    assert (out / "scores.parquet").exists()  # the previous outputs are untouched


def test_stage_logs_to_mlflow(loras, tmp_path, monkeypatch):
    import mlflow

    from spo_core.stages.common import execute

    monkeypatch.delenv("SPO_DISABLE_MLFLOW")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SPO_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("SPO_EXPERIMENT", "evaluate-test")
    cfg = stage.EvaluateConfig.model_validate(_stage_cfg({"pert": loras["pert"]}, tmp_path / "eval"))
    metrics = execute("evaluate", cfg, stage.run)

    runs = mlflow.search_runs(experiment_names=["evaluate-test"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    row = runs.iloc[0]
    for key in ("base/brightness/mean", "pert/red/winrate_vs_base", "pert/brightness/diff_vs_base"):
        assert row[f"metrics.evaluate/{key}"] == pytest.approx(metrics[key])
    client = mlflow.MlflowClient()
    logged = {f.path for f in client.list_artifacts(row["run_id"], "evaluate")}
    assert {"evaluate/summary.json", "evaluate/winrates.json", "evaluate/grid.png", "evaluate/files"} <= logged
    files = {f.path for f in client.list_artifacts(row["run_id"], "evaluate/files")}
    assert files == {f"evaluate/files/{n}" for n in
                     ("scores.parquet", "summary.csv", "winrates.csv", "table.md", "grid.png")}
    table = mlflow.load_table("evaluate/summary.json", run_ids=[row["run_id"]])
    assert sorted(table["model"].unique()) == ["base", "pert"]


# ---------------------------------------------------------------------------------------------- evaluate_base


def test_evaluate_reuses_the_base_results_of_evaluate_base(loras, tmp_path, monkeypatch):
    # A retrained LoRA used to regenerate and rescore the unchanged base model in every evaluation.
    from spo_core.stages import evaluate_base

    generated: list[list[str]] = []
    real = stage.evaluate_models
    monkeypatch.setattr(stage, "evaluate_models",
                        lambda policy, models, *a, **k: generated.append([m.name for m in models]) or real(policy, models, *a, **k))
    raw = _stage_cfg({"pert": loras["pert"]}, tmp_path / "eval", base_dir=str(tmp_path / "base"), save_images=True)
    ref = stage.run(stage.EvaluateConfig.model_validate({**raw, "base_dir": None, "output_dir": str(tmp_path / "ref")}))
    assert ref["base_reused"] == 0 and generated == [["base", "pert"]]

    base_metrics = evaluate_base.run(evaluate_base.EvaluateBaseConfig.model_validate(raw))
    assert base_metrics["base/brightness/mean"] == pytest.approx(ref["base/brightness/mean"])
    got = stage.run(stage.EvaluateConfig.model_validate(raw))
    assert generated[1:] == [["base"], ["pert"]] and got["base_reused"] == 1  # the base was not generated again
    assert got == {**ref, "base_reused": 1}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "eval/scores.parquet"),
                                  pd.read_parquet(tmp_path / "ref/scores.parquet"))
    assert (tmp_path / "eval/grid.png").read_bytes() == (tmp_path / "ref/grid.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "eval/images/base").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ref/images/base").iterdir())

    # Other settings than the kept results': the base is evaluated here, as without base_dir.
    reseeded = stage.run(stage.EvaluateConfig.model_validate({**raw, "seed": 5}))
    assert reseeded["base_reused"] == 0 and generated[-1] == ["base", "pert"]
    # Without base_dir the stage evaluate_base refuses to run, in one line.
    with pytest.raises(ValidationError, match="base_dir is not set"):
        evaluate_base.EvaluateBaseConfig.model_validate({**raw, "base_dir": None})


def test_path_digest_follows_the_weights(tmp_path):
    from spo_core.utils import path_digest

    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "unet.safetensors"
    weights.write_bytes(bytes(range(256)) * 20_000)  # ~5 MB: head and tail are read
    first = path_digest(str(folder))
    assert path_digest(str(folder)) == first and path_digest("org/model") == "org/model" and path_digest(None) is None
    for offset in (10, weights.stat().st_size - 10):  # retrained weights change the head or the tail
        data = bytearray(weights.read_bytes())
        data[offset] ^= 1
        weights.write_bytes(bytes(data))
        assert path_digest(str(folder)) != first
        data[offset] ^= 1
        weights.write_bytes(bytes(data))
    assert path_digest(str(folder)) == first


def test_grid_reference_opens_each_row_with_the_renderer_image(tmp_path):
    from spo_core.stages import toy_world
    from spo_core.toyworld.config import ToyWorldConfig
    from spo_core.toyworld.rater import rate_prompts
    from spo_core.toyworld.render import render_prompts
    from spo_core.toyworld.world import load_world

    world_dir = tmp_path / "world"
    toy_world.run(ToyWorldConfig(output_dir=str(world_dir)))
    world = load_world(world_dir)
    prompts = world.validation_prompts[:2]
    tiles = {"base": torch.zeros(2, 3, 32, 32), "spo": torch.ones(2, 3, 32, 32)}
    out = stage.with_reference(tiles, prompts, world, seed=3)
    assert list(out) == ["renderer", "base", "spo"] and out["base"] is tiles["base"]
    assert torch.equal(out["renderer"], render_prompts(prompts, 32, 3, world.config))
    assert rate_prompts(out["renderer"], prompts, world.config)["reward"].min() > 0.9  # the ideal answer
    grid = comparison_grid(out, prompts, image_size=32)
    assert grid.size == (grid_layout(2, 3, 32, 32, prompts, list(out)).width,
                         grid_layout(2, 3, 32, 32, prompts, list(out)).height)
    assert stage.with_reference(tiles, prompts, None, seed=3) is tiles
    with pytest.raises(ValidationError, match="renderer"):
        stage.EvaluateConfig(model=ModelConfig(pretrained="x"), prompts={"source": "text", "path": "p.txt"},
                             scorers=[{"name": "toy_reward", "path": "w"}], loras={"renderer": "lora"})
