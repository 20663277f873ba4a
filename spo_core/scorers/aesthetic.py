"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``).

score = MLP(normalize(CLIP ViT-L/14 image embedding)), the MLP being 768-1024-128-64-16-1 linear
layers with dropout between (no activations), keys ``layers.{0,2,4,6,7}``. The prompt is ignored.
The same head layout is ImageReward's reward head (see :mod:`.imagereward`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from .base import register_scorer
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScorerLoadError,
    check_images,
    clip_preprocess,
    load_pretrained,
    load_pretrained_model,
    load_torch_state_dict,
    parse_options,
    read_clip_image_config,
    resolve_file,
)

logger = logging.getLogger(__name__)

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP_ID = "openai/clip-vit-large-patch14"


class LinearMLPHead(nn.Module):
    """in-1024-128-64-16-1 linear stack with dropout between (no activations), as in LAION's
    aesthetic predictor and ImageReward; indices 1, 3, 5 are the dropouts, so weights sit at
    ``layers.{0,2,4,6,7}``."""

    def __init__(self, input_size: int = 768, dropouts: Sequence[float] = (0.2, 0.2, 0.1)):
        super().__init__()
        self.input_size = input_size
        d1, d2, d3 = dropouts
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(d1),
            nn.Linear(1024, 128),
            nn.Dropout(d2),
            nn.Linear(128, 64),
            nn.Dropout(d3),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_head(file: str | os.PathLike) -> LinearMLPHead:
    """Load the LAION head strictly (weights only) from a ``.pth`` state dict."""
    sd = load_torch_state_dict(file, "aesthetic head")
    if "layers.0.weight" not in sd:
        raise ScorerLoadError(f"{file} is not an aesthetic MLP head (no layers.0.weight)")
    head = LinearMLPHead(input_size=sd["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ScorerLoadError(f"aesthetic head {file} does not fit the 5-layer MLP layout: {exc}") from exc
    return head.eval()


class AestheticScorer:
    """LAION aesthetic score of images (prompts are accepted and ignored)."""

    name = "aesthetic"

    def __init__(
        self,
        clip: CLIPVisionModelWithProjection,
        head: LinearMLPHead,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        proj = clip.config.projection_dim
        if proj != head.input_size:
            raise ScorerLoadError(f"CLIP image embeddings have {proj} dims but the aesthetic head takes {head.input_size}: "
                                  f"use the CLIP the head was trained on (ViT-L/14 for the LAION head)")
        self.device = torch.device(device)
        self.clip = clip.to(self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.head = head.to(self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings, (B, D)."""
        # OpenAI CLIP's own preprocess (torchvision CenterCrop rounding); the head was fit on it.
        x = clip_preprocess(check_images(images).to(self.device), self.image_size, self.mean, self.std, crop_rounding="round")
        emb = torch.cat([self.clip(pixel_values=x[i : i + self.batch_size]).image_embeds
                         for i in range(0, x.shape[0], self.batch_size)])
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | None = None) -> torch.Tensor:
        check_images(images, prompts)
        return self.head(self.image_embeds(images)).squeeze(-1)


class AestheticOptions(BaseModel):
    """Options of the ``aesthetic`` scorer (``scorer.options`` in the config)."""

    model_config = ConfigDict(extra="forbid")

    clip: str = DEFAULT_CLIP_ID  # CLIP ViT-L/14 directory or hub id (a full CLIPModel checkpoint is fine)
    batch_size: int = Field(default=16, gt=0)


def load_clip_vision(source: str) -> CLIPVisionModelWithProjection:
    """The image tower + projection of a CLIP checkpoint (full ``CLIPModel`` or vision-only)."""
    what = "CLIP ViT-L/14 (aesthetic)"
    cfg = load_pretrained(AutoConfig.from_pretrained, source, what + " config")
    if isinstance(cfg, CLIPConfig):
        # A sub-config does not inherit the top-level projection width; set it explicitly.
        vision_cfg = cfg.vision_config
        vision_cfg.projection_dim = cfg.projection_dim
    elif isinstance(cfg, CLIPVisionConfig):
        vision_cfg = cfg
    else:
        raise ScorerLoadError(f"{what}: '{source}' is a {type(cfg).__name__}, not a CLIP checkpoint")
    return load_pretrained_model(CLIPVisionModelWithProjection, source, what, config=vision_cfg)


@register_scorer("aesthetic")
def build_aesthetic(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", **options: Any) -> AestheticScorer:
    """``path``: the head file, a directory holding it, or a hub id; ``clip``: the CLIP ViT-L/14."""
    opts = parse_options(AestheticOptions, options, "aesthetic")
    if path is None:
        raise ScorerLoadError(
            f"scorer 'aesthetic' needs path=<{AESTHETIC_FILE}> (the LAION head from "
            f"github.com/christophschuhmann/improved-aesthetic-predictor) or a directory holding it"
        )
    head = load_aesthetic_head(resolve_file(path, AESTHETIC_FILE, "aesthetic head"))
    clip = load_clip_vision(opts.clip)
    size, mean, std = read_clip_image_config(opts.clip, int(clip.config.image_size))
    return AestheticScorer(clip, head, size, mean, std, device=device, batch_size=opts.batch_size)
