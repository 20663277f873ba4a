"""The step-aware preference model as a scorer: ``score(images, prompts, timesteps)``.

``path`` is a directory written by the ``train_pm`` stage: a time-conditioned model (``aware``), a
step-agnostic one (``agnostic``, timesteps ignored) or any plain CLIPModel directory (``plain``).
Preprocessing and text encoding are :class:`~spo_core.scorers.pickscore.ClipScorer`'s, the same
transform the preference model was trained with.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from .base import register_scorer
from .pickscore import ClipScorer, clip_similarity
from .preprocess import ScorerLoadError, check_images, load_pretrained, parse_options, read_clip_image_config

log = logging.getLogger(__name__)


class StepAwareScorer:
    """Scores x0 estimates at their diffusion timestep: ``logit_scale.exp() * cos(img_t, txt)``."""

    def __init__(self, model, clip_scorer: ClipScorer, name: str = "step_aware"):
        self.name = name
        self.model = model.to(clip_scorer.device, dtype=clip_scorer.dtype).eval().requires_grad_(False)
        self.clip = clip_scorer  # owns preprocessing, tokenisation and text features
        self.device = clip_scorer.device

    @property
    def time_conditioned(self) -> bool:
        return self.model.time_conditioned

    def _timesteps(self, timesteps: Any, n: int) -> torch.Tensor:
        if timesteps is None:
            return torch.zeros(n, dtype=torch.long, device=self.device)  # clean images
        t = torch.as_tensor(timesteps, device=self.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"got {n} images but {t.numel()} timesteps: pass one timestep per image, or one for all")
        return t

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, timesteps: Any = None) -> torch.Tensor:
        x = self.clip.preprocess(check_images(images).to(self.device)).to(self.clip.dtype)
        t = self._timesteps(timesteps, x.shape[0])
        bs = self.clip.batch_size
        return torch.cat([self.model.image_features(x[i:i + bs], t[i:i + bs]).float() for i in range(0, x.shape[0], bs)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps: Any = None) -> torch.Tensor:
        check_images(images, prompts)
        return clip_similarity(self.image_features(images, timesteps), self.clip.text_features(prompts),
                               self.model.logit_scale.detach().float().exp())


class StepAwareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    processor: str | None = None  # tokenizer + preprocessor_config.json; None: the model directory
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=77, gt=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # bf16 on GPUs: half the memory and time


@register_scorer("step_aware")
def build_step_aware(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> StepAwareScorer:
    """Load a ``train_pm`` output directory (aware / agnostic) or a plain CLIPModel directory."""
    from ..preference.time_clip import TimeConditionedCLIP

    opts = parse_options(StepAwareOptions, options, "step_aware")
    if path is None:
        raise ValueError("scorer 'step_aware' needs path=<directory written by the train_pm stage, e.g. artifacts/pm/aware>")
    model = TimeConditionedCLIP.from_pretrained(os.fspath(path))
    proc = opts.processor if opts.processor is not None else os.fspath(path)
    try:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, proc, "CLIP tokenizer")
    except ScorerLoadError as exc:
        raise ScorerLoadError(f"{exc}. Fix: pass processor=<directory with the CLIP tokenizer> (train_pm writes one "
                              "into every model directory)") from exc
    size, mean, std = read_clip_image_config(proc, int(model.clip.config.vision_config.image_size))
    # The wrapped CLIPModel serves ClipScorer's text features and preprocessing: one copy in memory.
    clip_scorer = ClipScorer(model.clip, tokenizer, size, mean, std, device=device, name="step_aware",
                             batch_size=opts.batch_size, max_length=opts.max_length, dtype=opts.dtype)
    log.info("step_aware scorer from %s (time_conditioned=%s)", path, model.time_conditioned)
    return StepAwareScorer(model, clip_scorer)
