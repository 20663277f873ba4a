"""Flow-GRPO's pure parts against closed forms: group advantages (own or global std), the KL of two
Gaussians with one std, the trained steps."""

from __future__ import annotations

import torch

from spo_core.config import RolloutConfig
from spo_core.methods.grpo import FlowGRPOMethod, gaussian_mean_kl, group_advantages


def test_group_advantages_centre_each_group_and_divide_by_its_std_or_the_global_one():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 12.0, 14.0])
    g = torch.tensor([0, 0, 1, 1, 1, 1])
    own = group_advantages(r, g)
    torch.testing.assert_close(own[:2], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))
    s1 = torch.tensor([10.0, 10.0, 12.0, 14.0]).std(unbiased=False)
    torch.testing.assert_close(own[2:], (torch.tensor([10.0, 10.0, 12.0, 14.0]) - 11.5) / (s1 + 1e-4))
    glob = group_advantages(r, g, global_std=2.0)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 1.0, -1.5, -1.5, 0.5, 2.5]) / (2.0 + 1e-4))
    assert torch.equal(group_advantages(torch.tensor([5.0]), torch.tensor([0])), torch.zeros(1))  # alone: 0


def test_the_kl_penalty_is_the_gaussian_kl_per_dimension():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0])
    ours = gaussian_mean_kl(mean, ref, std)
    p = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1).expand_as(mean))
    q = torch.distributions.Normal(ref, std.view(-1, 1, 1, 1).expand_as(ref))
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)))


def test_the_first_fraction_of_the_steps_is_trained():
    m = FlowGRPOMethod(RolloutConfig(num_steps=10), scorer=None)
    assert m.trained_steps() == 9  # int(10 x 0.99), as the published code
    assert FlowGRPOMethod(RolloutConfig(num_steps=10), None, timestep_fraction=0.01).trained_steps() == 1
