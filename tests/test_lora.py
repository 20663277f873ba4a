"""Tests for spo_core.models.lora: attach, save (diffusers + kohya), load, merge, and load errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from spo_core.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig
from spo_core.models.diffusion import load_policy
from spo_core.models.lora import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    LoraLoadError,
    adapters_disabled,
    attach_lora,
    load_lora,
    lora_state_dict,
    save_lora,
    save_merged,
)
from spo_core.checkpoints import CheckpointStore
from spo_core.training import RESUME_MAY_CHANGE, TrainingError, train_rounds


def probe(policy, seed: int = 0) -> torch.Tensor:
    """The CFG noise prediction on a fixed input: what the LoRA changes."""
    cond = policy.encode_prompts(["a red cube", "a cat"])
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.guided_eps(x, torch.tensor([500, 120]), cond, 5.0)


def trained_like(policy, cfg: LoraConfig, perturb_lora) -> torch.Tensor:
    attach_lora(policy, cfg)
    perturb_lora(policy)
    return probe(policy)


def test_attach_lora_starts_as_identity_and_disables(make_policy, perturb_lora):
    policy = make_policy("sd15")
    base = probe(policy)
    params = attach_lora(policy, LoraConfig(rank=4))
    # Targets to_q, to_k, to_v, to_out.0 of every attention: 2 (A, B) per module, all trainable, fp32.
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert len(params) == len(names) > 0 and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v", "0"}
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.shape[0] == 4 for n, p in policy.unet.named_parameters() if "lora_A" in n)
    torch.testing.assert_close(probe(policy), base)  # gaussian init: B = 0
    perturb_lora(policy)
    assert (probe(policy) - base).abs().max() > 1e-2
    with adapters_disabled(policy):
        torch.testing.assert_close(probe(policy), base)  # the reference model
    assert (probe(policy) - base).abs().max() > 1e-2  # re-enabled afterwards


def test_attach_lora_unknown_targets_raise_lora_error(make_policy):
    policy = make_policy("sd15")
    with pytest.raises(LoraLoadError, match="target_modules"):
        attach_lora(policy, LoraConfig(target_modules=["no_such_module"]))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_save_lora_loads_in_diffusers_pipeline(kind, tiny_pipeline_dir, perturb_lora, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe_dir = tiny_pipeline_dir(kind)
    policy = load_policy(ModelConfig(pretrained=str(pipe_dir), kind=kind))
    # alpha != rank: the scale alpha/rank = 2 must travel with the file.
    cfg = LoraConfig(rank=4, alpha=8.0)
    attach_lora(policy, cfg)
    perturb_lora(policy)
    out = save_lora(policy, tmp_path / "lora", cfg)
    assert (out / DIFFUSERS_WEIGHT_NAME).exists() and (out / KOHYA_WEIGHT_NAME).exists()
    kohya = load_file(str(out / KOHYA_WEIGHT_NAME))
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)
    assert all(k.startswith("lora_unet_") for k in kohya)

    if kind == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(pipe_dir))
    pipe.load_lora_weights(str(out))
    cond = policy.encode_prompts(["a red cube"])
    x = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    with torch.no_grad():
        ours = policy.unet(x, t, encoder_hidden_states=cond.cond, added_cond_kwargs=cond.cond_added).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=cond.cond, added_cond_kwargs=cond.cond_added).sample
        with adapters_disabled(policy):
            base = policy.unet(x, t, encoder_hidden_states=cond.cond, added_cond_kwargs=cond.cond_added).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-2
    # The policy conditions the UNet exactly as the pipeline does (SDXL: zero unconditional branch).
    if kind == "sd15":
        pe, ne = pipe.encode_prompt("a red cube", "cpu", 1, True)
    else:
        pe, ne, pooled, npooled = pipe.encode_prompt("a red cube", device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True)
        torch.testing.assert_close(cond.cond_added["text_embeds"], pooled)
        torch.testing.assert_close(cond.uncond_added["text_embeds"], npooled)
    torch.testing.assert_close(cond.cond, pe)
    torch.testing.assert_close(cond.uncond, ne)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_load_lora_reproduces_trained_outputs(kind, alpha, fmt, make_policy, perturb_lora, tmp_path):
    cfg = LoraConfig(rank=4, alpha=alpha)
    policy = make_policy(kind)
    base = probe(policy)
    trained = trained_like(policy, cfg, perturb_lora)
    out = save_lora(policy, tmp_path / "lora", cfg)
    fresh = make_policy(kind)
    torch.testing.assert_close(probe(fresh), base)  # same tiny base weights
    load_lora(fresh, out if fmt == "diffusers" else out / KOHYA_WEIGHT_NAME)
    torch.testing.assert_close(probe(fresh), trained, rtol=1e-5, atol=1e-6)
    # Loaded for inference by default.
    assert not any(p.requires_grad for p in fresh.unet.parameters())


def test_load_lora_trainable_flag(make_policy, perturb_lora, tmp_path):
    cfg = LoraConfig(rank=2)
    policy = make_policy("sd15")
    trained_like(policy, cfg, perturb_lora)
    out = save_lora(policy, tmp_path / "lora", cfg, export_kohya=False)
    assert not (out / KOHYA_WEIGHT_NAME).exists()
    fresh = make_policy("sd15")
    load_lora(fresh, out, trainable=True)
    trainable = [n for n, p in fresh.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # Same keys and values as the saved adapter.
    a, b = lora_state_dict(policy), lora_state_dict(fresh)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_save_merged_matches_lora_outputs(make_policy, perturb_lora, tmp_path):
    policy = make_policy("sd15")
    trained = trained_like(policy, LoraConfig(rank=4, alpha=2.0), perturb_lora)
    save_merged(policy, tmp_path / "merged")
    merged = load_policy(ModelConfig(pretrained=str(tmp_path / "merged"), kind="sd15", resolution=policy.resolution))
    assert not any("lora_" in n for n, _ in merged.unet.named_parameters())
    torch.testing.assert_close(probe(merged), trained, rtol=1e-4, atol=1e-5)


def test_sdxl_lora_into_sd15_raises(make_policy, tmp_path):
    cfg = LoraConfig(rank=4)
    sdxl = make_policy("sdxl")
    attach_lora(sdxl, cfg)
    out = save_lora(sdxl, tmp_path / "xl", cfg)
    for path in (out, out / KOHYA_WEIGHT_NAME):
        with pytest.raises(LoraLoadError, match="sd15"):
            load_lora(make_policy("sd15"), path)


def test_partially_matching_lora_raises(make_policy, tmp_path):
    # An SDXL LoRA on to_q / to_out only: its mid-block keys happen to fit the SD-1.5 UNet, its
    # down/up-block keys do not. Loading 8 of 32 modules silently would be a wrong model.
    cfg = LoraConfig(rank=4, target_modules=["to_q", "to_out.0"])
    sdxl = make_policy("sdxl")
    attach_lora(sdxl, cfg)
    out = save_lora(sdxl, tmp_path / "xl", cfg)
    with pytest.raises(LoraLoadError):
        load_lora(make_policy("sd15"), out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_lora_is_refused_before_anything_is_generated(make_policy, perturb_lora, tmp_path, bad):
    cfg = LoraConfig(rank=4)
    policy = make_policy("sd15")
    trained_like(policy, cfg, perturb_lora)
    with torch.no_grad():
        next(p for n, p in policy.unet.named_parameters() if "lora_B" in n)[0, 0] = bad
    out = save_lora(policy, tmp_path / "diverged", cfg)
    for path in (out, out / KOHYA_WEIGHT_NAME):
        with pytest.raises(LoraLoadError, match=r"NaN/inf values in 1 of \d+ tensors.*diverged run"):
            load_lora(make_policy("sd15"), path)


def test_load_lora_bad_paths(make_policy, tmp_path):
    policy = make_policy("sd15")
    with pytest.raises(LoraLoadError, match="does not exist"):
        load_lora(policy, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraLoadError, match="no .safetensors"):
        load_lora(policy, tmp_path / "empty")
    # A safetensors file that holds no LoRA at all.
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(LoraLoadError):
        load_lora(policy, tmp_path / "not_lora.safetensors")


def test_resume_with_wrong_rank_raises(make_policy, tmp_path):
    # A rank-4 checkpoint, then a resume configured with rank 2.
    donor = make_policy("sd15")
    params = attach_lora(donor, LoraConfig(rank=4))
    opt = torch.optim.AdamW(params)
    saved_cfg = {"lora": LoraConfig(rank=4).model_dump(mode="json"), "optim": OptimConfig().model_dump(mode="json"),
                 "train": TrainConfig(rounds=2, output_dir=str(tmp_path / "out")).model_dump(mode="json")}
    CheckpointStore(tmp_path / "out" / "checkpoints", prefix="round").save(
        0, {"lora": lora_state_dict(donor)}, {"optimizer": opt.state_dict()}, saved_cfg, RESUME_MAY_CHANGE)
    policy = make_policy("sd15")
    # The configuration check names the differing key before any weights are loaded.
    with pytest.raises(TrainingError, match=r"configuration differs in lora.rank: 4 -> 2"):
        train_rounds(policy, method=None, prompts=["a cat"], lora_cfg=LoraConfig(rank=2), optim_cfg=OptimConfig(),
                     train_cfg=TrainConfig(rounds=2, output_dir=str(tmp_path / "out")), resume=True)
