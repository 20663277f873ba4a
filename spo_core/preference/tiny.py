"""A tiny random CLIPModel directory with PickScore_v1's architecture family, for tests and micro runs.

Same classes, key names and files as a real PickScore directory (``config.json`` +
``model.safetensors`` + CLIP tokenizer + ``preprocessor_config.json``), only a few thousand
parameters and a character-level tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ..models.tiny import tiny_text_config, write_clip_tokenizer
from ..utils import atomic_dir
from .time_clip import write_preprocessor_config


def tiny_clip(vocab_size: int, image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 2,
              projection_dim: int = 32, seed: int = 0) -> CLIPModel:
    """A random CLIPModel (gelu, as PickScore's ViT-H) with a ``vocab_size`` text tower."""
    torch.manual_seed(seed)
    text = tiny_text_config(vocab_size, hidden=width, projection_dim=projection_dim)
    cfg = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size, hidden_act="gelu",
                           projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    return CLIPModel(cfg).eval()


def save_tiny_clip(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8, width: int = 32,
                   layers: int = 2, seed: int = 0) -> Path:
    """Write a self-contained tiny CLIP scorer directory (model + tokenizer + preprocessing), atomically."""
    with atomic_dir(out_dir) as tmp:
        write_clip_tokenizer(tmp)
        vocab = len(CLIPTokenizer.from_pretrained(str(tmp)))
        tiny_clip(vocab, image_size, patch_size, width, layers, seed=seed).save_pretrained(str(tmp))
        write_preprocessor_config(tmp, image_size)
    return Path(out_dir)
