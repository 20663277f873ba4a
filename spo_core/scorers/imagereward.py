"""ImageReward (Xu et al., 2023) without the ``image-reward`` package.

Architecture (THUDM/ImageReward ``ImageReward.py`` + BLIP ``blip_pretrain.py``/``med.py``/``vit.py``):

- ``blip.visual_encoder``: BLIP ViT-L/16 (timm layout: ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``;
  pre-norm blocks, LayerNorm eps 1e-6, exact GELU), returning all tokens after the final norm.
- ``blip.text_encoder``: BLIP's "MED" BERT in encoder mode: embeddings are word + absolute position
  (no token types), then per layer bidirectional self-attention, cross-attention to the image tokens
  (keys/values project from the vision width), feed-forward; post-norm like BERT. transformers'
  ``BertModel`` cannot be used as is (its cross-attention needs ``is_decoder=True``, which makes
  self-attention causal, and projects keys/values from the text width), so the layers are assembled
  here from transformers' ``BertAttention``/``BertIntermediate``/``BertOutput`` with BLIP's key names.
- ``blip.vision_proj``/``blip.text_proj``: BLIP's contrastive projections, unused by the reward but
  present in the checkpoint, kept so it loads strictly.
- ``mlp``: 768-1024-128-64-16-1 linear stack (dropouts between, no activations).

reward = (mlp(text_encoder(ids, image_embeds)[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Uncertainties (checked against the public inference code, not against the released weights):
the token used is the first one ([CLS]), as in ``ImageReward.score``/``inference_rank`` (the training
code's pair mode reads the last token, but the release scores with the first); the input ids are the
plain BERT ids with [CLS] first (no [ENC] substitution, unlike BLIP's ITM head); prompts are padded
to 35 tokens with a padding mask; the checkpoint may carry ``text_encoder.embeddings.position_ids``
(a buffer in old transformers), which is dropped before the strict load.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from .aesthetic import LinearMLPHead
from .base import register_scorer
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScorerLoadError,
    check_images,
    clip_preprocess,
    load_tokenizer,
    load_torch_state_dict,
    parse_options,
    resolve_file,
)

logger = logging.getLogger(__name__)

IMAGEREWARD_HUB_ID = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER_ID = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
# Buffers that old transformers saved in the state dict; they hold no learned weights.
_IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


def normalize_reward(raw: torch.Tensor) -> torch.Tensor:
    """ImageReward's fixed standardisation of the MLP output."""
    return (raw - REWARD_MEAN) / REWARD_STD


class ImageRewardArch(BaseModel):
    """Sizes of ImageReward's BLIP + MLP. Defaults: the released ImageReward-v1.0 (ViT-L/16, BERT-base)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_eps: float = 1e-6
    vocab_size: int = 30524  # bert-base-uncased + BLIP's [DEC] and [ENC]
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    text_eps: float = 1e-12
    hidden_act: str = "gelu"
    embed_dim: int | None = 256  # BLIP's vision_proj/text_proj width; None: checkpoint has none

    def bert_config(self) -> BertConfig:
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_intermediate,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.text_eps,
            hidden_act=self.hidden_act,
            attn_implementation="sdpa",
        )


# ------------------------------------------------------------------ vision: BLIP ViT (timm layout)


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as BLIP
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = _VitAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = _VitMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(nn.Module):
    """BLIP's ViT image encoder; returns all tokens (B, 1 + patches, width) after the final norm."""

    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        if arch.image_size % arch.patch_size:
            raise ValueError(f"image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}")
        if arch.vision_width % arch.vision_heads:
            raise ValueError(f"vision width {arch.vision_width} is not divisible by {arch.vision_heads} heads: set vision_heads")
        n_patches = (arch.image_size // arch.patch_size) ** 2
        self.patch_embed = _PatchEmbed(arch.patch_size, arch.vision_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, arch.vision_width))
        self.blocks = nn.ModuleList(
            _VitBlock(arch.vision_width, arch.vision_heads, arch.vision_mlp, arch.vision_eps) for _ in range(arch.vision_layers)
        )
        self.norm = nn.LayerNorm(arch.vision_width, eps=arch.vision_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ------------------------------------------------------------------ text: BLIP MED encoder


class _TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (BLIP's MED has no token-type embeddings)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]))


class _TextLayer(nn.Module):
    def __init__(self, cfg: BertConfig, encoder_width: int, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(cfg, is_causal=False, layer_idx=layer_idx)
        self.crossattention = BertAttention(cfg, is_causal=False, layer_idx=layer_idx, is_cross_attention=True)
        # BLIP projects the image tokens from the vision width (transformers assumes the text width).
        cross = self.crossattention.self
        cross.key = nn.Linear(encoder_width, cross.all_head_size)
        cross.value = nn.Linear(encoder_width, cross.all_head_size)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.attention(hidden, attention_mask=mask)
        hidden, _ = self.crossattention(hidden, encoder_hidden_states=image_embeds, encoder_attention_mask=None)
        return self.output(self.intermediate(hidden), hidden)


class _TextLayers(nn.Module):
    def __init__(self, layers: list[_TextLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BlipTextEncoder(nn.Module):
    """BLIP's multimodal text encoder (BERT with cross-attention to image tokens in every layer)."""

    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        cfg = arch.bert_config()
        self.embeddings = _TextEmbeddings(cfg)
        self.encoder = _TextLayers([_TextLayer(cfg, arch.vision_width, i) for i in range(cfg.num_hidden_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        # BLIP's additive padding mask (0 keep, -10000 drop), broadcast over heads and queries.
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, image_embeds)
        return hidden


class _Blip(nn.Module):
    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        self.visual_encoder = BlipVisionTransformer(arch)
        self.text_encoder = BlipTextEncoder(arch)
        if arch.embed_dim is not None:
            self.vision_proj = nn.Linear(arch.vision_width, arch.embed_dim)
            self.text_proj = nn.Linear(arch.text_width, arch.embed_dim)


class ImageRewardModel(nn.Module):
    """ImageReward's network with the checkpoint's key names (``blip.*``, ``mlp.layers.*``)."""

    def __init__(self, arch: ImageRewardArch | None = None):
        super().__init__()
        self.arch = arch or ImageRewardArch()
        self.blip = _Blip(self.arch)
        self.mlp = LinearMLPHead(self.arch.text_width)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) reward, shape (B,); inputs already preprocessed and tokenised."""
        image_embeds = self.blip.visual_encoder(pixel_values)
        text = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        return self.mlp(text[:, 0]).squeeze(-1)


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def infer_imagereward_arch(sd: dict[str, torch.Tensor], **fixed: Any) -> ImageRewardArch:
    """Read ImageReward sizes from a checkpoint; head counts, eps and activation come from ``fixed``."""
    try:
        v, t = "blip.visual_encoder.", "blip.text_encoder."
        patch = sd[v + "patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd[v + "pos_embed"].shape[1] - 1) ** 0.5))
        vocab, width = sd[t + "embeddings.word_embeddings.weight"].shape
        sizes = dict(
            image_size=grid * patch,
            patch_size=patch,
            vision_width=sd[v + "cls_token"].shape[-1],
            vision_layers=_count(sd, v + "blocks."),
            vision_mlp=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
            vocab_size=vocab,
            text_width=width,
            text_layers=_count(sd, t + "encoder.layer."),
            text_intermediate=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0],
            embed_dim=sd["blip.vision_proj.weight"].shape[0] if "blip.vision_proj.weight" in sd else None,
        )
    except KeyError as exc:
        raise ScorerLoadError(f"not an ImageReward checkpoint: key {exc} is missing") from exc
    return ImageRewardArch(**sizes, **fixed)


def load_imagereward_model(file: str | os.PathLike, **fixed: Any) -> ImageRewardModel:
    """Load ``ImageReward.pt`` (weights only) into :class:`ImageRewardModel`, strictly."""
    sd = load_torch_state_dict(file, "ImageReward")
    for key in _IGNORED_KEYS:
        sd.pop(key, None)
    model = ImageRewardModel(infer_imagereward_arch(sd, **fixed))
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ScorerLoadError(
            f"ImageReward checkpoint {file} does not match the BLIP + MLP layout: "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return model.eval()


def blip_tokenizer(tokenizer: Any) -> Any:
    """Add BLIP's special tokens ([DEC] as bos, [ENC]) the way BLIP's ``init_tokenizer`` does, so a
    plain bert-base-uncased tokenizer gives the ids (30522, 30523) the checkpoint was trained with."""
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """Normalised ImageReward of (image, prompt) pairs."""

    name = "imagereward"

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_length: int = MAX_TEXT_TOKENS,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if len(tokenizer) > model.arch.vocab_size:
            raise ScorerLoadError(f"tokenizer has {len(tokenizer)} tokens but the text encoder only {model.arch.vocab_size}")
        self.batch_size = int(batch_size)
        self.max_length = min(int(max_length), model.arch.max_position_embeddings)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        unique = list(dict.fromkeys(prompts))
        tok = self.tokenizer(unique, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        idx = torch.tensor([unique.index(p) for p in prompts])
        return tok["input_ids"][idx].to(self.device), tok["attention_mask"][idx].to(self.device)

    @torch.no_grad()
    def raw_reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = check_images(images, prompts).to(self.device)
        # ImageReward's torchvision transform: Resize(224) bicubic, CenterCrop(224), CLIP statistics.
        x = clip_preprocess(x, self.model.arch.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_rounding="round")
        ids, mask = self.tokenize(prompts)
        out = [
            self.model(x[i : i + self.batch_size], ids[i : i + self.batch_size], mask[i : i + self.batch_size])
            for i in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        return normalize_reward(self.raw_reward(images, prompts))


class ImageRewardOptions(BaseModel):
    """Options of the ``imagereward`` scorer (``scorer.options`` in the config)."""

    model_config = ConfigDict(extra="forbid")

    # bert-base-uncased tokenizer directory or hub id; None: <path>/tokenizer if present, else bert-base-uncased.
    tokenizer: str | None = None
    # BLIP med_config.json (text heads, eps, activation); None: the one beside the checkpoint, if any.
    med_config: str | None = None
    vision_heads: int = Field(default=16, gt=0)
    text_heads: int | None = Field(default=None, gt=0)  # None: med_config's, else 12
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=MAX_TEXT_TOKENS, gt=1)


def _read_med_config(file: Path | None) -> dict[str, Any]:
    if file is None or not file.is_file():
        return {}
    cfg = json.loads(file.read_text())
    out: dict[str, Any] = {}
    if "num_attention_heads" in cfg:
        out["text_heads"] = int(cfg["num_attention_heads"])
    if "layer_norm_eps" in cfg:
        out["text_eps"] = float(cfg["layer_norm_eps"])
    if "hidden_act" in cfg:
        out["hidden_act"] = str(cfg["hidden_act"])
    return out


@register_scorer("imagereward")
def build_imagereward(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", **options: Any) -> ImageRewardScorer:
    """``path``: ``ImageReward.pt``, a directory holding it (and optionally med_config.json and a
    ``tokenizer/`` folder), or a hub id (default THUDM/ImageReward)."""
    opts = parse_options(ImageRewardOptions, options, "imagereward")
    source = str(path) if path is not None else IMAGEREWARD_HUB_ID
    file = resolve_file(source, IMAGEREWARD_FILE, "ImageReward checkpoint")
    if opts.med_config is not None:
        med = resolve_file(opts.med_config, MED_CONFIG_FILE, "ImageReward med_config")
    else:
        med = file.parent / MED_CONFIG_FILE
    fixed = {"vision_heads": opts.vision_heads, **_read_med_config(med)}
    if opts.text_heads is not None:
        fixed["text_heads"] = opts.text_heads
    model = load_imagereward_model(file, **fixed)
    tok_source = opts.tokenizer
    if tok_source is None:
        local = Path(source).expanduser()
        local_dir = local if local.is_dir() else local.parent
        tok_source = str(local_dir / "tokenizer") if (local_dir / "tokenizer").is_dir() else DEFAULT_TOKENIZER_ID
    tokenizer = blip_tokenizer(load_tokenizer(tok_source, "ImageReward (BERT) tokenizer"))
    logger.info("ImageReward loaded from %s (tokenizer %s)", file, tok_source)
    return ImageRewardScorer(model, tokenizer, device=device, batch_size=opts.batch_size, max_length=opts.max_length)
