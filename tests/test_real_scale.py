"""The SD-1.5 / SDXL training path at real settings, checked on a CPU: fp16/bf16 arithmetic, the
SDXL multi-step schedule, the fp16 VAE, device placement per process, memory controls."""

from __future__ import annotations

import pytest
import torch

from spo_core.config import LoraConfig, OptimConfig, SamplerConfig, TrainConfig, load_spo_config
from spo_core.methods.spo import SPOMethod, pair_logprobs
from spo_core.models.diffusion import DDIM_OVERRIDES
from spo_core.models.lora import adapters_disabled, attach_lora
from spo_core.models.tiny import SD_SCHEDULER_CONFIG
from spo_core.processes.ddim import ddim_step_with_logprob
from spo_core.rollouts import RowRNG, segment_ends, spo_sample
from spo_core.scorers.simple import BrightnessScorer
from spo_core.training import TrainingError, make_optimizer, train_rounds


def _closed_form(x, eps, a, a_prev, prev):
    """REFERENCE formulas in float64."""
    x, eps, prev = x.double(), eps.double(), prev.double()
    a, a_prev = a.double().view(-1, 1, 1, 1), a_prev.double().view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = var.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
    logp = (-((prev - mean) ** 2) / (2 * var) - std.log() - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))
    return mean, std, logp.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddim_step_in_half_precision_matches_the_float64_closed_form(dtype):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **DDIM_OVERRIDES})
    sched.set_timesteps(20)
    ac = sched.alphas_cumprod  # float32, as diffusers keeps it
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in sched.timesteps.tolist():
        prev_t = t - 50
        a = ac[t].expand(4)
        a_prev = (ac[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod).expand(4)
        x = torch.randn((4, 4, 16, 16), generator=g).to(dtype)
        eps = torch.randn((4, 4, 16, 16), generator=g).to(dtype)
        z = torch.randn((4, 4, 16, 16), generator=g).to(dtype)
        prev, logp, mean, std = ddim_step_with_logprob(x, eps, a, a_prev, eta=1.0, noise=z)
        assert prev.dtype == dtype and mean.dtype == torch.float32 and logp.dtype == torch.float32
        ref_mean, ref_std, ref_logp = _closed_form(x, eps, a, a_prev, prev)
        err_sigma = ((mean.double() - ref_mean).abs() / ref_std).max().item()
        assert err_sigma < 1e-3, (t, err_sigma)
        assert (logp.double() - ref_logp).abs().max().item() < 1e-3, t
        torch.testing.assert_close(std.double(), ref_std.view(-1), rtol=1e-5, atol=0)
        seen.append(t)
    assert 51 in seen and 1 in seen


def test_log_ratio_is_exactly_zero_at_initialisation_under_autocast(make_policy):
    policy = make_policy("sd15")
    attach_lora(policy, LoraConfig(rank=4))
    method = SPOMethod(SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.0), load_spo_config("tiny").loss,
                       BrightnessScorer())
    cond = policy.encode_prompts(["a cat", "a dog"])
    pairs, _ = spo_sample(policy, cond, method.scorer, method.sampler, RowRNG([1, 2]))
    # What accelerate's autocast() enters for mixed_precision="bf16" on a CPU (an Accelerator here
    # would fix the process-wide AcceleratorState for the other tests).
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        lw, ll, _ = pair_logprobs(policy, cond, pairs, 5.0, 1.0)
        with adapters_disabled(policy):
            rw, rl, _ = pair_logprobs(policy, cond, pairs, 5.0, 1.0)
    assert len(pairs) > 0 and lw.dtype == torch.float32
    assert torch.equal(lw - rw, torch.zeros_like(lw)) and torch.equal(ll - rl, torch.zeros_like(ll))


def test_segment_ends_count_solo_steps_after_each_branch():
    assert segment_ends(4, 20, 3) == [8, 12, 16, 20]
    assert segment_ends(4, 20, 0) == list(range(5, 21))
    # A boundary one step before x_0 extends the last segment instead of leaving a lone branch.
    assert segment_ends(0, 5, 1) == [2, 5]
    assert segment_ends(4, 19, 4) == [9, 14, 19]
    assert segment_ends(4, 20, 4) == [9, 14, 20]


class _Recorder(BrightnessScorer):
    def __init__(self):
        self.t = []

    def score(self, images, prompts, timesteps=None):
        self.t.append(int(timesteps[0]))
        return super().score(images, prompts, timesteps)


def test_sdxl_profile_scores_segment_ends_at_551_351_151_0(make_policy):
    sampler = load_spo_config("sdxl").sampler
    assert (sampler.num_steps, sampler.kappa, sampler.inner_steps) == (20, 750, 3)
    policy = make_policy("sdxl")
    ts, _ = policy.process.grid(20)
    rec = _Recorder()
    pairs, stats = spo_sample(policy, policy.encode_prompts(["a cat"]), rec,
                              sampler.model_copy(update={"threshold": 0.0}), RowRNG([3]))
    assert rec.t == [551, 351, 151, 0]
    # Every transition from t = 751 on is trained: 16 steps, 4 segments of 4.
    assert sorted(pairs.t.tolist(), reverse=True) == [t for t in ts.tolist() if t <= 751]
    assert int(pairs.shared.sum()) == 4 and stats.segments == 4


def test_vae_honours_force_upcast_in_fp16(make_policy):
    sdxl = make_policy("sdxl")
    assert sdxl.vae.config.force_upcast  # as SDXL's own VAE
    sdxl.to(dtype=torch.float16)
    assert sdxl.unet.dtype == torch.float16 and next(sdxl.vae.parameters()).dtype == torch.float32
    img = sdxl.decode(torch.randn((2, *sdxl.latent_shape)).half())
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    # The fp16-fix VAE clears the flag: it stays fp16. SD-1.5's pipeline never upcasts.
    fixed = make_policy("sdxl")
    fixed.vae.register_to_config(force_upcast=False)
    fixed.to(dtype=torch.float16)
    assert next(fixed.vae.parameters()).dtype == torch.float16
    sd15 = make_policy("sd15")
    sd15.to(dtype=torch.float16)
    assert next(sd15.vae.parameters()).dtype == torch.float16


def test_every_process_puts_policy_scorer_and_monitor_on_its_own_device(monkeypatch):
    """The Accelerator exists before anything is placed, and its per-process device is what the
    stage passes to the policy, the scorer and the monitor (never a bare 'cuda', i.e. GPU 0)."""
    from spo_core.stages import trainer_stage

    own = torch.device("cuda", 3)  # what accelerate gives process 3 of 4

    class FakeAccelerator:
        device = own

    seen = {}

    class Stop(Exception):
        pass

    monkeypatch.setattr(trainer_stage, "make_accelerator", lambda *a, **k: FakeAccelerator())
    monkeypatch.setattr(trainer_stage, "load_policy", lambda cfg, device: seen.setdefault("policy", device) and object())
    monkeypatch.setattr(trainer_stage, "build_scorer", lambda name, path, device, **o: seen.setdefault("scorer", device))

    def monitor(mon, sampler, device):
        seen["monitor"] = device
        raise Stop

    monkeypatch.setattr(trainer_stage, "make_monitor", monitor)
    cfg = load_spo_config("tiny", ["device=cuda"])
    with pytest.raises(Stop):
        trainer_stage.run_training("train_spo", cfg, lambda policy, scorer: None)
    assert seen == {"policy": own, "scorer": own, "monitor": own}


def test_gradient_checkpointing_trains_the_same_lora(make_policy, tiny_prompts, tmp_path):
    from spo_core.models.lora import lora_state_dict

    sampler = SamplerConfig(num_steps=4, kappa=1000, k=2, threshold=0.0)
    results = []
    for gc in (False, True):
        policy = make_policy("sd15")
        train = TrainConfig(rounds=2, prompts_per_round=2, train_batch_size=4, gradient_checkpointing=gc,
                            output_dir=str(tmp_path / f"gc{gc}"), export_kohya=False)
        train_rounds(policy, SPOMethod(sampler, load_spo_config("tiny").loss, BrightnessScorer()), tiny_prompts,
                     LoraConfig(rank=2), OptimConfig(lr=1e-3), train, device="cpu")
        assert policy.unet.is_gradient_checkpointing == gc
        results.append(lora_state_dict(policy))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(TrainingError, match="pip install bitsandbytes.*optim.name=adamw"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig(name="adamw8bit"))
