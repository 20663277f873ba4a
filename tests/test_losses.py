"""Tests for spo_core.losses against hand-computed numbers (REFERENCE.md sections 2-4)."""

from __future__ import annotations

import math

import pytest
import torch

from spo_core.losses import (
    clamped_ratio_dpo_loss,
    diffusion_dpo_loss,
    normalize_advantages,
    ppo_clip_loss,
    preference_loss,
)


def softplus(x: float) -> float:
    # -log sigmoid(z) = log(1 + exp(-z)) = softplus(-z)
    return math.log1p(math.exp(x))


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# ------------------------------------------------------------------ SPO / D3PO clamped ratio


def test_clamped_ratio_is_log2_when_policy_equals_reference():
    lp = t(-1.3, 0.2, 5.0)
    loss, info = clamped_ratio_dpo_loss(lp, lp - 0.7, lp, lp - 0.7)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.equal(info["ratio_w"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(info["clipped"], torch.zeros(3, dtype=torch.float64))


def test_clamped_ratio_hand_computed_inside_clamp():
    # log r_w = 0.05 (r = 1.051 < 1.1), log r_l = -0.02 (r = 0.980 > 0.9): no clamp.
    loss, info = clamped_ratio_dpo_loss(t(0.05), t(-0.02), t(0.0), t(0.0), beta=10.0, eps=0.1)
    margin = 10 * (0.05 + 0.02)  # = 0.7
    assert info["margin"].item() == pytest.approx(margin, abs=1e-12)
    assert loss.item() == pytest.approx(softplus(-margin), abs=1e-12)  # log(1 + e^-0.7) = 0.40319
    assert loss.item() == pytest.approx(0.4031860, abs=1e-6)
    assert info["clipped"].item() == 0.0


def test_clamped_ratio_hand_computed_clamped():
    # log r_w = 0.5 -> r = 1.6487, clamped to 1.1; log r_l = -0.5 -> r = 0.6065, clamped to 0.9.
    loss, info = clamped_ratio_dpo_loss(t(1.5), t(0.5), t(1.0), t(1.0), beta=10.0, eps=0.1)
    margin = 10 * (math.log(1.1) - math.log(0.9))  # = 2.00671
    assert info["margin"].item() == pytest.approx(margin, abs=1e-12)
    assert loss.item() == pytest.approx(softplus(-margin), abs=1e-12)  # = 0.12693
    assert info["ratio_w"].item() == pytest.approx(math.exp(0.5))
    assert info["clipped"].item() == 1.0
    # Only one side clamped: half the pair counts as clipped.
    loss2, info2 = clamped_ratio_dpo_loss(t(0.5), t(-0.03), t(0.0), t(0.0), beta=2.0, eps=0.2)
    margin2 = 2.0 * (math.log(1.2) + 0.03)
    assert loss2.item() == pytest.approx(softplus(-margin2), abs=1e-12)
    assert info2["clipped"].item() == 0.5


def test_clamped_ratio_mean_over_pairs_and_gradients():
    lw = t(0.05, 0.5).requires_grad_(True)
    ll = t(-0.02, 0.0).requires_grad_(True)
    loss, _ = clamped_ratio_dpo_loss(lw, ll, t(0.0, 0.0), t(0.0, 0.0), beta=10.0, eps=0.1)
    expected = 0.5 * (softplus(-10 * 0.07) + softplus(-10 * math.log(1.1)))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # Unclamped pair: dL/dlogp_w = -beta * sigmoid(-m) / 2 (the 1/2 from the mean); clamped pair: 0.
    sig = 1 / (1 + math.exp(0.7))
    assert lw.grad[0].item() == pytest.approx(-10 * sig / 2, abs=1e-12)
    assert ll.grad[0].item() == pytest.approx(10 * sig / 2, abs=1e-12)
    assert lw.grad[1].item() == 0.0
    # r_l = 1 sits inside the clamp, so the second pair's lose side still gets a gradient.
    assert ll.grad[1].item() == pytest.approx(10 / (1 + math.exp(10 * math.log(1.1))) / 2, abs=1e-12)


# ------------------------------------------------------------------ Diffusion-DPO


def test_diffusion_dpo_hand_computed():
    # model_diff = 0.3 - 0.5 = -0.2, ref_diff = 0.4 - 0.4 = 0; inside = -0.5 * 10 * (-0.2) = 1.
    loss, info = diffusion_dpo_loss(t(0.3), t(0.5), t(0.4), t(0.4), beta=10.0)
    assert loss.item() == pytest.approx(softplus(-1.0), abs=1e-12)  # 0.31326
    assert info["implicit_acc"].item() == 1.0
    assert info["model_diff"].item() == pytest.approx(-0.2)
    # The default beta (5000) is -log sigmoid(2500 * (ref_diff - model_diff)).
    loss2, info2 = diffusion_dpo_loss(t(0.1000), t(0.1002), t(0.1001), t(0.1000))
    inside = 2500 * ((0.1001 - 0.1000) - (0.1000 - 0.1002))  # = 0.75
    assert loss2.item() == pytest.approx(softplus(-inside), abs=1e-9)
    # Model equal to reference: log 2, and implicit accuracy 0 (inside == 0 is not > 0).
    loss3, info3 = diffusion_dpo_loss(t(0.2, 0.7), t(0.3, 0.1), t(0.2, 0.7), t(0.3, 0.1))
    assert loss3.item() == pytest.approx(math.log(2), abs=1e-12)
    assert info3["implicit_acc"].tolist() == [0.0, 0.0]
    # A model that moves the wrong way gets a loss above log 2.
    loss4, info4 = diffusion_dpo_loss(t(0.5), t(0.3), t(0.4), t(0.4), beta=10.0)
    assert loss4.item() == pytest.approx(softplus(1.0), abs=1e-12)
    assert info4["implicit_acc"].item() == 0.0


# ------------------------------------------------------------------ DDPO / PPO


def test_ppo_clip_hand_computed():
    logp_old = t(0.0, 0.0, 0.0, 0.0)
    logp = t(math.log(1.5), math.log(0.5), math.log(1.05), 0.0)
    adv = t(2.0, -1.0, 10.0, -3.0)
    loss, info = ppo_clip_loss(logp, logp_old, adv, clip_range=0.2, adv_clip=5.0)
    # row 0: max(-2*1.5, -2*1.2) = -2.4;  row 1: max(1*0.5, 1*0.8) = 0.8
    # row 2: A clipped to 5: max(-5*1.05, -5*1.05) = -5.25;  row 3: ratio 1: 3
    per = [-2.4, 0.8, -5.25, 3.0]
    assert loss.item() == pytest.approx(sum(per) / 4, abs=1e-12)
    assert info["ratio"].tolist() == pytest.approx([1.5, 0.5, 1.05, 1.0])
    assert info["clipfrac"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_ppo_clip_default_range_and_gradient():
    # DDPO's clip range 1e-4: a ratio of 1.01 with positive advantage is clipped -> zero gradient.
    logp = t(math.log(1.01), 0.0).requires_grad_(True)
    loss, _ = ppo_clip_loss(logp, t(0.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((-(1 + 1e-4) - 1.0) / 2, abs=1e-12)
    loss.backward()
    assert logp.grad[0].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(-0.5, abs=1e-12)  # d(-A*rho)/dlogp = -A*rho, / 2


# ------------------------------------------------------------------ advantages


def test_normalize_advantages_hand_computed():
    rewards = t(1.0, 3.0, 2.0, 4.0, 6.0, 7.0)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    adv = normalize_advantages(rewards, groups)
    s1 = math.sqrt(8 / 3)  # population std of (2, 4, 6)
    expected = [-1.0, 1.0, -2 / s1, 0.0, 2 / s1, 0.0]  # a one-sample group gets 0
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv.dtype == torch.float32
    # Constant rewards within a group: zero advantage, not NaN.
    adv2 = normalize_advantages(t(5.0, 5.0, 5.0), torch.tensor([4, 4, 4]))
    assert adv2.tolist() == [0.0, 0.0, 0.0]


def test_normalize_advantages_interleaved_groups():
    adv = normalize_advantages(t(10.0, 0.0, 20.0, 2.0), torch.tensor([7, 3, 7, 3]))
    assert adv.tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0], abs=1e-6)


# ------------------------------------------------------------------ PickScore preference loss


def test_preference_loss_hand_computed():
    # label (1, 0), scores (2, 0): CE = -log softmax(2, 0)[0] = log(1 + e^-2) = 0.12693
    loss = preference_loss(t(2.0), t(0.0), t(1.0), t(0.0))
    assert loss.item() == pytest.approx(softplus(-2.0), abs=1e-6)
    # label (0, 1): CE = log(1 + e^2) = 2.12693
    loss = preference_loss(t(2.0), t(0.0), t(0.0), t(1.0))
    assert loss.item() == pytest.approx(softplus(2.0), abs=1e-6)


def test_preference_loss_ties():
    # A tie predicted as a tie (equal scores) costs exactly 0.
    loss = preference_loss(t(3.7, -1.0), t(3.7, -1.0), t(0.5, 0.5), t(0.5, 0.5))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # A tie with scores (1, 0): 0.5*CE0 + 0.5*CE1 + log 0.5
    lp0, lp1 = -softplus(-1.0), -softplus(1.0)
    expected = -(0.5 * lp0 + 0.5 * lp1) + math.log(0.5)
    loss = preference_loss(t(1.0), t(0.0), t(0.5), t(0.5))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() > 0
    # A batch mixing a tie and a labelled pair averages the two.
    loss = preference_loss(t(0.0, 2.0), t(0.0, 0.0), t(0.5, 1.0), t(0.5, 0.0))
    assert loss.item() == pytest.approx((0.0 + softplus(-2.0)) / 2, abs=1e-6)
