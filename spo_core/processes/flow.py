"""The flow-matching process (rectified flow: SD3, SD3.5, FLUX.1) with a stochastic reverse step.

Forward: ``x_t = (1 - t) x0 + t eps`` for t in [0, 1] (t is diffusers' sigma; t = 1 is pure noise).
The model predicts the velocity ``v = eps - x0``, so ``x0 = x_t - t v`` and ``eps = x_t + (1 - t) v``.

Sampling with the ODE (diffusers' ``FlowMatchEulerDiscreteScheduler``) has no log-probability. The
reverse-time SDE with the same marginals p_t, for any noise scale g_t, is

    dx = [v - (g_t^2 / 2) score] dt + g_t dw,    score(x, t) = -E[eps | x_t] / t = -(x + (1 - t) v) / t

and its Euler-Maruyama step from t to s < t (dt = s - t < 0) is Gaussian:

    mean = x (1 + g^2 dt / (2 t)) + v (1 + g^2 (1 - t) / (2 t)) dt,    std = g sqrt(-dt).

Flow-GRPO's noise scale is ``g_t = noise_level * sqrt(t / (1 - t))``: large where the image is
still noise, small near the end; at t = 1 the denominator uses ``t_cap``, the grid's next time (it
would be infinite). At ``noise_level = 0`` the step is the ODE's Euler step, diffusers' ``step``.
"""

from __future__ import annotations

import torch

from .common import bcast, gaussian_logprob, work_dtype


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with t (B,) per row."""
    tb = bcast(t.to(x0.dtype), x0)
    return (1 - tb) * x0 + tb * eps


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean-image estimate ``x_t - t v`` (the step-aware preference model scores it)."""
    return x_t - bcast(t.to(x_t.dtype), x_t) * v


def sde_noise_scale(t: torch.Tensor, noise_level: float, t_cap: float | torch.Tensor | None = None) -> torch.Tensor:
    """Flow-GRPO's ``g_t = noise_level sqrt(t / (1 - t))``, with ``1 - t_cap`` in the denominator where t = 1."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if noise_level == 0:
        return torch.zeros_like(t)  # the ODE: no noise, at t = 1 too
    denom_t = t if t_cap is None else torch.where(t >= 1, torch.as_tensor(t_cap, dtype=t.dtype, device=t.device), t)
    if bool((denom_t >= 1).any()):
        raise ValueError("t = 1 needs t_cap (the next time of the grid, below 1) for the SDE's noise scale")
    return noise_level * (t / (1 - denom_t)).sqrt()


def flow_sde_step_with_logprob(
    x_t: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    noise_level: float = 0.7,
    t_cap: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reverse SDE step x_t -> x_s (s < t, both (B,)) with its Gaussian log-probability.

    Give ``noise`` to sample, or ``prev_sample`` to evaluate the log-probability of a given next
    sample. Returns (x_s, log_prob (B,), mean, std (B,)) as ``sampling.ddim_step_with_logprob``
    does: the log-probability is the mean over C, H, W, computed in ``work_dtype``, of the
    stored (rounded) x_s. At ``noise_level = 0`` std is 0 and the log-probability is undefined (NaN).
    """
    wd = work_dtype(x_t.dtype)
    xw, vw = x_t.to(wd), v.to(wd)
    t, s = t.to(device=x_t.device, dtype=wd), s.to(device=x_t.device, dtype=wd)
    if bool((s >= t).any()) or bool((t <= 0).any()):
        raise ValueError("a reverse step needs 0 < t and s < t for every row")
    g = sde_noise_scale(t, noise_level, t_cap)
    dt = s - t
    t_b, dt_b, g2 = bcast(t, xw), bcast(dt, xw), bcast(g**2, xw)
    mean = xw * (1 + g2 * dt_b / (2 * t_b)) + vw * (1 + g2 * (1 - t_b) / (2 * t_b)) * dt_b
    std = g * (-dt).sqrt()
    std_b = bcast(std, xw)
    if prev_sample is None:
        if noise is None:
            raise ValueError("flow_sde_step_with_logprob needs either noise or prev_sample")
        prev_sample = (mean + std_b * noise.to(wd)).to(x_t.dtype)
    if noise_level == 0:
        logp = torch.full((x_t.shape[0],), float("nan"), dtype=wd, device=x_t.device)
    else:
        logp = gaussian_logprob(prev_sample, mean, std_b)
    return prev_sample, logp, mean, std


class FlowProcess:
    """The process of a velocity-predicting flow policy on its scheduler's grid (``sigmas(n)``: 1 ... 0).

    Times are floats in [0, 1]; ``eta`` is the SDE's noise level (Flow-GRPO's 0.7; 0 is the ODE). The
    noise scale at t = 1 uses the grid's next time, as Flow-GRPO does."""

    time_dtype = torch.float32

    def __init__(self, sigmas):
        self.sigmas = sigmas  # num_steps -> (N + 1,) grid, the policy's

    def grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigmas(num_steps).float()
        return s[:-1].clone(), s[1:].clone()

    def on_1000(self, t: torch.Tensor) -> torch.Tensor:
        """Times on the 0..1000 scale of ``sampler.kappa`` and the step-aware preference model."""
        return t * 1000

    def from_1000(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times t / 1000 for times on the 0..1000 scale (noisy pairs draw those)."""
        return t.float() / 1000

    def step(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, eta: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None):
        return flow_sde_step_with_logprob(x, v, t, prev_t, noise_level=eta, t_cap=prev_t.to(t.dtype), noise=noise,
                                          prev_sample=prev_sample)

    def x0(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wd = work_dtype(x.dtype)
        t = torch.as_tensor(t, device=x.device, dtype=wd).reshape(-1).expand(x.shape[0])
        return x0_from_velocity(x.to(wd), v.to(wd), t)

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses on ``add_noise(x0, noise, t)``: the velocity ``eps - x0``."""
        return noise - x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x0.device, dtype=x0.dtype).reshape(-1).expand(x0.shape[0])
        return forward_noise(x0, noise, t)
