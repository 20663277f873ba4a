"""Noisy-pair building and preference-model training on tiny random models and synthetic data.

The real path (PickScore_v1 judging SD-1.5 x0 estimates) runs here on a tiny random SD-1.5
("tiny:sd15", the same diffusers classes and key names) and a tiny CLIPModel.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from spo_core.config import ModelConfig, OptimConfig, ScorerConfig
from spo_core.data.stream import PreferenceSource
from spo_core.data.pickapic import PreferenceDataError, decode_image, encode_image, write_preference_dataset
from spo_core.models.diffusion import load_policy
from spo_core.preference.config import PAPER_EVAL_TIMESTEPS, NoisyPairsConfig, TrainPMConfig
from spo_core.preference.noisy_pairs import (
    BuildSettings,
    NoisyPairs,
    NoisyPairsError,
    build_noisy_pairs,
    draw_entry,
    estimate_x0_images,
    eval_plan,
    open_source,
    relabel_with_scorer,
    split_holdout,
    to_square,
    to_uint8,
    train_plan,
    write_noisy_pair_set,
)
from spo_core.preference.tiny import save_tiny_clip
from spo_core.preference.time_clip import TimeConditionedCLIP
from spo_core.preference.train import accuracy_stats, load_inputs, pair_correct, pair_scores, run_train_pm
from spo_core.scorers.base import build_scorer




@pytest.fixture(autouse=True)
def _no_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_DISABLE_MLFLOW", "1")
    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))


def _pairs_frame(n: int = 14, seed: int = 0) -> pd.DataFrame:
    """Pick-a-Pic-schema rows with PNG bytes of mixed sizes, decisive labels and ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = (40, 48) if i % 2 else (36, 36)
        label = [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5)][i % 4]
        rows.append(dict(caption=f"a {['red', 'blue', 'green', 'pink', 'gray'][i % 5]} shape",
                         jpg_0=encode_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                         jpg_1=encode_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                         label_0=label[0], label_1=label[1]))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def policy():
    return load_policy(ModelConfig(pretrained="tiny:sd15", kind="sd15"))


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "pairs.parquet"
    write_preference_dataset(_pairs_frame(), path)
    return path


def _load(path):
    """(source, index with digests, the same rows with their image bytes)."""
    src = open_source(str(path))
    df = src.index(digest=True).frame
    return src, df, src.fetcher().frame(df)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "pm", image_size=16, patch_size=4)


# ------------------------------------------------------------------------------ data


def test_holdout_split_is_by_caption_and_decisive():
    df = _pairs_frame(20)
    train, held = split_holdout(df, eval_pairs=4, seed=0)
    assert len(held) == 4 and (held["label_0"] != held["label_1"]).all()
    assert not set(train["caption"]) & set(held["caption"])
    assert len(train) + len(df[df["caption"].isin(held["caption"])]) == len(df)
    again, held2 = split_holdout(df.sample(frac=1.0, random_state=3), eval_pairs=4, seed=0)
    assert set(held2["caption"]) == set(held["caption"])  # order-free, seeded
    with pytest.raises(NoisyPairsError, match="no training pairs"):
        split_holdout(df, eval_pairs=1000, seed=0)


def test_hub_source_without_datasets_names_the_fix():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(PreferenceDataError, match="datasets"):
            open_source("yuvalkirstain/pickapic_v1", "train")
    else:
        pytest.skip("`datasets` is installed")
    with pytest.raises(PreferenceDataError, match="no such file"):
        open_source("./no/such/file.parquet")


def test_built_pairs_equal_an_unbatched_recomputation(policy, prefs, tmp_path):
    src, df, full = _load(prefs)
    settings = BuildSettings(image_size=16, batch_size=4, shard_size=5, seed=7)
    plan = train_plan(len(df), repeats=1, max_pairs=7)
    stats = build_noisy_pairs(policy, src, df, tmp_path / "train", plan, settings)
    assert (stats.pairs_total, stats.pairs_written, stats.shards_total) == (7, 7, 2)
    ds = NoisyPairs(tmp_path / "train")
    assert len(ds) == 7 and ds.image_size == 16
    for k in (0, 6):  # one entry from each shard, different positions in their UNet batches
        item = ds[k]
        row = full.iloc[int(plan.pair_index[k])]
        t, noise = draw_entry(7, plan.salt, k, -1, policy.latent_shape)
        assert int(item["timestep"]) == t and item["caption"] == row["caption"]
        assert torch.equal(item["label"], torch.tensor([row["label_0"], row["label_1"]], dtype=torch.float32))
        with torch.no_grad():
            imgs = torch.stack([to_square(decode_image(row[c])[None], policy.resolution)[0] for c in ("jpg_0", "jpg_1")])
            lat = policy.encode_images(imgs)
            x_t = policy.add_noise(lat, torch.stack([noise, noise]), torch.tensor([t, t]))  # one shared noise
            cond = policy.encode_prompts([row["caption"]]).select([0, 0])
            x0 = policy.x0_from_eps(x_t, torch.tensor([t, t]), policy.guided_eps(x_t, torch.tensor([t, t]), cond, 5.0))
            expected = to_uint8(to_square(policy.decode(x0), 16))
        for j, key in enumerate(("image_0", "image_1")):
            diff = (item[key].int() - expected[j].int()).abs().max()
            assert diff <= 1, f"entry {k} {key}: max uint8 difference {diff}"


def test_resume_and_determinism(policy, prefs, tmp_path):
    src, df, _ = _load(prefs)
    settings = BuildSettings(image_size=16, batch_size=3, shard_size=4, seed=1)
    plan = train_plan(len(df), repeats=1, max_pairs=6)
    build_noisy_pairs(policy, src, df, tmp_path / "a", plan, settings)
    first = {p.name: p.read_bytes() for p in sorted((tmp_path / "a").glob("shard-*"))}
    assert sorted(first) == ["shard-00000.json", "shard-00000.safetensors", "shard-00001.json", "shard-00001.safetensors"]
    # A re-run skips complete shards; a lost shard is rebuilt byte for byte.
    (tmp_path / "a" / "shard-00001.safetensors").unlink()
    stats = build_noisy_pairs(policy, src, df, tmp_path / "a", plan, settings)
    assert (stats.pairs_written, stats.shards_written) == (2, 1)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "a").glob("shard-*"))} == first
    assert build_noisy_pairs(policy, src, df, tmp_path / "a", plan, settings).pairs_written == 0
    # Extending max_pairs keeps full shards and rebuilds only the partial one.
    stats = build_noisy_pairs(policy, src, df, tmp_path / "a", train_plan(len(df), 1, 9), settings)
    assert (stats.pairs_written, stats.shards_written) == (5, 2)
    assert (tmp_path / "a" / "shard-00000.safetensors").read_bytes() == first["shard-00000.safetensors"]
    # Another seed in the same folder is refused, not mixed in.
    with pytest.raises(NoisyPairsError, match="other settings"):
        build_noisy_pairs(policy, src, df, tmp_path / "a", plan, BuildSettings(image_size=16, batch_size=3, shard_size=4, seed=2))


def test_x0_estimates_for_sdxl_conditioning():
    policy = load_policy(ModelConfig(pretrained="tiny:sdxl", kind="sdxl"))
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 2, 3, policy.resolution, policy.resolution, generator=g)
    noise = torch.randn(2, *policy.latent_shape, generator=g)
    est0, est1 = estimate_x0_images(policy, imgs[0], imgs[1], ["a cat", "a dog"], torch.tensor([100, 900]), noise)
    assert est0.shape == imgs[0].shape and float(est0.min()) >= 0 and float(est1.max()) <= 1
    # The pair's second image is computed like the first: swapping the inputs swaps the outputs.
    swapped1, swapped0 = estimate_x0_images(policy, imgs[1], imgs[0], ["a cat", "a dog"], torch.tensor([100, 900]), noise)
    torch.testing.assert_close(swapped0, est0, rtol=0, atol=1e-5)


def test_eval_set_has_every_pair_at_every_timestep(policy, prefs, tmp_path):
    src, df, full = _load(prefs)
    df, full = df.head(3), full.head(3)
    settings = BuildSettings(image_size=None, batch_size=8, shard_size=8, seed=0, clean_at_zero=True)
    build_noisy_pairs(policy, src, df, tmp_path / "eval", eval_plan(3, list(PAPER_EVAL_TIMESTEPS)), settings)
    ds = NoisyPairs(tmp_path / "eval")
    assert len(ds) == 15 and ds.timestep_values() == list(PAPER_EVAL_TIMESTEPS)
    assert ds.image_size == policy.resolution  # stored at model resolution when image_size is None
    for i in range(3):  # t = 0 stores the clean image itself
        assert int(ds[i]["timestep"]) == 0
        clean = to_uint8(to_square(decode_image(full.iloc[i]["jpg_1"])[None], policy.resolution))[0]
        assert torch.equal(ds[i]["image_1"], clean)
    shard = load_file(str(tmp_path / "eval" / "shard-00000.safetensors"))
    assert shard["image_0"].dtype == torch.uint8 and shard["label"].shape == (8, 2)


def test_relabel_follows_the_judge(clip_dir):
    df = _pairs_frame(6)
    src = PreferenceSource.from_frame(df)
    index = src.index().frame
    judge = build_scorer("pickscore", path=str(clip_dir))
    out = relabel_with_scorer(index, src, judge, threshold=0.0, batch_size=4)  # batches mix image sizes
    for i, row in df.iterrows():
        s0 = judge.score(decode_image(row["jpg_0"])[None], [row["caption"]])
        s1 = judge.score(decode_image(row["jpg_1"])[None], [row["caption"]])
        assert out.loc[i, "label_0"] == (1.0 if s0 > s1 else 0.0) and out.loc[i, "label_1"] == 1.0 - out.loc[i, "label_0"]
    assert (relabel_with_scorer(index, src, judge, threshold=0.999)["label_0"] == 0.5).all()
    assert index["label_0"].tolist() == _pairs_frame(6)["label_0"].tolist()  # the input frame is not modified


# ------------------------------------------------------------------------------ training


def _synthetic_set(path, n: int, timesteps, seed: int, flip_at: int | None = None):
    """Uniform-grey images; the brighter one is preferred (or the darker one for t >= flip_at)."""
    g = torch.Generator().manual_seed(seed)
    bright = torch.rand(n, 2, generator=g) * 0.8 + 0.1
    img = (bright[:, :, None, None, None] + 0.05 * torch.randn(n, 2, 3, 16, 16, generator=g)).clamp(0, 1)
    img = (img * 255).round().to(torch.uint8)
    t = timesteps(n, g)
    first = bright[:, 0] > bright[:, 1]
    if flip_at is not None:
        first = first ^ (t >= flip_at)
    labels = torch.stack([first.float(), 1 - first.float()], 1)
    return write_noisy_pair_set(path, img[:, 0], img[:, 1], t, labels, [f"a picture {i % 5}" for i in range(n)], shard_size=128)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    def build(flip_at):
        root = tmp_path_factory.mktemp("synthetic")
        _synthetic_set(root / "train", 384, lambda n, g: torch.randint(0, 1000, (n,), generator=g), 0, flip_at)
        _synthetic_set(root / "eval", 250, lambda n, g: torch.tensor(PAPER_EVAL_TIMESTEPS).repeat(n // 5), 1, flip_at)
        return root
    return build


def _cfg(clip_dir, data, out, **kw) -> TrainPMConfig:
    base = dict(base=str(clip_dir), data_dir=str(data), output_dir=str(out), device="cpu", batch_size=16,
                optim=OptimConfig(lr=1e-3, weight_decay=0.0), checkpoint_every=1000, log_every=5)
    return TrainPMConfig(**{**base, **kw})


def test_pair_correct_counts_equal_scores_as_half():
    s0, s1 = torch.tensor([2.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert pair_correct(s0, s1, labels).tolist() == [1.0, 0.0, 0.5, 1.0]


def test_training_beats_chance_on_an_easy_task(clip_dir, synthetic, tmp_path):
    data = synthetic(None)
    metrics = run_train_pm(_cfg(clip_dir, data, tmp_path / "pm", variants=["plain", "agnostic"], max_steps=30))
    assert metrics["steps/agnostic"] == 30
    assert metrics["acc/agnostic/mean"] > 0.85, metrics
    assert metrics["acc/agnostic/mean"] > metrics["acc/plain/mean"] + 0.2
    assert all(metrics[f"n/t{t}"] == 50 for t in PAPER_EVAL_TIMESTEPS)
    table = (tmp_path / "pm" / "accuracy.md").read_text()
    assert "| agnostic |" in table and "t=951" in table
    # The paired difference from plain, on the same 50 pairs, with its standard error and interval.
    stats = json.loads((tmp_path / "pm" / "accuracy.json").read_text())
    for t in PAPER_EVAL_TIMESTEPS:
        a, p = stats["agnostic"][str(t)], stats["plain"][str(t)]
        assert a["diff_vs_plain"] == pytest.approx(a["accuracy"] - p["accuracy"])
        assert a["diff_ci_low"] < a["diff_vs_plain"] < a["diff_ci_high"] and 0 < a["diff_se"] < 0.2
        assert metrics[f"se/agnostic/t{t}"] == pytest.approx(a["se"])
        assert metrics[f"diff_vs_plain/agnostic/t{t}"] == pytest.approx(a["diff_vs_plain"])
    assert "Paired difference from plain" in table and "Standard error" in table


def test_accuracy_stats_match_closed_forms():
    # 4 pairs at t = 0: plain right on 2, aware on 3 (one of them a tie scored 0.5).
    plain, aware = [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.5]
    st = accuracy_stats({"plain": {0: plain}, "aware": {0: aware}})
    p, a = st["plain"][0], st["aware"][0]
    assert p["accuracy"] == 0.5 and p["pairs"] == 4 and "diff_vs_plain" not in p
    assert p["se"] == pytest.approx(np.std(plain, ddof=1) / 2)
    d = np.subtract(aware, plain)  # [0, 1, 0, 0.5]
    assert a["diff_vs_plain"] == pytest.approx(0.375)
    assert a["diff_se"] == pytest.approx(np.std(d, ddof=1) / 2)
    half = 3.182446305284263 * a["diff_se"]  # t_{0.975, 3}
    assert a["diff_ci_low"] == pytest.approx(0.375 - half) and a["diff_ci_high"] == pytest.approx(0.375 + half)


def test_step_aware_model_learns_a_time_dependent_preference(clip_dir, synthetic, tmp_path):
    # The preferred image flips at t = 500: a model blind to t is right at t=0 or at t=951, not both.
    data = synthetic(500)
    metrics = run_train_pm(_cfg(clip_dir, data, tmp_path / "pm", variants=["aware"], max_steps=40,
                                optim=OptimConfig(lr=3e-3, weight_decay=0.0)))
    for t in (0, 251, 701, 951):
        assert metrics[f"acc/aware/t{t}"] > 0.8, metrics


def test_resume_reproduces_an_uninterrupted_run(clip_dir, tmp_path):
    data = tmp_path / "data"  # no eval/ set: this test is about the weights only
    _synthetic_set(data / "train", 40, lambda n, g: torch.randint(0, 1000, (n,), generator=g), 0)
    cfg = _cfg(clip_dir, data, tmp_path / "pm", variants=["aware"], max_steps=4, checkpoint_every=2, batch_size=8,
               gradient_accumulation_steps=2, lr_scheduler="linear", warmup_steps=1, keep_checkpoints=3)
    run_train_pm(cfg)
    (fp_dir,) = (tmp_path / "pm" / "checkpoints" / "aware").iterdir()  # one folder per configuration
    ckpts = fp_dir
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    straight = TimeConditionedCLIP.from_pretrained(tmp_path / "pm" / "aware").state_dict()
    # Simulate a crash after step 2: the last checkpoint and the output are gone.
    shutil.rmtree(ckpts / "step-000004")
    shutil.rmtree(tmp_path / "pm" / "aware")
    metrics = run_train_pm(cfg)
    assert metrics["resumed_from/aware"] == 2 and metrics["steps/aware"] == 4
    resumed = TimeConditionedCLIP.from_pretrained(tmp_path / "pm" / "aware").state_dict()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # A finished model is not retrained; other settings start fresh (a DVC experiment with another
    # seed) in a checkpoint folder of their own, which replaces the old one once it completes.
    assert run_train_pm(cfg)["train_s/aware"] == 0.0
    other = run_train_pm(cfg.model_copy(update={"seed": 5}))
    assert other["resumed_from/aware"] == 0 and other["steps/aware"] == 4
    left = [p.name for p in (tmp_path / "pm" / "checkpoints" / "aware").iterdir()]
    assert len(left) == 1 and left != [fp_dir.name]


def test_a_retrained_base_at_the_same_path_is_not_resumed(tmp_path):
    # The toy PickScore retrained in place (a DVC experiment changing its params) must not let the
    # finished step-aware model, or a checkpoint of it, trained from the old base be reused.
    base = save_tiny_clip(tmp_path / "base", image_size=16, patch_size=4, seed=0)
    data = tmp_path / "data"
    _synthetic_set(data / "train", 24, lambda n, g: torch.randint(0, 1000, (n,), generator=g), 0)
    cfg = _cfg(base, data, tmp_path / "pm", variants=["aware"], max_steps=4, checkpoint_every=2, batch_size=8)
    first = run_train_pm(cfg)
    assert first["steps/aware"] == 4
    save_tiny_clip(base, image_size=16, patch_size=4, seed=1)  # same path, other weights
    again = run_train_pm(cfg)
    assert again["resumed_from/aware"] == 0 and again["train_s/aware"] > 0
    shutil.rmtree(tmp_path / "pm" / "aware")  # a crash: only checkpoints of the new base may resume
    save_tiny_clip(base, image_size=16, patch_size=4, seed=2)
    assert run_train_pm(cfg)["resumed_from/aware"] == 0


# ------------------------------------------------------------------------------ stages end to end


def test_stages_end_to_end_on_tiny_sd15(prefs, clip_dir, tmp_path):
    from spo_core.stages import noisy_pairs as noisy_stage
    from spo_core.stages import train_pm as train_stage
    from spo_core.stages.common import execute

    ncfg = NoisyPairsConfig(model=ModelConfig(pretrained="tiny:sd15"), data=str(prefs), eval_pairs=1, image_size=16,
                            batch_size=5, shard_size=8, max_pairs=5, output_dir=str(tmp_path / "noisy"), device="cpu",
                            relabel=ScorerConfig(name="pickscore", path=str(clip_dir)), relabel_threshold=0.0)
    m = execute("noisy_pairs", ncfg, noisy_stage.run)
    assert m["pairs_written"] == 5 and m["seconds_per_pair"] > 0 and m["eval_entries_total"] == 5
    saved = json.loads((tmp_path / "metrics" / "noisy_pairs.json").read_text())
    assert saved["pairs_written"] == 5
    assert execute("noisy_pairs", ncfg, noisy_stage.run)["pairs_written"] == 0  # resumed: nothing left to do

    tcfg = _cfg(clip_dir, tmp_path / "noisy", tmp_path / "pm", batch_size=4, max_steps=2, checkpoint_every=1)
    execute("train_pm", tcfg, train_stage.run)
    saved = json.loads((tmp_path / "metrics" / "train_pm.json").read_text())
    for v in ("plain", "agnostic", "aware"):
        for t in PAPER_EVAL_TIMESTEPS:
            assert 0.0 <= saved[f"acc/{v}/t{t}"] <= 1.0
    assert (tmp_path / "pm" / "accuracy.md").is_file()
    scorer = build_scorer("step_aware", path=str(tmp_path / "pm" / "aware"))
    assert scorer.time_conditioned
    assert scorer.score(torch.rand(2, 3, 32, 32), ["a red shape", "a blue shape"], torch.tensor([951, 0])).shape == (2,)
    # No train/inference skew: the scorer sees exactly what training and evaluation saw.
    ds = NoisyPairs(tmp_path / "noisy" / "eval")
    batch = {k: (torch.stack([ds[i][k] for i in range(5)]) if k != "caption" else [ds[i][k] for i in range(5)])
             for k in ds[0]}
    model = TimeConditionedCLIP.from_pretrained(tmp_path / "pm" / "aware").eval()
    inputs = load_inputs(str(tmp_path / "pm" / "aware"), None, 77)
    s0, _ = pair_scores(model, inputs, batch, torch.device("cpu"))
    direct = scorer.score(batch["image_0"].float() / 255, batch["caption"], batch["timestep"])
    torch.testing.assert_close(direct, s0, rtol=0, atol=1e-5)
    assert build_scorer("pickscore", path=str(tmp_path / "pm" / "agnostic")).score(torch.rand(1, 3, 16, 16), ["x"]).shape == (1,)


def test_on_the_fly_pairs_match_the_stored_set_and_train(policy, prefs, clip_dir, tmp_path):
    """train_pairs: on_the_fly stores no shards; train_pm computes the same entries per batch."""
    from torch.utils.data import default_collate

    from spo_core.preference.noisy_pairs import OnTheFlyPairs, open_pairs, write_on_the_fly_set

    src, df, _ = _load(prefs)
    settings = BuildSettings(image_size=16, batch_size=4, shard_size=5, seed=7)
    plan = train_plan(len(df), repeats=2)
    info = {"data": str(prefs), "split": "train"}
    build_noisy_pairs(policy, src, df, tmp_path / "stored" / "train", plan, settings, source_info=info)
    write_on_the_fly_set(policy, ModelConfig(pretrained="tiny:sd15", kind="sd15"), df, tmp_path / "otf" / "train",
                         plan, settings, info, src.files)
    assert not list((tmp_path / "otf" / "train").glob("shard-*"))
    stored, otf = open_pairs(tmp_path / "stored" / "train"), open_pairs(tmp_path / "otf" / "train")
    assert isinstance(otf, OnTheFlyPairs) and isinstance(stored, NoisyPairs) and len(otf) == len(stored) == 28
    ks = [0, 3, 9, 27]  # another UNet batch composition than the stored build's
    got = otf.finish(default_collate([otf[k] for k in ks]), "cpu")
    for j, k in enumerate(ks):
        item = stored[k]
        assert int(got["timestep"][j]) == int(item["timestep"]) and got["caption"][j] == item["caption"]
        assert torch.equal(got["label"][j], item["label"])
        for key in ("image_0", "image_1"):
            assert (got[key][j].int() - item[key].int()).abs().max() <= 1, (k, key)
    metrics = run_train_pm(_cfg(clip_dir, tmp_path / "otf", tmp_path / "pm", variants=["agnostic"], max_steps=3,
                                batch_size=4))
    assert metrics["steps/agnostic"] == 3 and metrics["train_pairs"] == 28
