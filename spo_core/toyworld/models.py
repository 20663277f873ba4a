"""Builders for the toy world's two models, with the real architectures at tiny sizes.

* the base diffusion model: a ``CLIPTextModel`` + ``UNet2DConditionModel`` with cross-attention +
  an exact :class:`PixelShuffleLatentMap` instead of a VAE + DDIM with SD-1.5's schedule, wrapped in
  a :class:`DiffusionPolicy` (so it saves as a diffusers pipeline and loads with ``load_policy``);
* the flow base (``kind: sd3``): an ``SD3Transformer2DModel`` + two ``CLIPTextModelWithProjection``
  (SD3's CLIP-L and CLIP-G; no T5) + the same latent map + ``FlowMatchEulerDiscreteScheduler``, in a
  :class:`FlowPolicy`;
* the toy PickScore: a transformers ``CLIPModel`` with a small ViT on the world's images.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, CLIPVisionConfig)

from ..models.diffusion import DiffusionPolicy
from ..models.flow_policy import FlowPolicy
from ..models.latent_map import PixelShuffleLatentMap
from ..models.tiny import SD_SCHEDULER_CONFIG, tiny_text_config
from .config import ClipArch, ToyPretrainConfig, TransformerArch, UNetArch

# The flow base has no T5: SD3 then joins zero T5 tokens to the CLIP tokens (diffusers' convention).
# One zero token (instead of SD3's 256) keeps the joint attention small; the saved pipeline records it.
TOY_T5_TOKENS = 1


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


def build_base_flow_policy(arch: TransformerArch, tokenizer: CLIPTokenizer, resolution: int, shift: float = 1.0,
                           seed: int = 0) -> FlowPolicy:
    """A freshly initialised flow toy base (deterministic under ``seed``)."""
    unit = arch.latent_factor * arch.patch_size
    if resolution % unit:
        raise ValueError(f"resolution {resolution} is not divisible by latent_factor x patch_size = {unit}")
    latent_side = resolution // arch.latent_factor
    torch.manual_seed(seed)
    channels = 3 * arch.latent_factor**2
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=arch.patch_size, in_channels=channels, out_channels=channels,
        num_layers=arch.num_layers, attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=2 * arch.text_hidden,  # CLIP-L and CLIP-G states side by side (T5's width in SD3)
        caption_projection_dim=arch.num_attention_heads * arch.attention_head_dim,
        pooled_projection_dim=2 * arch.text_hidden, pos_embed_max_size=latent_side // arch.patch_size,
        dual_attention_layers=tuple(arch.dual_attention_layers), qk_norm="rms_norm")
    encoders = [CLIPTextModelWithProjection(text_config(tokenizer, arch.text_hidden, arch.text_layers))
                for _ in range(2)]
    return FlowPolicy(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=PixelShuffleLatentMap(factor=arch.latent_factor),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        kind="sd3", resolution=resolution, max_sequence_length=TOY_T5_TOKENS,
    )


def build_toy_base(cfg: ToyPretrainConfig, tokenizer: CLIPTokenizer, resolution: int) -> DiffusionPolicy | FlowPolicy:
    """The untrained toy base of ``cfg.kind``."""
    if cfg.kind == "sd3":
        return build_base_flow_policy(cfg.transformer, tokenizer, resolution, shift=cfg.flow_shift, seed=cfg.seed)
    return build_base_policy(cfg.arch, tokenizer, resolution, seed=cfg.seed)


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
