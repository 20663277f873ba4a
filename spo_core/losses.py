"""Losses as pure functions on tensors (REFERENCE.md sections 2-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clamped_ratio_dpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
                           beta: float = 10.0, eps: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPO / D3PO loss: r = clamp(exp(logp - logp_ref), 1-eps, 1+eps); L = -log sigmoid(beta (log r_w - log r_l)).

    Returns the mean loss and per-pair diagnostics (ratios, and whether each ratio was clamped).
    At initialisation (policy == reference) the loss is log 2.
    """
    r_w = torch.exp(logp_w - ref_logp_w)
    r_l = torch.exp(logp_l - ref_logp_l)
    rc_w = r_w.clamp(1 - eps, 1 + eps)
    rc_l = r_l.clamp(1 - eps, 1 + eps)
    margin = beta * (rc_w.log() - rc_l.log())
    loss = -F.logsigmoid(margin)
    info = {
        "ratio_w": r_w.detach(),
        "ratio_l": r_l.detach(),
        "clipped": ((r_w - rc_w).abs() > 0).float().detach() * 0.5 + ((r_l - rc_l).abs() > 0).float().detach() * 0.5,
        "margin": margin.detach(),
    }
    return loss.mean(), info


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float = 5000.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO: errors are per-pair MSEs of the noise prediction; L = -log sigmoid(-beta/2 * d),

    d = (err_w - err_l) - (ref_err_w - ref_err_l).
    """
    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside)
    return loss.mean(), {"implicit_acc": (inside > 0).float().detach(), "model_diff": model_diff.detach(), "ref_diff": ref_diff.detach()}


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4,
                  adv_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's PPO objective: mean(max(-A rho, -A clip(rho, 1 +- clip_range))), A clipped to +-adv_clip."""
    adv = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    return loss.mean(), {"ratio": ratio.detach(), "clipfrac": ((ratio - 1).abs() > clip_range).float().detach()}


def normalize_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-group (per-prompt) standardised rewards; groups with one sample get advantage 0."""
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    for gid in groups.unique():
        m = groups == gid
        r = rewards[m].float()
        if r.numel() > 1:
            adv[m] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return adv


def preference_loss(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor) -> torch.Tensor:
    """PickScore's tie-aware objective: 2-way softmax over [s0, s1], L = l0*CE0 + l1*CE1 (mean).

    For a tie (0.5, 0.5) the loss is shifted by log 0.5 so that a perfectly tied prediction scores
    zero, as in the reference code.
    """
    logp = torch.log_softmax(torch.stack([s0, s1], -1).float(), -1)
    l0, l1 = label0.float(), label1.float()
    loss = -(l0 * logp[..., 0] + l1 * logp[..., 1])
    tie = (l0 == 0.5) & (l1 == 0.5)
    loss = torch.where(tie, loss + torch.log(torch.tensor(0.5, device=loss.device)), loss)
    return loss.mean()
