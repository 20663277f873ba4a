"""PickScore (Kirstain et al., 2023) and the reusable CLIP image-text scorer behind it.

score = scale * cos(image_embed, text_embed), where scale is the model's ``logit_scale.exp()``
(PickScore) or a fixed number (HPSv2 uses 100). :class:`ClipScorer` works with any transformers
``CLIPModel`` directory, so the toy world's tiny CLIP loads through exactly the same code.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPModel

from ..utils import DTYPES
from .base import register_scorer
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScorerLoadError,
    check_images,
    clip_preprocess,
    load_pretrained_model,
    load_tokenizer,
    looks_like_hub_id,
    pad_preprocess,
    parse_options,
    read_clip_image_config,
)

logger = logging.getLogger(__name__)

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
# PickScore was trained with the processor (tokenizer + image statistics) of this model.
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def clip_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Row-wise ``scale * cos(image_embeds[i], text_embeds[i])``."""
    return scale * (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


class ClipScorer:
    """Scores (image, prompt) pairs with a CLIP model: ``scale * cos(img, txt)``.

    Args:
        model: a transformers ``CLIPModel``.
        tokenizer: its tokenizer (CLIP BPE); prompts are truncated to the model's context.
        image_size: side of the square image the vision tower expects.
        mean, std: normalisation statistics.
        resize: ``"crop"`` (shortest side + centre crop, CLIPImageProcessor) or ``"pad"``
            (longest side + zero padding, open_clip ``ResizeMaxSize`` as used by HPSv2).
        scale: multiply cos by this; ``None`` uses ``model.logit_scale.exp()`` (PickScore).
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: Any,
        image_size: int,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        *,
        resize: Literal["crop", "pad"] = "crop",
        scale: float | None = None,
        name: str = "pickscore",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_length: int = 77,
        dtype: str | torch.dtype = torch.float32,
    ):
        self.name = name
        self.device = torch.device(device)
        # bf16/fp16 halve the memory and most of the time of a ViT-H scorer; features and scores are float32.
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.model = model.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        if resize not in ("crop", "pad"):
            raise ValueError(f"resize must be 'crop' or 'pad', got {resize!r}")
        self.resize = resize
        self.fixed_scale = scale
        self.batch_size = int(batch_size)
        # The text tower cannot take more positions than it was built with (tiny toy models).
        self.max_length = min(int(max_length), int(model.config.text_config.max_position_embeddings))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize == "pad":
            return pad_preprocess(images, self.image_size, self.mean, self.std)
        return clip_preprocess(images, self.image_size, self.mean, self.std, crop_rounding="floor")

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (not normalised), shape (B, D)."""
        x = self.preprocess(check_images(images).to(self.device)).to(self.dtype)
        return torch.cat(
            [self.model.get_image_features(pixel_values=x[i : i + self.batch_size]).pooler_output.float()
             for i in range(0, x.shape[0], self.batch_size)]
        )

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (not normalised), shape (len(prompts), D)."""
        unique = list(dict.fromkeys(prompts))  # SPO scores k candidates per prompt: encode each once
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        feats = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        ).pooler_output.float()
        index = {p: i for i, p in enumerate(unique)}
        return feats[torch.tensor([index[p] for p in prompts], device=feats.device)]

    @property
    def scale(self) -> torch.Tensor:
        if self.fixed_scale is not None:
            return torch.tensor(float(self.fixed_scale), device=self.device)
        return self.model.logit_scale.detach().float().exp()

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        check_images(images, prompts)
        return clip_similarity(self.image_features(images), self.text_features(prompts), self.scale)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        processor: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> "ClipScorer":
        """Load a CLIPModel from ``path`` and its tokenizer/image statistics from ``processor``
        (default: ``path`` itself)."""
        model = load_pretrained_model(CLIPModel, path, "CLIP model")
        proc = processor if processor is not None else path
        try:
            tokenizer = load_tokenizer(proc, "CLIP tokenizer")
        except ScorerLoadError as exc:
            if processor is None:
                raise ScorerLoadError(
                    f"{exc}. '{path}' holds no tokenizer: pass processor=<directory with the CLIP tokenizer>, "
                    f"e.g. a local copy of {PICKSCORE_PROCESSOR_ID} for PickScore"
                ) from exc
            raise
        size, mean, std = read_clip_image_config(proc, int(model.config.vision_config.image_size))
        return cls(model, tokenizer, size, mean, std, device=device, **kwargs)


class PickScoreOptions(BaseModel):
    """Options of the ``pickscore`` scorer (``scorer.options`` in the config)."""

    model_config = ConfigDict(extra="forbid")

    # Tokenizer + preprocessor_config directory or hub id; None: the model directory itself, or
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K when the model comes from the default hub id.
    processor: str | None = None
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=77, gt=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@register_scorer("pickscore")
def build_pickscore(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> ClipScorer:
    """PickScore_v1 (or any CLIPModel directory): ``logit_scale.exp() * cos``."""
    opts = parse_options(PickScoreOptions, options, "pickscore")
    model_path = path or PICKSCORE_ID
    processor = opts.processor
    if processor is None and looks_like_hub_id(str(model_path)) and not os.path.exists(model_path):
        processor = PICKSCORE_PROCESSOR_ID
    return ClipScorer.from_pretrained(
        model_path, processor, device=device, name="pickscore", batch_size=opts.batch_size, max_length=opts.max_length,
        dtype=opts.dtype,
    )
