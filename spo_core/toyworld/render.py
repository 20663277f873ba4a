"""The renderer: a Scene -> an anti-aliased image, with natural variation drawn from a seeded rng.

Variation (all from ``rng``, in a fixed order per scene): the centre moves by up to
``position_jitter`` of the side, the size by up to ``size_jitter`` relative, each colour channel by
up to ``colour_jitter``. An unspecified position is uniform over the grid's span and an
unspecified size uniform between the smallest and largest size word.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import WorldConfig
from .geometry import scene_tensors, shape_masks
from .grammar import Scene, parse_many


def _draw_params(st, world: WorldConfig, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    n = len(st)
    lo, hi = world.grid[0], world.grid[-1]
    smin, smax = min(world.sizes.values()), max(world.sizes.values())
    u = torch.from_numpy(rng.random((n, 9))).float()  # one row of uniforms per scene, fixed layout
    jitter_pos = (u[:, 0:2] * 2 - 1) * world.position_jitter
    centre = torch.where(st.position.isnan(), lo + (hi - lo) * u[:, 0:2], st.position + jitter_pos)
    jittered = st.size * (1 + (u[:, 2] * 2 - 1) * world.size_jitter)
    size = torch.where(st.size.isnan(), smin + (smax - smin) * u[:, 2], jittered)
    colour = (st.colour + (u[:, 3:6] * 2 - 1) * world.colour_jitter).clamp(0, 1)
    background = (st.background + (u[:, 6:9] * 2 - 1) * world.colour_jitter).clamp(0, 1)
    return centre, size, colour, background


def render_batch(scenes: list[Scene], resolution: int, rng: np.random.Generator,
                 world: WorldConfig | None = None) -> torch.Tensor:
    """Render scenes to a float tensor (B, 3, R, R) in [0, 1]; pure given ``rng``'s state."""
    world = world or WorldConfig()
    st = scene_tensors(scenes, world)
    centre, size, colour, background = _draw_params(st, world, rng)
    mask = shape_masks(st.shape, centre * resolution, size * resolution, resolution).unsqueeze(1)
    img = background.view(-1, 3, 1, 1) * (1 - mask) + colour.view(-1, 3, 1, 1) * mask
    return img.clamp(0.0, 1.0)


def render(scene: Scene, resolution: int, rng: np.random.Generator, world: WorldConfig | None = None) -> torch.Tensor:
    """Render one scene to (3, R, R) in [0, 1]."""
    return render_batch([scene], resolution, rng, world)[0]


def render_prompts(prompts: list[str], resolution: int, seed: int | list[int],
                   world: WorldConfig | None = None) -> torch.Tensor:
    """Render prompts (parsed with the grammar) from a seed: the "perfect model" for these prompts."""
    world = world or WorldConfig()
    return render_batch(parse_many(prompts, world), resolution, np.random.default_rng(seed), world)
