"""The ground-truth rater: a documented reward in [0, 1] and simulated human labels.

Each pixel is unmixed as ``background + a * (object colour - background)`` plus a residual; its
object amount is ``a * fit`` and its background amount ``(1 - a) * fit``, where ``fit`` is 1 for a
residual within ``colour_near`` (RGB distance), 0 beyond ``colour_far``, linear between, and ``a``
is rescaled so that values within ``unmix_deadzone`` of 0 or 1 become 0 or 1. So anti-aliased
edges count by their coverage and any other colour counts as neither. Amounts count only within
one pixel of a coherent region (the 3x3 median of the amount map), so that scattered pixels of the
right colour (noise) do not make an object.

alignment (does the image show the prompt?), weighted mean of
  * ``colour``     min(1, object amount / A_lo, A_hi / object amount), [A_lo, A_hi] the object
                   areas the renderer can draw for the prompt (named size +- jitter, or any size):
                   too little and too much of the colour (noise, smears) both cost;
  * ``background`` mean background amount / (1 - A_hi / image area), capped at 1;
  * ``shape``      the object-amount mask is compared (soft IoU) with every shape's template placed
                   at the mask's centroid with the mask's area; softmax(IoU / shape_temperature)
                   of the prompt's shape;
  * ``position``   exp(-d^2 / 2 position_sigma^2), d = centroid distance to the named grid cell
                   (1 if the prompt names no position);
  * ``size``       exp(-log(h_est / h)^2 / 2 size_sigma^2), h_est = sqrt(area / pi)
                   (1 if the prompt names no size);
  shape, position and size are multiplied by ``presence`` = min(1, 2 * object amount / A_lo) so
  that an absent object earns none of them.
quality (is it a clean picture of something?), weighted mean of
  * ``palette``    mean fit of each pixel to its closest world colour: blurred edges, muddy or
                   desaturated colours and noise all leave pixels between palette colours;
  * ``smoothness`` 1 - mean(min(1, |g - median3x3(g)| / noise_scale)), g the channel mean of a
                   pixel: absence of speckle noise;
  multiplied by ``presence`` too when ``quality_needs_object`` (off by default), so that an image
  of the bare background (alignment 0.25, quality 1, reward 0.475) does not outscore an imperfect
  object and the reward always pulls towards drawing one.
reward = (alignment_weight * alignment + quality_weight * quality) / (alignment_weight + quality_weight).

Simulated humans label a pair Bradley-Terry style: image 0 wins with probability
sigmoid((r0 - r1) / temperature), and the pair is a tie (0.5, 0.5) when |r0 - r1| < tie_margin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SHAPES, LabelConfig, RaterConfig, WorldConfig
from .geometry import SceneTensors, all_shape_sdfs, coverage, pixel_grid, scene_tensors
from .grammar import Scene, parse_many

COMPONENTS = ("colour", "background", "shape", "position", "size", "palette", "smoothness")


def _membership(d: torch.Tensor, cfg: RaterConfig) -> torch.Tensor:
    """RGB distance -> "has this colour" in [0, 1] (flat top so that colour jitter costs nothing)."""
    return ((cfg.colour_far - d) / (cfg.colour_far - cfg.colour_near)).clamp(0.0, 1.0)


def _unmix(images: torch.Tensor, colour: torch.Tensor, background: torch.Tensor,
           cfg: RaterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (object, background) amounts, each (B, R, R).

    A pixel is read as ``background + a * (colour - background)`` plus a residual: the object
    amount is ``a * membership(residual)`` and the background amount ``(1 - a) * membership(residual)``,
    so anti-aliased edges count by coverage and any other colour counts as neither.
    """
    axis = (colour - background).view(-1, 3, 1, 1)
    rel = images - background.view(-1, 3, 1, 1)
    a = ((rel * axis).sum(dim=1, keepdim=True) / (axis**2).sum(dim=1, keepdim=True).clamp(min=1e-6)).clamp(0.0, 1.0)
    fit = _membership((rel - a * axis).norm(dim=1), cfg)
    # A dead zone at both ends so that colour jitter spread over the whole background is not read
    # as a faint object everywhere (it would drag the centroid and inflate the area).
    dz = cfg.unmix_deadzone
    a = ((a.squeeze(1) - dz) / (1 - 2 * dz)).clamp(0.0, 1.0)
    return a * fit, (1 - a) * fit


def _near_palette(images: torch.Tensor, palette: torch.Tensor, cfg: RaterConfig) -> torch.Tensor:
    """Membership in the closest of K shared colours: (B, 3, R, R), (K, 3) -> (B, R, R)."""
    x = images.permute(0, 2, 3, 1)
    # |x - p|^2 expanded: one matmul instead of a (B, K, 3, R, R) difference tensor.
    d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ palette.T + (palette * palette).sum(-1)
    return _membership(d2.amin(dim=-1).clamp(min=0).sqrt(), cfg)


def _median3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _median3x3(images: torch.Tensor) -> torch.Tensor:
    """Exact 3x3 median (replicate padding) by the row-sort network; far faster than sorting patches."""
    p = F.pad(images, (1, 1, 1, 1), mode="replicate")
    h, w = images.shape[-2:]
    rows = [[p[..., i:i + h, j:j + w] for j in range(3)] for i in range(3)]
    lows = [torch.minimum(torch.minimum(a, b), c) for a, b, c in rows]
    mids = [_median3(a, b, c) for a, b, c in rows]
    highs = [torch.maximum(torch.maximum(a, b), c) for a, b, c in rows]
    max_low = torch.maximum(torch.maximum(lows[0], lows[1]), lows[2])
    min_high = torch.minimum(torch.minimum(highs[0], highs[1]), highs[2])
    return _median3(max_low, _median3(*mids), min_high)


def _coherent(amount: torch.Tensor) -> torch.Tensor:
    """Keep amounts only near coherent regions: scattered pixels that happen to have the right
    colour (noise, confetti) are not an object. The 3x3 median finds the coherent cores; growing
    them by one pixel gives back the edges and corners that the median erodes."""
    core = F.max_pool2d(_median3x3(amount), kernel_size=3, stride=1, padding=1)
    return amount * (2 * core).clamp(max=1.0)


def _alignment(images: torch.Tensor, st: SceneTensors, world: WorldConfig) -> dict[str, torch.Tensor]:
    cfg, res = world.rater, images.shape[-1]
    n_px = res * res
    # The object areas the renderer can draw: the named size +- jitter, or any size if unsaid.
    smallest, largest = min(world.sizes.values()), max(world.sizes.values())
    h_nominal = st.size * res
    area_lo = math.pi * (torch.nan_to_num(st.size, nan=smallest) * res * (1 - world.size_jitter)) ** 2
    area_hi = math.pi * (torch.nan_to_num(st.size, nan=largest) * res * (1 + world.size_jitter)) ** 2
    obj, bg = _unmix(images, st.colour, st.background, cfg)
    obj, bg = _coherent(torch.stack([obj, bg], dim=1)).unbind(dim=1)
    mass = obj.sum(dim=(1, 2))
    presence = (2 * mass / area_lo).clamp(max=1.0)
    # Too much of the colour (e.g. noise, or a smeared object) costs as much as too little.
    colour = torch.minimum(mass / area_lo, area_hi / mass.clamp(min=1e-6)).clamp(max=1.0)
    background = (bg.mean(dim=(1, 2)) / (1 - area_hi / n_px)).clamp(max=1.0)

    x, y = pixel_grid(res, images.device)
    centroid = torch.stack([(obj * x).sum(dim=(1, 2)), (obj * y).sum(dim=(1, 2))], dim=1) / (mass.unsqueeze(1) + 1e-6)
    h_est = torch.sqrt(mass / math.pi).clamp(min=0.5)
    templates = coverage(all_shape_sdfs(centroid, h_est, res))  # (S, B, R, R)
    iou = torch.minimum(templates, obj).sum(dim=(2, 3)) / torch.maximum(templates, obj).sum(dim=(2, 3)).clamp(min=1e-6)
    allowed = torch.tensor([SHAPES.index(s) for s in world.shapes], device=images.device)
    probs = torch.softmax(iou[allowed] / cfg.shape_temperature, dim=0)  # over the world's shapes
    full = torch.zeros_like(iou).index_copy(0, allowed, probs)
    shape = full.gather(0, st.shape.view(1, -1)).squeeze(0)

    d2 = ((centroid / res - st.position) ** 2).sum(dim=1)
    position = torch.nan_to_num(torch.exp(-d2 / (2 * cfg.position_sigma**2)), nan=1.0)
    log_ratio = torch.log(h_est / h_nominal)
    size = torch.nan_to_num(torch.exp(-log_ratio**2 / (2 * cfg.size_sigma**2)), nan=1.0)
    return {"colour": colour, "background": background, "shape": shape * presence,
            "position": position * presence, "size": size * presence, "presence": presence}


def _quality(images: torch.Tensor, world: WorldConfig) -> dict[str, torch.Tensor]:
    cfg = world.rater
    palette_rgb = torch.tensor([*world.colours.values(), *world.backgrounds.values()], device=images.device)
    palette = _near_palette(images, palette_rgb, cfg).mean(dim=(1, 2))
    grey = images.mean(dim=1, keepdim=True)  # noise rarely cancels across channels; 3x cheaper
    residual = (grey - _median3x3(grey)).abs().squeeze(1)
    smoothness = 1 - (residual / cfg.noise_scale).clamp(max=1.0).mean(dim=(1, 2))
    return {"palette": palette, "smoothness": smoothness}


def _weighted(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"rater weights {weights} sum to zero: give at least one a positive weight")
    return sum(parts[k] * (w / total) for k, w in weights.items())


@torch.no_grad()
def rate(images: torch.Tensor, scenes: list[Scene] | SceneTensors,
         world: WorldConfig | None = None) -> dict[str, torch.Tensor]:
    """Score images (B, 3, R, R) in [0, 1] against their scenes; returns (B,) tensors.

    Keys: ``reward``, ``alignment``, ``quality`` and every name in :data:`COMPONENTS`. Images at
    another resolution than the world's are resized (area averaging / bilinear) first.
    """
    world = world or WorldConfig()
    cfg = world.rater
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rate() needs images of shape (B, 3, H, W), got {tuple(images.shape)}")
    images = resize_to(images.float(), world.resolution)
    st = scene_tensors(scenes, world) if isinstance(scenes, list) else scenes
    if len(st) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(st)} scenes: give one scene per image")
    st = SceneTensors(**{k: v.to(images.device) for k, v in vars(st).items()})
    parts = {**_alignment(images, st, world), **_quality(images, world)}
    presence = parts.pop("presence")
    alignment = _weighted(parts, {"colour": cfg.colour_weight, "background": cfg.background_weight,
                                  "shape": cfg.shape_weight, "position": cfg.position_weight, "size": cfg.size_weight})
    quality = _weighted(parts, {"palette": cfg.palette_weight, "smoothness": cfg.smoothness_weight})
    if cfg.quality_needs_object:
        quality = quality * presence
    reward = _weighted({"a": alignment, "q": quality}, {"a": cfg.alignment_weight, "q": cfg.quality_weight})
    return {"reward": reward, "alignment": alignment, "quality": quality, **parts}


def rate_prompts(images: torch.Tensor, prompts: list[str], world: WorldConfig | None = None) -> dict[str, torch.Tensor]:
    """:func:`rate` with prompts parsed by the grammar."""
    world = world or WorldConfig()
    return rate(images, parse_many(prompts, world), world)


def resize_to(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-2:] == (resolution, resolution):
        return images
    mode = "area" if images.shape[-1] > resolution else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(images, size=(resolution, resolution), mode=mode, **kw).clamp(0, 1)


def simulate_labels(r0: torch.Tensor, r1: torch.Tensor, cfg: LabelConfig,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry labels with ties: returns (label_0, label_1), each 0, 0.5 or 1, summing to 1."""
    diff = (r0 - r1).float()
    p0 = torch.sigmoid(diff / cfg.temperature)
    win0 = (torch.rand(diff.shape, generator=generator) < p0).float()
    label0 = torch.where(diff.abs() < cfg.tie_margin, torch.full_like(diff, 0.5), win0)
    return label0, 1 - label0
