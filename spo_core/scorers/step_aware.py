"""The step-aware preference model as a scorer: ``score(images, prompts, timesteps)``.

``path`` is a directory written by the ``train_pm`` stage: a time-conditioned model (``aware``), a
step-agnostic one (``agnostic``, timesteps ignored) or any plain CLIPModel directory (``plain``).
Preprocessing and text encoding are :class:`~spo_core.scorers.pickscore.ClipScorer`'s, the same
transform the preference model was trained with.

``path`` may also be a step-aware model released with the SPO reference code (e.g.
``sd-v1-5_step-aware_preference_model.bin`` from the hub repo SPO-Diffusion-Models/Step-Aware_Preference_Models),
or a folder holding one: a PyTorch state dict, loaded with ``weights_only=True`` and converted by
:meth:`TimeConditionedCLIP.from_reference_checkpoint`. The conversion needs the CLIP it was trained
from (option ``base``, default ``yuvalkirstain/PickScore_v1``) and that CLIP's tokenizer and image
statistics (option ``processor``, default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), as the reference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from .base import register_scorer
from .pickscore import PICKSCORE_ID, PICKSCORE_PROCESSOR_ID, ClipScorer, clip_similarity
from .preprocess import ScorerLoadError, check_images, load_tokenizer, parse_options, read_clip_image_config

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

    # tokenizer + preprocessor_config.json; None: the model directory (for a reference .bin checkpoint:
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the reference's processor)
    processor: str | None = None
    # only for a reference .bin checkpoint: the CLIP it was trained from (directory or hub id)
    base: str | None = None
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=77, gt=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # bf16 on GPUs: half the memory and time


# What torch.save checkpoints of the reference code end with; other files are not state dicts of it.
REFERENCE_SUFFIXES = (".bin", ".pt", ".pth")


def reference_checkpoint(path: str | os.PathLike) -> Path | None:
    """The reference-code checkpoint ``path`` names (the file, or the only one in a folder that is not
    a transformers model directory), or None when ``path`` is a model directory or hub id."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in REFERENCE_SUFFIXES:
            raise ScorerLoadError(f"scorer 'step_aware': {p} is a file but not a reference checkpoint ({'/'.join(REFERENCE_SUFFIXES)}): "
                                  "pass a train_pm output directory, a CLIPModel directory, or the SPO reference's .bin")
        return p
    if not p.is_dir() or (p / "config.json").is_file():
        return None  # a model directory (train_pm output, CLIPModel with pytorch_model.bin) or a hub id
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in REFERENCE_SUFFIXES)
    if len(found) > 1:
        raise ScorerLoadError(f"scorer 'step_aware': {p} holds {len(found)} checkpoints ({', '.join(f.name for f in found[:4])}): "
                              "set path to the one to load")
    return found[0] if found else None


def _load_reference(ckpt: Path, opts: StepAwareOptions):
    from ..preference.time_clip import TimeConditionedCLIP

    base = opts.base or PICKSCORE_ID
    try:
        model = TimeConditionedCLIP.from_reference_checkpoint(ckpt, base)
    except ScorerLoadError as exc:  # the message says what failed; name the option that picks the base
        raise ScorerLoadError(f"scorer 'step_aware', reference checkpoint {ckpt} on base CLIP '{base}' (options.base, "
                              f"default {PICKSCORE_ID}): {exc}") from exc
    return model, opts.processor or PICKSCORE_PROCESSOR_ID


@register_scorer("step_aware")
def build_step_aware(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> StepAwareScorer:
    """Load a ``train_pm`` output directory (aware / agnostic), a plain CLIPModel directory, or a
    step-aware model released with the SPO reference code (``.bin``)."""
    from ..preference.time_clip import TimeConditionedCLIP

    opts = parse_options(StepAwareOptions, options, "step_aware")
    if path is None:
        raise ValueError("scorer 'step_aware' needs path=<directory written by the train_pm stage, e.g. artifacts/pm/aware>")
    ckpt = reference_checkpoint(path)
    if ckpt is not None:
        model, proc = _load_reference(ckpt, opts)
    else:
        if opts.base is not None:
            raise ScorerLoadError(f"scorer 'step_aware': options.base is only for a reference .bin checkpoint, and "
                                  f"'{path}' is a model directory: remove options.base")
        model = TimeConditionedCLIP.from_pretrained(os.fspath(path))
        proc = opts.processor if opts.processor is not None else os.fspath(path)
    try:
        tokenizer = load_tokenizer(proc, "CLIP tokenizer")
    except ScorerLoadError as exc:
        where = (f"default {PICKSCORE_PROCESSOR_ID}, the reference's; a local copy when offline" if ckpt is not None
                 else "train_pm writes one into every model directory")
        raise ScorerLoadError(f"{exc}. Fix: pass options.processor=<directory with the CLIP tokenizer> ({where})") from exc
    size, mean, std = read_clip_image_config(proc, int(model.clip.config.vision_config.image_size))
    # The wrapped CLIPModel serves ClipScorer's text features and preprocessing: one copy in memory.
    clip_scorer = ClipScorer(model.clip, tokenizer, size, mean, std, device=device, name="step_aware",
                             batch_size=opts.batch_size, max_length=opts.max_length, dtype=opts.dtype)
    log.info("step_aware scorer from %s (time_conditioned=%s%s)", path, model.time_conditioned,
             ", reference checkpoint" if ckpt is not None else "")
    return StepAwareScorer(model, clip_scorer)
