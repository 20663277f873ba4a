"""Toy-world scorers: the ground truth (``toy_reward``, ``toy_alignment``, ``toy_quality``) and the
learned ``toy_pickscore``.

The ground-truth scorers parse each prompt with the toy grammar and rate with
:mod:`spo_core.toyworld.rater`; ``path`` is a toy world directory (or its ``world.json``), None for
the default world. Images of any size are resized to the world's resolution. ``toy_pickscore``
is a :class:`~spo_core.scorers.pickscore.ClipScorer` on the toy PickScore directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..toyworld.config import WorldConfig
from ..toyworld.rater import rate_prompts
from ..toyworld.world import WORLD_JSON
from .base import register_scorer
from .pickscore import ClipScorer
from .preprocess import check_images, parse_options


def load_world_config(path: str | Path | None) -> WorldConfig:
    """The world of a toy world directory or world.json; the default world for None."""
    if path is None:
        return WorldConfig()
    p = Path(path)
    file = p / WORLD_JSON if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"toy scorer: '{path}' is neither a toy world directory nor its {WORLD_JSON}: "
                                "point scorer.path at the toy_world stage's output (or leave it null for the "
                                "default world)")
    return WorldConfig.model_validate(json.loads(file.read_text())["world"])


class ToyRewardScorer:
    """One output of the ground-truth rater: ``reward``, ``alignment``, ``quality`` or a component."""

    def __init__(self, world: WorldConfig, component: str = "reward", name: str = "toy_reward"):
        self.world, self.component, self.name = world, component, name

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        check_images(images, prompts)
        return rate_prompts(images, list(prompts), self.world)[self.component]


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToyPickScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=256, gt=0)


def _ground_truth(component: str, name: str):
    def factory(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> ToyRewardScorer:
        parse_options(_NoOptions, options, name)
        return ToyRewardScorer(load_world_config(path), component, name)

    factory.__doc__ = f"Ground-truth toy {component} in [0, 1] (path: toy world dir, or None for the default world)."
    return factory


register_scorer("toy_reward")(_ground_truth("reward", "toy_reward"))
register_scorer("toy_alignment")(_ground_truth("alignment", "toy_alignment"))
register_scorer("toy_quality")(_ground_truth("quality", "toy_quality"))


@register_scorer("toy_pickscore")
def build_toy_pickscore(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> ClipScorer:
    """The toy PickScore (``logit_scale.exp() * cos``) from the toy_pickscore stage's output directory."""
    if path is None:
        raise ValueError("scorer 'toy_pickscore' needs path: the toy_pickscore stage's output "
                         "(e.g. artifacts/toy/pickscore)")
    opts = parse_options(ToyPickScoreOptions, options, "toy_pickscore")
    return ClipScorer.from_pretrained(path, device=device, name="toy_pickscore", batch_size=opts.batch_size)
