"""The published SD3.5-Medium and FLUX.1-dev architectures, with random weights (for benchmarks).

The configs are the public ``config.json`` files of

* ``stabilityai/stable-diffusion-3.5-medium``: transformer (MMDiT-X: 24 layers of 1536 channels, the
  dual-attention layers 0-12, RMS q/k norms), vae (16 latent channels, shift and scaling factors),
  text_encoder = CLIP-L and text_encoder_2 = OpenCLIP bigG (both with projection), text_encoder_3 =
  T5-v1.1-XXL;
* ``black-forest-labs/FLUX.1-dev``: transformer (19 double-stream + 38 single-stream blocks of 3072
  channels, guidance embedding), vae (16 channels, its own factors), text_encoder = CLIP-L (no
  projection), text_encoder_2 = T5-v1.1-XXL;

written out by hand (no download), keeping the fields that matter for the shapes. Built like
:mod:`spo_core.models.published`: directly in the requested dtype on the requested device,
``device="meta"`` for shapes only. ``t5=False`` leaves T5-XXL out (4.7B parameters: SD3 then uses
zero T5 tokens, as diffusers does without it; FLUX gets zero T5 states of the same shape), and
``depth`` scales the transformer down (a CPU cannot hold FLUX's 12B parameters in 24 GiB) while
keeping the width, so a block costs what it costs at full size.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .flow_policy import DEFAULT_T5_LENGTH
from .published import CLIP_L_TEXT_CONFIG, OPENCLIP_BIGG_TEXT_CONFIG, _n_params, _tokenizers, construct
from .tiny_flow import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG

log = logging.getLogger(__name__)

FLOW_KINDS = ("sd3", "flux")

SD35M_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# The SD3 / FLUX autoencoder: 16 latent channels, no quant convs; the two differ in their factors.
_FLOW_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    force_upcast=True,
)
VAE_CONFIGS = {"sd3": dict(_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
               "flux": dict(_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159)}
T5_XXL_CONFIG: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)


def _check_kind(kind: str) -> None:
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow model kind '{kind}': use 'sd3' or 'flux'")


def transformer_config(kind: str, depth: float = 1.0) -> dict[str, Any]:
    """The published transformer config; ``depth`` < 1 keeps that share of the blocks (at least one each)."""
    _check_kind(kind)
    if not 0 < depth <= 1:
        raise ValueError(f"depth must lie in (0, 1], got {depth}")
    cfg = copy.deepcopy(SD35M_TRANSFORMER_CONFIG if kind == "sd3" else FLUX_DEV_TRANSFORMER_CONFIG)
    if depth < 1:
        if kind == "sd3":  # the same share of the dual-attention layers, still the first ones
            dual = max(1, round(len(cfg["dual_attention_layers"]) * depth))
            cfg["num_layers"] = max(1, round(cfg["num_layers"] * depth))
            cfg["dual_attention_layers"] = tuple(range(min(dual, cfg["num_layers"])))
        else:
            cfg["num_layers"] = max(1, round(cfg["num_layers"] * depth))
            cfg["num_single_layers"] = max(1, round(cfg["num_single_layers"] * depth))
    return cfg


def build_transformer(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      seed: int | None = 0, depth: float = 1.0):
    cls = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    with construct(device, dtype, seed):
        return cls(**transformer_config(kind, depth))


def build_flow_vae(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int | None = 0) -> AutoencoderKL:
    _check_kind(kind)
    with construct(device, dtype, seed):
        return AutoencoderKL(**copy.deepcopy(VAE_CONFIGS[kind]))


def build_t5_xxl(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int | None = 0) -> T5EncoderModel:
    with construct(device, dtype, seed):
        return T5EncoderModel(T5Config(**T5_XXL_CONFIG))


def _clip(config: dict[str, Any], projection: bool, dtype, device, seed):
    with construct(device, dtype, seed):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def _t5_tokenizer(tokenizer_dir: str | Path | None, max_length: int):
    from transformers import T5TokenizerFast

    from .tiny_flow import write_t5_tokenizer

    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="spo_t5_") as tmp:
            return _t5_tokenizer(tmp, max_length)
    return T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(Path(tokenizer_dir) / "t5", max_length)))


def build_published_flow_components(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                                    seed: int = 0, t5: bool = True, depth: float = 1.0,
                                    tokenizer_dir: str | Path | None = None) -> dict:
    """Random full-size (or ``depth``-scaled) components for ``kind`` in {"sd3", "flux"}, keyed as
    diffusers' pipelines: ``FlowPolicy(kind=kind, resolution=..., **components)``. Tokenizers are
    byte-level CLIP and character-level T5 vocabularies (cost, not meaning, is measured)."""
    _check_kind(kind)
    tok, tok_2 = _tokenizers(tokenizer_dir, 2)
    t5_model = build_t5_xxl(dtype, device, seed + 4) if t5 else None
    t5_tok = _t5_tokenizer(tokenizer_dir, DEFAULT_T5_LENGTH[kind]) if t5 else None
    comps: dict[str, Any] = dict(
        transformer=build_transformer(kind, dtype, device, seed, depth),
        vae=build_flow_vae(kind, dtype, device, seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER_CONFIG if kind == "sd3" else FLUX_SCHEDULER_CONFIG)),
        tokenizer=tok,
    )
    if kind == "sd3":
        comps.update(text_encoder=_clip(CLIP_L_TEXT_CONFIG, True, dtype, device, seed + 2),
                     text_encoder_2=_clip(OPENCLIP_BIGG_TEXT_CONFIG, True, dtype, device, seed + 3), tokenizer_2=tok_2,
                     text_encoder_3=t5_model, tokenizer_3=t5_tok)
    else:
        comps.update(text_encoder=_clip(CLIP_L_TEXT_CONFIG, False, dtype, device, seed + 2),
                     text_encoder_2=t5_model, tokenizer_2=t5_tok)
    log.info("built random %s components on %s in %s: %s", kind, device, dtype,
             {k: f"{_n_params(v) / 1e6:.1f}M" for k, v in comps.items() if isinstance(v, torch.nn.Module)})
    return comps
