"""DDIM (eta = 1) sampling with log-probabilities, and the SPO step-wise branching sampler.

``ddim_step_with_logprob`` is the pure maths of REFERENCE.md section 1; everything else calls it.
With the same noise z it returns exactly what diffusers' ``DDIMScheduler.step(eta=1,
variance_noise=z)`` returns (tested).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .config import SamplerConfig
from .models.diffusion import Conditioning, DiffusionPolicy

log = logging.getLogger(__name__)

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------ pure maths


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alphas_at(alphas_cumprod: torch.Tensor, final_alpha_cumprod: float | torch.Tensor, t: torch.Tensor,
              prev_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, alpha_bar_prev) with ``final_alpha_cumprod`` where prev_t < 0."""
    ac = alphas_cumprod.to(t.device)
    a = ac[t.long()]
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0).long()], torch.as_tensor(final_alpha_cumprod, device=t.device, dtype=ac.dtype))
    return a, a_prev


def ddim_step_with_logprob(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    a: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_prev with its Gaussian log-probability.

    ``a``, ``a_prev`` are (B,) cumulative alphas at t and prev_t. Give ``noise`` to sample, or
    ``prev_sample`` to evaluate the log-probability of a given next sample. Returns
    (x_prev, log_prob (B,), mean, std (B,)); the log-probability is the MEAN over C, H, W, as in the
    reference code (beta = 10 is on that scale).
    """
    a_b, ap_b = _bcast(a, x_t), _bcast(a_prev, x_t)
    x0 = (x_t - (1 - a_b).sqrt() * eps) / a_b.sqrt()
    var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    std_b = _bcast(std, x_t)
    mean = ap_b.sqrt() * x0 + (1 - ap_b - std_b**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        if noise is None:
            raise ValueError("ddim_step_with_logprob needs either noise or prev_sample")
        prev_sample = mean + std_b * noise
    logp = -((prev_sample.detach() - mean) ** 2) / (2 * std_b**2) - std_b.log() - _LOG_SQRT_2PI
    return prev_sample, logp.mean(dim=tuple(range(1, x_t.ndim))), mean, std


def step_timesteps(policy: DiffusionPolicy, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM timesteps and their predecessors, e.g. 20 steps: 951..1 and 901..-49."""
    sched = policy.scheduler
    sched.set_timesteps(num_steps)
    t = sched.timesteps.clone().long()
    prev = t - sched.config.num_train_timesteps // num_steps
    return t, prev


def final_alpha(policy: DiffusionPolicy) -> torch.Tensor:
    return policy.scheduler.final_alpha_cumprod


def policy_step(policy: DiffusionPolicy, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
                eta: float, noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None):
    """ddim_step_with_logprob with the policy's schedule; t, prev_t are (B,) long tensors."""
    a, a_prev = alphas_at(policy.alphas_cumprod, final_alpha(policy), t, prev_t)
    return ddim_step_with_logprob(x, eps, a, a_prev, eta=eta, noise=noise, prev_sample=prev_sample)


def _full(v: int | torch.Tensor, n: int, device) -> torch.Tensor:
    return torch.full((n,), int(v), dtype=torch.long, device=device)


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
def sample_images(policy: DiffusionPolicy, prompts: list[str], seeds: list[int], num_steps: int = 20,
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
    ts, prevs = step_timesteps(policy, num_steps)
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
            t, pt = _full(ts[i], n, x.device), _full(prevs[i], n, x.device)
            eps = policy.guided_eps(x, t, cond, guidance_scale)
            x, _, _, _ = policy_step(policy, x, eps, t, pt, eta, noise=noises[:, i + 1])
        out.append(x if return_latents else policy.decode(x))
    return torch.cat(out)


@dataclass
class Trajectories:
    """Full DDIM trajectories (for D3PO / DDPO): latents[:, i] -> latents[:, i + 1] at timesteps[i]."""

    latents: torch.Tensor  # (B, N+1, C, H, W)
    log_probs: torch.Tensor  # (B, N) under the sampling policy
    timesteps: torch.Tensor  # (N,)
    prev_timesteps: torch.Tensor  # (N,)
    unet_evals: int = 0


@torch.no_grad()
def sample_trajectories(policy: DiffusionPolicy, cond: Conditioning, rng: RowRNG, rows: torch.Tensor, num_steps: int = 20,
                        guidance_scale: float = 5.0, eta: float = 1.0, x_T: torch.Tensor | None = None) -> Trajectories:
    """Whole trajectories for the rows of ``cond``; ``rows[i]`` names the RowRNG stream of row i."""
    ts, prevs = step_timesteps(policy, num_steps)
    n = len(cond)
    shape = policy.latent_shape
    x = x_T if x_T is not None else rng.randn(rows, shape, policy.device, policy.dtype)
    lat, lps = [x], []
    for i in range(num_steps):
        t, pt = _full(ts[i], n, x.device), _full(prevs[i], n, x.device)
        eps = policy.guided_eps(x, t, cond, guidance_scale)
        z = rng.randn(rows, shape, x.device, x.dtype)
        x, lp, _, _ = policy_step(policy, x, eps, t, pt, eta, noise=z)
        lat.append(x)
        lps.append(lp)
    return Trajectories(torch.stack(lat, 1), torch.stack(lps, 1), ts, prevs, unet_evals=n * num_steps)


# ------------------------------------------------------------------------------ SPO branching sampler


@dataclass
class StepPairs:
    """Win/lose transitions collected by the SPO sampler; one row per (win, lose) transition pair.

    When ``shared[i]`` is True the two transitions start from the same x_t (single-step SPO), so
    one policy and one reference evaluation at ``x_t_w[i]`` serve both log-probabilities.
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

    def __len__(self) -> int:
        return self.t.shape[0]

    def select(self, idx: torch.Tensor) -> "StepPairs":
        return StepPairs(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})

    def to(self, device) -> "StepPairs":
        return StepPairs(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})

    @staticmethod
    def cat(parts: list["StepPairs"]) -> "StepPairs":
        return StepPairs(**{k: torch.cat([getattr(p, k) for p in parts]) for k in StepPairs.__dataclass_fields__})


@dataclass
class SampleStats:
    unet_evals: int = 0  # guided UNet evaluations (one per image per call; CFG counts once)
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
def spo_sample(policy: DiffusionPolicy, cond: Conditioning, scorer, cfg: SamplerConfig,
               rng: RowRNG, score_batch: int = 256) -> tuple[StepPairs | None, SampleStats]:
    """Run the SPO step-wise sampler for a batch of prompts (all prompts advance together).

    Plain DDIM steps while the next timestep is still >= kappa (with 20 steps and kappa = 750,
    branching starts at t = 751, step index 4, as in the reference code); from there, segments of ``cfg.inner_steps`` transitions: k
    candidates are drawn from each prompt's shared x_t (or, with resampler ``none``, k independent
    trajectories each take a step), each candidate takes j-1 further solo steps, the segment ends
    are scored at their own timestep (t = 0 after the last step) and the best/worst (or a random
    pair) gives the labels. Candidates of all prompts are evaluated in one batched UNet call per
    step, and the chosen candidate's noise prediction is reused for the next step.
    """
    ts, prevs = step_timesteps(policy, cfg.num_steps)
    n_steps, k, g = cfg.num_steps, cfg.k, cfg.guidance_scale
    P = len(cond)
    dev, dt = policy.device, policy.dtype
    shape = policy.latent_shape
    stats = SampleStats()

    if len(rng) != P:
        raise ValueError(f"spo_sample needs one RNG stream per prompt: got {len(rng)} for {P} prompts")

    def eps_at(x: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        stats.unet_evals += x.shape[0]
        return policy.guided_eps(x, _full(ts[step], x.shape[0], dev), cond.select(rows), g)

    def step(x, eps, i, rows):
        n = x.shape[0]
        z = rng.randn(rows, shape, dev, dt)
        out, _, _, _ = policy_step(policy, x, eps, _full(ts[i], n, dev), _full(prevs[i], n, dev), cfg.eta, noise=z)
        return out

    rows1 = torch.arange(P, device=dev)
    x = rng.randn(rows1.cpu(), shape, dev, dt)
    eps_cache: torch.Tensor | None = None
    i = 0
    while i < n_steps and int(prevs[i]) >= cfg.kappa:
        eps = eps_cache if eps_cache is not None else eps_at(x, i, rows1)
        x = step(x, eps, i, rows1)
        eps_cache = None
        i += 1

    independent = cfg.resampler == "none"
    # State: m trajectories per prompt, flattened prompt-major: (P*m, ...).
    m = 1
    pairs: list[StepPairs] = []
    while i < n_steps:
        j = min(cfg.inner_steps, n_steps - i)
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
        end = i + j  # index of the step whose timestep the segment end sits at
        if end < n_steps:
            eps_end = eps_at(cand, end, rows_k)
            x0 = policy.x0_from_eps(cand, _full(ts[end], P * k, dev), eps_end)
            t_score = _full(ts[end], P * k, dev)
        else:
            eps_end, x0, t_score = None, cand, _full(0, P * k, dev)
        scores = _score(policy, scorer, x0, [cond.prompts[r] for r in rows_k.tolist()], t_score, score_batch).view(P, k)
        stats.score_means.append(float(scores.mean()))
        stats.score_stds.append(float(scores.std(dim=1).mean()))
        win, lose = choose_pair(scores, cfg.pair, rng)
        s_w, s_l = scores.gather(1, win[:, None])[:, 0], scores.gather(1, lose[:, None])[:, 0]
        keep = keep_pair(s_w, s_l, cfg.threshold)
        stats.segments += P
        stats.pairs_kept += int(keep.sum())
        kept = keep.nonzero()[:, 0]
        if len(kept):
            fw, fl = kept * k + win[kept], kept * k + lose[kept]
            for s in range(j):  # the segment's label applies to each of its transitions
                pairs.append(StepPairs(
                    x_t_w=path_x[s][fw], x_t_l=path_x[s][fl], x_prev_w=path_x[s + 1][fw], x_prev_l=path_x[s + 1][fl],
                    t=_full(ts[i + s], len(kept), dev), prev_t=_full(prevs[i + s], len(kept), dev),
                    prompt_index=kept.clone(), shared=torch.full((len(kept),), s == 0 and m == 1, device=dev),
                    score_w=s_w[kept].float(), score_l=s_l[kept].float(),
                ))
        if independent:
            x, eps_cache, m = cand, eps_end, k
        else:
            pick = rows1 * k + resample_index(cfg.resampler, win, lose, k, rng)
            x = cand[pick]
            eps_cache = None if eps_end is None else eps_end[pick]
        i = end
    stats.final_latents = x
    return (StepPairs.cat(pairs) if pairs else None), stats


def _score(policy: DiffusionPolicy, scorer, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for s in range(0, x0.shape[0], batch):
        images = policy.decode(x0[s:s + batch])
        out.append(torch.as_tensor(scorer.score(images, prompts[s:s + batch], t[s:s + batch])).float().to(x0.device))
    return torch.cat(out)
