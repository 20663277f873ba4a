"""HPSv2 (Wu et al., 2023) without open_clip: open_clip's ViT-H-14 rebuilt as a transformers CLIPModel.

open_clip (and timm) need torchvision, which does not import beside the CPU torch build used here,
so the HPSv2 checkpoint (open_clip state-dict layout) is converted to ``CLIPModel`` keys:

    visual.conv1 / class_embedding / positional_embedding -> vision_model.embeddings.*
    visual.ln_pre / ln_post                                -> vision_model.pre_layrnorm / post_layernorm
    [visual.]transformer.resblocks.N.attn.in_proj_*        -> ...encoder.layers.N.self_attn.{q,k,v}_proj (split in 3)
    ... attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj    -> out_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2
    visual.proj, text_projection (x @ P)                   -> visual_projection / text_projection (nn.Linear: P.T)
    token_embedding, positional_embedding, ln_final        -> text_model.embeddings.*, text_model.final_layer_norm
    logit_scale                                            -> logit_scale

Both towers use exact GELU and LayerNorm eps 1e-5 like open_clip's ViT-H-14. The text tower pools the
EOT token (open_clip: argmax of the ids, EOT being the largest id; transformers: first EOS id), the
same position for tokenised prompts. Score = 100 * cos(img, txt) (HPSv2 reports cos; the SPO paper
and most papers print it x100). Preprocessing: longest side to 224 (bicubic), zero pad, CLIP mean/std.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPConfig, CLIPModel

from .base import register_scorer
from .pickscore import ClipScorer
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScorerLoadError,
    load_tokenizer,
    load_torch_state_dict,
    parse_options,
    resolve_file,
)

logger = logging.getLogger(__name__)

HPSV2_HUB_ID = "xswu/HPSv2"
HPSV2_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# open_clip's ViT-H-14 tokenizer is the OpenAI CLIP BPE with a 77-token context.
DEFAULT_TOKENIZER_ID = "openai/clip-vit-base-patch32"
HPS_SCALE = 100.0

# Buffers open_clip may have saved that carry no weights.
_IGNORED_KEYS = {"attn_mask", "visual.attn_mask"}


class OpenClipArch(BaseModel):
    """Sizes of an open_clip ``CLIP`` (ViT image tower + built-in text tower). Defaults: ViT-H-14."""

    model_config = ConfigDict(extra="forbid")

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_mlp: int = 5120
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_mlp: int = 4096

    def to_clip_config(self) -> CLIPConfig:
        for tower, width, heads in (("vision", self.vision_width, self.vision_heads), ("text", self.text_width, self.text_heads)):
            if width % heads:
                raise ScorerLoadError(f"{tower} width {width} is not divisible by {heads} heads: set {tower}_heads")
        return CLIPConfig(
            text_config=dict(
                vocab_size=self.vocab_size,
                hidden_size=self.text_width,
                intermediate_size=self.text_mlp,
                num_hidden_layers=self.text_layers,
                num_attention_heads=self.text_heads,
                max_position_embeddings=self.context_length,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                projection_dim=self.embed_dim,
                # open_clip pools the largest id (EOT); CLIP BPE puts SOT/EOT at the top of the vocab.
                bos_token_id=self.vocab_size - 2,
                eos_token_id=self.vocab_size - 1,
                pad_token_id=0,
            ),
            vision_config=dict(
                hidden_size=self.vision_width,
                intermediate_size=self.vision_mlp,
                num_hidden_layers=self.vision_layers,
                num_attention_heads=self.vision_heads,
                image_size=self.image_size,
                patch_size=self.patch_size,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                projection_dim=self.embed_dim,
            ),
            projection_dim=self.embed_dim,
        )


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def infer_open_clip_arch(sd: dict[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 16) -> OpenClipArch:
    """Read an open_clip ViT CLIP's sizes from its state dict (head counts cannot be read: pass them)."""
    try:
        patch = sd["visual.conv1.weight"].shape[-1]
        n_pos = sd["visual.positional_embedding"].shape[0]
        grid = int(round((n_pos - 1) ** 0.5))
        if grid * grid != n_pos - 1:
            raise ScorerLoadError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
        vocab, text_width = sd["token_embedding.weight"].shape
        return OpenClipArch(
            embed_dim=sd["visual.proj"].shape[1],
            image_size=grid * patch,
            patch_size=patch,
            vision_width=sd["visual.class_embedding"].shape[0],
            vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
            vision_heads=vision_heads,
            vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=vocab,
            text_width=text_width,
            text_layers=_count_blocks(sd, "transformer.resblocks."),
            text_heads=text_heads,
            text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
    except KeyError as exc:
        raise ScorerLoadError(f"not an open_clip ViT CLIP state dict: key {exc} is missing") from exc


_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}

_TOP_MAP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}

_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def convert_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip ViT CLIP state dict to transformers ``CLIPModel`` keys (pure function)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key in _IGNORED_KEYS:
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
        elif key == "visual.proj":  # open_clip computes x @ proj; nn.Linear computes x @ W.T
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := _BLOCK_KEY.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                # nn.MultiheadAttention stacks [q; k; v] along dim 0.
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
            elif rest in _BLOCK_MAP:
                out[base + _BLOCK_MAP[rest]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ScorerLoadError(
            f"open_clip state dict has {len(unknown)} keys this converter does not know (first: {unknown[:8]}); "
            f"only plain ViT CLIP models (no layer scale, attention pooling or custom text towers) are supported"
        )
    return out


def clip_model_from_open_clip(sd: dict[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 16) -> CLIPModel:
    """Build a ``CLIPModel`` holding an open_clip ViT CLIP's weights, loaded strictly."""
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    arch = infer_open_clip_arch(sd, vision_heads, text_heads)
    model = CLIPModel(arch.to_clip_config())
    converted = convert_open_clip_state_dict(sd)
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ScorerLoadError(
            f"converted open_clip weights do not fit CLIPModel({arch}): "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return model.float().eval()


class HPSv2Options(BaseModel):
    """Options of the ``hpsv2`` scorer (``scorer.options`` in the config)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal["v2.0", "v2.1"] = "v2.0"  # picks the checkpoint file and labels the scorer
    # CLIP BPE tokenizer directory or hub id; None: <path>/tokenizer if present, else openai/clip-vit-base-patch32.
    tokenizer: str | None = None
    vision_heads: int = Field(default=16, gt=0)
    text_heads: int = Field(default=16, gt=0)
    batch_size: int = Field(default=16, gt=0)


def _default_tokenizer(path: str) -> str:
    p = Path(path).expanduser()
    for d in (p, p.parent) if p.is_file() else (p,):
        if (d / "tokenizer").is_dir():
            return str(d / "tokenizer")
    return DEFAULT_TOKENIZER_ID


@register_scorer("hpsv2")
def build_hpsv2(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", **options: Any) -> ClipScorer:
    """HPSv2: ``path`` is the checkpoint file, a directory holding it, or a hub id (default xswu/HPSv2)."""
    opts = parse_options(HPSv2Options, options, "hpsv2")
    source = str(path) if path is not None else HPSV2_HUB_ID
    file = resolve_file(source, HPSV2_FILES[opts.version], f"HPSv2 {opts.version} checkpoint")
    model = clip_model_from_open_clip(load_torch_state_dict(file, "HPSv2"), opts.vision_heads, opts.text_heads)
    tok_source = opts.tokenizer or _default_tokenizer(source)
    tokenizer = load_tokenizer(tok_source, "HPSv2 (CLIP BPE) tokenizer")
    logger.info("HPSv2 %s loaded from %s (tokenizer %s)", opts.version, file, tok_source)
    return ClipScorer(
        model,
        tokenizer,
        model.config.vision_config.image_size,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        resize="pad",
        scale=HPS_SCALE,
        name="hpsv2." + opts.version.split(".")[1],
        device=device,
        batch_size=opts.batch_size,
        max_length=model.config.text_config.max_position_embeddings,
    )
