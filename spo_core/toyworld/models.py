"""Builders for the toy world's two models, with the real architectures at tiny sizes.

* the base diffusion model: a ``CLIPTextModel`` + ``UNet2DConditionModel`` with cross-attention +
  an exact :class:`PixelShuffleLatentMap` instead of a VAE + DDIM with SD-1.5's schedule, wrapped in
  a :class:`DiffusionPolicy` (so it saves as a diffusers pipeline and loads with ``load_policy``);
* the toy PickScore: a transformers ``CLIPModel`` with a small ViT on the world's images.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

from ..models.diffusion import DiffusionPolicy
from ..models.latent_map import PixelShuffleLatentMap
from ..models.tiny import SD_SCHEDULER_CONFIG, tiny_text_config
from .config import ClipArch, UNetArch


def text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int = 4) -> CLIPTextConfig:
    cfg = tiny_text_config(len(tokenizer), hidden=hidden, projection_dim=hidden)
    cfg.num_hidden_layers = layers
    cfg.num_attention_heads = heads
    cfg.max_position_embeddings = tokenizer.model_max_length
    # Pooling reads the first end-of-text token: take the ids from the tokenizer itself.
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    return cfg


def build_base_policy(arch: UNetArch, tokenizer: CLIPTokenizer, resolution: int, seed: int = 0) -> DiffusionPolicy:
    """A freshly initialised toy base model (deterministic under ``seed``)."""
    if resolution % arch.latent_factor:
        raise ValueError(f"resolution {resolution} is not divisible by arch.latent_factor={arch.latent_factor}")
    latent_side = resolution // arch.latent_factor
    if latent_side % 2 ** (len(arch.block_out_channels) - 1):
        raise ValueError(f"latent side {latent_side} cannot be halved {len(arch.block_out_channels) - 1} times: "
                         "use fewer blocks or a larger resolution")
    torch.manual_seed(seed)
    channels = 3 * arch.latent_factor**2
    unet = UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(arch.block_out_channels),
        layers_per_block=arch.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.cross_attention)),
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.attention_heads,
        norm_num_groups=arch.norm_num_groups,
    )
    text_encoder = CLIPTextModel(text_config(tokenizer, arch.text_hidden, arch.text_layers))
    return DiffusionPolicy(
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        vae=PixelShuffleLatentMap(factor=arch.latent_factor),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        kind="sd15",
        resolution=resolution,
    )


def build_toy_clip(arch: ClipArch, tokenizer: CLIPTokenizer, resolution: int, seed: int = 0) -> CLIPModel:
    if resolution % arch.patch_size:
        raise ValueError(f"resolution {resolution} is not divisible by clip patch_size={arch.patch_size}")
    torch.manual_seed(seed)
    text = text_config(tokenizer, arch.hidden, arch.text_layers, arch.heads)
    vision = CLIPVisionConfig(
        hidden_size=arch.hidden,
        intermediate_size=4 * arch.hidden,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.heads,
        image_size=resolution,
        patch_size=arch.patch_size,
        projection_dim=arch.projection_dim,
        hidden_act="gelu",
    )
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=arch.projection_dim)
    return CLIPModel(cfg)
