"""Do a step scorer's labels point towards better final images?

SPO labels the k candidates of a step by a step scorer and trains the policy to prefer the winner's
transition. That helps only if the winner's *final* image tends to be better than the loser's. This
module measures it: at chosen steps of a trajectory it branches k candidates from one shared x_t (as
:func:`spo_core.rollouts.spo_sample` does), scores them with each step scorer exactly as the sampler
does (the x0 estimate at the next timestep, or x_0 after the last step), continues every candidate to
x_0 with its own noise and scores the final images with a reference scorer (the ground truth in the
toy world). Per step and scorer it reports

* ``gap``: mean over prompts of final(best by the step scorer) - final(worst by it), the quantity the
  best/worst pair pushes up (0 for random labels, negative when the labels point the wrong way);
* ``agree``: over candidate pairs whose final scores differ, the fraction ordered the same way by the
  step scorer and by the final score (0.5 for random labels).

A row ``ceiling`` per step orders the candidates by their final scores themselves: the largest gap
any labels could reach at that step. With ``lookahead`` n > 0 rows ``<name>@la<n>`` score each
candidate, with each step scorer at t = 0, by a deterministic n-step (eta 0) continuation to x_0
instead of the one-call x0 estimate, as SPO's sampler does with ``sampler.lookahead``: how much of
the ceiling a step scorer sees when its input is sharper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rollouts import RowRNG, _full, decode_and_score, deterministic_x0


@dataclass
class StepFidelity:
    step: int  # index in the sampling grid of the branching transition
    t_score: float  # the candidates' time (0..1000), where the x0 estimate is scored (look-ahead rows: at 0)
    scorer: str
    gap: float
    gap_se: float
    agree: float
    n_prompts: int
    per_prompt: tuple[float, ...] = ()  # each prompt's final best-minus-worst gap (for paired comparisons)


def order_agreement(step_scores: torch.Tensor, final: torch.Tensor) -> tuple[float, int]:
    """Fraction of within-row candidate pairs that two score tables order alike, over pairs whose
    ``final`` scores differ (ties in ``step_scores`` count half); (P, k) each. Returns (fraction, pairs)."""
    ds = step_scores.unsqueeze(2) - step_scores.unsqueeze(1)
    df = final.unsqueeze(2) - final.unsqueeze(1)
    upper = torch.triu(torch.ones_like(ds, dtype=torch.bool), diagonal=1) & (df != 0)
    same = (torch.sign(ds) * torch.sign(df))[upper]
    n = int(upper.sum())
    return (float(((same > 0).float() + 0.5 * (same == 0).float()).mean()) if n else math.nan), n


def row_gaps(step_scores: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Per row, final[argmax step] - final[argmin step]; (P, k) each, (P,) float64 out."""
    win, lose = step_scores.argmax(dim=1, keepdim=True), step_scores.argmin(dim=1, keepdim=True)
    return (final.gather(1, win) - final.gather(1, lose)).squeeze(1).double()


def mean_se(d: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (NaN for fewer than two values)."""
    d = torch.as_tensor(d, dtype=torch.float64)
    return float(d.mean()), (float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan)


def paired_gap_difference(a: StepFidelity, b: StepFidelity) -> tuple[float, float]:
    """Scorer a's gap minus scorer b's at the same step, paired over prompts: (mean, standard error)."""
    if (a.step, a.n_prompts) != (b.step, b.n_prompts) or len(a.per_prompt) != a.n_prompts:
        raise ValueError(f"rows {a.scorer}@{a.step} and {b.scorer}@{b.step} are not paired over the same prompts")
    return mean_se(torch.tensor(a.per_prompt, dtype=torch.float64) - torch.tensor(b.per_prompt, dtype=torch.float64))


@torch.no_grad()
def step_label_fidelity(policy, prompts: list[str], seeds: list[int], step_scorers: dict, final_scorer,
                        steps: list[int], num_steps: int = 20, k: int = 4, guidance_scale: float = 5.0,
                        eta: float = 1.0, lookahead: int = 0, decode_batch_size: int = 64) -> list[StepFidelity]:
    """Branch k candidates at each step index in ``steps`` of each prompt's trajectory and compare
    the step scorers' orders with the final images' ``final_scorer`` scores (see the module doc)."""
    if not steps or min(steps) < 0 or max(steps) >= num_steps:
        raise ValueError(f"steps {steps} must be indices in [0, {num_steps})")
    proc, shape, dev, dt = policy.process, policy.latent_shape, policy.device, policy.dtype
    ts, prevs = proc.grid(num_steps)
    P = len(prompts)
    cond = policy.encode_prompts(prompts)
    rows = torch.arange(P)
    rows_k = rows.repeat_interleave(k)
    cond_k = cond.select(rows_k)
    prompts_k = [prompts[r] for r in rows_k.tolist()]
    main = RowRNG(seeds)
    branch = RowRNG([s + 7919 for s in seeds])  # the branches' noise never perturbs the main path

    def step(x, i, c, rng, r, eps=None):
        n = x.shape[0]
        t = _full(ts[i], n, dev, ts.dtype)
        eps = policy.predict(x, t, c, guidance_scale) if eps is None else eps
        return proc.step(x, eps, t, _full(prevs[i], n, dev, ts.dtype), eta, noise=rng.randn(r, shape, dev, dt))[0]

    out: list[StepFidelity] = []
    x = main.randn(rows, shape, dev, dt)
    for i in range(num_steps):
        if i in steps:
            cand = step(x.repeat_interleave(k, 0), i, cond_k, branch, rows_k)
            eps_next = None  # the candidates' prediction at the next time, shared by every use below
            if i + 1 < num_steps:
                t_next = _full(ts[i + 1], P * k, dev, ts.dtype)
                eps_next = policy.predict(cand, t_next, cond_k, guidance_scale)
                x0 = proc.x0(cand, t_next, eps_next)
                t_score = proc.on_1000(t_next)
            else:
                x0, t_score = cand, proc.on_1000(_full(0, P * k, dev, ts.dtype))
            scores = {}
            if step_scorers:  # decoded once, in chunks, for all step scorers
                table = decode_and_score(policy, _Together(step_scorers), x0, prompts_k, t_score, decode_batch_size)
                scores = dict(zip(step_scorers, table.cpu().view(P, k, -1).unbind(dim=2)))
            at_0 = proc.on_1000(_full(0, P * k, dev, ts.dtype))
            if lookahead > 0 and step_scorers:  # each step scorer on the continuation, at t = 0
                ahead = deterministic_x0(policy, cand, i + 1, ts, prevs, cond_k, lookahead, guidance_scale,
                                         eps_first=eps_next)
                table = decode_and_score(policy, _Together(step_scorers), ahead, prompts_k, at_0, decode_batch_size)
                scores.update(zip([f"{n}@la{lookahead}" for n in step_scorers], table.cpu().view(P, k, -1).unbind(dim=2)))
            c = cand
            for j in range(i + 1, num_steps):
                c = step(c, j, cond_k, branch, rows_k, eps_next if j == i + 1 else None)
            final = decode_and_score(policy, final_scorer, c, prompts_k, at_0, decode_batch_size).cpu().view(P, k)
            scores["ceiling"] = final
            for name, sc in scores.items():
                d = row_gaps(sc, final)
                agree, _ = order_agreement(sc, final)
                out.append(StepFidelity(i, float(t_score[0]), name, *mean_se(d), agree, P, tuple(d.tolist())))
        x = step(x, i, cond, main, rows)
    return out


class _Together:
    """Several scorers as one, (n, S) scores, so that each chunk of latents is decoded once."""

    def __init__(self, scorers: dict):
        self.scorers = list(scorers.values())

    def score(self, images, prompts, timesteps=None):
        return torch.stack([torch.as_tensor(s.score(images, prompts, timesteps)).float() for s in self.scorers], dim=1)

