"""SPO: step-wise win/lose pairs from the branching sampler, trained with the clamped-ratio DPO loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplerConfig, SPOLossConfig
from ..losses import clamped_ratio_dpo_loss
from ..models.lora import adapters_disabled
from ..rollouts import StepPairs, spo_sample
from ..training import RoundContext


def pair_logprobs(policy, ctx_cond, pairs: StepPairs, guidance_scale: float, eta: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log p(x_prev_w | x_t_w) and log p(x_prev_l | x_t_l) under the current UNet, with one
    guided evaluation per distinct x_t: a pair whose win and lose share x_t costs one evaluation.

    Returns (logp_w, logp_l, unet_evals).
    """
    b = len(pairs)
    ns = (~pairs.shared).nonzero()[:, 0]
    states = torch.cat([pairs.x_t_w, pairs.x_t_l[ns]])
    ts = torch.cat([pairs.t, pairs.t[ns]])
    rows = torch.cat([pairs.prompt_index, pairs.prompt_index[ns]])
    out = policy.predict(states, ts, ctx_cond.select(rows), guidance_scale)
    lose_idx = torch.arange(b, device=out.device)
    lose_idx[ns] = b + torch.arange(len(ns), device=out.device)
    out_w, out_l = out[:b], out[lose_idx]
    step = policy.process.step
    _, logp_w, _, _ = step(pairs.x_t_w, out_w, pairs.t, pairs.prev_t, eta, prev_sample=pairs.x_prev_w)
    _, logp_l, _, _ = step(pairs.x_t_l, out_l, pairs.t, pairs.prev_t, eta, prev_sample=pairs.x_prev_l)
    return logp_w, logp_l, states.shape[0]


@dataclass
class SPOMethod:
    sampler: SamplerConfig
    loss_cfg: SPOLossConfig
    scorer: object
    name: str = "spo"

    def collect(self, ctx: RoundContext):
        pairs, st = spo_sample(ctx.policy, ctx.cond, self.scorer, self.sampler, ctx.rng)
        metrics = {
            "sample_unet_evals": st.unet_evals,
            "decode_chunks": st.decode_chunks,
            "pairs": len(pairs),
            "keep_fraction": st.keep_fraction,
            "score_mean": sum(st.score_means) / max(len(st.score_means), 1),
            "score_std": sum(st.score_stds) / max(len(st.score_stds), 1),
        }
        if len(pairs):
            metrics["score_gap"] = float((pairs.score_w - pairs.score_l).mean())
        return pairs, metrics

    def loss(self, ctx: RoundContext, batch: StepPairs):
        g, eta = self.sampler.guidance_scale, self.sampler.eta
        logp_w, logp_l, n_pol = pair_logprobs(ctx.policy, ctx.cond, batch, g, eta)
        with torch.no_grad(), adapters_disabled(ctx.policy):
            ref_w, ref_l, n_ref = pair_logprobs(ctx.policy, ctx.cond, batch, g, eta)
        loss, info = clamped_ratio_dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=self.loss_cfg.beta, eps=self.loss_cfg.eps)
        return loss, {
            "loss": float(loss.detach()),
            "ratio_w": float(info["ratio_w"].mean()),
            "ratio_l": float(info["ratio_l"].mean()),
            "clipped_fraction": float(info["clipped"].mean()),
            "unet_evals": n_pol + n_ref,
        }
