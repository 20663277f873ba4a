"""The toy preference dataset: two base samples per prompt, labelled by the simulated human.

Rows follow the Pick-a-Pic schema (``caption``, ``jpg_0``, ``jpg_1`` as PNG bytes, ``label_0``,
``label_1``) plus ``reward_0`` / ``reward_1`` (the hidden ground truth) and ``seed_0`` / ``seed_1``.
Image ``j`` of prompt ``i`` uses seed ``seed_base + 2 i + j``; labels are drawn for the whole split
at once, so the data do not depend on the sampling batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.pickapic import encode_image
from ..models.diffusion import DiffusionPolicy
from .compare import sample
from .config import LabelConfig, SampleConfig, WorldConfig
from .rater import rate_prompts, simulate_labels
from .render import render_prompts

# Seed offsets keep the train and validation splits' noise streams apart.
SPLIT_SEED_OFFSET = {"train": 0, "validation": 50_000_000}


@dataclass
class PairSplit:
    frame: pd.DataFrame
    renderer_reward: torch.Tensor  # (n_prompts,) reward of one renderer image per prompt


def build_pairs(policy: DiffusionPolicy, prompts: list[str], world: WorldConfig, sampler: SampleConfig,
                labels: LabelConfig, seed: int, split: str, chunk_prompts: int = 64) -> PairSplit:
    """Sample, rate and label two images per prompt (deterministic under ``seed`` and ``split``)."""
    base = seed * 100_000_000 + SPLIT_SEED_OFFSET[split]
    rows: list[dict] = []
    rewards = []
    for start in tqdm(range(0, len(prompts), chunk_prompts), desc=f"toy prefs ({split})"):
        chunk = prompts[start:start + chunk_prompts]
        doubled = [p for p in chunk for _ in range(2)]
        seeds = [base + 2 * (start + i) + j for i in range(len(chunk)) for j in range(2)]
        # Quantise as PNG will, so that the stored rewards are those of the stored images.
        images = (sample(policy, doubled, seeds, sampler) * 255).round() / 255
        r = rate_prompts(images, doubled, world)["reward"].view(-1, 2)
        rewards.append(r)
        pairs = images.view(-1, 2, *images.shape[1:])
        for i, p in enumerate(chunk):
            rows.append({"caption": p, "jpg_0": encode_image(pairs[i, 0]), "jpg_1": encode_image(pairs[i, 1]),
                         "reward_0": float(r[i, 0]), "reward_1": float(r[i, 1]),
                         "seed_0": seeds[2 * i], "seed_1": seeds[2 * i + 1]})
    r = torch.cat(rewards)
    gen = torch.Generator().manual_seed(base + 1)
    label0, label1 = simulate_labels(r[:, 0], r[:, 1], labels, gen)
    frame = pd.DataFrame(rows)
    frame.insert(3, "label_0", label0.double().numpy())
    frame.insert(4, "label_1", label1.double().numpy())
    truth = rate_prompts(render_prompts(prompts, world.resolution, base + 2, world), prompts, world)["reward"]
    return PairSplit(frame=frame, renderer_reward=truth)


def pair_statistics(split: PairSplit, prefix: str) -> dict[str, float]:
    """Label balance, tie share, label noise and base-vs-renderer reward for one split."""
    df = split.frame
    tie = (df["label_0"] == 0.5).to_numpy()
    decided = df[~tie]
    r0, r1 = df["reward_0"].to_numpy(), df["reward_1"].to_numpy()
    agree = ((decided["reward_0"] > decided["reward_1"]) == (decided["label_0"] > decided["label_1"])).mean()
    return {
        f"{prefix}_pairs": len(df),
        f"{prefix}_tie_share": float(tie.mean()),
        f"{prefix}_label0_share": float((decided["label_0"] == 1.0).mean()) if len(decided) else float("nan"),
        # How often the simulated human agrees with the reward ordering: the ceiling for any learned scorer.
        f"{prefix}_label_reward_agreement": float(agree) if len(decided) else float("nan"),
        f"{prefix}_base_reward": float((r0.mean() + r1.mean()) / 2),
        f"{prefix}_renderer_reward": float(split.renderer_reward.mean()),
        f"{prefix}_mean_abs_reward_gap": float(abs(r0 - r1).mean()),
    }
