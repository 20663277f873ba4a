"""The published SD-1.5, SDXL-base-1.0 and PickScore (CLIP ViT-H/14) architectures, with random weights.

For benchmarks that must see the real sizes (memory, seconds, UNet evaluations) on a machine that
has no weights. The configs below are the public ``config.json`` files of

* ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (unet, vae, text_encoder = OpenAI CLIP ViT-L/14 text),
* ``stabilityai/stable-diffusion-xl-base-1.0`` (unet, vae, text_encoder = CLIP-L text,
  text_encoder_2 = OpenCLIP ViT-bigG/14 text with projection),
* ``yuvalkirstain/PickScore_v1`` (= ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s architecture),

written out by hand (no download), keeping only the fields that differ from the library
defaults or matter for the shapes. Parameter counts are asserted in tests/test_published_configs.py.

Weights are random (seeded). Builders construct each module directly in the requested dtype and on
the requested device (``torch.set_default_dtype`` + a ``torch.device`` context), so a float16
SDXL never exists as a float32 copy: ~5.1 GB for its UNet instead of 10.3 GB. ``device="meta"``
builds shapes only (no memory), which is what the tests use.

Tokenizers are :func:`~spo_core.models.tiny.write_clip_tokenizer`'s byte-level vocabulary (514
ids, all below the published ``vocab_size`` of 49408): the real BPE merges are not needed to
measure cost, only a prompt length of at most 77 tokens.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .tiny import SD_SCHEDULER_CONFIG, write_clip_tokenizer

log = logging.getLogger(__name__)

KINDS = ("sd15", "sdxl")

# ------------------------------------------------------------------------------------------ SD-1.5

SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD15_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# OpenAI CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), as shipped in SD-1.5's text_encoder.
CLIP_L_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,  # the legacy value: pooling takes the highest token id (the real and the byte EOS alike)
    pad_token_id=1,
)

# ------------------------------------------------------------------------------------------ SDXL

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    # 1280 (pooled text_embeds of text_encoder_2) + 6 time ids x 256
    projection_class_embeddings_input_dim=2816,
    time_embedding_type="positional",
    conv_in_kernel=3,
    conv_out_kernel=3,
)

SDXL_VAE_CONFIG: dict[str, Any] = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# madebyollin/sdxl-vae-fp16-fix (the profile's VAE): same architecture and scaling, safe in float16.
SDXL_VAE_FP16_FIX_CONFIG: dict[str, Any] = dict(SDXL_VAE_CONFIG, force_upcast=False)

SDXL_TEXT_CONFIG: dict[str, Any] = dict(CLIP_L_TEXT_CONFIG)  # the same CLIP-L text tower

# OpenCLIP ViT-bigG/14 text tower with its projection (SDXL's text_encoder_2).
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = dict(
    CLIP_L_TEXT_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)

# ------------------------------------------------------------------------------------------ PickScore

# PickScore_v1 = CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) fine-tuned; the SPO preference
# model is this CLIPModel wrapped by spo_core.preference.time_clip.TimeConditionedCLIP.
PICKSCORE_CLIP_CONFIG: dict[str, Any] = dict(
    projection_dim=1024,
    logit_scale_init_value=2.6592,
    # The OpenCLIP ViT-H/14 text tower: CLIP-L's layout at width 1024, 24 layers, gelu.
    text_config=dict(CLIP_L_TEXT_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, hidden_act="gelu", projection_dim=1024),
    vision_config=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_channels=3,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    ),
)
PICKSCORE_IMAGE_SIZE = 224

# Parameter counts these configs give (checked on the meta device by tests/test_published_configs.py);
# they agree with the published figures (SD-1.5 UNet 859.52M, SDXL UNet 2.567B, CLIP-L text 123.06M,
# OpenCLIP bigG text + projection 694.66M, SD VAE 83.65M, CLIP ViT-H/14 986.11M).
PARAMETER_COUNTS: dict[str, int] = {
    "sd15.unet": 859_520_964,
    "sdxl.unet": 2_567_463_684,
    "vae": 83_653_863,
    "clip_l_text": 123_060_480,
    "openclip_bigg_text_with_projection": 694_659_840,
    "pickscore_clip": 986_109_441,
}

UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
VAE_CONFIGS = {"sd15": SD15_VAE_CONFIG, "sdxl": SDXL_VAE_CONFIG}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind '{kind}': use 'sd15' or 'sdxl'")


# ------------------------------------------------------------------------------------------ construction


@contextlib.contextmanager
def construct(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              seed: int | None = 0) -> Iterator[None]:
    """Create modules directly on ``device`` in ``dtype`` (no float32 copy), with seeded random init.

    The caller's RNG state and default dtype are restored afterwards. ``device="meta"`` allocates
    nothing (shapes only).
    """
    device = torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    old = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if seed is not None and device.type != "meta":
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            torch.manual_seed(seed)
        stack.enter_context(device)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int | None = 0) -> UNet2DConditionModel:
    _check_kind(kind)
    with construct(device, dtype, seed):
        return UNet2DConditionModel(**copy.deepcopy(UNET_CONFIGS[kind]))


def build_vae(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              seed: int | None = 0, fp16_fix: bool = False) -> AutoencoderKL:
    """SD's KL autoencoder; ``fp16_fix`` gives madebyollin/sdxl-vae-fp16-fix's config (SDXL only)."""
    _check_kind(kind)
    cfg = SDXL_VAE_FP16_FIX_CONFIG if (kind == "sdxl" and fp16_fix) else VAE_CONFIGS[kind]
    with construct(device, dtype, seed):
        return AutoencoderKL(**copy.deepcopy(cfg))


def clip_l_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(**CLIP_L_TEXT_CONFIG)


def openclip_bigg_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(**OPENCLIP_BIGG_TEXT_CONFIG)


def pickscore_clip_config() -> CLIPConfig:
    cfg = copy.deepcopy(PICKSCORE_CLIP_CONFIG)
    return CLIPConfig(text_config=cfg.pop("text_config"), vision_config=cfg.pop("vision_config"), **cfg)


def build_text_encoder(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       seed: int | None = 0) -> CLIPTextModel:
    """CLIP ViT-L/14's text tower (SD-1.5's text_encoder and SDXL's first one)."""
    with construct(device, dtype, seed):
        return CLIPTextModel(clip_l_text_config())


def build_text_encoder_2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seed: int | None = 0) -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG/14's text tower with projection (SDXL's text_encoder_2)."""
    with construct(device, dtype, seed):
        return CLIPTextModelWithProjection(openclip_bigg_text_config())


def build_pickscore_clip(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         seed: int | None = 0) -> CLIPModel:
    """A CLIPModel with PickScore_v1's (CLIP ViT-H/14) architecture."""
    with construct(device, dtype, seed):
        return CLIPModel(pickscore_clip_config())


def build_step_aware_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           seed: int | None = 0, time_conditioned: bool = True):
    """The full-size step-aware preference model: ViT-H/14 CLIP + adaLN-Zero time conditioning.

    Its conditioning starts at the identity (as ``train_pm`` initialises it), so with random CLIP
    weights the scores are random but the cost is exactly the trained model's.
    """
    from ..preference.time_clip import TimeConditionedCLIP

    clip = build_pickscore_clip(dtype, device, seed)
    with construct(device, dtype, None if seed is None else seed + 1):
        return TimeConditionedCLIP(clip, time_conditioned=time_conditioned)


def _tokenizers(tokenizer_dir: str | Path | None, n: int = 1) -> list[CLIPTokenizer]:
    """``n`` independent byte-level CLIP tokenizers (written to ``tokenizer_dir`` or a temp dir)."""
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="spo_tok_") as tmp:
            return _tokenizers(tmp, n)
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "vocab.json").exists():
        write_clip_tokenizer(tok_dir)
    return [CLIPTokenizer.from_pretrained(str(tok_dir)) for _ in range(n)]


def scorer_dtype_supported() -> bool:
    """Whether this library's ClipScorer can run in a dtype other than float32 (its ``dtype`` argument)."""
    import inspect

    from ..scorers.pickscore import ClipScorer

    return "dtype" in inspect.signature(ClipScorer.__init__).parameters


def build_step_aware_scorer(device: str | torch.device = "cpu", seed: int | None = 0,
                            tokenizer_dir: str | Path | None = None, batch_size: int = 16,
                            time_conditioned: bool = True, dtype: torch.dtype = torch.float32):
    """The full-size preference model as the ``step_aware`` scorer (what ``build_step_aware`` returns
    for a trained ``train_pm`` directory), built directly in ``dtype`` (float32 by default, as the
    scorer's default; a ClipScorer without a ``dtype`` argument always runs float32)."""
    from ..scorers.pickscore import ClipScorer
    from ..scorers.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from ..scorers.step_aware import StepAwareScorer

    kw: dict[str, Any] = {}
    if dtype != torch.float32:
        if scorer_dtype_supported():
            kw["dtype"] = dtype
        else:
            log.warning("this ClipScorer runs in float32 only: building the scorer in float32, not %s", dtype)
            dtype = torch.float32
    model = build_step_aware_model(dtype, device, seed, time_conditioned=time_conditioned)
    (tokenizer,) = _tokenizers(tokenizer_dir)
    vocab = model.clip.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the text tower only {vocab}")
    clip_scorer = ClipScorer(model.clip, tokenizer, PICKSCORE_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                             device=device, name="step_aware", batch_size=batch_size, **kw)
    return StepAwareScorer(model, clip_scorer)


def build_published_components(kind: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                               seed: int = 0, tokenizer_dir: str | Path | None = None,
                               vae_fp16_fix: bool | None = None) -> dict:
    """Random full-size components for ``kind`` in {"sd15", "sdxl"}, keys as :func:`build_tiny_components`'s.

    ``DiffusionPolicy(kind=kind, resolution=..., **build_published_components(kind, torch.float16, "cuda"))``.
    ``vae_fp16_fix`` (SDXL): the fp16-fix VAE's config (force_upcast False); None: when dtype is float16.
    Each module gets its own seed (seed, seed+1, ...), so the result does not depend on build order.
    """
    _check_kind(kind)
    tok, tok_2 = _tokenizers(tokenizer_dir, 2)
    for m_cfg in (CLIP_L_TEXT_CONFIG, OPENCLIP_BIGG_TEXT_CONFIG):
        if len(tok) > m_cfg["vocab_size"]:
            raise ValueError(f"tokenizer has {len(tok)} ids but the text encoders only {m_cfg['vocab_size']}")
    if vae_fp16_fix is None:
        vae_fp16_fix = dtype == torch.float16
    comps = dict(
        unet=build_unet(kind, dtype, device, seed),
        vae=build_vae(kind, dtype, device, seed + 1, fp16_fix=vae_fp16_fix),
        text_encoder=build_text_encoder(dtype, device, seed + 2),
        tokenizer=tok,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )
    if kind == "sdxl":
        comps["text_encoder_2"] = build_text_encoder_2(dtype, device, seed + 3)
        comps["tokenizer_2"] = tok_2
    log.info("built random %s components on %s in %s: %s", kind, device, dtype,
             {k: f"{_n_params(v) / 1e6:.1f}M" for k, v in comps.items() if isinstance(v, torch.nn.Module)})
    return comps


def checkpoint_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys as the published checkpoint files name them.

    transformers 5 builds ``CLIPTextModel`` without its ``text_model`` wrapper and strips that
    prefix when loading (a ``PrefixChange`` in its conversion mapping); the published files
    (SD's ``text_encoder/model.safetensors``) keep it. Every other class here uses its own names.
    """
    keys = list(model.state_dict())
    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        keys = ["text_model." + k for k in keys]
    return keys
