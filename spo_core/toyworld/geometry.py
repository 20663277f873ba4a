"""Signed-distance shapes shared by the renderer and the ground-truth rater.

Every shape with half-extent ``h`` has the area of a circle of radius ``h`` (pi h^2), so a size
word means the same amount of colour whatever the shape; the rater relies on that to estimate
size from area. Distances are in pixels, pixel centres sit at ``i + 0.5``, and the triangle
(pointing up) is centred on its centroid so that "position" is the centre of mass for every shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SHAPES, WorldConfig
from .grammar import POSITIONS, Scene

_SQUARE = math.sqrt(math.pi) / 2  # half-side of the square of area pi
_DIAMOND = math.sqrt(math.pi / 2)  # half-diagonal of the diamond of area pi
_TRI_SIDE = math.sqrt(4 * math.pi / math.sqrt(3))  # side of the equilateral triangle of area pi
_TRI_HEIGHT = _TRI_SIDE * math.sqrt(3) / 2


@dataclass
class SceneTensors:
    """A batch of scenes as tensors; NaN marks an unspecified size or position."""

    colour: torch.Tensor  # (B, 3) nominal object RGB
    background: torch.Tensor  # (B, 3) nominal background RGB
    shape: torch.Tensor  # (B,) index into config.SHAPES
    size: torch.Tensor  # (B,) half-extent as a fraction of the side, NaN if unspecified
    position: torch.Tensor  # (B, 2) (x, y) centre as fractions of the side, NaN if unspecified

    def __len__(self) -> int:
        return self.shape.shape[0]


def position_xy(name: str, world: WorldConfig) -> tuple[float, float]:
    col, row = POSITIONS[name]
    return world.grid[col], world.grid[row]


def scene_tensors(scenes: list[Scene], world: WorldConfig) -> SceneTensors:
    nan = float("nan")
    return SceneTensors(
        colour=torch.tensor([world.colours[s.colour] for s in scenes], dtype=torch.float32).reshape(-1, 3),
        background=torch.tensor([world.backgrounds[s.background] for s in scenes], dtype=torch.float32).reshape(-1, 3),
        shape=torch.tensor([SHAPES.index(s.shape) for s in scenes], dtype=torch.long),
        size=torch.tensor([world.sizes[s.size] if s.size else nan for s in scenes], dtype=torch.float32),
        position=torch.tensor([position_xy(s.position, world) if s.position else (nan, nan) for s in scenes],
                              dtype=torch.float32).reshape(-1, 2),
    )


def pixel_grid(resolution: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(resolution, device=device, dtype=torch.float32) + 0.5
    return c.view(1, 1, -1), c.view(1, -1, 1)  # x (1, 1, W), y (1, H, 1)


def all_shape_sdfs(centre: torch.Tensor, half_extent: torch.Tensor, resolution: int) -> torch.Tensor:
    """Signed distance (pixels) of every shape in SHAPES order: (len(SHAPES), B, R, R).

    ``centre`` (B, 2) and ``half_extent`` (B,) are in pixels. Polygons use the max of their edge
    half-planes: exact inside and near the edges, which is all anti-aliasing needs.
    """
    x, y = pixel_grid(resolution, centre.device)
    px = (x - centre[:, 0].view(-1, 1, 1)).abs()
    py = y - centre[:, 1].view(-1, 1, 1)
    h = half_extent.view(-1, 1, 1)
    circle = torch.sqrt(px**2 + py**2) - h
    square = torch.maximum(px, py.abs()) - _SQUARE * h
    diamond = (px + py.abs() - _DIAMOND * h) / math.sqrt(2)
    side, height = _TRI_SIDE * h, _TRI_HEIGHT * h
    base = py - height / 3
    slant = (height * px - side / 2 * (py + 2 * height / 3)) / side
    triangle = torch.maximum(base, slant)
    by_name = {"circle": circle, "square": square, "triangle": triangle, "diamond": diamond}
    return torch.stack([by_name[name] for name in SHAPES])


def coverage(sdf: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of a pixel from its signed distance (a one-pixel linear ramp)."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def shape_masks(shape: torch.Tensor, centre: torch.Tensor, half_extent: torch.Tensor, resolution: int) -> torch.Tensor:
    """Soft masks (B, R, R) of the given shapes (indices into SHAPES)."""
    sdf = all_shape_sdfs(centre, half_extent, resolution)
    idx = shape.view(1, -1, 1, 1).expand(1, -1, resolution, resolution)
    return coverage(sdf.gather(0, idx)[0])
