"""The flow-matching policies (SD3 / SD3.5 and FLUX.1 architectures, tiny random weights) against
diffusers' own pipelines: the ODE rollout, the text conditioning, the LoRA files."""

from __future__ import annotations

import pytest
import torch

from spo_core.config import LoraConfig, ModelConfig
from spo_core.models.diffusion import ModelLoadError, load_policy
from spo_core.models.flow_policy import pack_latents, unpack_latents
from spo_core.models.lora import attach_lora, load_lora, save_lora
from spo_core.models.tiny import save_tiny_pipeline
from spo_core.rollouts import sample_images

PROMPTS = ["a red cube", "blue sky at night", ""]
SEEDS = [11, 12, 13]
RES = 16  # 8x8 latents: 16 SD3 patches, 16 packed FLUX tokens


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd3", "flux")}


def _pipeline(kind, path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline).from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_latents(kind, pipe, policy, steps, guidance):
    """The pipeline's final latents from the initial noise sample_images draws for SEEDS."""
    shape = policy.latent_shape
    x_T = torch.stack([torch.randn((steps + 1, *shape), generator=torch.Generator().manual_seed(s))[0] for s in SEEDS])
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", height=RES,
              width=RES, max_sequence_length=policy.max_sequence_length)
    with torch.no_grad():
        if kind == "sd3":
            return pipe(latents=x_T, negative_prompt=[""] * len(PROMPTS), **kw).images
        return unpack_latents(pipe(latents=pack_latents(x_T), **kw).images, *shape[1:])


@pytest.mark.parametrize("kind,guidance", [("sd3", 4.5), ("sd3", 1.0), ("flux", 3.5)])
def test_the_ode_rollout_equals_the_diffusers_pipeline(kind, guidance, pipelines):
    # noise level 0: the SDE step is the scheduler's Euler step; the grid (SD3's static shift, FLUX's
    # resolution-dependent one), the text encoders, CFG / the guidance embedding and FLUX's packing all
    # have to match for the final latents to agree.
    policy = load_policy(ModelConfig(pretrained=str(pipelines[kind]), kind=kind, resolution=RES))
    steps = 5
    ours = sample_images(policy, PROMPTS, SEEDS, num_steps=steps, guidance_scale=guidance, eta=0.0, return_latents=True)
    theirs = _diffusers_latents(kind, _pipeline(kind, pipelines[kind]), policy, steps, guidance)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_saved_lora_loads_in_the_diffusers_pipeline_and_back(kind, pipelines, tmp_path):
    policy = load_policy(ModelConfig(pretrained=str(pipelines[kind]), kind=kind, resolution=RES))
    cfg = LoraConfig(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                             "add_v_proj", "to_add_out"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        params = attach_lora(policy, cfg)
        for p in params:  # a trained-looking adapter: lora_B starts at zero
            p.data.normal_(0, 0.3)
    save_lora(policy, tmp_path / "lora", cfg)
    steps, guidance = 4, 3.0
    ours = sample_images(policy, PROMPTS, SEEDS, num_steps=steps, guidance_scale=guidance, eta=0.0, return_latents=True)
    base = load_policy(ModelConfig(pretrained=str(pipelines[kind]), kind=kind, resolution=RES))
    plain = sample_images(base, PROMPTS, SEEDS, num_steps=steps, guidance_scale=guidance, eta=0.0, return_latents=True)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    pipe = _pipeline(kind, pipelines[kind])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_diffusers_latents(kind, pipe, policy, steps, guidance), ours, rtol=1e-4, atol=1e-4)
    load_lora(base, tmp_path / "lora")  # and our loader reads it back
    again = sample_images(base, PROMPTS, SEEDS, num_steps=steps, guidance_scale=guidance, eta=0.0, return_latents=True)
    torch.testing.assert_close(again, ours)


def test_flow_options_are_refused_on_unet_models_and_vae_on_flow_models():
    with pytest.raises(ModelLoadError, match="model.true_cfg_scale applies to sd3 and flux"):
        load_policy(ModelConfig(pretrained="tiny:sd15", true_cfg_scale=2.0))
    with pytest.raises(ModelLoadError, match="model.vae applies to sd15 and sdxl"):
        load_policy(ModelConfig(pretrained="tiny:flux", kind="flux", vae="some/vae"))
    with pytest.raises(ModelLoadError, match="does not match model.kind"):
        load_policy(ModelConfig(pretrained="tiny:sd3", kind="flux"))


def test_noisy_pair_x0_estimates_use_the_flow_forward_process(pipelines):
    from spo_core.preference.noisy_pairs import estimate_x0_images

    policy = load_policy(ModelConfig(pretrained=str(pipelines["flux"]), kind="flux", resolution=RES))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, RES, RES, generator=g), torch.rand(2, 3, RES, RES, generator=g)
    noise = torch.randn(2, *policy.latent_shape, generator=g)
    # t = 0 (timestep 0 of 1000): x_t is the clean latent and x0 = x_t - 0 v is it too.
    x0_a, x0_b = estimate_x0_images(policy, a, b, ["x", "y"], torch.tensor([0, 0]), noise, guidance_scale=3.5)
    torch.testing.assert_close(x0_a, policy.decode(policy.encode_images(a)))
    # t = 0.6: x_t = 0.4 x0 + 0.6 eps and the estimate is x_t - 0.6 v of the guided velocity.
    x0_a, _ = estimate_x0_images(policy, a, b, ["x", "y"], torch.tensor([600, 600]), noise, guidance_scale=3.5)
    lat = policy.encode_images(a)
    x_t = 0.4 * lat + 0.6 * noise
    v = policy.guided_velocity(x_t, torch.tensor(0.6), policy.encode_prompts(["x", "y"]), 3.5)
    torch.testing.assert_close(x0_a, policy.decode(x_t - 0.6 * v), rtol=1e-4, atol=1e-4)


def test_spo_branches_on_the_flow_grid_once_the_next_time_is_below_kappa():
    from spo_core.config import SamplerConfig
    from spo_core.rollouts import RowRNG, spo_sample

    class Times:  # records the times the step-aware scorer is given (the 0..1000 scale)
        name = "times"
        seen: list = []

        def score(self, images, prompts, timesteps=None):
            self.seen.append(torch.as_tensor(timesteps).clone())
            return images.mean(dim=(1, 2, 3))

    policy = load_policy(ModelConfig(pretrained="tiny:flux", kind="flux", resolution=RES))
    ts, prevs = policy.process.grid(6)
    first = next(i for i in range(6) if float(prevs[i]) * 1000 < 750)
    scorer = Times()
    cfg = SamplerConfig(num_steps=6, kappa=750, k=2, eta=0.7, guidance_scale=3.5, threshold=0.0)
    pairs, stats = spo_sample(policy, policy.encode_prompts(["a", "b"]), scorer, cfg, RowRNG([1, 2]))
    assert pairs.t.dtype == torch.float32 and 0 < first < 5
    assert sorted(set(pairs.t.tolist()), reverse=True) == ts[first:].tolist()  # one segment per step from there
    # each segment's end is scored at its own time on the 0..1000 scale, the last one at 0 (the image)
    assert [float(s[0]) for s in scorer.seen] == pytest.approx([*(prevs[first:-1] * 1000).tolist(), 0.0])
    # With a look-ahead every candidate is scored as an image (t = 0), by its ODE continuation: the
    # winner's score is the mean of the image its continuation decodes to.
    from spo_core.rollouts import deterministic_x0

    scorer.seen.clear()
    ahead = cfg.model_copy(update={"lookahead": 2})
    pairs, _ = spo_sample(policy, policy.encode_prompts(["a", "b"]), scorer, ahead, RowRNG([1, 2]))
    assert all(float(s.abs().max()) == 0 for s in scorer.seen) and len(scorer.seen) == 6 - first
    r = int(((pairs.order == first) & (pairs.prompt_index == 0)).nonzero()[0, 0])
    x0 = deterministic_x0(policy, pairs.x_prev_w[r:r + 1], first + 1, ts, prevs, policy.encode_prompts(["a"]), 2, 3.5)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(pairs.score_w[r:r + 1], policy.decode(x0).mean(dim=(1, 2, 3)).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_gradient_checkpointing_of_the_transformer_gives_the_same_gradients(kind):
    # The memory control of the UNet path, on the transformer: activations recomputed in backward.
    from spo_core.methods.grpo import gaussian_mean_kl

    grads = []
    for on in (False, True):
        policy = load_policy(ModelConfig(pretrained=f"tiny:{kind}", kind=kind, resolution=RES))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            params = attach_lora(policy, LoraConfig(rank=2))
            for p in params:
                p.data.normal_(0, 0.1)
        if on:
            policy.denoiser.enable_gradient_checkpointing()
        policy.denoiser.train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, *policy.latent_shape, generator=g)
        cond = policy.encode_prompts(["a", "b"])
        t, s = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
        v = policy.guided_velocity(x, t, cond, 3.0)
        _, logp, mean, std = policy.process.step(x, v, t, s, 0.7, noise=torch.randn(x.shape, generator=g))
        (logp.sum() + gaussian_mean_kl(mean, torch.zeros_like(mean), std).sum()).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_bf16_flow_policies_step_in_float32_and_stay_near_float32(kind):
    # The flow profiles run the transformer in bf16: velocities and the SDE step's log-probability
    # come back in float32 and finite, and a short ODE rollout stays near the float32 one.
    full = load_policy(ModelConfig(pretrained=f"tiny:{kind}", kind=kind, resolution=RES))
    half = load_policy(ModelConfig(pretrained=f"tiny:{kind}", kind=kind, resolution=RES, dtype="bfloat16"))
    assert half.dtype == torch.bfloat16
    x = torch.randn(2, *half.latent_shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    cond = half.encode_prompts(["a red cube", "blue sky"])
    t, s = torch.tensor([0.9, 0.4]), torch.tensor([0.7, 0.2])
    v = half.guided_velocity(x, t, cond, 3.0)
    _, logp, mean, _ = half.process.step(x, v, t, s, 0.7, noise=torch.randn(x.shape).to(torch.bfloat16))
    assert v.dtype == logp.dtype == mean.dtype == torch.float32 and torch.isfinite(logp).all()
    a = sample_images(full, PROMPTS, SEEDS, num_steps=4, guidance_scale=3.0, eta=0.0, return_latents=True)
    b = sample_images(half, PROMPTS, SEEDS, num_steps=4, guidance_scale=3.0, eta=0.0, return_latents=True)
    assert torch.isfinite(b.float()).all()
    assert (a - b.float()).abs().mean() < 0.05 * a.abs().mean(), float((a - b.float()).abs().mean())
