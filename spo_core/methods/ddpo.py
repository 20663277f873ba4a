"""DDPO baseline: PPO on whole trajectories (DDIM or flow SDE), reward = the preference model on final images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import RolloutConfig
from ..losses import normalize_advantages, ppo_clip_loss
from ..rows import Rows
from ..rollouts import SampleStats, decode_and_score, sample_trajectories
from ..training import RoundContext


@dataclass
class Transitions(Rows):
    x_t: torch.Tensor
    x_prev: torch.Tensor
    t: torch.Tensor
    prev_t: torch.Tensor
    prompt_index: torch.Tensor  # row of the round's Conditioning
    advantage: torch.Tensor
    logp_old: torch.Tensor
    order: torch.Tensor  # sample * num_steps + step: unique within a prompt


@dataclass
class DDPOMethod:
    sampler: RolloutConfig
    scorer: object
    samples_per_prompt: int = 4
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    name: str = "ddpo"

    @torch.no_grad()
    def collect(self, ctx: RoundContext):
        policy, P, S = ctx.policy, len(ctx.cond), self.samples_per_prompt
        rows = torch.arange(P).repeat_interleave(S)
        tr = sample_trajectories(policy, ctx.cond.select(rows), ctx.rng, rows, self.sampler.num_steps,
                                 self.sampler.guidance_scale, self.sampler.eta)
        prompts = [ctx.cond.prompts[r] for r in rows.tolist()]
        stats = SampleStats()
        rewards = decode_and_score(policy, self.scorer, tr.latents[:, -1], prompts, torch.zeros(len(rows), dtype=torch.long),
                                   self.sampler.decode_batch_size, stats).cpu()
        adv = self.advantages(ctx, rewards, rows)
        B, N = len(rows), self.trained_steps()
        dev = tr.latents.device
        data = Transitions(
            x_t=tr.latents[:, :N].reshape(B * N, *tr.latents.shape[2:]),
            x_prev=tr.latents[:, 1:N + 1].reshape(B * N, *tr.latents.shape[2:]),
            t=tr.timesteps[:N].to(dev).repeat(B), prev_t=tr.prev_timesteps[:N].to(dev).repeat(B),
            prompt_index=rows.to(dev).repeat_interleave(N), advantage=adv.to(dev).repeat_interleave(N),
            logp_old=tr.log_probs[:, :N].reshape(B * N),
            order=(torch.arange(S).repeat(P)[:, None] * N + torch.arange(N)[None]).reshape(B * N).to(dev),
        )
        return data, {"sample_unet_evals": tr.unet_evals, "decode_chunks": stats.decode_chunks,
                      "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                      "score_mean": float(rewards.mean())}

    def advantages(self, ctx: RoundContext, rewards: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """DDPO's per-prompt standardised rewards."""
        return normalize_advantages(rewards, rows)

    def trained_steps(self) -> int:
        """The steps of each trajectory that are trained on (the first ones): all of them in DDPO."""
        return self.sampler.num_steps

    def loss(self, ctx: RoundContext, b: Transitions):
        policy = ctx.policy
        out = policy.predict(b.x_t, b.t, ctx.cond.select(b.prompt_index), self.sampler.guidance_scale)
        _, logp, _, _ = policy.process.step(b.x_t, out, b.t, b.prev_t, self.sampler.eta, prev_sample=b.x_prev)
        loss, info = ppo_clip_loss(logp, b.logp_old, b.advantage, self.clip_range, self.adv_clip)
        return loss, {"loss": float(loss.detach()), "ratio": float(info["ratio"].mean()),
                      "clipfrac": float(info["clipfrac"].mean()), "unet_evals": len(b)}
