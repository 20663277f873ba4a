"""The DDPM/DDIM process of the UNet models (SD-1.5, SDXL): a DDIM step with eta > 0 and its log-probability.

``ddim_step_with_logprob`` is the pure maths; with the same noise z it returns exactly what diffusers'
``DDIMScheduler.step(eta=1, variance_noise=z)`` returns (tested). :class:`DDIMProcess` binds it to a
scheduler's grid: integer timesteps, e.g. 20 steps: 951, 901, ..., 1, each stepping to t - 50
(the last to the scheduler's final alpha).
"""

from __future__ import annotations

import torch

from .common import bcast, gaussian_logprob, work_dtype


def alphas_at(alphas_cumprod: torch.Tensor, final_alpha_cumprod: float | torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, alpha_bar_prev) with ``final_alpha_cumprod`` where prev_t < 0."""
    ac = alphas_cumprod.to(t.device)
    a = ac[t.long()]
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0).long()],
                         torch.as_tensor(final_alpha_cumprod, device=t.device, dtype=ac.dtype))
    return a, a_prev


def ddim_step_with_logprob(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    a: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_prev with its Gaussian log-probability.

    ``a``, ``a_prev`` are (B,) cumulative alphas at t and prev_t. Give ``noise`` to sample, or
    ``prev_sample`` to evaluate the log-probability of a given next sample. Returns
    (x_prev, log_prob (B,), mean, std (B,)); the log-probability is the MEAN over C, H, W, as in the
    reference code (beta = 10 is on that scale). The arithmetic runs in :func:`work_dtype` of the
    latents (float32 for fp16/bf16); x_prev comes back in the latents' dtype, and its
    log-probability is that of the stored (rounded) x_prev, so sampling and training agree.
    """
    wd = work_dtype(x_t.dtype)
    xw, ew = x_t.to(wd), eps.to(wd)
    a, a_prev = a.to(device=x_t.device, dtype=wd), a_prev.to(device=x_t.device, dtype=wd)
    a_b, ap_b = bcast(a, xw), bcast(a_prev, xw)
    x0 = (xw - (1 - a_b).sqrt() * ew) / a_b.sqrt()
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    std_b = bcast(std, xw)
    mean = ap_b.sqrt() * x0 + (1 - ap_b - std_b**2).clamp(min=0).sqrt() * ew
    if prev_sample is None:
        if noise is None:
            raise ValueError("ddim_step_with_logprob needs either noise or prev_sample")
        prev_sample = (mean + std_b * noise.to(wd)).to(x_t.dtype)
    return prev_sample, gaussian_logprob(prev_sample, mean, std_b), mean, std


class DDIMProcess:
    """The process of an epsilon-predicting UNet policy on its DDIM scheduler's grid.

    Times are integer timesteps (long tensors, 0..999); ``eta`` is DDIM's (1 in SPO)."""

    time_dtype = torch.long

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps and their successors, e.g. 20 steps: 951..1 and 901..-49."""
        self.scheduler.set_timesteps(num_steps)
        t = self.scheduler.timesteps.clone().long()
        return t, t - self.scheduler.config.num_train_timesteps // num_steps

    def on_1000(self, t: torch.Tensor) -> torch.Tensor:
        """Times on the 0..1000 scale of ``sampler.kappa`` and the step-aware preference model."""
        return t

    def from_1000(self, t: torch.Tensor) -> torch.Tensor:
        """This process's times for times on the 0..1000 scale (noisy pairs draw those)."""
        return t.long()

    def step(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, eta: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None):
        """:func:`ddim_step_with_logprob` on this schedule; t, prev_t (B,) long."""
        a, a_prev = alphas_at(self.scheduler.alphas_cumprod, self.scheduler.final_alpha_cumprod, t, prev_t)
        return ddim_step_with_logprob(x, eps, a, a_prev, eta=eta, noise=noise, prev_sample=prev_sample)

    def x0(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The x0 estimate, computed in float32 (or float64) whatever the latents' dtype."""
        wd = work_dtype(x.dtype)
        a = self.scheduler.alphas_cumprod.to(x.device)[torch.as_tensor(t, device=x.device).long()]
        a = bcast(a.reshape(-1).to(wd), x)
        return (x.to(wd) - (1 - a).sqrt() * eps.to(wd)) / a.sqrt()

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses on ``add_noise(x0, noise, t)``: the noise (epsilon prediction)."""
        return noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, torch.as_tensor(t, device=x0.device).long())
