"""An exact, invertible latent map used instead of a VAE for the toy world.

Pixel-unshuffle folds ``factor x factor`` pixel blocks into channels: a 32x32x3 image becomes a
16x16x12 latent with no information lost, so the toy model needs no trained autoencoder. It has
the ``encode``/``decode`` surface that :class:`~spo_core.models.diffusion.DiffusionPolicy` uses for
an ``AutoencoderKL`` and saves/loads like any diffusers model (``vae/config.json``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleLatentMap(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, factor: int = 1, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        if factor < 1:
            raise ValueError(f"PixelShuffleLatentMap factor must be >= 1, got {factor}")
        # A buffer so that .to(device/dtype) and save_pretrained work like for a real model.
        self.register_buffer("_anchor", torch.zeros(1), persistent=True)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, C, H, W) -> latents (B, C*f*f, H/f, W/f), roughly unit scale."""
        x = images * 2.0 - 1.0
        if self.config.factor > 1:
            x = F.pixel_unshuffle(x, self.config.factor)
        return x * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images`; returns images clamped to [0, 1]."""
        x = latents / self.config.scaling_factor
        if self.config.factor > 1:
            x = F.pixel_shuffle(x, self.config.factor)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used
        return self.decode_latents(self.encode_images(images))
