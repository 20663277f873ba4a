"""The published SD3.5-Medium and FLUX.1-dev architectures (spo_core.models.published_flow), built on the
meta device: sizes against the published figures and the state-dict keys of the real checkpoints."""

from __future__ import annotations

import pytest
import torch

from spo_core.models import published_flow as PF
from spo_core.models.flow_policy import FlowPolicy

# Published figures in parameters: SD3.5 Medium "2.5 billion" (Stability AI's model card; the
# transformer's file holds 2.47B values, its 384 x 384 position table included), FLUX.1-dev "12 billion"
# (Black Forest Labs), the T5-v1.1-XXL encoder 4.76B (its checkpoint), SD3's VAE 83.8M.
PUBLISHED = {"sd3.transformer": 2.5e9, "flux.transformer": 11.9e9, "t5_xxl": 4.76e9, "vae": 83.8e6}


def n_values(m: torch.nn.Module) -> int:
    """Parameters and buffers (tied weights once), the values a checkpoint file stores."""
    return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())


@pytest.fixture(scope="module")
def meta():
    return {kind: PF.build_published_flow_components(kind, device="meta") for kind in PF.FLOW_KINDS}


@pytest.mark.parametrize("key, get, tol", [
    ("sd3.transformer", lambda m: m["sd3"]["transformer"], 0.02),
    ("flux.transformer", lambda m: m["flux"]["transformer"], 0.01),
    ("t5_xxl", lambda m: m["sd3"]["text_encoder_3"], 0.01),
    ("t5_xxl", lambda m: m["flux"]["text_encoder_2"], 0.01),
    ("vae", lambda m: m["sd3"]["vae"], 0.01),
])
def test_sizes_match_the_published_figures(meta, key, get, tol):
    n = n_values(get(meta))
    assert abs(n - PUBLISHED[key]) / PUBLISHED[key] < tol, (key, n)


@pytest.mark.parametrize("kind, expected", [
    ("sd3", {"pos_embed.pos_embed": (1, 384 * 384, 1536), "context_embedder.weight": (1536, 4096),
             "time_text_embed.text_embedder.linear_1.weight": (1536, 2048),
             "transformer_blocks.12.attn2.to_q.weight": (1536, 1536),
             "transformer_blocks.0.attn.norm_added_q.weight": (64,), "proj_out.weight": (64, 1536)}),
    ("flux", {"x_embedder.weight": (3072, 64), "context_embedder.weight": (3072, 4096),
              "time_text_embed.guidance_embedder.linear_1.weight": (3072, 256),
              "transformer_blocks.18.attn.to_add_out.weight": (3072, 3072),
              "single_transformer_blocks.37.proj_out.weight": (3072, 15360), "proj_out.weight": (64, 3072)}),
])
def test_transformer_checkpoint_keys(meta, kind, expected):
    sd = meta[kind]["transformer"].state_dict()
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    if kind == "sd3":  # MMDiT-X: dual attention on layers 0-12 only
        assert not any(k.startswith("transformer_blocks.13.attn2.") for k in sd)


def test_depth_keeps_the_width_and_a_share_of_the_blocks():
    cfg = PF.transformer_config("flux", depth=0.25)
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (5, 10)
    assert cfg["attention_head_dim"] * cfg["num_attention_heads"] == 3072
    sd3 = PF.transformer_config("sd3", depth=0.5)
    assert sd3["num_layers"] == 12 and max(sd3["dual_attention_layers"]) < 12
    with pytest.raises(ValueError, match="depth"):
        PF.transformer_config("sd3", depth=0)


@pytest.mark.parametrize("kind", PF.FLOW_KINDS)
def test_components_make_a_flow_policy_without_t5(kind):
    # What benchmarks/real_size.py builds on a CPU: no T5-XXL (zero T5 tokens), a shallower transformer.
    comps = PF.build_published_flow_components(kind, device="meta", t5=False, depth=0.1)
    policy = FlowPolicy(kind=kind, resolution=256, **comps)
    assert policy.latent_shape == (16, 32, 32)
    assert (policy.text_encoder_3 if kind == "sd3" else policy.text_encoder_2) is None
