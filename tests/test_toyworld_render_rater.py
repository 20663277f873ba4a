"""Renderer placement / determinism and the ground-truth rater's rankings and labels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from spo_core.toyworld.config import LabelConfig, WorldConfig
from spo_core.toyworld.grammar import parse, split_prompts
from spo_core.toyworld.rater import COMPONENTS, rate, rate_prompts, simulate_labels
from spo_core.toyworld.render import render, render_batch, render_prompts

WORLD = WorldConfig()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_render_is_deterministic_and_in_range():
    scene = parse("a medium purple triangle on a gray background")
    a, b = render(scene, 32, rng(3)), render(scene, 32, rng(3))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, render(scene, 32, rng(4)))  # jitter differs with the seed
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_render_places_shape_and_colours():
    scene = parse("a large red square at the top left on a white background")
    img = render(scene, 32, rng(0))
    red, white = torch.tensor(WORLD.colours["red"]), torch.tensor(WORLD.backgrounds["white"])
    assert (img[:, 8, 8] - red).abs().max() < 0.1  # centre of the top-left cell (0.25 * 32)
    for y, x in [(24, 24), (8, 28), (30, 2)]:
        assert (img[:, y, x] - white).abs().max() < 0.1
    mask = (img - red.view(3, 1, 1)).norm(dim=0) < 0.2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert abs(xs.float().mean() + 0.5 - 8) < 1.5 and abs(ys.float().mean() + 0.5 - 8) < 1.5
    # Anti-aliasing: some edge pixels are mixtures of the two colours.
    mixed = ((img - red.view(3, 1, 1)).norm(dim=0) > 0.2) & ((img - white.view(3, 1, 1)).norm(dim=0) > 0.2)
    assert 0 < int(mixed.sum()) < 60


def test_sizes_and_shapes_differ():
    area = {}
    for size in ("small", "large"):
        img = render(parse(f"a {size} blue circle in the centre on a white background"), 32, rng(0))
        area[size] = float(((img - torch.tensor(WORLD.colours["blue"]).view(3, 1, 1)).norm(dim=0) < 0.3).sum())
    assert area["large"] > 3 * area["small"]
    masks = [render(parse(f"a large green {s} in the centre on a black background"), 32, rng(0))[1] > 0.4
             for s in WORLD.shapes]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert int((masks[i] ^ masks[j]).sum()) > 10  # every pair of shapes differs visibly


def test_render_at_16_pixels():
    img = render_prompts(["a small yellow diamond at the bottom right on a brown background"], 16, 0)
    assert img.shape == (1, 3, 16, 16)


@pytest.fixture(scope="module")
def batch():
    prompts = split_prompts(WORLD).train[:48]
    scenes = [parse(p) for p in prompts]
    return prompts, scenes, render_batch(scenes, 32, rng(0), WORLD)


def test_rater_scores_true_renders_high(batch):
    prompts, scenes, images = batch
    out = rate(images, scenes, WORLD)
    assert set(out) == {"reward", "alignment", "quality", *COMPONENTS}
    for v in out.values():
        assert v.shape == (len(scenes),) and float(v.min()) >= 0.0 and float(v.max()) <= 1.0 + 1e-6
    assert float(out["reward"].mean()) > 0.95 and float(out["reward"].min()) > 0.85
    same = rate_prompts(images, prompts, WORLD)["reward"]
    assert torch.allclose(same, out["reward"])
    upscaled = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert torch.allclose(rate(upscaled, scenes, WORLD)["reward"], out["reward"], atol=1e-5)


@pytest.mark.parametrize("field,component", [("colour", "colour"), ("shape", "shape"), ("background", "background")])
def test_rater_prefers_the_true_render_over_a_wrong_attribute(batch, field, component):
    _, scenes, images = batch
    options = {"colour": list(WORLD.colours), "shape": list(WORLD.shapes), "background": list(WORLD.backgrounds)}[field]
    wrong = [replace(s, **{field: options[(options.index(getattr(s, field)) + 1) % len(options)]}) for s in scenes]
    bad = rate(render_batch(wrong, 32, rng(0), WORLD), scenes, WORLD)
    good = rate(images, scenes, WORLD)
    assert bool((good["reward"] > bad["reward"]).all())
    assert float(bad[component].mean()) < 0.2 < 0.9 < float(good[component].mean())


def test_rater_prefers_the_true_render_over_noise(batch):
    _, scenes, images = batch
    good = rate(images, scenes, WORLD)
    noise = rate(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)), scenes, WORLD)
    assert bool((good["reward"] > noise["reward"] + 0.3).all())
    noisy = (images + 0.15 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert float(rate(noisy, scenes, WORLD)["quality"].mean()) < float(good["quality"].mean()) - 0.2


def test_position_counts_only_when_named():
    free = parse("a large pink circle on a white background")
    placed = parse("a large pink circle at the bottom right on a white background")
    img = render(replace(placed, position="top left"), 32, rng(0)).unsqueeze(0)
    assert float(rate(img, [free], WORLD)["position"]) == pytest.approx(1.0)
    assert float(rate(img, [placed], WORLD)["position"]) < 0.05


def test_labels_follow_bradley_terry_with_ties():
    n = 20000
    gen = torch.Generator().manual_seed(0)
    cfg = LabelConfig(temperature=0.05, tie_margin=0.01)
    r0 = torch.full((n,), 0.55)
    l0, l1 = simulate_labels(r0, torch.full((n,), 0.5), cfg, gen)
    assert torch.equal(l0 + l1, torch.ones(n))
    assert float(l0.mean()) == pytest.approx(float(torch.sigmoid(torch.tensor(0.05 / 0.05))), abs=0.015)
    tied = simulate_labels(r0, r0 + 0.005, cfg, gen)[0]
    assert bool((tied == 0.5).all())
    mixed = torch.rand(n, generator=gen)
    lab = simulate_labels(mixed, torch.rand(n, generator=gen), LabelConfig(temperature=1e-4, tie_margin=0.0), gen)[0]
    assert set(lab.unique().tolist()) <= {0.0, 1.0}
    again = simulate_labels(r0, torch.full((n,), 0.5), cfg, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, l0)  # deterministic under the generator's seed


def test_reward_is_invariant_under_left_right_mirroring(batch):
    # The toy PickScore's augmentation relies on it: mirrored pairs keep their labels.
    from spo_core.toyworld.toy_pickscore import mirror

    prompts, _, images = batch
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    flipped, captions = mirror(noisy, prompts)
    assert any("left" in p for p in prompts) and captions != prompts
    a, b = rate_prompts(noisy, prompts, WORLD), rate_prompts(flipped, captions, WORLD)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_an_empty_background_scores_below_an_imperfect_object(batch):
    """With ``quality_needs_object`` quality is earned only by a picture of something; without it
    the bare prompted background (alignment 0.25, quality 1) scores 0.475."""
    _, scenes, images = batch
    gated = WORLD.model_copy(update={"rater": WORLD.rater.model_copy(update={"quality_needs_object": True})})
    blank = torch.stack([torch.tensor(WORLD.backgrounds[s.background]).view(3, 1, 1).expand(3, 32, 32)
                         for s in scenes])
    shapes = list(WORLD.shapes)
    wrong = [replace(s, shape=shapes[(shapes.index(s.shape) + 1) % len(shapes)]) for s in scenes]
    wrong_images = render_batch(wrong, 32, rng(0), WORLD)
    empty, imperfect = rate(blank, scenes, gated), rate(wrong_images, scenes, gated)
    assert float(empty["quality"].max()) == pytest.approx(0.0, abs=1e-6)
    assert float(empty["reward"].max()) == pytest.approx(0.7 * 0.25, abs=1e-3)
    assert bool((imperfect["reward"] > empty["reward"] + 0.2).all())
    assert torch.allclose(imperfect["reward"], rate(wrong_images, scenes, WORLD)["reward"], atol=0.05)
    assert float(rate(blank, scenes, WORLD)["reward"].mean()) == pytest.approx(0.475, abs=1e-3)
    with pytest.raises(ValueError, match="quality_needs_object"):
        WorldConfig.model_validate({"rater": {"quality_needs_object": "sometimes"}})
