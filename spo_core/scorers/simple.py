"""Simple deterministic scorers for tests and learning checks (no weights)."""

from __future__ import annotations

import torch

from .base import register_scorer


class BrightnessScorer:
    """Mean pixel brightness in [0, 1]; prefers brighter images. Ignores prompts and timesteps."""

    name = "brightness"

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


class ChannelScorer:
    """Mean of one colour channel minus the others: prefers e.g. redder images (channel 0)."""

    name = "channel"

    def __init__(self, channel: int = 0):
        self.channel = int(channel)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x = images.float()
        own = x[:, self.channel].mean(dim=(1, 2))
        rest = torch.cat([x[:, :self.channel], x[:, self.channel + 1:]], dim=1).mean(dim=(1, 2, 3))
        return own - rest


@register_scorer("brightness")
def _brightness(path=None, device="cpu", **options) -> BrightnessScorer:
    if options:
        raise ValueError(f"scorer 'brightness' takes no options, got {sorted(options)}")
    return BrightnessScorer()


@register_scorer("channel")
def _channel(path=None, device="cpu", channel: int = 0) -> ChannelScorer:
    return ChannelScorer(channel)
