"""Diffusion-DPO baseline: offline preference pairs, same t and noise for win and lose, beta 5000."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pandas as pd

from ..data.pickapic import PreferenceDataError, decode_image
from ..data.stream import PreferenceSource
from ..losses import diffusion_dpo_loss
from ..models.lora import adapters_disabled
from ..rows import Rows
from ..rollouts import RowRNG
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


def load_pairs(path: str) -> tuple[PreferenceSource, pd.DataFrame]:
    """The source and the index of its non-tied pairs (image bytes are read per round, not held)."""
    source = PreferenceSource.open(path)
    df = source.index().frame
    df = df[df["label_0"] != df["label_1"]].reset_index(drop=True)
    if df.empty:
        raise PreferenceDataError(f"preference dataset '{path}' has no non-tied pairs: Diffusion-DPO drops ties. "
                                  "Fix: give pairs with a preference")
    return source, df


@dataclass
class DiffusionDPOMethod:
    dataset: str
    beta: float = 5000.0
    pairs_per_round: int = 16
    seed: int = 0
    name: str = "diffusion_dpo"

    def __post_init__(self):
        self.source, index = load_pairs(self.dataset)
        self.captions = index["caption"].astype(str).tolist()
        self.file_id = index["file_id"].to_numpy()
        self.source_row = index["source_row"].to_numpy()
        self.first_wins = index["label_0"].to_numpy() > index["label_1"].to_numpy()
        self.where = [f"file {f}, row {r}" for f, r in zip(index["source_file"], self.source_row)]
        self._fetcher = None

    def _pair_images(self, idx: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(winner, loser) images of the pairs ``idx``, read from the source now."""
        if self._fetcher is None:
            self._fetcher = self.source.fetcher()
        blobs = self._fetcher.images(self.file_id[idx], self.source_row[idx])
        win, lose = [], []
        for i, (a, b) in zip(idx, blobs):
            w, lo = (a, b) if self.first_wins[i] else (b, a)
            win.append(decode_image(w, self.where[i]))
            lose.append(decode_image(lo, self.where[i]))
        return self._resize(torch.stack(win), size), self._resize(torch.stack(lose), size)

    @staticmethod
    def _resize(imgs: torch.Tensor, size: int) -> torch.Tensor:
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
        win, lose = self._pair_images(idx, size)
        lat_w = policy.encode_images(win.to(policy.device))
        lat_l = policy.encode_images(lose.to(policy.device))
        # The pairs' conditioning is the round's: the trainer gathers it with the pairs.
        ctx.cond = policy.encode_prompts([self.captions[i] for i in idx])
        # One t and one noise per pair from the pair's own stream (any number of processes, same draw).
        rng = RowRNG([item_seed(self.seed + 1, p) for p in positions])
        rows = torch.arange(len(idx))
        # t uniform on 0..999, as the process's times (DDIM: the timestep; flow: t / 1000)
        t = policy.process.from_1000(rng.randint(rows, 1000)).to(policy.device)
        noise = rng.randn(rows, tuple(lat_w.shape[1:]), policy.device, lat_w.dtype)
        data = LatentPairs(lat_w, lat_l, noise, t, rows.to(policy.device), torch.zeros(len(idx), dtype=torch.long,
                                                                                        device=policy.device))
        return data, {"sample_unet_evals": 0, "pairs": len(idx)}

    def loss(self, ctx: RoundContext, b: LatentPairs):
        policy = ctx.policy
        n = len(b)
        x = torch.cat([policy.add_noise(b.lat_w, b.noise, b.t), policy.add_noise(b.lat_l, b.noise, b.t)])
        tt, cond = torch.cat([b.t, b.t]), ctx.cond.select(torch.cat([b.prompt_index, b.prompt_index]))
        target = torch.cat([policy.process.target(b.lat_w, b.noise), policy.process.target(b.lat_l, b.noise)])

        def errors(pred):
            e = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
            return e[:n], e[n:]

        mw, ml = errors(policy.predict(x, tt, cond, 1.0))  # conditional prediction, as Diffusion-DPO trains
        with torch.no_grad(), adapters_disabled(policy):
            rw, rl = errors(policy.predict(x, tt, cond, 1.0))
        loss, info = diffusion_dpo_loss(mw, ml, rw, rl, beta=self.beta)
        return loss, {"loss": float(loss.detach()), "implicit_acc": float(info["implicit_acc"].mean()),
                      "unet_evals": 2 * x.shape[0]}
