"""The toy PickScore: a tiny CLIPModel trained like PickScore on the toy preference pairs.

Phase 1 (``clip_steps``) trains it as a CLIP (the library's symmetric contrastive loss) on freshly
rendered training scenes and their captions, standing in for the CLIP that PickScore starts from;
most renders are degraded (noise, colour blotches) and a share of each batch are the training
pairs' base samples with their prompts, so that it can read captions in base samples.
Phase 2 (``pref_steps``) trains the whole model with PickScore's objective: score =
``logit_scale.exp() * cos(image, text)``, tie-aware 2-way softmax cross-entropy over the pair
(:func:`spo_core.losses.preference_loss`). Images are preprocessed exactly as
:class:`spo_core.scorers.pickscore.ClipScorer` does, so the saved directory scores the same there.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, get_cosine_schedule_with_warmup

from ..data.pickapic import decode_image
from ..losses import preference_loss
from ..scorers.pickscore import clip_similarity
from ..scorers.preprocess import clip_preprocess
from .config import ToyPickScoreConfig
from .grammar import parse_many
from .models import build_toy_clip
from .render import render_batch
from .world import LoadedWorld

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp


@dataclass
class PairTensors:
    captions: list[str]
    images: torch.Tensor  # (N, 2, 3, R, R) uint8
    labels: torch.Tensor  # (N, 2) float
    rewards: torch.Tensor | None  # (N, 2) ground truth, when the frame has it

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "PairTensors":
        def img(b) -> torch.Tensor:
            return (decode_image(b) * 255).round().to(torch.uint8)

        images = torch.stack([torch.stack([img(a), img(b)]) for a, b in zip(df["jpg_0"], df["jpg_1"])])
        rewards = torch.tensor(df[["reward_0", "reward_1"]].to_numpy(), dtype=torch.float32) if "reward_0" in df else None
        labels = torch.tensor(df[["label_0", "label_1"]].to_numpy(), dtype=torch.float32)
        return cls(captions=list(df["caption"]), images=images, labels=labels, rewards=rewards)


@dataclass
class PickScoreResult:
    model: CLIPModel
    history: list[tuple[str, int, float]] = field(default_factory=list)  # (phase, step, loss)
    metrics: dict[str, float] = field(default_factory=dict)


class _Encoder:
    """Preprocessing + tokenisation shared by training and evaluation (as ClipScorer does them)."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, cfg: ToyPickScoreConfig, resolution: int):
        self.model, self.tokenizer, self.cfg, self.resolution = model, tokenizer, cfg, resolution

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        return clip_preprocess(x, self.resolution, self.cfg.image_mean, self.cfg.image_std, crop_rounding="floor")

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        img = self.model.get_image_features(pixel_values=self.pixels(images)).pooler_output
        txt = self.model.get_text_features(**self.text(captions)).pooler_output
        return clip_similarity(img, txt, self.model.logit_scale.exp())

    def pair_scores(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        s = self.scores(torch.cat([images[:, 0], images[:, 1]]), captions + captions)
        return s[:n], s[n:]


def degrade(images: torch.Tensor, cfg: ToyPickScoreConfig, rng: np.random.Generator) -> torch.Tensor:
    """Pixel noise plus smooth colour blotches of random strength on a share of the images.

    Base samples are noisy blobs; a CLIP that has only seen clean renders cannot read the
    caption's colours in them. Each image gets noise std ~ U(0, clip_noise) and blotches
    (a 4x4 random field upsampled) of std ~ U(0, clip_blotch) with probability clip_degrade.
    """
    n, _, h, w = images.shape
    u = torch.from_numpy(rng.random((n, 3))).float()
    on = (u[:, 0] < cfg.clip_degrade).float().view(n, 1, 1, 1)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    pixel = torch.randn(images.shape, generator=gen) * (u[:, 1] * cfg.clip_noise).view(n, 1, 1, 1)
    coarse = torch.randn((n, 3, 4, 4), generator=gen) * (u[:, 2] * cfg.clip_blotch).view(n, 1, 1, 1)
    blotch = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (images + on * (pixel + blotch)).clamp(0.0, 1.0)


def clip_batch(step: int, cfg: ToyPickScoreConfig, world: LoadedWorld, scenes: list, train: PairTensors
               ) -> tuple[torch.Tensor, list[str]]:
    """Phase-1 batch: (mostly degraded) renders of training scenes plus a share of base samples
    from the training pairs, each with its own caption (labels are not used here)."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    n_base = min(round(cfg.clip_base_share * cfg.clip_batch_size), 2 * len(train.captions))
    n_render = min(cfg.clip_batch_size - n_base, len(scenes))
    idx = rng.choice(len(scenes), size=n_render, replace=False)
    renders = degrade(render_batch([scenes[i] for i in idx], world.config.resolution, rng, world.config), cfg, rng)
    captions = [world.train_prompts[i] for i in idx]
    if n_base:
        flat = rng.choice(2 * len(train.captions), size=n_base, replace=False)
        base = train.images[flat // 2, flat % 2].float() / 255
        renders = torch.cat([renders, base])
        captions += [train.captions[i] for i in flat // 2]
    return renders, captions


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def mirror(images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Flip images left-right and swap "left"/"right" in their captions.

    The ground-truth reward is exactly invariant under this (every shape is left-right
    symmetric), so mirrored pairs keep their labels: twice the preference data for free.
    """
    swap = {"left": "right", "right": "left"}
    return images.flip(-1), [_LEFT_RIGHT.sub(lambda m: swap[m.group(1)], c) for c in captions]


def _optimiser(model: CLIPModel, lr: float, cfg: ToyPickScoreConfig, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, steps // 2), steps)


def _step(opt, sched, model: CLIPModel, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


@torch.no_grad()
def pair_accuracy(enc: _Encoder, pairs: PairTensors, batch_size: int = 256) -> dict[str, float]:
    """Agreement of the model's preference with the labels (non-tied pairs) and with the true reward."""
    enc.model.eval()
    diffs = []
    for i in range(0, len(pairs.captions), batch_size):
        s0, s1 = enc.pair_scores(pairs.images[i:i + batch_size], pairs.captions[i:i + batch_size])
        diffs.append(s0 - s1)
    d = torch.cat(diffs)
    decided = pairs.labels[:, 0] != 0.5
    out = {"accuracy": float(((d > 0) == (pairs.labels[:, 0] > 0.5))[decided].float().mean()),
           "decided_pairs": int(decided.sum())}
    if pairs.rewards is not None:
        rd = pairs.rewards[:, 0] - pairs.rewards[:, 1]
        nonzero = rd != 0
        out["reward_order_agreement"] = float(((d > 0) == (rd > 0))[nonzero].float().mean())
        out["label_reward_agreement"] = float(((rd > 0) == (pairs.labels[:, 0] > 0.5))[decided & nonzero].float().mean())
    return out


def train_toy_pickscore(cfg: ToyPickScoreConfig, world: LoadedWorld, train: PairTensors, validation: PairTensors,
                        on_log: Callable[[str, int, float], None] | None = None, log_every: int = 25) -> PickScoreResult:
    wcfg = world.config
    tokenizer = world.tokenizer()
    model = build_toy_clip(cfg.arch, tokenizer, wcfg.resolution, seed=cfg.seed)
    enc = _Encoder(model, tokenizer, cfg, wcfg.resolution)
    result = PickScoreResult(model=model)

    def record(phase: str, step: int, window: list[float]) -> None:
        mean = float(np.mean(window))
        result.history.append((phase, step, mean))
        if on_log is not None:
            on_log(phase, step, mean)

    # Phase 1: CLIP on rendered training scenes (held-out colour x shape pairs never appear).
    scenes = parse_many(world.train_prompts, wcfg)
    model.train()
    if cfg.clip_steps:
        opt, sched = _optimiser(model, cfg.clip_lr, cfg, cfg.clip_steps)
        window: list[float] = []
        for step in tqdm(range(cfg.clip_steps), desc="toy pickscore (clip)"):
            images, captions = clip_batch(step, cfg, world, scenes, train)
            out = model(**enc.text(captions), pixel_values=enc.pixels(images), return_loss=True)
            _step(opt, sched, model, out.loss)
            window.append(out.loss.item())
            if (step + 1) % log_every == 0 or step + 1 == cfg.clip_steps:
                record("clip", step + 1, window)
                window = []
    before = pair_accuracy(enc, validation)
    result.metrics.update({f"validation_clip_only_{k}": v for k, v in before.items()})

    # Phase 2: PickScore's objective on the labelled pairs.
    model.train()
    if cfg.pref_steps:
        opt, sched = _optimiser(model, cfg.pref_lr, cfg, cfg.pref_steps)
        window = []
        n = len(train.captions)
        for step in tqdm(range(cfg.pref_steps), desc="toy pickscore (pref)"):
            rng = np.random.default_rng([cfg.seed, 2, step])
            idx = rng.choice(n, size=min(cfg.pref_batch_size, n), replace=False)
            images, captions = train.images[idx], [train.captions[i] for i in idx]
            if cfg.pref_mirror and rng.random() < 0.5:
                images, captions = mirror(images, captions)
            s0, s1 = enc.pair_scores(images, captions)
            loss = preference_loss(s0, s1, train.labels[idx, 0], train.labels[idx, 1])
            _step(opt, sched, model, loss)
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == cfg.pref_steps:
                record("pref", step + 1, window)
                window = []
    model.eval().requires_grad_(False)
    result.metrics.update({f"validation_{k}": v for k, v in pair_accuracy(enc, validation).items()})
    result.metrics.update({f"train_{k}": v for k, v in pair_accuracy(enc, train).items()})
    result.metrics["logit_scale"] = float(model.logit_scale.exp())
    return result


def save_toy_pickscore(model: CLIPModel, tokenizer: CLIPTokenizer, cfg: ToyPickScoreConfig, resolution: int,
                       out_dir: str | Path) -> None:
    """CLIPModel (safetensors) + tokenizer + preprocessor_config.json, loadable by ClipScorer."""
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    CLIPImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution},
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
    ).save_pretrained(str(out_dir))
