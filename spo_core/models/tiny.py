"""Tiny random models with the SD-1.5 / SDXL architectures, for tests and CPU smoke runs.

They use the same classes and state-dict key names as the real checkpoints, only smaller.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..utils import atomic_dir

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (the printable stand-in of every byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(out_dir: str | Path, merges: list[tuple[str, str]] | None = None, max_length: int = 77) -> Path:
    """Write a CLIPTokenizer directory with a byte-level vocabulary plus optional BPE merges.

    With no merges it tokenises character by character, which is all the tiny models need.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    for a, b in merges or []:
        vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in (merges or [])]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(out))
    return out


def tiny_text_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_vae() -> AutoencoderKL:
    # Two blocks: one 2x down-sampling, so 32x32 images give 16x16x4 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def build_tiny_components(kind: str, seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """Random tiny components for ``kind`` in {"sd15", "sdxl"} (keys as in a diffusers pipeline)."""
    import tempfile

    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="spo_tok_") as tmp:
            return build_tiny_components(kind, seed, tmp)
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "vocab.json").exists():
        write_clip_tokenizer(tok_dir)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        return _tiny_components(kind, tok_dir)


def _tiny_components(kind: str, tok_dir: Path) -> dict:
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tokenizer)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    if kind == "sd15":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        return dict(unet=unet, vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(vocab)),
                    tokenizer=tokenizer, scheduler=scheduler)
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=32 + 6 * 8,
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        return dict(
            unet=unet,
            vae=tiny_vae(),
            text_encoder=CLIPTextModel(tiny_text_config(vocab)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(vocab)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dir)),
            scheduler=scheduler,
        )
    raise ValueError(f"unknown model kind '{kind}': use 'sd15' or 'sdxl'")


def save_tiny_pipeline(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save random tiny components of ``kind`` (sd15, sdxl, sd3, flux) as a diffusers pipeline
    directory (like a downloaded checkpoint)."""
    import shutil

    if kind in ("sd3", "flux"):
        from .flow_policy import FlowPolicy as policy_cls
        from .tiny_flow import build_tiny_flow_components as build
    else:
        from .diffusion import DiffusionPolicy as policy_cls
        build = build_tiny_components
    with atomic_dir(out_dir) as tmp:
        comps = build(kind, seed=seed, tokenizer_dir=Path(tmp) / "_tok")
        policy_cls(kind=kind, **comps).save_pretrained(tmp)
        shutil.rmtree(Path(tmp) / "_tok")
    return Path(out_dir)
