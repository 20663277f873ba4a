"""D3PO baseline: two whole trajectories from one x_T; the final images' preference labels every step.

Training reuses SPO's pair log-probabilities and clamped-ratio loss (beta 0.1 by default); only
the first transition of a pair shares x_t, so the rest cost two evaluations per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RolloutConfig, SPOLossConfig
from ..rollouts import SampleStats, StepPairs, decode_and_score, keep_pair, sample_trajectories
from ..training import RoundContext
from .spo import SPOMethod


@dataclass
class D3POMethod(SPOMethod):
    sampler: RolloutConfig = None  # type: ignore[assignment]
    loss_cfg: SPOLossConfig = None  # type: ignore[assignment]
    scorer: object = None
    threshold: float = 0.0
    name: str = "d3po"

    @torch.no_grad()
    def collect(self, ctx: RoundContext):
        policy, P = ctx.policy, len(ctx.cond)
        x_T = ctx.rng.randn(torch.arange(P), policy.latent_shape, policy.device, policy.dtype)
        rows = torch.arange(P).repeat(2)
        tr = sample_trajectories(policy, ctx.cond.select(rows), ctx.rng, rows, self.sampler.num_steps,
                                 self.sampler.guidance_scale, self.sampler.eta, x_T=torch.cat([x_T, x_T]))
        final = tr.latents[:, -1]
        prompts = [ctx.cond.prompts[r] for r in rows.tolist()]
        stats = SampleStats()
        scores = decode_and_score(policy, self.scorer, final, prompts, torch.zeros(2 * P, dtype=torch.long),
                                  self.sampler.decode_batch_size, stats).cpu()
        s_a, s_b = scores[:P], scores[P:]
        a_wins = s_a >= s_b
        s_w, s_l = torch.where(a_wins, s_a, s_b), torch.where(a_wins, s_b, s_a)
        kept = keep_pair(s_w, s_l, self.threshold).nonzero()[:, 0]
        metrics = {"sample_unet_evals": tr.unet_evals, "decode_chunks": stats.decode_chunks, "pairs": 0,
                   "keep_fraction": len(kept) / P, "score_mean": float(scores.mean()), "score_std": float(scores.std())}
        dev = final.device
        w_rows = torch.where(a_wins, torch.arange(P), torch.arange(P) + P)[kept].to(dev)
        l_rows = torch.where(a_wins, torch.arange(P) + P, torch.arange(P))[kept].to(dev)
        n, N = len(kept), self.sampler.num_steps
        parts = []
        for i in range(N):
            parts.append(StepPairs(
                x_t_w=tr.latents[w_rows, i], x_t_l=tr.latents[l_rows, i],
                x_prev_w=tr.latents[w_rows, i + 1], x_prev_l=tr.latents[l_rows, i + 1],
                t=tr.timesteps[i].to(dev).expand(n).clone(), prev_t=tr.prev_timesteps[i].to(dev).expand(n).clone(),
                prompt_index=kept.to(dev), shared=torch.full((n,), i == 0, device=dev),
                score_w=s_w[kept].to(dev), score_l=s_l[kept].to(dev), order=torch.full((n,), i, device=dev),
            ))
        pairs = StepPairs.cat(parts)
        metrics["pairs"] = len(pairs)
        if n:
            metrics["score_gap"] = float((s_w - s_l)[kept].mean())
        return pairs, metrics
