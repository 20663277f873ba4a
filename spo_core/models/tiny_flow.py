"""Tiny random models with the SD3 / SD3.5 and FLUX.1 architectures, for tests and CPU smoke runs.

Same classes and state-dict key names as the published checkpoints (``SD3Transformer2DModel`` with
SD3.5's dual-attention layers and RMS q/k norms, ``FluxTransformer2DModel`` with FLUX.1-dev's
guidance embedding, CLIP-L / CLIP-G / T5 text encoders, a VAE with a shift factor and no quant
convs), only smaller. The T5 tokenizer is a character-level unigram model built offline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from .tiny import tiny_text_config, write_clip_tokenizer

# The published schedulers' settings (SD3/SD3.5: a static shift of 3; FLUX.1: resolution-dependent).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
TINY_T5_LENGTH = 32  # the T5 sequence length of the tiny models (SD3 uses 256, FLUX.1-dev 512)


def write_t5_tokenizer(out_dir: str | Path, max_length: int = TINY_T5_LENGTH) -> Path:
    """A T5 tokenizer directory (``tokenizer.json``) that splits text into printable ASCII characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(c), -1.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=max_length).save_pretrained(str(out))
    return out


def tiny_t5(vocab_size: int, d_model: int) -> T5EncoderModel:
    # T5 v1.1 (gated GELU), the encoder family SD3 and FLUX use.
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def tiny_flow_vae() -> AutoencoderKL:
    # SD3/FLUX-style: latents shifted then scaled, no quant convs; 2x down-sampling, 4 latent channels.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_flow_components(kind: str, seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Random tiny components for ``kind`` in {"sd3", "flux"}, keyed as in the diffusers pipelines."""
    if kind not in ("sd3", "flux"):
        raise ValueError(f"unknown flow model kind '{kind}': use 'sd3' or 'flux'")
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="spo_tok_") as tmp:
            return build_tiny_flow_components(kind, seed, tmp)
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "clip" / "vocab.json").exists():
        write_clip_tokenizer(tok_dir / "clip")
        write_t5_tokenizer(tok_dir / "t5")
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        return _components(kind, tok_dir)


def _components(kind: str, tok_dir: Path) -> dict:
    clip_tok = lambda: CLIPTokenizer.from_pretrained(str(tok_dir / "clip"))  # noqa: E731
    t5_tok = T5TokenizerFast.from_pretrained(str(tok_dir / "t5"))
    vocab = len(clip_tok())
    if kind == "sd3":
        # CLIP-L and CLIP-G hidden states (32 + 32) are padded to T5's width (64) and joined along the sequence.
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                            dual_attention_layers=(0,), qk_norm="rms_norm")
        return dict(transformer=transformer, vae=tiny_flow_vae(),
                    scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
                    text_encoder=CLIPTextModelWithProjection(tiny_text_config(vocab)), tokenizer=clip_tok(),
                    text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(vocab)), tokenizer_2=clip_tok(),
                    text_encoder_3=tiny_t5(len(t5_tok), 64), tokenizer_3=t5_tok)
    # FLUX.1-dev: 2x2 latent patches packed into tokens (4 channels -> 16), rotary axes summing to the head width.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(transformer=transformer, vae=tiny_flow_vae(),
                scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
                text_encoder=CLIPTextModel(tiny_text_config(vocab)), tokenizer=clip_tok(),
                text_encoder_2=tiny_t5(len(t5_tok), 32), tokenizer_2=t5_tok)

