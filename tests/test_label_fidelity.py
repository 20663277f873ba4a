"""Step-label fidelity: the pair-order statistics in closed form, and the branching rollout."""

from __future__ import annotations

import math

import pytest
import torch

from spo_core.config import ModelConfig
from spo_core.label_fidelity import StepFidelity, mean_se, order_agreement, paired_gap_difference, row_gaps, step_label_fidelity
from spo_core.models.diffusion import load_policy
from spo_core.scorers.base import build_scorer


def test_order_agreement_and_gap_in_closed_form():
    final = torch.tensor([[0.1, 0.4, 0.2, 0.9], [0.5, 0.5, 0.0, 1.0]])
    assert order_agreement(final, final) == (1.0, 6 + 5)  # one tied final pair in row 2 is left out
    assert order_agreement(-final, final)[0] == 0.0
    flat = torch.zeros_like(final)
    assert order_agreement(flat, final)[0] == 0.5  # step ties count half
    # Row 1: best by step = index 3 (0.9), worst = index 0 (0.1); row 2: best 3 (1.0), worst 2 (0.0).
    torch.testing.assert_close(row_gaps(final, final), torch.tensor([0.8, 1.0], dtype=torch.float64))
    mean, se = mean_se(row_gaps(final, final))
    assert mean == pytest.approx((0.8 + 1.0) / 2) and se == pytest.approx(0.1)  # std 0.1414 over 2 rows
    assert mean_se(row_gaps(-final, final))[0] == pytest.approx(-0.9)
    # Paired over prompts: a - b per prompt, then mean and SE; rows of other steps do not pair.
    a = StepFidelity(4, 701.0, "a", 0.5, 0.0, 0.5, 3, (0.3, 0.5, 0.7))
    b = StepFidelity(4, 701.0, "b", 0.2, 0.0, 0.5, 3, (0.1, 0.4, 0.1))
    d_mean, d_se = paired_gap_difference(a, b)
    assert d_mean == pytest.approx(0.3) and d_se == pytest.approx(float(torch.tensor([0.2, 0.1, 0.6]).std()) / math.sqrt(3))
    with pytest.raises(ValueError, match="not paired"):
        paired_gap_difference(a, StepFidelity(7, 551.0, "b", 0.2, 0.0, 0.5, 3, (0.1, 0.4, 0.1)))
    assert math.isnan(order_agreement(torch.zeros(1, 2), torch.ones(1, 2))[0])


def test_step_label_fidelity_on_the_tiny_model():
    policy = load_policy(ModelConfig(pretrained="tiny:sd15", resolution=16))
    final = build_scorer("brightness")
    prompts, seeds = ["a red cat", "a blue dog", "a tree"], [0, 1, 2]

    def run():
        return step_label_fidelity(policy, prompts, seeds, {"bright": final, "dark": _Negated(final)}, final,
                                   steps=[0, 2], num_steps=3, k=3)

    rows = run()
    assert [(r.step, r.scorer) for r in rows] == [(s, n) for s in (0, 2) for n in ("bright", "dark", "ceiling")]
    by = {(r.step, r.scorer): r for r in rows}
    for s in (0, 2):
        ceiling = by[(s, "ceiling")]
        assert ceiling.agree == 1.0 and ceiling.gap > 0 and ceiling.n_prompts == 3
        assert by[(s, "bright")].gap <= ceiling.gap + 1e-7 and by[(s, "dark")].gap <= ceiling.gap + 1e-7
    # After the last step the candidates are scored at x_0, so the final scorer's own labels reach the ceiling.
    assert by[(2, "bright")].gap == pytest.approx(by[(2, "ceiling")].gap) and by[(2, "bright")].agree == 1.0
    assert by[(2, "dark")].gap == pytest.approx(-by[(2, "ceiling")].gap) and by[(2, "dark")].agree == 0.0
    assert by[(2, "bright")].t_score == 0 and by[(0, "bright")].t_score > by[(2, "bright")].t_score
    assert [r.gap for r in run()] == [r.gap for r in rows]  # deterministic under the seeds
    assert all(len(r.per_prompt) == 3 and sum(r.per_prompt) / 3 == pytest.approx(r.gap) for r in rows)
    # "dark" ranks exactly against "bright": the paired difference is twice the ceiling.
    assert paired_gap_difference(by[(2, "bright")], by[(2, "dark")])[0] == pytest.approx(2 * by[(2, "ceiling")].gap)
    # A deterministic look-ahead adds a row per step scorer and draws no noise, so the other rows do not
    # move; after the last step there is nothing left to look ahead, and it ranks as the final scorer does.
    ahead = step_label_fidelity(policy, prompts, seeds, {"bright": final}, final, steps=[0, 2], num_steps=3, k=3,
                                lookahead=2)
    by_ahead = {(r.step, r.scorer): r for r in ahead}
    assert [r.scorer for r in ahead if r.step == 0] == ["bright", "bright@la2", "ceiling"]
    assert by_ahead[(0, "bright")].gap == by[(0, "bright")].gap and by_ahead[(0, "ceiling")].gap == by[(0, "ceiling")].gap
    assert by_ahead[(2, "bright@la2")].gap == pytest.approx(by[(2, "ceiling")].gap)
    assert by_ahead[(0, "bright@la2")].gap <= by[(0, "ceiling")].gap + 1e-7
    with pytest.raises(ValueError, match="steps"):
        step_label_fidelity(policy, prompts, seeds, {}, final, steps=[3], num_steps=3, k=2)


class _Negated:
    def __init__(self, scorer):
        self.scorer = scorer

    def score(self, images, prompts, timesteps=None):
        return -self.scorer.score(images, prompts)
