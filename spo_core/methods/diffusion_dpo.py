"""Diffusion-DPO baseline: offline preference pairs, same t and noise for win and lose, beta 5000."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.pickapic import decode_image, read_preference_dataset
from ..losses import diffusion_dpo_loss
from ..models.lora import adapters_disabled
from ..rows import Rows
from ..sampling import RowRNG
from ..training import RoundContext, item_seed, prompts_for_round, round_positions


@dataclass
class LatentPairs(Rows):
    """Encoded offline pairs with the training t and noise of each pair (shared by win and lose)."""

    lat_w: torch.Tensor
    lat_l: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    prompt_index: torch.Tensor  # row of the round's Conditioning
    order: torch.Tensor  # 0: one item per pair


def load_pairs(path: str) -> tuple[list[str], list[bytes], list[bytes]]:
    """(captions, winner bytes, loser bytes) of a Pick-a-Pic-schema dataset, ties dropped."""
    df = read_preference_dataset(path)
    df = df[df["label_0"] != df["label_1"]]
    if df.empty:
        raise ValueError(f"preference dataset '{path}' has no non-tied pairs: Diffusion-DPO drops ties")
    w0 = df["label_0"].to_numpy() > df["label_1"].to_numpy()
    win = [a if f else b for a, b, f in zip(df["jpg_0"], df["jpg_1"], w0)]
    lose = [b if f else a for a, b, f in zip(df["jpg_0"], df["jpg_1"], w0)]
    return df["caption"].astype(str).tolist(), win, lose


@dataclass
class DiffusionDPOMethod:
    dataset: str
    beta: float = 5000.0
    pairs_per_round: int = 16
    seed: int = 0
    name: str = "diffusion_dpo"

    def __post_init__(self):
        self.captions, self.win, self.lose = load_pairs(self.dataset)

    def _images(self, blobs: list[bytes], idx: list[int], size: int) -> torch.Tensor:
        imgs = torch.stack([decode_image(blobs[i], index=i) for i in idx])
        if imgs.shape[-1] != size or imgs.shape[-2] != size:
            imgs = F.interpolate(imgs, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return imgs

    @torch.no_grad()
    def collect(self, ctx: RoundContext):
        acc = ctx.accelerator
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        idx = prompts_for_round(list(range(len(self.captions))), self.pairs_per_round, ctx.round, self.seed, rank, world)
        positions = round_positions(self.pairs_per_round, ctx.round, rank, world)
        policy = ctx.policy
        size = policy.resolution
        lat_w = policy.encode_images(self._images(self.win, idx, size).to(policy.device))
        lat_l = policy.encode_images(self._images(self.lose, idx, size).to(policy.device))
        # The pairs' conditioning is the round's: the trainer gathers it with the pairs.
        ctx.cond = policy.encode_prompts([self.captions[i] for i in idx])
        # One t and one noise per pair from the pair's own stream (any number of processes, same draw).
        rng = RowRNG([item_seed(self.seed + 1, p) for p in positions])
        rows = torch.arange(len(idx))
        t = rng.randint(rows, policy.scheduler.config.num_train_timesteps).to(policy.device)
        noise = rng.randn(rows, tuple(lat_w.shape[1:]), policy.device, lat_w.dtype)
        data = LatentPairs(lat_w, lat_l, noise, t, rows.to(policy.device), torch.zeros(len(idx), dtype=torch.long,
                                                                                        device=policy.device))
        return data, {"sample_unet_evals": 0, "pairs": len(idx)}

    def loss(self, ctx: RoundContext, b: LatentPairs):
        policy = ctx.policy
        n = len(b)
        x = torch.cat([policy.add_noise(b.lat_w, b.noise, b.t), policy.add_noise(b.lat_l, b.noise, b.t)])
        tt, cond = torch.cat([b.t, b.t]), ctx.cond.select(torch.cat([b.prompt_index, b.prompt_index]))
        target = torch.cat([b.noise, b.noise])

        def errors(pred):
            e = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
            return e[:n], e[n:]

        mw, ml = errors(policy.guided_eps(x, tt, cond, 1.0))  # conditional prediction, as Diffusion-DPO trains
        with torch.no_grad(), adapters_disabled(policy):
            rw, rl = errors(policy.guided_eps(x, tt, cond, 1.0))
        loss, info = diffusion_dpo_loss(mw, ml, rw, rl, beta=self.beta)
        return loss, {"loss": float(loss.detach()), "implicit_acc": float(info["implicit_acc"].mean()),
                      "unet_evals": 2 * x.shape[0]}
