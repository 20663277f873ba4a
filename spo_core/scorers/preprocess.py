"""Shared helpers of the real scorers: tensor image preprocessing and weight resolution.

Image helpers work on float tensors (B, 3, H, W) in [0, 1] and reproduce, with torch ops, the PIL
pipelines the scorers were trained with (CLIP: shortest side + centre crop; open_clip/HPSv2:
longest side + zero padding). Keeping them on tensors lets scorers run batched on any device.

Weight helpers turn a scorer's ``path`` (a local file/directory or a Hugging Face hub id) into
something loadable, and turn hub failures (e.g. offline) into errors that name the id and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from ..errors import InputError

logger = logging.getLogger(__name__)

# OpenAI CLIP statistics, shared by CLIP, open_clip ViT-H-14 (HPSv2), BLIP (ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

T = TypeVar("T")
O = TypeVar("O", bound=BaseModel)


class ScorerLoadError(InputError, RuntimeError):
    """A scorer's weights, tokenizer or config could not be found or do not fit the architecture."""


def parse_options(options_cls: type[O], options: dict[str, Any], scorer: str) -> O:
    """Validate a scorer's ``**options`` into its pydantic model, naming the scorer on failure."""
    try:
        return options_cls(**options)
    except ValidationError as exc:
        allowed = ", ".join(sorted(options_cls.model_fields))
        raise ValueError(f"bad options for scorer '{scorer}' (allowed: {allowed}):\n{exc}") from None


# ----------------------------------------------------------------------------------------------
# Image preprocessing (tensors in [0, 1])
# ----------------------------------------------------------------------------------------------


def check_images(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """Validate a scorer input batch and return it as float32."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"scorers take images as a float tensor (B, 3, H, W) in [0, 1], got {shape}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")
    return images.float()


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # antialias=True follows PIL's bicubic filter when shrinking; clamp mimics PIL's uint8 range.
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (long side truncated, as torchvision/transformers do)."""
    h, w = images.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    return _resize(images, new)


def center_crop(images: torch.Tensor, size: int, rounding: Literal["floor", "round"] = "floor") -> torch.Tensor:
    """Centre crop to ``size`` x ``size``.

    ``floor`` is transformers' CLIPImageProcessor offset, ``round`` torchvision's CenterCrop (used by
    BLIP/ImageReward and OpenAI CLIP); they differ by one pixel when the margin is odd.
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} images to {size}: resize first")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_longest_side_and_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """open_clip ``ResizeMaxSize``: longest side to ``size`` (bicubic), then centre-pad to a square.

    The padding is in pixel space (before normalisation), as in open_clip where it pads the PIL image.
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    out = _resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        out = F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    crop_rounding: Literal["floor", "round"] = "floor",
) -> torch.Tensor:
    """CLIP-style: shortest side to ``size`` (bicubic), centre crop, normalise."""
    return normalize(center_crop(resize_shortest_side(images, size), size, crop_rounding), mean, std)


def pad_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """open_clip eval transform with ``resize_longest_max``: longest side, zero pad, normalise."""
    return normalize(resize_longest_side_and_pad(images, size), mean, std)


def read_clip_image_config(source: str | os.PathLike, default_size: int) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Read (crop size, mean, std) from a ``preprocessor_config.json`` in a local directory.

    Falls back to ``default_size`` and the OpenAI statistics when the directory has none (e.g. a
    toy CLIP saved with ``save_pretrained`` only). Hub ids are resolved to their cached file.
    """
    cfg_file = None
    p = Path(source).expanduser()
    if p.is_dir():
        cfg_file = p / "preprocessor_config.json"
    elif looks_like_hub_id(str(source)) and not p.exists():
        try:
            cfg_file = Path(_hf_hub_download(str(source), "preprocessor_config.json"))
        except Exception:  # noqa: BLE001 - optional file; the model load reports real hub problems
            cfg_file = None
    if cfg_file is None or not cfg_file.is_file():
        logger.info("no preprocessor_config.json in %s: using size %d and OpenAI CLIP mean/std", source, default_size)
        return default_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    cfg = json.loads(cfg_file.read_text())
    crop = cfg.get("crop_size", cfg.get("size", default_size))
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge", default_size))
    mean = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD))
    return int(crop), mean, std


# ----------------------------------------------------------------------------------------------
# Weight resolution: local path or hub id
# ----------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value))


def _hf_hub_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename)


def _hub_error(what: str, source: str, exc: Exception) -> ScorerLoadError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ScorerLoadError(
        f"could not load {what}: '{source}' is not a local path, and as a Hugging Face hub id it failed "
        f"({type(exc).__name__}: {first_line}). Offline or not cached: download '{source}' where there is "
        f"network and pass a local directory (or file) instead."
    )


def resolve_file(source: str | os.PathLike, filename: str, what: str) -> Path:
    """Return a local file for ``source``: the file itself, ``source/filename``, or a hub download."""
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        f = p / filename
        if f.is_file():
            return f
        raise ScorerLoadError(f"{what}: directory {p} has no {filename}; pass the file itself or a directory holding it")
    if not looks_like_hub_id(str(source)):
        raise ScorerLoadError(f"{what}: '{source}' is neither an existing file/directory nor a hub id (owner/name)")
    try:
        return Path(_hf_hub_download(str(source), filename))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable error
        raise _hub_error(f"{what} ({filename})", str(source), exc) from exc


def load_pretrained(loader: Callable[..., T], source: str | os.PathLike, what: str, **kwargs: Any) -> T:
    """Call a ``from_pretrained``-style ``loader`` on a local directory or a hub id.

    Local directories load with ``local_files_only=True`` (never touch the network); hub failures
    raise :class:`ScorerLoadError` naming the id and telling to pass a local directory.
    """
    p = Path(source).expanduser()
    if p.exists():
        try:
            return loader(str(p), local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:  # unreadable files, wrong shapes
            raise ScorerLoadError(f"could not load {what} from local path {p}: {exc}") from exc
    if not looks_like_hub_id(str(source)):
        raise ScorerLoadError(f"{what}: '{source}' is neither an existing directory nor a hub id (owner/name)")
    try:
        return loader(str(source), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(what, str(source), exc) from exc


def load_pretrained_model(model_cls: Any, source: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained`` (float32) that refuses checkpoints missing any of the model's
    weights (transformers would leave them randomly initialised with only a warning)."""
    model, info = load_pretrained(model_cls.from_pretrained, source, what, dtype=torch.float32, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ScorerLoadError(f"{what} at '{source}' lacks {len(missing)} weights of {model_cls.__name__} (first: {missing[:6]})")
    return model


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")


def load_tokenizer(source: str | os.PathLike, what: str) -> Any:
    """``AutoTokenizer`` from a local directory or hub id, refusing directories without vocabulary.

    transformers 5 silently builds an empty tokenizer (special tokens only) from a model directory
    that has no tokenizer files; that would score every prompt alike, so it is an error here.
    """
    from transformers import AutoTokenizer

    p = Path(source).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise ScorerLoadError(f"{what}: {p} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, what)
    if len(tokenizer) < 10:
        raise ScorerLoadError(f"{what}: '{source}' gave a tokenizer with only {len(tokenizer)} tokens (no vocabulary files)")
    return tokenizer


def load_torch_state_dict(file: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load a torch checkpoint safely (weights only) as float32 tensors.

    Accepts a bare state dict or ``{"state_dict": ...}`` / ``{"model": ...}``, and strips a
    ``module.`` prefix left by DistributedDataParallel.
    """
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ScorerLoadError(f"could not read {what} checkpoint {file} with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ScorerLoadError(f"{what} checkpoint {file} is not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    return out
