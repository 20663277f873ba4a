"""Flow-GRPO (arXiv 2505.05470): GRPO on the flow SDE's trajectories, beside SPO.

Per prompt, a group of G images from the stochastic sampler; the advantage of an image is its
reward minus its group's mean, divided by the group's standard deviation or (``global_std``, the
published default) by that of every reward of the round, over all processes. Each trained step is
a PPO sample with a clipped ratio, plus a KL penalty to the reference (the base, adapter off):
for two Gaussians of one standard deviation, ``|mean - mean_ref|^2 / (2 std^2)`` (mean over C, H, W).
Only the first ``timestep_fraction`` of each trajectory's steps are trained on, as the published
code does. The same method runs on the DDIM process of the UNet models (the KL is the same formula).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import reduce_sums
from ..losses import ppo_clip_loss
from ..models.lora import adapters_disabled
from ..training import RoundContext
from .ddpo import DDPOMethod, Transitions

STD_EPS = 1e-4  # added to the standard deviation, as the published code does


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: float | None = None) -> torch.Tensor:
    """(r - mean of r's group) / (std + 1e-4): the group's own std, or ``global_std`` when given."""
    r = rewards.float()
    adv = torch.zeros_like(r)
    for gid in groups.unique():
        m = groups == gid
        std = r[m].std(unbiased=False) if global_std is None else torch.as_tensor(global_std)
        adv[m] = (r[m] - r[m].mean()) / (std + STD_EPS)
    return adv


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per row, as the mean over C, H, W (the log-probabilities' scale)."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - mean_ref) ** 2).mean(dim=dims) / (2 * std.reshape(-1) ** 2)


@dataclass
class FlowGRPOMethod(DDPOMethod):
    kl_beta: float = 0.01
    global_std: bool = True
    timestep_fraction: float = 0.99
    name: str = "grpo"

    def advantages(self, ctx: RoundContext, rewards: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if not self.global_std:
            return group_advantages(rewards, rows)
        r = rewards.double()
        s = torch.stack([r.sum(), (r**2).sum(), torch.tensor(float(len(r)), dtype=torch.float64)])
        s = reduce_sums(ctx.accelerator, s.to(ctx.policy.device)).cpu()  # NCCL reduces on the device
        mean = s[0] / s[2]
        std = float((s[1] / s[2] - mean**2).clamp(min=0).sqrt())  # the population std of the round's rewards
        return group_advantages(rewards, rows, global_std=std)

    def trained_steps(self) -> int:
        return max(1, int(self.sampler.num_steps * self.timestep_fraction))

    def loss(self, ctx: RoundContext, b: Transitions):
        policy, g, eta = ctx.policy, self.sampler.guidance_scale, self.sampler.eta
        cond = ctx.cond.select(b.prompt_index)
        out = policy.predict(b.x_t, b.t, cond, g)
        _, logp, mean, std = policy.process.step(b.x_t, out, b.t, b.prev_t, eta, prev_sample=b.x_prev)
        loss, info = ppo_clip_loss(logp, b.logp_old, b.advantage, self.clip_range, self.adv_clip)
        metrics = {"ratio": float(info["ratio"].mean()), "clipfrac": float(info["clipfrac"].mean())}
        evals = len(b)
        if self.kl_beta > 0:
            with torch.no_grad(), adapters_disabled(policy):
                ref = policy.predict(b.x_t, b.t, cond, g)
                _, _, mean_ref, _ = policy.process.step(b.x_t, ref, b.t, b.prev_t, eta, prev_sample=b.x_prev)
            kl = gaussian_mean_kl(mean, mean_ref, std).mean()
            loss = loss + self.kl_beta * kl
            metrics["kl"] = float(kl.detach())
            evals += len(b)
        return loss, {"loss": float(loss.detach()), **metrics, "unet_evals": evals}
