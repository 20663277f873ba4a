"""Tests for the DDIM process (spo_core.processes.ddim: the log-probability step) and the rollouts
(spo_core.rollouts: plain sampling and the SPO branching sampler) on it."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo_core.config import SamplerConfig
from spo_core.models.tiny import SD_SCHEDULER_CONFIG
from spo_core.processes.ddim import alphas_at, ddim_step_with_logprob
from spo_core.rollouts import RowRNG, deterministic_x0, keep_pair, sample_images, spo_sample
from spo_core.scorers.simple import BrightnessScorer

# 6 DDIM steps ("leading", offset 1): t = 831, 665, 499, 333, 167, 1 and prev_t = t - 166.
T6 = [831, 665, 499, 333, 167, 1]


class RecordingScorer:
    """Brightness times ``scale`` (so that the pair filter's tanh sees useful gaps); records each call."""

    name = "recording"

    def __init__(self, scale: float = 1.0, sign: float = 1.0):
        self.scale, self.sign = scale, sign
        self.calls: list[dict] = []

    def score(self, images, prompts, timesteps=None):
        s = self.sign * self.scale * BrightnessScorer().score(images, prompts, timesteps)
        self.calls.append({"n": images.shape[0], "prompts": list(prompts), "t": timesteps.tolist(), "scores": s.clone()})
        return s


def cfg(**kw) -> SamplerConfig:
    base = dict(num_steps=6, kappa=1000, k=2, threshold=0.0, guidance_scale=5.0)
    base.update(kw)
    return SamplerConfig(**base)


def run(policy, prompts, scfg, seeds=None, scorer=None, **kw):
    scorer = scorer or RecordingScorer()
    cond = policy.encode_prompts(prompts)
    rng = RowRNG(seeds if seeds is not None else [100 + i for i in range(len(prompts))])
    pairs, stats = spo_sample(policy, cond, scorer, scfg, rng, **kw)
    return pairs, stats, scorer


def by_prompt_t(pairs, p: int, t: int) -> int:
    idx = ((pairs.prompt_index == p) & (pairs.t == t)).nonzero()[:, 0]
    assert len(idx) == 1, f"expected one pair for prompt {p} at t={t}, got {len(idx)}"
    return int(idx[0])


# ------------------------------------------------------------------------------ DDIM maths


@pytest.fixture(scope="module")
def sched20():
    s = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    s.set_timesteps(20)
    return s


@pytest.mark.parametrize("t", [951, 751, 501, 51, 1])
def test_ddim_step_matches_diffusers_and_gaussian_density(sched20, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn((3, 4, 8, 8), generator=g, dtype=torch.float64)
    eps = torch.randn((3, 4, 8, 8), generator=g, dtype=torch.float64)
    z = torch.randn((3, 4, 8, 8), generator=g, dtype=torch.float64)
    prev_t = t - 50
    ac = sched20.alphas_cumprod
    a = ac[t].expand(3)
    # t = 1 -> prev_t = -49 < 0: the scheduler's final_alpha_cumprod (alphas_cumprod[0], set_alpha_to_one=False).
    a_prev = (ac[prev_t] if prev_t >= 0 else sched20.final_alpha_cumprod).expand(3)
    if prev_t < 0:
        assert sched20.final_alpha_cumprod == ac[0]

    x_prev, logp, mean, std = ddim_step_with_logprob(x, eps, a, a_prev, eta=1.0, noise=z)

    ref = sched20.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(x_prev, ref, rtol=1e-5, atol=1e-6)
    # Mean from diffusers with zero noise; std from REFERENCE.md's variance formula.
    ref_mean = sched20.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    ref_std = sched20._get_variance(torch.tensor(t), torch.tensor(prev_t)).sqrt().item()
    # diffusers computes the variance in float32; ours follows the float64 inputs here.
    assert std[0].item() == pytest.approx(ref_std, rel=2e-5)
    # The same in float64 (float32 cancellation in 1 - a/a' costs ~1e-4 relative at t = 1).
    a64, ap64 = a[0].double(), a_prev[0].double()
    assert std[0].item() == pytest.approx(math.sqrt((1 - ap64) / (1 - a64) * (1 - a64 / ap64)), rel=1e-3)
    ref_logp = torch.distributions.Normal(ref_mean, ref_std).log_prob(x_prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    # The noise is exactly standard normal around the mean.
    torch.testing.assert_close((x_prev - mean) / std.view(-1, 1, 1, 1), z, rtol=1e-5, atol=1e-6)

    # Evaluating the log-probability of a given sample gives the same number.
    _, logp2, _, _ = ddim_step_with_logprob(x, eps, a, a_prev, eta=1.0, prev_sample=x_prev)
    torch.testing.assert_close(logp2, logp)


def test_ddim_step_batch_of_mixed_timesteps(sched20):
    # Rows at different timesteps (as in a training batch of pairs) each match diffusers.
    ts = [951, 501, 1]
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn((3, 4, 8, 8), generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor(ts)
    a, a_prev = alphas_at(sched20.alphas_cumprod, sched20.final_alpha_cumprod, t, t - 50)
    x_prev, _, _, _ = ddim_step_with_logprob(x, eps, a, a_prev, noise=z)
    for r, tt in enumerate(ts):
        ref = sched20.step(eps[r:r + 1], tt, x[r:r + 1], eta=1.0, variance_noise=z[r:r + 1]).prev_sample
        torch.testing.assert_close(x_prev[r:r + 1], ref, rtol=1e-5, atol=1e-6)


def test_ddim_logprob_gradients():
    # The log-probability is differentiable in eps (the policy) and treats the sample as data.
    g = torch.Generator().manual_seed(1)
    x, eps, xp = (torch.randn((2, 4, 4, 4), generator=g) for _ in range(3))
    eps.requires_grad_(True)
    xp.requires_grad_(True)
    a, ap = torch.tensor([0.3, 0.3]), torch.tensor([0.5, 0.5])
    _, logp, _, _ = ddim_step_with_logprob(x, eps, a, ap, prev_sample=xp)
    logp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert xp.grad is None
    with pytest.raises(ValueError, match="noise or prev_sample"):
        ddim_step_with_logprob(x, eps, a, ap)


def test_ddim_grid_and_step_final_alpha(make_policy):
    policy = make_policy("sd15")
    ts, prevs = policy.process.grid(20)
    assert ts.tolist() == list(range(951, 0, -50))
    assert prevs.tolist() == list(range(901, -50, -50))
    ts6, prevs6 = policy.process.grid(6)
    assert ts6.tolist() == T6 and prevs6.tolist() == [t - 166 for t in T6]
    # The policy's scheduler is DDIM with the SPO settings whatever the checkpoint ships.
    c = policy.scheduler.config
    assert (c.timestep_spacing, c.steps_offset, c.set_alpha_to_one, c.clip_sample) == ("leading", 1, False, False)
    # Last step: a_prev = final_alpha_cumprod = alphas_cumprod[0]; check against diffusers again.
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(2)
    x, eps, z = (torch.randn((1, 4, 16, 16), generator=g) for _ in range(3))
    out, _, _, _ = policy.process.step(x, eps, torch.tensor([1]), torch.tensor([-49]), 1.0, noise=z)
    torch.testing.assert_close(out, sched.step(eps, 1, x, eta=1.0, variance_noise=z).prev_sample)


def test_keep_pair_is_tanh_of_half_gap():
    s_w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    s_l = torch.tensor([0.0, 0.5, 1.9, 0.0])
    # tanh(0.5) = 0.462, tanh(0) = 0, tanh(0.05) = 0.05
    assert keep_pair(s_w, s_l, 0.3).tolist() == [True, False, False, False]
    assert keep_pair(s_w, s_l, 0.0).tolist() == [True, False, True, False]
    assert keep_pair(s_w, s_l, 0.46).tolist() == [True, False, False, False]
    assert keep_pair(s_w, s_l, 0.47).tolist() == [False, False, False, False]


def test_sample_images_paired_noise_independent_of_batch(make_policy):
    policy = make_policy("sd15")
    prompts, seeds = ["a cat", "a dog", "a cat"], [5, 6, 5]
    a = sample_images(policy, prompts, seeds, num_steps=4)
    b = sample_images(policy, prompts, seeds, num_steps=4, batch_size=1)
    assert a.shape == (3, 3, policy.resolution, policy.resolution) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[0], a[2])  # same prompt and seed -> same image
    assert (a[0] - a[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample_images(policy, ["a", "b"], [1], num_steps=2)


# ------------------------------------------------------------------------------ the branching sampler


@pytest.mark.parametrize(
    "num_steps,kappa,first_t",
    [
        (20, 750, 751),  # the paper's setting: plain steps 951..801, branching from step index 4
        (20, 1000, 951),  # branch at every step
        (6, 500, 665),  # 831 -> 665 is a plain step (665 >= 500); 665 -> 499 branches
        (6, 0, 1),  # only the final step (prev_t = -165 < 0) branches
    ],
)
def test_kappa_sets_the_branched_timesteps(make_policy, num_steps, kappa, first_t):
    policy = make_policy("sd15")
    pairs, stats, scorer = run(policy, ["a cat"], cfg(num_steps=num_steps, kappa=kappa))
    ts, _ = policy.process.grid(num_steps)
    expected = [t for t in ts.tolist() if t <= first_t]
    assert sorted(pairs.t.tolist(), reverse=True) == expected
    assert stats.segments == len(expected)
    assert all(pairs.shared)
    # Segments are scored at the timestep their end sits at (0 after the last step).
    assert [c["t"][0] for c in scorer.calls] == expected[1:] + [0]
    assert stats.keep_fraction == 1.0


def test_k_candidates_scored_per_segment(make_policy):
    policy = make_policy("sd15")
    pairs, stats, scorer = run(policy, ["a cat", "a dog"], cfg(k=3))
    # 6 segments, each scoring P * k = 6 candidates in one call, in prompt-major order.
    assert [c["n"] for c in scorer.calls] == [6] * 6
    assert scorer.calls[0]["prompts"] == ["a cat"] * 3 + ["a dog"] * 3
    for c in scorer.calls:
        assert len(set(c["scores"].tolist())) == 6  # distinct candidates
    # Win/lose are the argmax/argmin of each prompt's k scores.
    for seg, c in enumerate(scorer.calls):
        s = c["scores"].view(2, 3)
        for p in range(2):
            r = by_prompt_t(pairs, p, T6[seg])
            assert pairs.score_w[r] == s[p].max() and pairs.score_l[r] == s[p].min()
    # decode_batch_size splits the decoding and scoring calls, not the result.
    pairs2, stats2, scorer2 = run(policy, ["a cat", "a dog"], cfg(k=3, decode_batch_size=4))
    assert [c["n"] for c in scorer2.calls] == [4, 2] * 6
    assert stats2.decode_chunks == 12 and stats.decode_chunks == 6
    torch.testing.assert_close(pairs2.score_w, pairs.score_w)


def test_candidates_share_x_t_and_differ_after(make_policy):
    policy = make_policy("sd15")
    pairs, _, _ = run(policy, ["a cat", "a dog"], cfg(k=4, kappa=750, num_steps=6))
    assert len(pairs) > 0 and bool(pairs.shared.all())
    assert torch.equal(pairs.x_t_w, pairs.x_t_l)
    assert (pairs.x_prev_w - pairs.x_prev_l).flatten(1).abs().amax(1).min() > 1e-3
    assert bool((pairs.score_w > pairs.score_l).all())


def test_inner_steps_segments(make_policy):
    policy = make_policy("sd15")
    pairs, stats, scorer = run(policy, ["a cat", "a dog"], cfg(inner_steps=1))
    # One solo step after each branch: segments start at 831, 499, 167; each carries 2 transitions;
    # only the first shares x_t.
    assert stats.segments == 2 * 3
    assert len(pairs) == 2 * 3 * 2
    assert [c["t"][0] for c in scorer.calls] == [499, 167, 0]
    for p in range(2):
        for start, second in [(831, 665), (499, 333), (167, 1)]:
            a, b = by_prompt_t(pairs, p, start), by_prompt_t(pairs, p, second)
            assert bool(pairs.shared[a]) and not bool(pairs.shared[b])
            assert torch.equal(pairs.x_t_w[a], pairs.x_t_l[a])
            assert not torch.equal(pairs.x_t_w[b], pairs.x_t_l[b])
            # The sub-trajectories are continuous: the second transition starts where the first ended.
            assert torch.equal(pairs.x_t_w[b], pairs.x_prev_w[a]) and torch.equal(pairs.x_t_l[b], pairs.x_prev_l[a])
            # Both transitions carry the segment end's label.
            assert pairs.score_w[a] == pairs.score_w[b] and pairs.score_l[a] == pairs.score_l[b]
            assert pairs.prev_t[a] == second
    # A segment longer than the remaining steps is cut at the end: 831 -> 167 (4), then 167 -> 0 (2).
    pairs4, stats4, scorer4 = run(policy, ["a cat"], cfg(inner_steps=3))
    assert stats4.segments == 2 and len(pairs4) == 6
    assert [c["t"][0] for c in scorer4.calls] == [167, 0]
    assert sorted(pairs4.t[pairs4.shared].tolist()) == [167, 831]


def test_threshold_filters_pairs(make_policy):
    policy = make_policy("sd15")
    prompts = ["a cat", "a dog"]
    # Scale brightness so that the gaps give a spread of tanh(gap / 2) values.
    pairs0, stats0, sc0 = run(policy, prompts, cfg(k=3), scorer=RecordingScorer(scale=100.0))
    margins = torch.cat([torch.tanh((c["scores"].view(2, 3).amax(1) - c["scores"].view(2, 3).amin(1)) / 2) for c in sc0.calls])
    assert len(pairs0) == 12 and stats0.keep_fraction == 1.0
    # A threshold halfway between two observed margins (not on one: float ties would be fragile).
    srt = margins.sort().values
    thr = float(srt[5] + srt[6]) / 2
    expected = int((margins > thr).sum())
    assert 0 < expected < 12
    pairs, stats, _ = run(policy, prompts, cfg(k=3, threshold=thr), scorer=RecordingScorer(scale=100.0))
    # The threshold drops pairs but does not change the trajectories (same streams, same candidates).
    assert len(pairs) == expected == stats.pairs_kept
    assert stats.keep_fraction == pytest.approx(expected / 12)
    assert bool((torch.tanh((pairs.score_w - pairs.score_l) / 2) > thr).all())
    # A threshold above every margin keeps nothing.
    none, stats_n, _ = run(policy, prompts, cfg(k=3, threshold=min(float(margins.max()) + 1e-3, 0.999)),
                           scorer=RecordingScorer(scale=100.0))
    assert len(none) == 0 and stats_n.pairs_kept == 0 and stats_n.keep_fraction == 0.0


@pytest.mark.parametrize("mode", ["win", "lose"])
def test_resampler_win_lose_continue_from_chosen_candidate(make_policy, mode):
    policy = make_policy("sd15")
    pairs, stats, _ = run(policy, ["a cat", "a dog"], cfg(k=3, resampler=mode))
    assert len(pairs) == 12
    for p in range(2):
        for t, t_next in zip(T6[:-1], T6[1:]):
            a, b = by_prompt_t(pairs, p, t), by_prompt_t(pairs, p, t_next)
            chosen = pairs.x_prev_w[a] if mode == "win" else pairs.x_prev_l[a]
            assert torch.equal(pairs.x_t_w[b], chosen)
        last = by_prompt_t(pairs, p, 1)
        chosen = pairs.x_prev_w[last] if mode == "win" else pairs.x_prev_l[last]
        assert torch.equal(stats.final_latents[p], chosen)


def test_resampler_random_picks_candidates(make_policy):
    policy = make_policy("sd15")
    prompts = ["a cat", "a dog", "a tree", "a car"]
    pairs, _, _ = run(policy, prompts, cfg(k=2, resampler="random"))
    picks = []
    for p in range(4):
        for t, t_next in zip(T6[:-1], T6[1:]):
            a, b = by_prompt_t(pairs, p, t), by_prompt_t(pairs, p, t_next)
            is_w = torch.equal(pairs.x_t_w[b], pairs.x_prev_w[a])
            is_l = torch.equal(pairs.x_t_w[b], pairs.x_prev_l[a])
            assert is_w != is_l  # with k = 2 the next state is exactly one of the two candidates
            picks.append(is_w)
    # Uniform choice: over 20 decisions both kinds occur (fixed seeds, so this is deterministic).
    assert 0 < sum(picks) < len(picks)


def test_resampler_none_gives_independent_trajectories(make_policy):
    policy = make_policy("sd15")
    pairs, stats, scorer = run(policy, ["a cat", "a dog"], cfg(k=2, resampler="none"))
    assert len(pairs) == 12
    assert stats.final_latents.shape[0] == 2 * 2  # k trajectories per prompt survive
    for p in range(2):
        first = by_prompt_t(pairs, p, T6[0])
        assert bool(pairs.shared[first]) and torch.equal(pairs.x_t_w[first], pairs.x_t_l[first])
        for t, t_next in zip(T6[:-1], T6[1:]):
            a, b = by_prompt_t(pairs, p, t), by_prompt_t(pairs, p, t_next)
            assert not bool(pairs.shared[b])
            assert not torch.equal(pairs.x_t_w[b], pairs.x_t_l[b])
            # The two trajectories continue: {x_t_w, x_t_l} at t_next are the two states reached at t.
            nw, nl, bw, bl = pairs.x_t_w[b], pairs.x_t_l[b], pairs.x_prev_w[a], pairs.x_prev_l[a]
            assert (torch.equal(nw, bw) and torch.equal(nl, bl)) or (torch.equal(nw, bl) and torch.equal(nl, bw))


def test_pair_choice_random(make_policy):
    policy = make_policy("sd15")
    pairs, _, scorer = run(policy, ["a cat", "a dog"], cfg(k=4, pair="random"))
    assert bool((pairs.score_w >= pairs.score_l).all())
    assert not torch.equal(pairs.x_prev_w, pairs.x_prev_l)
    # Not always the best/worst pair.
    best = torch.cat([c["scores"].view(2, 4).amax(1) for c in scorer.calls])
    assert not torch.equal(pairs.score_w, best)


def test_seeded_streams_reproduce_the_run(make_policy):
    policy = make_policy("sd15")
    scfg = cfg(k=3, inner_steps=1, resampler="random")
    p1, s1, _ = run(policy, ["a cat", "a dog"], scfg, seeds=[7, 8])
    p2, s2, _ = run(policy, ["a cat", "a dog"], scfg, seeds=[7, 8])
    for f in p1.__dataclass_fields__:
        assert torch.equal(getattr(p1, f), getattr(p2, f)), f
    assert torch.equal(s1.final_latents, s2.final_latents) and s1.unet_evals == s2.unet_evals
    p3, _, _ = run(policy, ["a cat", "a dog"], scfg, seeds=[7, 9])
    # Prompt 0 keeps its stream (same samples), prompt 1 does not.
    m0, m1 = p1.prompt_index == 0, p1.prompt_index == 1
    torch.testing.assert_close(p3.x_prev_w[p3.prompt_index == 0], p1.x_prev_w[m0])
    assert not torch.allclose(p3.x_prev_w[p3.prompt_index == 1], p1.x_prev_w[m1])
    # A prompt's samples do not depend on the other prompts in its batch.
    solo, _, _ = run(policy, ["a cat"], scfg, seeds=[7])
    torch.testing.assert_close(solo.x_prev_w, p1.x_prev_w[m0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one RNG stream per prompt"):
        run(policy, ["a cat", "a dog"], scfg, seeds=[7])


def _count_guided(policy, monkeypatch):
    calls = []
    orig = policy.guided_eps

    def wrapped(x, t, cond, guidance_scale):
        out = orig(x, t, cond, guidance_scale)
        calls.append({"n": x.shape[0], "t": int(torch.as_tensor(t).reshape(-1)[0]), "out": out})
        return out

    monkeypatch.setattr(policy, "guided_eps", wrapped)
    return calls


@pytest.mark.parametrize(
    "kw,P,expected",
    [
        # P=2, k=3, 4 steps, kappa 1000, j=1: first step 2 (the two x_T); each of the 3 segments that
        # does not end the trajectory scores its end with eps at the next t: 3 * (2*3) = 18; the chosen
        # candidate's prediction is reused for its own step, so nothing else. Total 20.
        (dict(num_steps=4, k=3), 2, 20),
        # 6 steps, kappa 500, P=2, k=3: one plain step (2), the first branch (2), then 4 non-final
        # segment ends of 6 candidates (24). Total 28.
        (dict(num_steps=6, k=3, kappa=500), 2, 28),
        # 6 steps, k=2, one solo step per segment, P=2: segment starts 0, 2, 4. Start: 2. Each segment has one solo inner step
        # (4 candidates each: 3 * 4 = 12) and the two non-final segment ends (2 * 4 = 8). Total 22.
        (dict(num_steps=6, k=2, inner_steps=1), 2, 22),
        # resampler none, 4 steps, k=2, P=1: 1 at x_T, then the 3 non-final segment ends of 2 = 6. Total 7.
        (dict(num_steps=4, k=2, resampler="none"), 1, 7),
        # The first case with a 2-step look-ahead: after the segment ending at step 1 the continuation
        # 1 -> 2 -> 4 reuses the prediction at step 1 and needs one more call at step 2 (6); from step 2,
        # 2 -> 3 -> 4 needs one at step 3 (6); from step 3 one step, 3 -> 4, needs none. Total 20 + 12.
        (dict(num_steps=4, k=3, lookahead=2), 2, 32),
    ],
)
def test_unet_evaluation_count(make_policy, monkeypatch, kw, P, expected):
    policy = make_policy("sd15")
    calls = _count_guided(policy, monkeypatch)
    _, stats, _ = run(policy, ["a cat", "a dog"][:P], cfg(**kw))
    assert stats.unet_evals == expected
    assert sum(c["n"] for c in calls) == expected


def test_chosen_candidate_prediction_is_reused(make_policy, monkeypatch):
    policy = make_policy("sd15")
    P, k = 2, 3
    calls = _count_guided(policy, monkeypatch)
    steps = []
    orig_step = policy.process.step

    def rec_step(x, eps, t, prev_t, eta, noise=None, prev_sample=None):
        steps.append({"x": x.clone(), "eps": eps.clone(), "t": t.clone()})
        return orig_step(x, eps, t, prev_t, eta, noise=noise, prev_sample=prev_sample)

    monkeypatch.setattr(policy.process, "step", rec_step)
    cond = policy.encode_prompts(["a cat", "a dog"])
    _, stats = spo_sample(policy, cond, RecordingScorer(), cfg(k=k, resampler="random"), RowRNG([3, 4]))
    # Only the very first step evaluates the P parents; later parents reuse the prediction made when
    # their candidate was scored (batches of P*k).
    assert [c["n"] for c in calls] == [P] + [P * k] * 5
    assert len(steps) == 6
    # Every step used the policy's guided prediction at its own x_t (so the cache held the right
    # candidate's prediction): recompute it fresh for each recorded step.
    monkeypatch.setattr(policy, "guided_eps", type(policy).guided_eps.__get__(policy))
    for s in steps:
        n = s["x"].shape[0]
        rows = torch.arange(P).repeat_interleave(n // P)
        fresh = policy.guided_eps(s["x"], s["t"], cond.select(rows), 5.0)
        torch.testing.assert_close(s["eps"], fresh, rtol=1e-4, atol=1e-5)
    # The check has power: predictions at different candidates of one prompt differ far more than that.
    ends = calls[1]["out"].view(P, k, -1)
    assert (ends[:, 0] - ends[:, 1]).abs().max() > 1e-2


# ------------------------------------------------------------------------------ look-ahead step scorer


def test_deterministic_x0_over_the_whole_grid_is_eta0_sampling(make_policy):
    policy = make_policy("sd15")
    num_steps, seed = 6, 11
    plain = sample_images(policy, ["a cat"], [seed], num_steps=num_steps, eta=0.0, return_latents=True)
    x_T = torch.randn((num_steps + 1, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))[:1]
    ts, prevs = policy.process.grid(num_steps)
    ahead = deterministic_x0(policy, x_T, 0, ts, prevs, policy.encode_prompts(["a cat"]), num_steps, 5.0)
    torch.testing.assert_close(ahead, plain, rtol=1e-5, atol=1e-5)
    # Fewer steps than the grid has left: a different (coarser) x_0, still one call per step.
    coarse = deterministic_x0(policy, x_T, 0, ts, prevs, policy.encode_prompts(["a cat"]), 2, 5.0)
    assert (coarse - plain).abs().max() > 1e-3


def test_lookahead_scores_each_candidate_by_its_deterministic_continuation(make_policy):
    policy = make_policy("sd15")
    prompts, n = ["a cat", "a dog"], 2
    scfg = cfg(k=3, lookahead=n)
    pairs, _, scorer = run(policy, prompts, scfg)
    # Every candidate is scored as a clean image (t = 0), the look-ahead's own time.
    assert all(t == 0 for c in scorer.calls for t in c["t"])
    # The winner's score is the brightness of its continuation from the candidate it labels.
    ts, prevs = policy.process.grid(scfg.num_steps)
    cond = policy.encode_prompts(prompts)
    for r in range(len(pairs)):
        end = int(pairs.order[r]) + 1
        if end == scfg.num_steps:  # the last step's candidates are x_0 themselves
            x0 = pairs.x_prev_w[r:r + 1]
        else:
            x0 = deterministic_x0(policy, pairs.x_prev_w[r:r + 1], end, ts, prevs,
                                  cond.select(pairs.prompt_index[r:r + 1]), n, scfg.guidance_scale)
        expected = BrightnessScorer().score(policy.decode(x0), prompts[:1])
        torch.testing.assert_close(pairs.score_w[r:r + 1], expected.float(), rtol=1e-4, atol=1e-5)
    # The look-ahead draws no noise: with k = 2 (win and lose are all the candidates) the first
    # branch offers the same two candidates per prompt as the plain sampler, in whatever order.
    ahead, _, _ = run(policy, prompts, cfg(k=2, lookahead=n))
    plain, _, _ = run(policy, prompts, cfg(k=2))
    for p in range(len(prompts)):
        a, b = by_prompt_t(ahead, p, T6[0]), by_prompt_t(plain, p, T6[0])
        got = sorted([ahead.x_prev_w[a], ahead.x_prev_l[a]], key=lambda x: float(x.sum()))
        ref = sorted([plain.x_prev_w[b], plain.x_prev_l[b]], key=lambda x: float(x.sum()))
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y)
