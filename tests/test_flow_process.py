"""spo_core.processes.flow against closed forms and diffusers' flow-matching scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from spo_core.processes.flow import (
    flow_sde_step_with_logprob,
    forward_noise,
    sde_noise_scale,
    x0_from_velocity,
)


def test_log_prob_is_the_gaussian_density_of_the_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t, s = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.8, 0.45, 0.0], dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    prev, logp, mean, std = flow_sde_step_with_logprob(x, v, t, s, noise_level=0.7, noise=noise)
    # the drift of the reverse SDE written out: v - g^2/2 * score, score = -(x + (1 - t) v) / t
    gt = 0.7 * (t / (1 - t)).sqrt()
    tb, dtb, gb = (u.view(-1, 1, 1, 1) for u in (t, s - t, gt))
    drift = v - gb**2 / 2 * (-(x + (1 - tb) * v) / tb)
    assert torch.allclose(mean, x + drift * dtb) and torch.allclose(std, gt * (t - s).sqrt())
    assert torch.allclose(prev, mean + std.view(-1, 1, 1, 1) * noise)
    density = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(logp, density)
    # evaluating a given next sample gives the same log-probability as sampling it
    _, again, _, _ = flow_sde_step_with_logprob(x, v, t, s, noise_level=0.7, prev_sample=prev)
    assert torch.equal(again, logp)


def test_zero_noise_is_diffusers_flow_match_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's schedule
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for i, timestep in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        x = sched.step(v, timestep, x).prev_sample
        t, s = sched.sigmas[i].expand(2), sched.sigmas[i + 1].expand(2)
        ours, logp, _, std = flow_sde_step_with_logprob(ours, v, t, s, noise_level=0.0, noise=torch.zeros_like(v))
        assert torch.allclose(ours, x, atol=1e-6), i
        assert torch.isnan(logp).all() and (std == 0).all()


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor, a: float) -> torch.Tensor:
    # x0 ~ N(0, a^2), eps ~ N(0, 1): E[eps - x0 | x_t] is linear in x_t
    var = (1 - t) ** 2 * a**2 + t**2
    return (t - (1 - t) * a**2) / var * x


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_the_sde_keeps_the_marginals_of_the_flow(noise_level):
    # Data N(0, a^2) has a closed-form velocity; stepping from pure noise with the SDE must pass
    # through the forward process' marginals Var x_t = (1 - t)^2 a^2 + t^2 and end at N(0, a^2).
    a, n, steps = 0.5, 50_000, 200
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    x = (x - x.mean()) / x.std()  # exactly unit variance: what is left is the step's error and noise
    for i in range(steps):
        t, s = grid[i].expand(n), grid[i + 1].expand(n)
        v = _gaussian_velocity(x, grid[i], a)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x, _, _, _ = flow_sde_step_with_logprob(x, v, t, s, noise_level=noise_level, t_cap=grid[1], noise=noise)
        if i + 1 == steps // 2:
            tm = float(grid[i + 1])
            assert x.var().item() == pytest.approx((1 - tm) ** 2 * a**2 + tm**2, rel=0.03)
    assert x.var().item() == pytest.approx(a**2, rel=0.03) and abs(x.mean().item()) < 0.01


def test_half_precision_latents_step_in_float32():
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 4, 4, 4, generator=g).half(), torch.randn(2, 4, 4, 4, generator=g).half()
    t, s = torch.tensor([0.6, 0.6]), torch.tensor([0.5, 0.5])
    prev, logp, _, _ = flow_sde_step_with_logprob(x, v, t, s, noise=torch.randn(2, 4, 4, 4, generator=g))
    assert prev.dtype == torch.float16 and logp.dtype == torch.float32 and torch.isfinite(logp).all()


def test_forward_process_and_x0_estimate_invert_each_other():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    assert torch.allclose(x0_from_velocity(forward_noise(x0, eps, t), eps - x0, t), x0, atol=1e-6)


def test_bad_steps_are_refused():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="s < t"):
        flow_sde_step_with_logprob(x, x, torch.tensor([0.5]), torch.tensor([0.5]), noise=x)
    with pytest.raises(ValueError, match="t_cap"):
        flow_sde_step_with_logprob(x, x, torch.tensor([1.0]), torch.tensor([0.9]), noise=x)
    assert sde_noise_scale(torch.tensor([1.0]), 0.7, t_cap=0.9).item() == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    with pytest.raises(ValueError, match="noise_level"):
        sde_noise_scale(torch.tensor([0.5]), -1.0)


def test_the_training_targets_recover_x0_through_each_process():
    # What each network regresses on add_noise(x0, noise, t): DDIM the noise, flow the velocity eps - x0;
    # the process's x0 estimate from the exact target is x0 again.
    from diffusers import DDIMScheduler

    from spo_core.models.tiny import SD_SCHEDULER_CONFIG
    from spo_core.processes.ddim import DDIMProcess
    from spo_core.processes.flow import FlowProcess

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    flow = FlowProcess(lambda n: torch.linspace(1, 0, n + 1))
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(flow.target(x0, eps), eps - x0)
    assert torch.allclose(flow.x0(flow.add_noise(x0, eps, t), t, flow.target(x0, eps)), x0, atol=1e-5)
    ddim = DDIMProcess(DDIMScheduler(**SD_SCHEDULER_CONFIG))
    ts = torch.tensor([1, 500, 900])
    assert torch.equal(ddim.target(x0, eps), eps)
    assert torch.allclose(ddim.x0(ddim.add_noise(x0, eps, ts), ts, ddim.target(x0, eps)), x0, atol=1e-3)
