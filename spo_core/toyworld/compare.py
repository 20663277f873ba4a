"""Model vs renderer: paired samples, ground-truth rewards and sample grids for the toy world."""

from __future__ import annotations

import torch
from PIL import Image

from ..models.diffusion import DiffusionPolicy
from ..reporting import image_grid
from ..rollouts import sample_images
from .config import SampleConfig, WorldConfig
from .rater import rate_prompts
from .render import render_prompts


def sample(policy: DiffusionPolicy, prompts: list[str], seeds: list[int], sampler: SampleConfig,
           progress: bool = False) -> torch.Tensor:
    return sample_images(policy, prompts, seeds, num_steps=sampler.num_steps, guidance_scale=sampler.guidance_scale,
                         eta=sampler.eta, batch_size=sampler.batch_size, progress=progress)


def mean_components(scores: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v.mean()) for k, v in scores.items()}


def model_vs_renderer(policy: DiffusionPolicy, prompts: list[str], world: WorldConfig, sampler: SampleConfig,
                      seed: int, prefix: str) -> dict[str, float]:
    """Mean reward and components of model samples and of renderer images for the same prompts."""
    if not prompts:
        return {}
    seeds = [seed + i for i in range(len(prompts))]
    model = rate_prompts(sample(policy, prompts, seeds, sampler), prompts, world)
    truth = rate_prompts(render_prompts(prompts, world.resolution, seed, world), prompts, world)
    return {**mean_components(model, f"{prefix}_base"), **mean_components(truth, f"{prefix}_renderer")}


def sample_grid(policy: DiffusionPolicy, prompts: list[str], world: WorldConfig, sampler: SampleConfig,
                seed: int, samples_per_prompt: int = 3, scale: int = 3) -> Image.Image:
    """One row per prompt: the renderer's image, then ``samples_per_prompt`` model samples."""
    n = len(prompts)
    rep = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed + i for i in range(len(rep))]
    samples = sample(policy, rep, seeds, sampler).view(n, samples_per_prompt, 3, world.resolution, world.resolution)
    truth = render_prompts(prompts, world.resolution, seed, world).unsqueeze(1)
    cols = ["renderer"] + [f"base #{i + 1}" for i in range(samples_per_prompt)]
    return image_grid(torch.cat([truth, samples], dim=1), prompts, cols, scale=scale)
