"""Rollouts: plain sampling, whole trajectories (D3PO, DDPO) and SPO's step-wise branching sampler.

A rollout never does schedule maths itself. It asks the policy for its process (``policy.process``:
:class:`spo_core.processes.ddim.DDIMProcess` for the UNet models, :class:`spo_core.processes.flow.FlowProcess`
for SD3 / FLUX) and its network output (``policy.predict``: the guided noise or velocity), and steps
with ``process.step``, which also gives the step's log-probability. So every method built on these
rollouts runs on either process unchanged. Times are the process's own (integer timesteps or flow
times in [0, 1]); ``sampler.kappa`` and the step-aware scorer see them on the 0..1000 scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import SamplerConfig
from .models.diffusion import Conditioning
from .rows import Rows

if TYPE_CHECKING:
    from .models.diffusion import DiffusionPolicy
    from .models.flow_policy import FlowPolicy

    Policy = DiffusionPolicy | FlowPolicy

log = logging.getLogger(__name__)


def _full(v: int | float | torch.Tensor, n: int, device, dtype=torch.long) -> torch.Tensor:
    return torch.full((n,), v.item() if torch.is_tensor(v) else v, dtype=dtype, device=device)


class RowRNG:
    """One CPU generator per prompt, so that a prompt's samples do not depend on which other
    prompts share its batch or process (several processes reproduce a single-process run)."""

    def __init__(self, seeds: list[int]):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, rows: torch.Tensor, shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
        out = torch.stack([torch.randn(shape, generator=self.gens[r]) for r in rows.tolist()])
        return out.to(device=device, dtype=dtype)

    def randint(self, rows: torch.Tensor, high: int) -> torch.Tensor:
        return torch.tensor([int(torch.randint(0, high, (1,), generator=self.gens[r])) for r in rows.tolist()], dtype=torch.long)

    def two_of(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """Two distinct indices in [0, k) per row, shape (len(rows), 2)."""
        return torch.stack([torch.randperm(k, generator=self.gens[r])[:2] for r in rows.tolist()])


# ------------------------------------------------------------------------------ plain sampling


@torch.no_grad()
def sample_images(policy: Policy, prompts: list[str], seeds: list[int], num_steps: int = 20,
                  guidance_scale: float = 5.0, eta: float = 1.0, batch_size: int = 64,
                  return_latents: bool = False, progress: bool = False) -> torch.Tensor:
    """Generate one image per (prompt, seed) with per-image noise streams.

    Each image's initial noise and step noises come from its own generator seeded with its seed,
    so a base model and a fine-tuned model given the same seeds see the same noise (paired
    evaluation), independent of batch composition.
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    proc = policy.process
    ts, prevs = proc.grid(num_steps)
    shape = policy.latent_shape
    out = []
    rng = range(0, len(prompts), batch_size)
    for s in tqdm(rng, desc="sampling", disable=not progress):
        bp, bs = prompts[s:s + batch_size], seeds[s:s + batch_size]
        noises = torch.stack([
            torch.randn((num_steps + 1, *shape), generator=torch.Generator().manual_seed(int(sd))) for sd in bs
        ]).to(policy.device, policy.dtype)
        cond = policy.encode_prompts(bp)
        x = noises[:, 0]
        for i in range(num_steps):
            n = len(bp)
            t, pt = _full(ts[i], n, x.device, ts.dtype), _full(prevs[i], n, x.device, ts.dtype)
            out_i = policy.predict(x, t, cond, guidance_scale)
            x, _, _, _ = proc.step(x, out_i, t, pt, eta, noise=noises[:, i + 1])
        out.append(x if return_latents else policy.decode(x))
    return torch.cat(out)


@dataclass
class Trajectories:
    """Whole trajectories (for D3PO / DDPO): latents[:, i] -> latents[:, i + 1] at timesteps[i]."""

    latents: torch.Tensor  # (B, N+1, C, H, W)
    log_probs: torch.Tensor  # (B, N) under the sampling policy
    timesteps: torch.Tensor  # (N,)
    prev_timesteps: torch.Tensor  # (N,)
    unet_evals: int = 0


@torch.no_grad()
def sample_trajectories(policy: Policy, cond: Conditioning, rng: RowRNG, rows: torch.Tensor, num_steps: int = 20,
                        guidance_scale: float = 5.0, eta: float = 1.0, x_T: torch.Tensor | None = None) -> Trajectories:
    """Whole trajectories for the rows of ``cond``; ``rows[i]`` names the RowRNG stream of row i."""
    proc = policy.process
    ts, prevs = proc.grid(num_steps)
    n = len(cond)
    shape = policy.latent_shape
    x = x_T if x_T is not None else rng.randn(rows, shape, policy.device, policy.dtype)
    lat, lps = [x], []
    for i in range(num_steps):
        t, pt = _full(ts[i], n, x.device, ts.dtype), _full(prevs[i], n, x.device, ts.dtype)
        out = policy.predict(x, t, cond, guidance_scale)
        z = rng.randn(rows, shape, x.device, x.dtype)
        x, lp, _, _ = proc.step(x, out, t, pt, eta, noise=z)
        lat.append(x)
        lps.append(lp)
    return Trajectories(torch.stack(lat, 1), torch.stack(lps, 1), ts, prevs, unet_evals=n * num_steps)


# ------------------------------------------------------------------------------ SPO branching sampler


@dataclass
class StepPairs(Rows):
    """Win/lose transitions collected by the SPO sampler; one row per (win, lose) transition pair.

    When ``shared[i]`` is True the two transitions start from the same x_t (single-step SPO), so
    one policy and one reference evaluation at ``x_t_w[i]`` serve both log-probabilities.
    ``order`` is the step index of the transition (a prompt has at most one pair per step).
    """

    x_t_w: torch.Tensor
    x_t_l: torch.Tensor
    x_prev_w: torch.Tensor
    x_prev_l: torch.Tensor
    t: torch.Tensor  # (N,) long
    prev_t: torch.Tensor  # (N,) long
    prompt_index: torch.Tensor  # (N,) long, into the round's Conditioning
    shared: torch.Tensor  # (N,) bool
    score_w: torch.Tensor  # (N,) float
    score_l: torch.Tensor
    order: torch.Tensor  # (N,) long: the step index


@dataclass
class SampleStats:
    unet_evals: int = 0  # guided UNet evaluations (one per image per call; CFG counts once)
    decode_chunks: int = 0  # decode-and-score calls (each at most sampler.decode_batch_size images)
    segments: int = 0  # branching decisions made (prompts x segments)
    pairs_kept: int = 0
    score_means: list[float] = field(default_factory=list)
    score_stds: list[float] = field(default_factory=list)
    final_latents: torch.Tensor | None = None

    @property
    def keep_fraction(self) -> float:
        return self.pairs_kept / max(self.segments, 1)


def keep_pair(s_w: torch.Tensor, s_l: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPO's pair filter: softmax([s_w, s_l])[0] - [1] > threshold (i.e. tanh((s_w - s_l)/2))."""
    p = torch.softmax(torch.stack([s_w, s_l], -1).float(), -1)
    return (p[..., 0] - p[..., 1]) > threshold


def choose_pair(scores: torch.Tensor, mode: str, rng: RowRNG) -> tuple[torch.Tensor, torch.Tensor]:
    """(win, lose) candidate indices per row of ``scores`` (P, k), row p drawing from stream p."""
    if mode == "best_worst":
        return scores.argmax(-1), scores.argmin(-1)
    if mode == "random":
        p, k = scores.shape
        perm = rng.two_of(torch.arange(p), k).to(scores.device)
        a, b = perm[:, 0], perm[:, 1]
        sa, sb = scores.gather(1, a[:, None])[:, 0], scores.gather(1, b[:, None])[:, 0]
        return torch.where(sa >= sb, a, b), torch.where(sa >= sb, b, a)
    raise ValueError(f"unknown pair choice '{mode}': use best_worst or random")


def resample_index(mode: str, win: torch.Tensor, lose: torch.Tensor, k: int, rng: RowRNG) -> torch.Tensor:
    if mode == "random":
        return rng.randint(torch.arange(win.shape[0]), k).to(win.device)
    if mode == "win":
        return win
    if mode == "lose":
        return lose
    raise ValueError(f"resampler '{mode}' does not pick one candidate")


@torch.no_grad()
def spo_sample(policy: Policy, cond: Conditioning, scorer, cfg: SamplerConfig,
               rng: RowRNG) -> tuple[StepPairs, SampleStats]:
    """Run the SPO step-wise sampler for a batch of prompts (all prompts advance together).

    Plain DDIM steps while the next timestep is still >= kappa (with 20 steps and kappa = 750,
    branching starts at t = 751, step index 4, as in the reference code). From there, segments: k
    candidates are drawn from each prompt's shared x_t (or, with resampler ``none``, k independent
    trajectories each take a step), each candidate takes ``cfg.inner_steps`` further solo steps
    (:func:`segment_ends`), the segment ends are scored at their own timestep (t = 0 after the last
    step; with ``cfg.lookahead`` n > 0, by their n-step deterministic continuation at t = 0:
    :func:`deterministic_x0`) and the best/worst (or a random pair) gives the labels. Candidates of all prompts are
    evaluated in one batched UNet call per step, decoded and scored in chunks of
    ``cfg.decode_batch_size``, and the chosen candidate's noise prediction is reused for the next
    step. Returns the kept pairs (possibly none) and statistics.
    """
    proc = policy.process
    ts, prevs = proc.grid(cfg.num_steps)
    n_steps, k, g = cfg.num_steps, cfg.k, cfg.guidance_scale
    full = lambda v, n: _full(v, n, dev, ts.dtype)  # noqa: E731 - a time for n rows
    P = len(cond)
    dev, dt = policy.device, policy.dtype
    shape = policy.latent_shape
    stats = SampleStats()

    if len(rng) != P:
        raise ValueError(f"spo_sample needs one RNG stream per prompt: got {len(rng)} for {P} prompts")

    def eps_at(x: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        stats.unet_evals += x.shape[0]
        return policy.predict(x, full(ts[step], x.shape[0]), cond.select(rows), g)

    def step(x, eps, i, rows):
        n = x.shape[0]
        z = rng.randn(rows, shape, dev, dt)
        out, _, _, _ = proc.step(x, eps, full(ts[i], n), full(prevs[i], n), cfg.eta, noise=z)
        return out

    rows1 = torch.arange(P, device=dev)
    x = rng.randn(rows1.cpu(), shape, dev, dt)
    eps_cache: torch.Tensor | None = None
    i = 0
    while i < n_steps and float(proc.on_1000(prevs[i])) >= cfg.kappa:
        eps = eps_cache if eps_cache is not None else eps_at(x, i, rows1)
        x = step(x, eps, i, rows1)
        eps_cache = None
        i += 1

    independent = cfg.resampler == "none"
    # State: m trajectories per prompt, flattened prompt-major: (P*m, ...).
    m = 1
    pairs: list[StepPairs] = []
    for end in segment_ends(i, n_steps, cfg.inner_steps):
        j = end - i
        rows_m = rows1.repeat_interleave(m)
        eps = eps_cache if eps_cache is not None else eps_at(x, i, rows_m)
        rows_k = rows1.repeat_interleave(k)
        if m == 1:  # branch: k candidates from one shared x_t (same mean, independent noise)
            parent = x.repeat_interleave(k, 0)
            cand = step(parent, eps.repeat_interleave(k, 0), i, rows_k)
        else:  # independent trajectories: each takes its own step
            parent = x
            cand = step(x, eps, i, rows_k)
        path_x = [parent, cand]  # states along the segment, each (P*k, ...)
        for s in range(1, j):
            e = eps_at(cand, i + s, rows_k)
            cand = step(cand, e, i + s, rows_k)
            path_x.append(cand)
        if end < n_steps:
            eps_end = eps_at(cand, end, rows_k)
            if cfg.lookahead > 0:
                x0 = deterministic_x0(policy, cand, end, ts, prevs, cond.select(rows_k), cfg.lookahead, g,
                                      eps_first=eps_end, stats=stats)
                t_score = proc.on_1000(full(0, P * k))
            else:
                x0 = proc.x0(cand, full(ts[end], P * k), eps_end)
                t_score = proc.on_1000(full(ts[end], P * k))
        else:
            eps_end, x0, t_score = None, cand, proc.on_1000(full(0, P * k))
        scores = decode_and_score(policy, scorer, x0, [cond.prompts[r] for r in rows_k.tolist()], t_score,
                                  cfg.decode_batch_size, stats).view(P, k)
        stats.score_means.append(float(scores.mean()))
        stats.score_stds.append(float(scores.std(dim=1).mean()))
        win, lose = choose_pair(scores, cfg.pair, rng)
        s_w, s_l = scores.gather(1, win[:, None])[:, 0], scores.gather(1, lose[:, None])[:, 0]
        keep = keep_pair(s_w, s_l, cfg.threshold)
        stats.segments += P
        stats.pairs_kept += int(keep.sum())
        kept = keep.nonzero()[:, 0]
        fw, fl = kept * k + win[kept], kept * k + lose[kept]
        for s in range(j):  # the segment's label applies to each of its transitions
            pairs.append(StepPairs(
                x_t_w=path_x[s][fw], x_t_l=path_x[s][fl], x_prev_w=path_x[s + 1][fw], x_prev_l=path_x[s + 1][fl],
                t=full(ts[i + s], len(kept)), prev_t=full(prevs[i + s], len(kept)),
                prompt_index=kept.clone(), shared=torch.full((len(kept),), s == 0 and m == 1, device=dev),
                score_w=s_w[kept].float(), score_l=s_l[kept].float(), order=_full(i + s, len(kept), dev),
            ))
        if independent:
            x, eps_cache, m = cand, eps_end, k
        else:
            pick = rows1 * k + resample_index(cfg.resampler, win, lose, k, rng)
            x = cand[pick]
            eps_cache = None if eps_end is None else eps_end[pick]
        i = end
    stats.final_latents = x
    return StepPairs.cat(pairs), stats


def segment_ends(start: int, num_steps: int, inner_steps: int) -> list[int]:
    """Step indices where the branching segments from ``start`` end (the scored states).

    Each segment is one branching transition plus ``inner_steps`` solo steps, as the reference's
    ``num_inner_step``: 20 steps from index 4 with inner_steps = 3 end at 8, 12, 16, 20 (scored at
    t = 551, 351, 151 and 0). A segment that would end one step before x_0 is extended to x_0, so no
    lone one-step branch is left at the end. With inner_steps = 0 every step is its own segment.
    """
    ends, i, length = [], start, inner_steps + 1
    while i < num_steps:
        end = min(i + length, num_steps)
        if length > 1 and end == num_steps - 1:
            end = num_steps
        ends.append(end)
        i = end
    return ends


@torch.no_grad()
def deterministic_x0(policy: Policy, x: torch.Tensor, start: int, ts: torch.Tensor, prevs: torch.Tensor, cond: Conditioning,
                     n: int, guidance_scale: float, eps_first: torch.Tensor | None = None,
                     stats: SampleStats | None = None) -> torch.Tensor:
    """From x at grid index ``start`` to x_0 in at most n eta-0 steps over the grid's remaining times
    (evenly spaced indices, the last step landing on the grid's final time). ``eps_first``, when given,
    is the network output at (x, ts[start]) and saves the first call."""
    num_steps, proc, dev = len(ts), policy.process, x.device
    idx = sorted({round(v) for v in torch.linspace(start, num_steps, n + 1).tolist()})
    for a, b in zip(idx[:-1], idx[1:]):
        t = _full(ts[a], x.shape[0], dev, ts.dtype)
        prev = _full(ts[b] if b < num_steps else prevs[-1], x.shape[0], dev, ts.dtype)
        if a == start and eps_first is not None:
            eps = eps_first
        else:
            eps = policy.predict(x, t, cond, guidance_scale)
            if stats is not None:
                stats.unet_evals += x.shape[0]
        x = proc.step(x, eps, t, prev, 0.0, noise=torch.zeros_like(x))[0]
    return x


def decode_and_score(policy: Policy, scorer, latents: torch.Tensor, prompts: list[str], t: torch.Tensor,
                     chunk: int, stats: SampleStats | None = None) -> torch.Tensor:
    """Decode latents and score the images, ``chunk`` at a time (bounds the decoder's memory)."""
    out = []
    for s in range(0, latents.shape[0], chunk):
        images = policy.decode(latents[s:s + chunk])
        out.append(torch.as_tensor(scorer.score(images, prompts[s:s + chunk], t[s:s + chunk])).float().to(latents.device))
        if stats is not None:
            stats.decode_chunks += 1
    return torch.cat(out) if out else torch.zeros(0, device=latents.device)
