"""Micro end-to-end toy pipeline: world -> base pretraining (+ resume) -> preference pairs ->
toy PickScore -> toy scorers. Micro model sizes; one torch thread so timings hold on a busy CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPModel

from spo_core.config import ModelConfig
from spo_core.data.pickapic import read_preference_dataset
from spo_core.models.diffusion import load_policy
from spo_core.scorers.base import available_scorers, build_scorer
from spo_core.stages import toy_pickscore, toy_prefs, toy_pretrain, toy_world
from spo_core.stages.common import execute
from spo_core.toyworld.config import (
    ClipArch,
    SampleConfig,
    ToyPickScoreConfig,
    ToyPrefsConfig,
    ToyPretrainConfig,
    ToyWorldConfig,
    UNetArch,
)
from spo_core.toyworld.pretrain import train_base
from spo_core.toyworld.render import render_prompts
from spo_core.toyworld.world import load_world

MICRO_UNET = UNetArch(block_out_channels=(8, 16), cross_attention=(False, True), norm_num_groups=4, attention_heads=1,
                      text_hidden=16, text_layers=1)
MICRO_CLIP = ClipArch(hidden=16, vision_layers=1, text_layers=1, heads=2, projection_dim=16)
MICRO_SAMPLER = SampleConfig(num_steps=2, batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("toy")
    monkeypatch_module.setenv("SPO_METRICS_DIR", str(path / "metrics"))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPO_DISABLE_MLFLOW", "1")
        yield mp


@pytest.fixture(scope="module")
def world_dir(root):
    metrics = execute("toy_world", ToyWorldConfig(output_dir=str(root / "world")), toy_world.run)
    assert metrics["n_train"] >= 4000 and metrics["n_validation"] == 500 and metrics["n_heldout_pairs"] == 4
    return root / "world"


def pretrain_cfg(root, world_dir, **kw) -> ToyPretrainConfig:
    base = dict(world_dir=str(world_dir), output_dir=str(root / "base"), checkpoint_dir=str(root / "ckpt"), steps=4,
                batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1, arch=MICRO_UNET, sampler=MICRO_SAMPLER,
                grid_prompts=2, eval_prompts=2)
    return ToyPretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_dir(root, world_dir):
    metrics = execute("toy_pretrain", pretrain_cfg(root, world_dir), toy_pretrain.run)
    assert metrics["steps_run"] == 4 and metrics["final_loss"] > 0
    assert metrics["validation_renderer_reward"] > 0.9
    return root / "base"


def test_world_directory(world_dir):
    world = load_world(world_dir)
    desc = json.loads((world_dir / "world.json").read_text())
    assert len(world.train_prompts) == desc["n_train"] and len(world.validation_prompts) == 500
    assert world.tokenizer()(world.train_prompts[0]).input_ids[-1] == world.tokenizer().eos_token_id


def test_pretrained_base_saves_and_loads(base_dir, world_dir):
    for name in ("model_index.json", "loss.csv", "samples.png", "unet/diffusion_pytorch_model.safetensors"):
        assert (base_dir / name).exists(), name
    policy = load_policy(ModelConfig(pretrained=str(base_dir), kind="sd15"))
    assert policy.resolution == 32 and policy.latent_shape == (12, 16, 16)
    cond = policy.encode_prompts(load_world(world_dir).validation_prompts[:2])
    eps = policy.guided_eps(torch.randn(2, *policy.latent_shape), torch.tensor(500), cond, 5.0)
    assert eps.shape == (2, 12, 16, 16) and torch.isfinite(eps).all()


def killed_at_3_then_resumed(cfg: ToyPretrainConfig, world_dir):
    """Pretraining killed after step 3 (checkpoint at 2), then run again with the same configuration."""
    class Killed(RuntimeError):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_base(cfg, load_world(world_dir), on_log=kill_at_3)
    return train_base(cfg, load_world(world_dir))


def test_killed_pretraining_resumes_to_identical_weights(root, world_dir):
    resumed = killed_at_3_then_resumed(pretrain_cfg(root, world_dir, checkpoint_dir=str(root / "ckpt_resume")),
                                       world_dir)
    assert resumed.start_step == 2 and resumed.steps_run == 2
    straight = train_base(pretrain_cfg(root, world_dir, checkpoint_dir=str(root / "ckpt_straight")), load_world(world_dir))
    for a, b in zip(resumed.policy.unet.state_dict().values(), straight.policy.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in straight.losses]
    # A changed configuration (`dvc exp run -S toy_pretrain.lr=...`) starts fresh in a checkpoint folder
    # of its own, and once it completes the other configuration's checkpoints are gone.
    changed = train_base(pretrain_cfg(root, world_dir, checkpoint_dir=str(root / "ckpt_resume"), lr=1e-3),
                         load_world(world_dir))
    assert changed.start_step == 0 and changed.steps_run == 4
    assert len([p for p in (root / "ckpt_resume").iterdir()]) == 1


@pytest.fixture(scope="module")
def prefs_dir(root, world_dir, base_dir):
    cfg = ToyPrefsConfig(world_dir=str(world_dir), base_dir=str(base_dir), output_dir=str(root / "prefs"),
                         n_train_prompts=24, n_validation_prompts=12, sampler=MICRO_SAMPLER)
    metrics = execute("toy_prefs", cfg, toy_prefs.run)
    assert metrics["train_pairs"] == 24 and metrics["validation_pairs"] == 12
    assert 0.0 <= metrics["train_tie_share"] <= 1.0
    assert metrics["validation_renderer_reward"] > metrics["validation_base_reward"]
    return root / "prefs"


def test_prefs_dataset_is_pickapic_readable(prefs_dir, world_dir):
    df = read_preference_dataset(prefs_dir / "train.parquet")
    assert len(df) == 24 and {"reward_0", "reward_1"} <= set(df.columns)
    assert ((df["label_0"] + df["label_1"]) == 1).all()
    val = read_preference_dataset(prefs_dir / "validation.parquet")
    assert set(val["caption"]) <= set(load_world(world_dir).validation_prompts)
    # Labels point at the higher reward, or are ties for near-equal rewards.
    decided = df[df["label_0"] != 0.5]
    assert ((decided["reward_0"] - decided["reward_1"]).abs() >= 0.01).all()


@pytest.fixture(scope="module")
def pickscore_dir(root, world_dir, prefs_dir):
    cfg = ToyPickScoreConfig(world_dir=str(world_dir), prefs_dir=str(prefs_dir), output_dir=str(root / "pickscore"),
                             arch=MICRO_CLIP, clip_steps=3, clip_batch_size=8, pref_steps=3, pref_batch_size=8,
                             warmup_steps=1)
    metrics = execute("toy_pickscore", cfg, toy_pickscore.run)
    assert 0.0 <= metrics["validation_accuracy"] <= 1.0 and metrics["train_pairs"] == 24
    return root / "pickscore"


def test_toy_pickscore_loads_as_clip(pickscore_dir):
    model = CLIPModel.from_pretrained(str(pickscore_dir))
    assert model.config.vision_config.image_size == 32 and model.config.vision_config.patch_size == 4
    assert (pickscore_dir / "model.safetensors").exists() and (pickscore_dir / "preprocessor_config.json").exists()


def test_toy_scorers_registered_and_scoring(pickscore_dir, world_dir):
    assert {"toy_reward", "toy_alignment", "toy_quality", "toy_pickscore"} <= set(available_scorers())
    prompts = load_world(world_dir).validation_prompts[:4]
    images = render_prompts(prompts, 32, 0)
    big = torch.nn.functional.interpolate(images, size=64, mode="nearest")
    for name, path in [("toy_reward", None), ("toy_reward", str(world_dir)), ("toy_alignment", str(world_dir)),
                       ("toy_quality", None), ("toy_pickscore", str(pickscore_dir))]:
        scorer = build_scorer(name, path=path)
        s = scorer.score(images, prompts)
        assert s.shape == (4,) and torch.isfinite(s).all(), name
        # Any image size works; the ground truth resizes by area averaging (exact here), ClipScorer bicubically.
        assert torch.allclose(scorer.score(big, prompts), s, atol=1e-4 if name != "toy_pickscore" else 0.05), name
    truth = build_scorer("toy_reward").score(images, prompts)
    noise = build_scorer("toy_reward").score(torch.rand_like(images), prompts)
    assert bool((truth > noise).all())
    with pytest.raises(ValueError, match="needs path"):
        build_scorer("toy_pickscore")
    with pytest.raises(ValueError, match="bad options"):
        build_scorer("toy_reward", colour=1)


# ------------------------------------------------------------------ the flow toy base (kind sd3)

MICRO_TRANSFORMER = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_hidden=16, text_layers=2)


def flow_cfg(root, world_dir, **kw) -> ToyPretrainConfig:
    base = dict(kind="sd3", transformer=MICRO_TRANSFORMER, output_dir=str(root / "flow_base"),
                checkpoint_dir=str(root / "ckpt_flow"), sampler=MICRO_SAMPLER.model_copy(update={"eta": 0.7}))
    return pretrain_cfg(root, world_dir, **{**base, **kw})


@pytest.fixture(scope="module")
def flow_base_dir(root, world_dir):
    metrics = execute("toy_pretrain", flow_cfg(root, world_dir), toy_pretrain.run)
    assert metrics["steps_run"] == 4 and metrics["final_loss"] > 0
    assert metrics["transformer_parameters"] > 0 and metrics["text_encoder_2_parameters"] > 0
    return root / "flow_base"


def test_flow_base_saves_as_an_sd3_pipeline_and_loads_with_its_t5_length(flow_base_dir, world_dir):
    from spo_core.models.diffusion import pipeline_kind
    from spo_core.models.flow_policy import FlowPolicy

    assert pipeline_kind(flow_base_dir) == "sd3"
    assert (flow_base_dir / "transformer/diffusion_pytorch_model.safetensors").exists()
    policy = load_policy(ModelConfig(pretrained=str(flow_base_dir), kind="sd3"))
    assert isinstance(policy, FlowPolicy)
    # trained with one zero T5 token (no T5 encoder): loading keeps that length, not SD3's 256
    assert policy.max_sequence_length == 1 and policy.text_encoder_3 is None
    assert policy.resolution == 32 and policy.latent_shape == (12, 16, 16)
    cond = policy.encode_prompts(load_world(world_dir).validation_prompts[:2])
    assert cond.cond.shape[1] == policy.tokenizer.model_max_length + 1
    v = policy.guided_velocity(torch.randn(2, *policy.latent_shape), torch.tensor(0.5), cond, 5.0)
    assert v.shape == (2, 12, 16, 16) and torch.isfinite(v).all()


def test_flow_pretraining_regresses_the_velocity(root, world_dir):
    from spo_core.toyworld.models import build_toy_base
    from spo_core.toyworld.pretrain import denoising_loss

    cfg = flow_cfg(root, world_dir)
    policy = build_toy_base(cfg, load_world(world_dir).tokenizer(), 32)
    x0 = torch.rand(3, *policy.latent_shape) * 2 - 1
    captions = ["a red circle", "", "a blue square"]
    loss = denoising_loss(policy, x0, captions, torch.Generator().manual_seed(7), cfg)
    # the same draws by hand: noise, then t = sigmoid(N(0, 1)); x_t = (1 - t) x0 + t eps; target eps - x0
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.sigmoid(torch.randn(3, generator=gen))
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    hidden, pooled = policy.encode_text(captions)
    expected = ((policy.velocity(x_t, t, hidden, pooled) - (eps - x0)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_ddpm_pretraining_predicts_the_offset_noise(root, world_dir, offset):
    from spo_core.toyworld.models import build_toy_base
    from spo_core.toyworld.pretrain import denoising_loss

    cfg = pretrain_cfg(root, world_dir, noise_offset=offset)
    policy = build_toy_base(cfg, load_world(world_dir).tokenizer(), 32)
    x0 = torch.rand(3, *policy.latent_shape) * 2 - 1
    captions = ["a red circle", "", "a blue square"]
    loss = denoising_loss(policy, x0, captions, torch.Generator().manual_seed(7), cfg)
    # by hand: eps, then (only with an offset) one N(0, 1) per image and channel, then t
    gen = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=gen)
    if offset:
        eps = eps + offset * torch.randn(3, x0.shape[1], 1, 1, generator=gen)
    t = torch.randint(0, 1000, (3,), generator=gen)
    ids = policy.tokenizer(captions, padding="max_length", max_length=policy.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    x_t = policy.scheduler.add_noise(x0, eps, t)
    expected = ((policy.unet(x_t, t, encoder_hidden_states=policy.text_encoder(ids)[0]).sample - eps) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_noise_offset_is_refused_for_the_flow_base(root, world_dir):
    with pytest.raises(ValueError, match="noise_offset=0.1 applies to kind sd15 only"):
        flow_cfg(root, world_dir, noise_offset=0.1)


def test_killed_flow_pretraining_resumes_to_identical_weights(root, world_dir):
    resumed = killed_at_3_then_resumed(flow_cfg(root, world_dir, checkpoint_dir=str(root / "ckpt_flow_resume")),
                                       world_dir)
    assert resumed.start_step == 2
    straight = train_base(flow_cfg(root, world_dir, checkpoint_dir=str(root / "ckpt_flow_straight")),
                          load_world(world_dir))
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        for a, b in zip(getattr(resumed.policy, name).state_dict().values(),
                        getattr(straight.policy, name).state_dict().values()):
            assert torch.equal(a, b), name
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in straight.losses]


def test_flow_prefs_sample_the_flow_base(root, world_dir, flow_base_dir):
    cfg = ToyPrefsConfig(world_dir=str(world_dir), base_dir=str(flow_base_dir), output_dir=str(root / "flow_prefs"),
                         n_train_prompts=4, n_validation_prompts=4, sampler=MICRO_SAMPLER.model_copy(update={"eta": 0.7}))
    metrics = execute("toy_prefs", cfg, toy_prefs.run)
    assert metrics["train_pairs"] == 4 and metrics["validation_renderer_reward"] > metrics["validation_base_reward"]
