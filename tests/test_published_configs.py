"""The published SD-1.5 / SDXL / PickScore architectures (spo_core.models.published), built on the meta
device: parameter counts against the published figures and the state-dict keys of the real checkpoints."""

from __future__ import annotations

import pytest
import torch

from spo_core.models import published as P

# Published figures (model cards / config-derived counts quoted for these checkpoints), in parameters.
PUBLISHED = {
    "sd15.unet": 859.52e6,
    "sdxl.unet": 2.567e9,
    "vae": 83.65e6,
    "clip_l_text": 123.06e6,
    "openclip_bigg_text_with_projection": 694.66e6,
    "pickscore_clip": 986.1e6,
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def meta():
    """Every module once, on the meta device (shapes only: no memory, about a second)."""
    return {
        "sd15": P.build_published_components("sd15", device="meta"),
        "sdxl": P.build_published_components("sdxl", device="meta"),
        "pm": P.build_step_aware_model(device="meta"),
    }


def test_meta_build_allocates_nothing(meta):
    for comps in (meta["sd15"], meta["sdxl"]):
        for name, m in comps.items():
            if isinstance(m, torch.nn.Module):
                assert all(p.is_meta for p in m.parameters()), name
    assert all(p.is_meta for p in meta["pm"].parameters())
    assert torch.get_default_dtype() == torch.float32  # construct() restored it


@pytest.mark.parametrize("key, get", [
    ("sd15.unet", lambda m: m["sd15"]["unet"]),
    ("sdxl.unet", lambda m: m["sdxl"]["unet"]),
    ("vae", lambda m: m["sd15"]["vae"]),
    ("vae", lambda m: m["sdxl"]["vae"]),
    ("clip_l_text", lambda m: m["sd15"]["text_encoder"]),
    ("clip_l_text", lambda m: m["sdxl"]["text_encoder"]),
    ("openclip_bigg_text_with_projection", lambda m: m["sdxl"]["text_encoder_2"]),
    ("pickscore_clip", lambda m: m["pm"].clip),
])
def test_parameter_counts(meta, key, get):
    n = n_params(get(meta))
    assert n == P.PARAMETER_COUNTS[key]  # exact: what these configs give
    assert abs(n - PUBLISHED[key]) / PUBLISHED[key] < 0.01, (key, n)


def test_step_aware_extra_parameters(meta):
    """adaLN-Zero on ViT-H: t-embedder 256->1280->1280, Linear(1280, 6*1280) per layer (32), pooled (2*1280)."""
    w = 1280
    extra = (256 * w + w) + (w * w + w) + 32 * (w * 6 * w + 6 * w) + (w * 2 * w + 2 * w)
    pm = meta["pm"]
    assert pm.time_conditioned
    assert n_params(pm) - n_params(pm.clip) == extra == 320_066_560
    assert n_params(pm) == P.PARAMETER_COUNTS["pickscore_clip"] + extra == 1_306_176_001


def test_sd15_config_fields(meta):
    unet, vae, te = meta["sd15"]["unet"], meta["sd15"]["vae"], meta["sd15"]["text_encoder"]
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64
    assert unet.config.addition_embed_type is None
    assert vae.config.scaling_factor == 0.18215 and vae.config.sample_size == 512
    assert te.config.hidden_act == "quick_gelu" and te.config.max_position_embeddings == 77
    assert meta["sd15"]["scheduler"].config.beta_schedule == "scaled_linear"
    assert "text_encoder_2" not in meta["sd15"]


def test_sdxl_config_fields(meta):
    c = meta["sdxl"]
    unet = c["unet"]
    assert list(unet.config.transformer_layers_per_block) == [1, 2, 10]
    assert list(unet.config.attention_head_dim) == [5, 10, 20]
    assert unet.config.cross_attention_dim == 2048 and unet.config.sample_size == 128
    # cross_attention_dim = CLIP-L hidden (768) + bigG hidden (1280), the concatenated penultimate states
    assert c["text_encoder"].config.hidden_size + c["text_encoder_2"].config.hidden_size == 2048
    # projection_class_embeddings_input_dim = pooled bigG projection + 6 time ids x addition_time_embed_dim
    assert c["text_encoder_2"].config.projection_dim + 6 * unet.config.addition_time_embed_dim == 2816
    assert c["vae"].config.scaling_factor == 0.13025 and c["vae"].config.sample_size == 1024
    assert c["vae"].config.force_upcast is True  # float32 build: the base VAE
    assert P.build_vae("sdxl", torch.float16, "meta", fp16_fix=True).config.force_upcast is False
    te2 = c["text_encoder_2"].config
    assert (te2.hidden_size, te2.num_hidden_layers, te2.num_attention_heads, te2.intermediate_size, te2.hidden_act) == \
        (1280, 32, 20, 5120, "gelu")


def test_pickscore_config_fields(meta):
    cfg = meta["pm"].clip.config
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size, v.image_size) == \
        (1280, 32, 16, 5120, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (1024, 24, 16, 4096)
    assert cfg.projection_dim == 1024
    assert meta["pm"].clip.visual_projection.weight.shape == (1024, 1280)
    assert meta["pm"].clip.text_projection.weight.shape == (1024, 1024)


# Key names and shapes as in the published safetensors files.
SD15_UNET_KEYS = {
    "conv_in.weight": (320, 4, 3, 3),
    "time_embedding.linear_1.weight": (1280, 320),
    "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),  # conv projection in SD-1.5
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 768),
    "down_blocks.3.resnets.1.conv2.weight": (1280, 1280, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "conv_out.weight": (4, 320, 3, 3),
}
SDXL_UNET_KEYS = {
    "add_embedding.linear_1.weight": (1280, 2816),
    "add_embedding.linear_2.weight": (1280, 1280),
    "down_blocks.1.attentions.0.proj_in.weight": (640, 640),  # linear projection in SDXL
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
    "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
    "up_blocks.2.resnets.2.conv2.weight": (320, 320, 3, 3),
}
VAE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
CLIP_L_KEYS = {
    "text_model.embeddings.token_embedding.weight": (49408, 768),
    "text_model.embeddings.position_embedding.weight": (77, 768),
    "text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "text_model.final_layer_norm.weight": (768,),
}
BIGG_KEYS = {
    "text_model.embeddings.token_embedding.weight": (49408, 1280),
    "text_model.encoder.layers.31.self_attn.q_proj.weight": (1280, 1280),
    "text_model.final_layer_norm.weight": (1280,),
    "text_projection.weight": (1280, 1280),
}
PICKSCORE_KEYS = {
    "logit_scale": (),
    "text_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
    "vision_model.embeddings.class_embedding": (1280,),
    "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
    "vision_model.embeddings.position_embedding.weight": (257, 1280),
    "vision_model.pre_layrnorm.weight": (1280,),
    "vision_model.encoder.layers.31.self_attn.out_proj.weight": (1280, 1280),
    "vision_model.post_layernorm.weight": (1280,),
    "visual_projection.weight": (1024, 1280),
    "text_projection.weight": (1024, 1024),
}


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    sd = model.state_dict()
    return {ck: tuple(sd[k].shape) for ck, k in zip(P.checkpoint_keys(model), sd)}


@pytest.mark.parametrize("get, expected", [
    (lambda m: m["sd15"]["unet"], SD15_UNET_KEYS),
    (lambda m: m["sdxl"]["unet"], SDXL_UNET_KEYS),
    (lambda m: m["sd15"]["vae"], VAE_KEYS),
    (lambda m: m["sdxl"]["vae"], VAE_KEYS),
    (lambda m: m["sd15"]["text_encoder"], CLIP_L_KEYS),
    (lambda m: m["sdxl"]["text_encoder"], CLIP_L_KEYS),
    (lambda m: m["sdxl"]["text_encoder_2"], BIGG_KEYS),
    (lambda m: m["pm"].clip, PICKSCORE_KEYS),
], ids=["sd15_unet", "sdxl_unet", "sd15_vae", "sdxl_vae", "sd15_clip_l", "sdxl_clip_l", "sdxl_bigg", "pickscore"])
def test_checkpoint_key_names(meta, get, expected):
    shapes = _shapes(get(meta))
    for key, shape in expected.items():
        assert key in shapes, key
        assert shapes[key] == shape, (key, shapes[key])


def test_sdxl_has_no_sd15_only_keys(meta):
    sd15, sdxl = set(meta["sd15"]["unet"].state_dict()), set(meta["sdxl"]["unet"].state_dict())
    assert not any(k.startswith("add_embedding.") for k in sd15)
    assert "down_blocks.3.resnets.0.conv1.weight" in sd15 and not any(k.startswith("down_blocks.3.") for k in sdxl)
    assert not any(k.startswith("down_blocks.0.attentions.") for k in sdxl)  # SDXL's first level has no attention


def test_tokenizers_fit_the_text_towers(meta):
    for comps in (meta["sd15"], meta["sdxl"]):
        tok = comps["tokenizer"]
        assert len(tok) <= comps["text_encoder"].config.vocab_size
        assert tok.model_max_length == 77
        assert tok("a photo of a cat").input_ids[-1] == tok.eos_token_id == len(tok) - 1  # highest id: legacy pooling
    assert meta["sdxl"]["tokenizer_2"] is not meta["sdxl"]["tokenizer"]
    assert len(meta["sdxl"]["tokenizer_2"]) <= meta["sdxl"]["text_encoder_2"].config.vocab_size


def test_construct_dtype_and_rng():
    before = torch.random.get_rng_state()
    lin = None
    with P.construct("cpu", torch.bfloat16, seed=3):
        lin = torch.nn.Linear(4, 4)
    assert lin.weight.dtype == torch.bfloat16
    assert torch.equal(torch.random.get_rng_state(), before)
    with P.construct("cpu", torch.bfloat16, seed=3):
        lin2 = torch.nn.Linear(4, 4)
    assert torch.equal(lin.weight, lin2.weight)
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError):
        P.build_unet("sd3")
