"""DDPO baseline: PPO on whole DDIM trajectories, reward = the preference model on final images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplingConfig
from ..losses import normalize_advantages, ppo_clip_loss
from ..sampling import policy_step, sample_trajectories
from ..training import RoundContext


@dataclass
class Transitions:
    x_t: torch.Tensor
    x_prev: torch.Tensor
    t: torch.Tensor
    prev_t: torch.Tensor
    row: torch.Tensor  # index into the round's Conditioning
    advantage: torch.Tensor
    logp_old: torch.Tensor

    def __len__(self) -> int:
        return self.t.shape[0]

    def select(self, idx: torch.Tensor) -> "Transitions":
        return Transitions(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


@dataclass
class DDPOMethod:
    sampler: SamplingConfig
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
        rewards = torch.as_tensor(self.scorer.score(policy.decode(tr.latents[:, -1]), prompts,
                                                    torch.zeros(len(rows), dtype=torch.long))).float().cpu()
        adv = normalize_advantages(rewards, rows)
        B, N = len(rows), self.sampler.num_steps
        dev = tr.latents.device
        data = Transitions(
            x_t=tr.latents[:, :-1].reshape(B * N, *tr.latents.shape[2:]),
            x_prev=tr.latents[:, 1:].reshape(B * N, *tr.latents.shape[2:]),
            t=tr.timesteps.to(dev).repeat(B), prev_t=tr.prev_timesteps.to(dev).repeat(B),
            row=rows.to(dev).repeat_interleave(N), advantage=adv.to(dev).repeat_interleave(N),
            logp_old=tr.log_probs.reshape(B * N),
        )
        return data, {"sample_unet_evals": tr.unet_evals, "reward_mean": float(rewards.mean()),
                      "reward_std": float(rewards.std()), "score_mean": float(rewards.mean())}

    def num_items(self, data: Transitions | None) -> int:
        return 0 if data is None else len(data)

    def select(self, data: Transitions, idx: torch.Tensor) -> Transitions:
        return data.select(idx.to(data.t.device))

    def loss(self, ctx: RoundContext, b: Transitions):
        policy = ctx.policy
        eps = policy.guided_eps(b.x_t, b.t, ctx.cond.select(b.row), self.sampler.guidance_scale)
        _, logp, _, _ = policy_step(policy, b.x_t, eps, b.t, b.prev_t, self.sampler.eta, prev_sample=b.x_prev)
        loss, info = ppo_clip_loss(logp, b.logp_old, b.advantage, self.clip_range, self.adv_clip)
        return loss, {"loss": float(loss.detach()), "ratio": float(info["ratio"].mean()),
                      "clipfrac": float(info["clipfrac"].mean()), "unet_evals": len(b)}
