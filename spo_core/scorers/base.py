"""The scorer interface shared by preference models (SPO's step scorer) and evaluation scorers.

Images are float tensors of shape (B, 3, H, W) with values in [0, 1] on any device; each scorer
does its own resizing and normalisation. ``timesteps`` is the diffusion timestep of each image
(0 for clean images); step-agnostic scorers ignore it.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Return one float score per image, shape (B,), higher is better."""
        ...


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Register a factory ``f(path=None, device="cpu", **options) -> Scorer`` under ``name``."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer '{name}' registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_scorers() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build_scorer(name: str, path: str | None = None, device: str | torch.device = "cpu", **options) -> Scorer:
    """Build a registered scorer by name (the config's ``scorer.name``)."""
    _import_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer '{name}': choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](path=path, device=device, **options)


def _import_builtin() -> None:
    # Importing the modules runs their @register_scorer decorators.
    import importlib

    for mod in ("simple", "pickscore", "hpsv2", "imagereward", "aesthetic", "toy", "step_aware"):
        try:
            importlib.import_module(f"spo_core.scorers.{mod}")
        except ModuleNotFoundError as exc:  # a scorer module not written yet
            if exc.name != f"spo_core.scorers.{mod}":
                raise
