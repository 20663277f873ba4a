"""Tests of the real AI-feedback scorers (PickScore, HPSv2, ImageReward, Aesthetic) on tiny random
models laid out like the released checkpoints, plus the real LAION aesthetic head."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer

from spo_core.scorers.aesthetic import LinearMLPHead, load_aesthetic_head
from spo_core.scorers.base import build_scorer
from spo_core.scorers.hpsv2 import clip_model_from_open_clip, convert_open_clip_state_dict
from spo_core.scorers.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardArch,
    ImageRewardModel,
    normalize_reward,
)
from spo_core.scorers.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ScorerLoadError,
    center_crop,
    clip_preprocess,
    read_clip_image_config,
    resize_longest_side_and_pad,
)

AESTHETIC_HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a red cat", "a blue dog on grass", "a red cat"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _norm(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - m) / s


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _images(n=3, h=16, w=16, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- tiny tokenizers


def _clip_tokenizer(directory: Path) -> Path:
    """A character-level CLIP BPE tokenizer; SOT/EOT are the two largest ids like the real one."""
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab["<|startoftext|>"] = 52
    vocab["<|endoftext|>"] = 53
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return directory


def _bert_tokenizer(directory: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "on", "grass"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- preprocessing


def _smooth_pil(w, h, seed):
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.mark.parametrize("size", [(300, 200), (160, 230), (640, 480)])
def test_clip_preprocess_matches_clip_image_processor(size):
    # transformers 5's CLIPImageProcessor needs torchvision; CLIPImageProcessorPil is the same
    # pipeline (PIL bicubic, shortest side, floor centre crop, rescale, normalise) without it.
    from transformers import CLIPImageProcessorPil

    pil = _smooth_pil(*size, seed=size[0])
    ref = CLIPImageProcessorPil()(images=pil, return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    out = clip_preprocess(x, 224)
    assert out.shape == ref.shape == (1, 3, 224, 224)
    diff = (out - ref).abs()
    # Remaining differences come from PIL rounding to uint8 between its two passes.
    assert diff.max() < 0.03 and diff.mean() < 0.01


def test_resize_longest_side_and_pad_matches_pil_reference():
    pil = _smooth_pil(40, 20, seed=3)  # W=40, H=20 -> 16 x 8, padded 4 rows top and bottom
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    out = resize_longest_side_and_pad(x, 16)
    ref_img = np.zeros((16, 16, 3), np.uint8)
    ref_img[4:12] = np.asarray(pil.resize((16, 8), Image.BICUBIC))
    ref = torch.from_numpy(ref_img).permute(2, 0, 1)[None].float() / 255
    assert out.shape == (1, 3, 16, 16)
    assert torch.equal(out[..., :4, :], torch.zeros(1, 3, 4, 16)) and torch.equal(out[..., 12:, :], torch.zeros(1, 3, 4, 16))
    assert (out - ref).abs().max() < 0.02


def test_center_crop_rounding():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 5, 7)
    assert center_crop(x, 4, "floor")[0, 0, 0].tolist() == [1, 2, 3, 4]  # (7-4)//2 = 1
    assert center_crop(x, 4, "round")[0, 0, 0].tolist() == [2, 3, 4, 5]  # round(1.5) = 2, torchvision
    with pytest.raises(ValueError, match="resize first"):
        center_crop(x, 9)


def test_read_clip_image_config(tmp_path):
    assert read_clip_image_config(tmp_path, 16) == (16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    cfg = {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert read_clip_image_config(tmp_path, 16) == (32, (0.5,) * 3, (0.25,) * 3)


# --------------------------------------------------------------------------- PickScore / ClipScorer


def _tiny_clip(vocab=54, projection_dim=16, seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=projection_dim,
        logit_scale_init_value=3.0,
    )
    return CLIPModel(cfg).eval()


def test_pickscore_tiny_clip_directory(tmp_path):
    model = _tiny_clip()
    model.save_pretrained(tmp_path)
    _clip_tokenizer(tmp_path)
    scorer = build_scorer("pickscore", path=str(tmp_path), batch_size=2)
    images = _images()
    scores = scorer.score(images, PROMPTS)
    assert scorer.name == "pickscore" and scores.shape == (3,) and scores.dtype == torch.float32

    tok = CLIPTokenizer.from_pretrained(tmp_path)(PROMPTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert tok["input_ids"].shape[1] == 12  # the tower has 12 positions: the scorer must truncate
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_norm(images)).pooler_output
        txt = model.get_text_features(**tok).pooler_output
    expected = model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.score(images, PROMPTS), scores)  # deterministic, no state
    assert scores[0] != scores[2]  # same prompt, different images


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pickscore_in_half_precision_stays_close(tmp_path, dtype):
    # The preference model and scorers may run in bf16/fp16 (half the memory and most of the time on a
    # GPU); scores stay float32 and close to the fp32 ones.
    _tiny_clip().save_pretrained(tmp_path)
    _clip_tokenizer(tmp_path)
    full = build_scorer("pickscore", path=str(tmp_path))
    half = build_scorer("pickscore", path=str(tmp_path), dtype=dtype)
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    images = _images()
    s32, s16 = full.score(images, PROMPTS), half.score(images, PROMPTS)
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, rtol=0.05, atol=0.05)


def test_pickscore_errors(tmp_path):
    _tiny_clip().save_pretrained(tmp_path)  # no tokenizer saved
    with pytest.raises(ScorerLoadError, match="processor="):
        build_scorer("pickscore", path=str(tmp_path))
    with pytest.raises(ScorerLoadError, match="yuvalkirstain/PickScore_v1.*local directory"):
        build_scorer("pickscore")  # default hub id while offline
    with pytest.raises(ValueError, match="(?s)scorer 'pickscore'.*colour"):
        build_scorer("pickscore", path=str(tmp_path), colour="red")
    scorer = build_scorer("pickscore", path=str(tmp_path), processor=str(_clip_tokenizer(tmp_path / "tok")))
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(_images(2), ["a"])


# --------------------------------------------------------------------------- HPSv2


def _open_clip_state_dict(layers=2, width=32, patch=4, image=16, text_width=32, context=8, vocab=54, embed=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
        "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed),
        "token_embedding.weight": r(vocab, text_width),
        "positional_embedding": r(context, text_width),
        "ln_final.weight": 1 + r(text_width), "ln_final.bias": r(text_width),
        "text_projection": r(text_width, embed),
        "logit_scale": torch.tensor(4.6052),
    }
    for prefix, w in (("visual.transformer", width), ("transformer", text_width)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            sd.update({
                p + "ln_1.weight": 1 + r(w), p + "ln_1.bias": r(w),
                p + "attn.in_proj_weight": r(3 * w, w), p + "attn.in_proj_bias": r(3 * w),
                p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                p + "ln_2.weight": 1 + r(w), p + "ln_2.bias": r(w),
                p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w),
            })
    return sd


def _open_clip_block(x, sd, p, heads, mask=None):
    """open_clip ResidualAttentionBlock with nn.MultiheadAttention's own functional form."""
    d = x.shape[-1]
    h = _ln(x, sd, p + "ln_1", 1e-5).transpose(0, 1)  # (L, B, D): MultiheadAttention layout
    a, _ = F.multi_head_attention_forward(
        h, h, h, d, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
    )
    x = x + a.transpose(0, 1)
    h = _ln(x, sd, p + "ln_2", 1e-5)
    return x + _lin(F.gelu(_lin(h, sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")


def _open_clip_image(sd, pixels, heads, layers):
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = _ln(torch.cat([cls, x], 1) + sd["visual.positional_embedding"], sd, "visual.ln_pre", 1e-5)
    for i in range(layers):
        x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    return _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]


def _open_clip_text(sd, ids, heads, layers):
    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers):
        x = _open_clip_block(x, sd, f"transformer.resblocks.{i}.", heads, causal)
    x = _ln(x, sd, "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def test_open_clip_converter_matches_reference_forward():
    sd = _open_clip_state_dict()
    converted = convert_open_clip_state_dict(sd)
    assert len(converted) == len(sd) + 2 * (2 * 2 * 2)  # 2 towers x 2 layers x in_proj weight/bias, each -> 3
    model = clip_model_from_open_clip(sd, vision_heads=4, text_heads=4)  # raises on missing/unexpected keys
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[52, 0, 17, 4, 53, 0, 0, 0], [52, 2, 53, 0, 0, 0, 0, 0]])  # open_clip pads with 0
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(img, _open_clip_image(sd, pixels, 4, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, _open_clip_text(sd, ids, 4, 2), rtol=1e-4, atol=1e-5)


def test_open_clip_converter_rejects_unknown_keys():
    sd = _open_clip_state_dict(layers=1)
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    with pytest.raises(ScorerLoadError, match="ls_1.gamma"):
        convert_open_clip_state_dict(sd)


def test_hpsv2_scorer_from_checkpoint_file(tmp_path):
    sd = {k: v.half() for k, v in _open_clip_state_dict().items()}  # the released file is compressed
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "HPS_v2_compressed.pt")
    _clip_tokenizer(tmp_path / "tokenizer")  # default tokenizer location: <path>/tokenizer
    scorer = build_scorer("hpsv2", path=str(tmp_path), vision_heads=4, text_heads=4)
    assert scorer.name == "hpsv2.0"

    images = _images(3, h=16, w=8)  # portrait: longest side 16 already, padded 4 columns each side
    scores = scorer.score(images, PROMPTS)
    sd32 = {k: v.float() for k, v in sd.items()}
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")(PROMPTS, padding="max_length", max_length=8,
                                                                truncation=True, return_tensors="pt")
    ids = torch.where(tok["attention_mask"].bool(), tok["input_ids"], 0)
    img = _open_clip_image(sd32, _norm(F.pad(images, (4, 4, 0, 0))), 4, 2)
    txt = _open_clip_text(sd32, ids, 4, 2)
    torch.testing.assert_close(scores, 100 * F.cosine_similarity(img, txt, dim=-1), rtol=1e-4, atol=1e-4)

    with pytest.raises(ScorerLoadError, match="HPS_v2.1_compressed.pt"):
        build_scorer("hpsv2", path=str(tmp_path), version="v2.1")
    with pytest.raises(ScorerLoadError, match="xswu/HPSv2.*local directory"):
        build_scorer("hpsv2")


# --------------------------------------------------------------------------- ImageReward

TINY_IR = dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
               vocab_size=14, text_width=32, text_layers=2, text_heads=4, text_intermediate=64,
               max_position_embeddings=40, embed_dim=16)


def _blip_vit(sd, x, heads, layers):
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"]
    b, n, c = x.shape
    for i in range(layers):
        q = f"{p}blocks.{i}."
        qkv = _lin(_ln(x, sd, q + "norm1", 1e-6), sd, q + "attn.qkv").view(b, n, 3, heads, c // heads)
        qq, kk, vv = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(qq @ kk.transpose(-1, -2) * (c // heads) ** -0.5, -1) @ vv
        x = x + _lin(att.transpose(1, 2).reshape(b, n, c), sd, q + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, q + "norm2", 1e-6), sd, q + "mlp.fc1")), sd, q + "mlp.fc2")
    return _ln(x, sd, p + "norm", 1e-6)


def _bert_attention(x, kv, sd, p, heads, add_mask):
    b, n, c = x.shape
    split = lambda t: t.view(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(_lin(x, sd, p + "self.query")), split(_lin(kv, sd, p + "self.key")), split(_lin(kv, sd, p + "self.value"))
    att = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5 + add_mask, -1) @ v
    return _ln(_lin(att.transpose(1, 2).reshape(b, n, c), sd, p + "output.dense") + x, sd, p + "output.LayerNorm", 1e-12)


def _image_reward_raw(sd, pixels, ids, mask, heads=4, layers=2):
    img = _blip_vit(sd, pixels, heads, layers)
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(layers):
        p = f"{t}encoder.layer.{i}."
        x = _bert_attention(x, x, sd, p + "attention.", heads, pad)
        x = _bert_attention(x, img, sd, p + "crossattention.", heads, 0.0)
        x = _ln(_lin(F.gelu(_lin(x, sd, p + "intermediate.dense")), sd, p + "output.dense") + x, sd, p + "output.LayerNorm", 1e-12)
    h = x[:, 0]
    for j in (0, 2, 4, 6, 7):
        h = _lin(h, sd, f"mlp.layers.{j}")
    return h.squeeze(-1)


def _tiny_image_reward(seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = ImageRewardModel(ImageRewardArch(**TINY_IR))
    with torch.no_grad():  # non-trivial norms and biases so the reference check has teeth
        for name, prm in model.named_parameters():
            if prm.ndim == 1 or name.endswith(("cls_token", "pos_embed")):
                prm.add_(torch.randn_like(prm) * 0.1)
            else:
                prm.normal_(0.0, 0.2)
    return model.state_dict()


def test_image_reward_normalisation():
    raw = torch.tensor([REWARD_MEAN, REWARD_MEAN + REWARD_STD, 0.0])
    torch.testing.assert_close(normalize_reward(raw), torch.tensor([0.0, 1.0, -0.16717362830052426 / 1.0333394966054072]))


def test_image_reward_scorer_loads_original_layout_strictly(tmp_path):
    sd = _tiny_image_reward()
    assert {k.split(".")[0] for k in sd} == {"blip", "mlp"} and "mlp.layers.7.weight" in sd
    saved = dict(sd, **{"blip.text_encoder.embeddings.position_ids": torch.arange(40)[None]})  # old-transformers buffer
    torch.save(saved, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}))
    tok_dir = _bert_tokenizer(tmp_path / "tokenizer")
    scorer = build_scorer("imagereward", path=str(tmp_path / "ImageReward.pt"), vision_heads=4, batch_size=2)
    assert scorer.name == "imagereward" and len(scorer.tokenizer) == 14  # + BLIP's [DEC], [ENC]

    images = _images(3)
    scores = scorer.score(images, PROMPTS)
    assert scores.shape == (3,)
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"][0, 0].item() == 2  # [CLS] first
    raw = _image_reward_raw(sd, _norm(images), tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(scores, (raw - REWARD_MEAN) / REWARD_STD, rtol=1e-4, atol=1e-4)

    # A prompt longer than 35 tokens is truncated (same score as its first 33 words + [CLS]/[SEP]).
    long = " ".join(["red"] * 60)
    torch.testing.assert_close(scorer.score(images[:1], [long]), scorer.score(images[:1], [" ".join(["red"] * 33)]))

    # Strictness: a foreign or missing key is an error naming it.
    torch.save(dict(sd, **{"blip.extra.weight": torch.ones(1)}), tmp_path / "ImageReward.pt")
    with pytest.raises(ScorerLoadError, match="blip.extra.weight"):
        build_scorer("imagereward", path=str(tmp_path), tokenizer=str(tok_dir), vision_heads=4)
    torch.save({k: v for k, v in sd.items() if "crossattention.self.key.bias" not in k}, tmp_path / "ImageReward.pt")
    with pytest.raises(ScorerLoadError, match="crossattention.self.key.bias"):
        build_scorer("imagereward", path=str(tmp_path), tokenizer=str(tok_dir), vision_heads=4)


def test_image_reward_offline_hub_error():
    with pytest.raises(ScorerLoadError, match="THUDM/ImageReward.*local directory"):
        build_scorer("imagereward")


# --------------------------------------------------------------------------- Aesthetic


def test_real_aesthetic_head_matches_matmul_chain():
    raw = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    head = load_aesthetic_head(AESTHETIC_HEAD)
    assert isinstance(head, LinearMLPHead) and not head.training
    x = F.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    expected = x
    for j in (0, 2, 4, 6, 7):
        expected = expected @ raw[f"layers.{j}.weight"].T + raw[f"layers.{j}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_aesthetic_scorer_with_tiny_clip(tmp_path):
    clip = _tiny_clip(projection_dim=768)
    clip.save_pretrained(tmp_path / "clip")  # a full CLIPModel checkpoint, like openai/clip-vit-large-patch14
    scorer = build_scorer("aesthetic", path=str(AESTHETIC_HEAD), clip=str(tmp_path / "clip"), batch_size=2)
    images = _images(3)
    scores = scorer.score(images, PROMPTS)
    with torch.no_grad():
        emb = F.normalize(clip.get_image_features(pixel_values=_norm(images)).pooler_output, dim=-1)
        expected = load_aesthetic_head(AESTHETIC_HEAD)(emb).squeeze(-1)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ScorerLoadError, match="needs path="):
        build_scorer("aesthetic", clip=str(tmp_path / "clip"))
    _tiny_clip(projection_dim=16).save_pretrained(tmp_path / "clip16")
    with pytest.raises(ScorerLoadError, match="takes 768"):
        build_scorer("aesthetic", path=str(AESTHETIC_HEAD), clip=str(tmp_path / "clip16"))
