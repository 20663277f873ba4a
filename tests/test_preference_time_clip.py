"""Time-conditioned CLIP (SPO's step-aware preference model) and the ``step_aware`` scorer.

Tiny random CLIPModels with PickScore's architecture family and key names stand in for PickScore_v1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from spo_core.preference.tiny import save_tiny_clip
from spo_core.preference.time_clip import (
    TIME_CONFIG_FILE,
    TIME_WEIGHTS_FILE,
    TimeConditionedCLIP,
    convert_reference_state_dict,
    timestep_sinusoid,
    write_processor,
)
from spo_core.scorers.base import available_scorers, build_scorer
from spo_core.scorers.preprocess import ScorerLoadError




@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "base", image_size=16, patch_size=4)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _perturb(model: TimeConditionedCLIP, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.time_state_dict().items():
            model.get_parameter(name).add_(torch.randn(p.shape, generator=g) * std)


def test_sinusoid_matches_closed_form():
    t = torch.tensor([0.0, 7.0, 999.0])
    emb = timestep_sinusoid(t, dim=8, max_period=10000.0)
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    expected = torch.tensor([[math.cos(x * f) for f in freqs] + [math.sin(x * f) for f in freqs] for x in t.tolist()])
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-5)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_init_is_adaln_zero_without_the_reference_bias_bug(clip_dir):
    model = TimeConditionedCLIP.from_clip(clip_dir)
    width = model.clip.config.vision_config.hidden_size
    assert len(model.layer_modulations) == model.clip.config.vision_config.num_hidden_layers
    for mod in model.layer_modulations:
        lin = mod[1]
        assert lin.weight.shape == (6 * width, width) and torch.count_nonzero(lin.weight) == 0
        bias = lin.bias.view(6, width)
        # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        assert torch.equal(bias[[0, 1, 3, 4]], torch.zeros(4, width))
        assert torch.equal(bias[[2, 5]], torch.ones(2, width))
    assert torch.count_nonzero(model.pooled_modulation[1].weight) == 0
    assert torch.count_nonzero(model.pooled_modulation[1].bias) == 0
    assert model.t_embedder.mlp[0].in_features == 256 and model.t_embedder.mlp[2].out_features == width


def test_equals_base_clip_exactly_at_init(clip_dir, pixels):
    base = CLIPModel.from_pretrained(str(clip_dir)).eval()
    model = TimeConditionedCLIP.from_clip(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    enc = tok(["a red circle", "a blue square on white", "x", "a cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_img = base.get_image_features(pixel_values=pixels).pooler_output
        ref_txt = base.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        ref = base.logit_scale.exp() * torch.nn.functional.cosine_similarity(ref_img, ref_txt, dim=-1)
        for t in (0, 1, 251, 501, 999, torch.tensor([0, 300, 700, 999])):
            assert torch.equal(model.image_features(pixels, t), ref_img)
            scores = model(pixels, enc.input_ids, enc.attention_mask, t)
            torch.testing.assert_close(scores, ref, rtol=0, atol=1e-6)


def test_output_depends_on_t_once_modulations_move(clip_dir, pixels):
    model = TimeConditionedCLIP.from_clip(clip_dir).eval()
    _perturb(model)
    with torch.no_grad():
        a, b = model.image_features(pixels, 0), model.image_features(pixels, 999)
        assert (a - b).abs().max() > 1e-3
        assert torch.equal(model.image_features(pixels, 999), b)  # deterministic for a fixed t
        mixed = model.image_features(pixels, torch.tensor([0, 999, 0, 999]))
        torch.testing.assert_close(mixed[[0, 2]], a[[0, 2]], rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed[[1, 3]], b[[1, 3]], rtol=0, atol=1e-5)
    # Each site acts: only the pooled modulation, or only the layers, already makes outputs depend on t.
    for keep in ("pooled_modulation", "layer_modulations"):
        m = TimeConditionedCLIP.from_clip(clip_dir).eval()
        _perturb(m)
        m.load_state_dict({k: v for k, v in TimeConditionedCLIP.from_clip(clip_dir).state_dict().items()
                           if k.startswith(("pooled_modulation", "layer_modulations")) and not k.startswith(keep)},
                          strict=False)
        with torch.no_grad():
            assert (m.image_features(pixels, 0) - m.image_features(pixels, 999)).abs().max() > 1e-4, keep


def test_gradients_reach_modulations_and_clip(clip_dir, pixels):
    model = TimeConditionedCLIP.from_clip(clip_dir).train()
    model.image_features(pixels, torch.tensor([0, 10, 500, 999])).pow(2).sum().backward()
    assert model.layer_modulations[0][1].weight.grad.abs().sum() > 0
    assert model.pooled_modulation[1].weight.grad.abs().sum() > 0
    assert model.clip.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    # adaLN-Zero: with zero modulation weights no gradient reaches the embedder yet.
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients(clip_dir, pixels):
    model = TimeConditionedCLIP.from_clip(clip_dir).train()
    _perturb(model)
    t = torch.tensor([10, 900, 0, 500])

    def grads():
        model.zero_grad()
        model.image_features(pixels, t).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.clip.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("layer_modulations") for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=0, atol=1e-7)


def test_calling_the_wrapped_clip_without_t_fails_loudly(clip_dir, pixels):
    model = TimeConditionedCLIP.from_clip(clip_dir)
    with pytest.raises(RuntimeError, match="image_features"):
        model.clip.get_image_features(pixel_values=pixels)
    with pytest.raises(ValueError, match="already wrapped"):
        TimeConditionedCLIP(model.clip)


def test_save_and_load_round_trip(clip_dir, pixels, tmp_path):
    model = TimeConditionedCLIP.from_clip(clip_dir).eval()
    _perturb(model)
    out = model.save_pretrained(tmp_path / "aware")
    cfg = json.loads((out / TIME_CONFIG_FILE).read_text())
    assert cfg["time_conditioned"] is True and cfg["pooled_modulation"] == "after_post_layernorm"
    assert (out / TIME_WEIGHTS_FILE).is_file() and (out / "model.safetensors").is_file()
    loaded = TimeConditionedCLIP.from_pretrained(out).eval()
    with torch.no_grad():
        for t in (0, 640):
            assert torch.equal(loaded.image_features(pixels, t), model.image_features(pixels, t))
    # The CLIP part is a plain CLIPModel checkpoint with the original key names.
    plain = CLIPModel.from_pretrained(str(out))
    assert set(plain.state_dict()) == set(model.clip.state_dict())
    with pytest.raises(ScorerLoadError, match="time_conditioned=True"):
        TimeConditionedCLIP.from_pretrained(out, time_conditioned=False)


def test_agnostic_variant_and_plain_dirs(clip_dir, pixels, tmp_path):
    agnostic = TimeConditionedCLIP.from_clip(clip_dir, time_conditioned=False)
    assert agnostic.time_state_dict() == {}
    out = agnostic.save_pretrained(tmp_path / "agnostic")
    assert not (out / TIME_WEIGHTS_FILE).exists()
    assert TimeConditionedCLIP.from_pretrained(out).time_conditioned is False
    plain = TimeConditionedCLIP.from_pretrained(clip_dir)  # no time_condition.json: step-agnostic
    assert plain.time_conditioned is False
    with torch.no_grad():
        assert torch.equal(plain.image_features(pixels, 0), plain.image_features(pixels, 999))


def test_reference_checkpoint_maps_one_to_one(clip_dir, pixels, tmp_path):
    model = TimeConditionedCLIP.from_clip(clip_dir).eval()
    _perturb(model)
    with torch.no_grad():
        model.clip.logit_scale.add_(0.5)  # a CLIP weight that differs from the base
    ref_sd = {}
    for k, v in model.clip.state_dict().items():
        ref_sd[f"model.{k}"] = v.clone()
    ref_sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers saved it
    for k, v in model.time_state_dict().items():
        if k.startswith("layer_modulations."):
            idx, rest = k[len("layer_modulations."):].split(".", 1)
            ref_sd[f"model.vision_model.encoder.layers.{idx}.adaLN_modulation.{rest}"] = v.clone()
        elif k.startswith("pooled_modulation."):
            ref_sd["model.vision_model.adaLN_modulation." + k[len("pooled_modulation."):]] = v.clone()
        else:
            ref_sd[f"model.{k}"] = v.clone()
    clip_sd, time_sd = convert_reference_state_dict(ref_sd)
    assert set(time_sd) == set(model.time_state_dict())
    torch.save(ref_sd, tmp_path / "final_ckpt.bin")
    loaded = TimeConditionedCLIP.from_reference_checkpoint(tmp_path / "final_ckpt.bin", clip_dir).eval()
    with torch.no_grad():
        assert torch.equal(loaded.image_features(pixels, 321), model.image_features(pixels, 321))
        assert torch.equal(loaded.logit_scale, model.logit_scale)


# ------------------------------------------------------------------------------ scorer


def _scorer_dir(clip_dir, path, time_conditioned=True, perturb=False):
    model = TimeConditionedCLIP.from_clip(clip_dir, time_conditioned=time_conditioned)
    if perturb:
        _perturb(model)
    model.save_pretrained(path)
    write_processor(path, AutoTokenizer.from_pretrained(str(clip_dir)), 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return path


def test_step_aware_scorer_equals_pickscore_at_init(clip_dir, tmp_path):
    assert "step_aware" in available_scorers()
    path = _scorer_dir(clip_dir, tmp_path / "aware")
    images = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(3))  # any size: resized + cropped
    prompts = ["a red circle", "a blue square", "a red circle"]
    step_aware = build_scorer("step_aware", path=str(path))
    pick = build_scorer("pickscore", path=str(path))  # same directory through the plain CLIP scorer
    ref = pick.score(images, prompts)
    for t in (None, 0, 500, torch.tensor([951, 1, 0])):
        torch.testing.assert_close(step_aware.score(images, prompts, t), ref, rtol=0, atol=1e-6)
    assert step_aware.clip.image_size == 16 and step_aware.clip.mean == (0.5, 0.5, 0.5)


def test_step_aware_scorer_uses_timesteps(clip_dir, tmp_path):
    path = _scorer_dir(clip_dir, tmp_path / "aware", perturb=True)
    scorer = build_scorer("step_aware", path=str(path), batch_size=2)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    prompts = ["a", "b", "c"]
    s0, s9 = scorer.score(images, prompts, 0), scorer.score(images, prompts, 999)
    assert (s0 - s9).abs().max() > 1e-4
    torch.testing.assert_close(scorer.score(images, prompts, None), s0)
    torch.testing.assert_close(scorer.score(images, prompts, torch.tensor([0, 999, 0])), torch.stack([s0[0], s9[1], s0[2]]))
    with pytest.raises(ValueError, match="timesteps"):
        scorer.score(images, prompts, torch.tensor([1, 2]))


def test_step_aware_scorer_loads_agnostic_and_plain(clip_dir, tmp_path):
    images = torch.rand(2, 3, 16, 16)
    agnostic = build_scorer("step_aware", path=str(_scorer_dir(clip_dir, tmp_path / "ag", time_conditioned=False)))
    assert agnostic.time_conditioned is False
    assert torch.equal(agnostic.score(images, ["a", "b"], 0), agnostic.score(images, ["a", "b"], 999))
    plain = build_scorer("step_aware", path=str(clip_dir))
    assert plain.time_conditioned is False and plain.score(images, ["a", "b"]).shape == (2,)
    with pytest.raises(ValueError, match="needs path"):
        build_scorer("step_aware")
