"""Helpers shared by the processes' step functions."""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the step arithmetic: float32 for fp16/bf16 latents (float64 stays float64).

    In fp16, 1 - alpha_bar near t = 0 keeps only a few significant bits (at t = 51 the DDIM variance
    term even turns negative), so schedule coefficients, the mean and the log-probability are
    never computed in the latents' dtype.
    """
    return torch.promote_types(dtype, torch.float32)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast against ``like`` (B, ...)."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std_b: torch.Tensor) -> torch.Tensor:
    """The log-density of ``sample`` under N(mean, std^2), as the MEAN over every dimension but the first
    (the reference code's scale, on which SPO's beta = 10 is set); ``std_b`` broadcasts against it."""
    logp = -((sample.detach().to(mean.dtype) - mean) ** 2) / (2 * std_b**2) - std_b.log() - LOG_SQRT_2PI
    return logp.mean(dim=tuple(range(1, sample.ndim)))
