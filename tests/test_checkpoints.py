"""The one checkpoint mechanism: atomic folders, configuration fingerprints, safe resume."""

from __future__ import annotations

import logging

import pytest
import torch

from spo_core.checkpoints import CheckpointError, CheckpointStore, config_differences, fingerprint
from spo_core.config import LoraConfig, ModelConfig, OptimConfig, SamplerConfig, SPOLossConfig, TrainConfig
from spo_core.methods.spo import SPOMethod
from spo_core.models.diffusion import load_policy
from spo_core.scorers.simple import BrightnessScorer
from spo_core.training import TrainingError, train_rounds


def test_fingerprint_ignores_only_the_keys_that_may_change():
    a = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "train": {"rounds": 3, "seed": 0}}
    b = {"optim": {"lr": 5e-4, "betas": [0.9, 0.999]}, "train": {"rounds": 9, "seed": 0}}
    may = ("optim.lr", "train.rounds")
    assert fingerprint(a, may) == fingerprint(b, may)
    assert fingerprint(a) != fingerprint(b)
    c = {**b, "train": {"rounds": 3, "seed": 1}}
    assert config_differences(a, c, may) == ["train.seed: 0 -> 1"]


def test_store_saves_atomically_keeps_the_last_and_restores(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=2)
    cfg = {"x": 1}
    for step in range(3):
        store.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"optimizer": {"step": step}}, cfg,
                   extra={"history": [step]})
    assert [p.name for p in store.list()] == ["step-000001", "step-000002"]
    ck = store.resume(cfg)
    assert ck.step == 2 and torch.equal(ck.tensors["model"]["w"], torch.full((2,), 2.0))
    assert ck.state["optimizer"]["step"] == 2 and ck.manifest["history"] == [2]
    # An unfinished folder (no manifest) is not a checkpoint.
    (tmp_path / "ck" / "step-000009").mkdir()
    assert store.latest().name == "step-000002"
    with pytest.raises(CheckpointError, match=r"x: 1 -> 2.*Keys that may change on resume: none"):
        store.resume({"x": 2})


def _train(tmp_path, rounds, lr=1e-3, seed=0, resume=False):
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    sampler = SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.0)
    train = TrainConfig(rounds=rounds, prompts_per_round=2, train_batch_size=4, seed=seed,
                        output_dir=str(tmp_path / "run"), export_kohya=False)
    return train_rounds(policy, SPOMethod(sampler, SPOLossConfig(), BrightnessScorer()), ["a cat", "a dog", "a cow"],
                        LoraConfig(rank=2), OptimConfig(lr=lr), train, resume=resume, device="cpu")


def test_resume_refuses_a_changed_configuration_and_follows_a_new_learning_rate(tmp_path, caplog):
    _train(tmp_path, rounds=1)
    with pytest.raises(TrainingError, match=r"train\.seed: 0 -> 1.*optim\.lr.*train\.rounds"):
        _train(tmp_path, rounds=2, seed=1, resume=True)
    # A lower learning rate (the way to continue a run that diverged) is allowed, and the optimiser
    # takes it instead of the one saved in its state.
    with caplog.at_level(logging.INFO, logger="spo_core.training"):
        res = _train(tmp_path, rounds=2, lr=2e-4, resume=True)
    assert "learning rate 0.001 -> 0.0002" in caplog.text
    assert [h["round"] for h in res["history"]] == [0, 1]


class _InfGradients(SPOMethod):
    """A stand-in for a diverging step: finite loss, infinite gradients in round 0."""

    def loss(self, ctx, batch):
        loss, m = super().loss(ctx, batch)
        if ctx.round == 0:
            p = next(q for n, q in ctx.policy.unet.named_parameters() if "lora_A" in n)
            p.register_hook(lambda g: g * float("inf"))
        return loss, m


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    # The round's loss was finite, so only a check of the weights keeps them out of "the last good
    # checkpoint" that the error message tells the user to resume from.
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    sampler = SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.0)
    train = TrainConfig(rounds=2, prompts_per_round=2, output_dir=str(tmp_path / "run"), export_kohya=False)
    with pytest.raises(TrainingError, match=r"diverged in round 0 \(non-finite.*not checkpointed.*--resume --set optim\.lr=0\.0001"):
        train_rounds(policy, _InfGradients(sampler, SPOLossConfig(), BrightnessScorer()), ["a cat", "a dog"],
                     LoraConfig(rank=2), OptimConfig(lr=1e-3), train, device="cpu")
    assert CheckpointStore(tmp_path / "run" / "checkpoints", prefix="round").list() == []
    assert not (tmp_path / "run" / "lora").exists()


def test_a_run_in_which_every_pair_is_filtered_fails(tmp_path):
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    sampler = SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.999)  # brightness gaps are far below it
    train = TrainConfig(rounds=2, prompts_per_round=2, output_dir=str(tmp_path / "run"), export_kohya=False)
    with pytest.raises(TrainingError, match=r"no optimiser step in 2 round\(s\).*keep_fraction 0\.00.*sampler\.threshold"):
        train_rounds(policy, SPOMethod(sampler, SPOLossConfig(), BrightnessScorer()), ["a cat", "a dog"],
                     LoraConfig(rank=2), OptimConfig(), train, device="cpu")
    assert not (tmp_path / "run" / "lora").exists()


def test_stores_keyed_by_configuration_resume_their_own_and_prune_the_others(tmp_path):
    root = tmp_path / "ck"
    (root / "step-000005").mkdir(parents=True)  # the layout before configurations had folders
    (root / "step-000005" / "manifest.json").write_text("{}")
    (root / "notes").mkdir()  # not a checkpoint folder: left alone
    a, b = {"lr": 1e-3, "seed": 0}, {"lr": 5e-4, "seed": 0}
    store_a = CheckpointStore.for_run(root, a)
    store_a.save(3, {"model": {"w": torch.ones(2)}}, {}, a)
    # A changed configuration sees no checkpoint (it starts fresh: no refusal) ...
    store_b = CheckpointStore.for_run(root, b)
    assert store_b.root != store_a.root and store_b.resume(b) is None
    # ... and the same one resumes its own.
    assert CheckpointStore.for_run(root, dict(a)).resume(a).step == 3
    store_b.save(1, {"model": {"w": torch.zeros(2)}}, {}, b)
    assert sorted(p.name for p in store_b.prune_other_runs()) == sorted([store_a.root.name, "step-000005"])
    assert sorted(p.name for p in root.iterdir()) == sorted([store_b.root.name, "notes"])
    assert store_b.resume(b).step == 1


def test_train_spo_resume_refuses_a_base_model_retrained_at_the_same_path(tmp_path, monkeypatch):
    """`--resume` compares the contents of the files a run trains from, not only their paths."""
    from spo_core.config import load_spo_config
    from spo_core.stages import train_spo

    monkeypatch.setenv("SPO_METRICS_DIR", str(tmp_path / "metrics"))
    base = tmp_path / "base"
    load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16)).save_pretrained(base)
    common = ["train.prompts_per_round=2", "train.train_batch_size=4", "sampler.num_steps=4", "sampler.k=2",
              "sampler.threshold=0.0", "train.checkpoint_every=1", f"train.output_dir={tmp_path / 'spo'}",
              f"model.pretrained={base}", "model.resolution=16", "monitor.scorer=null", "train.export_kohya=false"]
    train_spo.run(load_spo_config("tiny", common + ["train.rounds=1"]))
    resumed = train_spo.run(load_spo_config("tiny", common + ["train.rounds=2", "train.resume=true"]))
    assert resumed["rounds"] == 2  # the same base: round 0 from the checkpoint, round 1 trained

    retrained = load_policy(ModelConfig(pretrained=str(base), resolution=16))
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(0.01)
    retrained.save_pretrained(base)
    with pytest.raises(TrainingError, match=r"input_contents\.model: '[0-9a-f]+' -> '[0-9a-f]+'"):
        train_spo.run(load_spo_config("tiny", common + ["train.rounds=3", "train.resume=true"]))
