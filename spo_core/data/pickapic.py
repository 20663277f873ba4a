"""The Pick-a-Pic preference schema: read, validate, write, decode and batch image pairs.

A row is one human (or toy-world) judgement: ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded
image bytes) and ``label_0`` / ``label_1`` (floats: (1, 0) image 0 preferred, (0, 1) image 1
preferred, (0.5, 0.5) a tie). The column names stay ``jpg_*`` whatever the encoding: the toy world
stores lossless PNG, real data JPEG. Extra columns (Pick-a-Pic has many) are kept.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from PIL import Image

from spo_core.utils import atomic_path
from ..errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "REQUIRED_COLUMNS",
    "PreferenceDataError",
    "read_preference_dataset",
    "validate_preference_frame",
    "write_preference_dataset",
    "decode_image",
    "encode_image",
    "iter_pairs",
]

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
# Added on reading: where each row came from, so that an error names the file and row.
ORIGIN_COLUMNS = ("source_file", "source_row")
_LABEL_TOL = 1e-6


class PreferenceDataError(InputError, ValueError):
    """A preference dataset that breaks the schema; the message names the file, the problem and the fix."""


def _rows(mask: np.ndarray | pd.Series, limit: int = 5) -> list[int]:
    return np.flatnonzero(np.asarray(mask)).tolist()[:limit]


def validate_preference_frame(df: pd.DataFrame, source: str = "<frame>") -> pd.DataFrame:
    """Check ``df`` against the schema and return it; raise :class:`PreferenceDataError` otherwise.

    Checks: the five columns exist; captions are non-empty strings; images are present; labels are
    finite, within [0, 1] and sum to 1 per row. Row numbers in messages are positions in ``source``.
    """

    def fail(problem: str, fix: str) -> PreferenceDataError:
        return PreferenceDataError(f"preference data '{source}': {problem}. Fix: {fix}")

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise fail(
            f"missing columns {missing} (found {list(df.columns)})",
            f"provide all of {list(REQUIRED_COLUMNS)} (rename columns if they are spelled differently)",
        )
    if len(df) == 0:
        raise fail("no rows", "give a file with at least one preference pair")

    captions = df["caption"]
    not_str = ~captions.map(lambda c: isinstance(c, str))
    if not_str.any():
        raise fail(f"non-string captions at rows {_rows(not_str)}", "fill those captions with text or drop the rows")
    empty = captions.str.strip() == ""
    if empty.any():
        raise fail(f"empty captions at rows {_rows(empty)}", "fill those captions or drop the rows")

    for col in ("jpg_0", "jpg_1"):
        absent = ~df[col].map(lambda b: isinstance(b, (bytes, bytearray, memoryview)) and len(b) > 0)
        if absent.any():
            raise fail(f"missing or non-bytes images in '{col}' at rows {_rows(absent)}", "store encoded image bytes (see encode_image)")

    try:
        labels = df[["label_0", "label_1"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise fail(f"labels are not numeric ({exc})", "store label_0/label_1 as floats") from None
    nonfinite = ~np.isfinite(labels).all(axis=1)
    if nonfinite.any():
        raise fail(f"missing or non-finite labels at rows {_rows(nonfinite)}", "fill them with (1,0), (0,1) or (0.5,0.5)")
    out_of_range = ((labels < -_LABEL_TOL) | (labels > 1 + _LABEL_TOL)).any(axis=1)
    if out_of_range.any():
        raise fail(
            f"labels outside [0, 1] at rows {_rows(out_of_range)} (e.g. {labels[out_of_range][0].tolist()})",
            "labels are preference probabilities: use (1,0), (0,1) or (0.5,0.5)",
        )
    bad_sum = np.abs(labels.sum(axis=1) - 1.0) > _LABEL_TOL
    if bad_sum.any():
        raise fail(
            f"label_0 + label_1 != 1 at rows {_rows(bad_sum)} (e.g. {labels[bad_sum][0].tolist()})",
            "normalise each pair to sum to 1: (1,0), (0,1) or (0.5,0.5) for a tie",
        )
    return df


def _parquet_files(path: Path) -> list[Path]:
    if not path.exists():
        raise PreferenceDataError(f"preference data '{path}': does not exist. Fix: check the path")
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise PreferenceDataError(
                f"preference data '{path}': the folder holds no .parquet files. Fix: point at a parquet file or a "
                "folder of parquet shards"
            )
        return shards
    return [path]


def read_preference_dataset(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet file, or a folder of ``*.parquet`` shards (sorted by name), and validate it.

    Each shard is validated on its own so that errors name the offending file and its row numbers.
    The result has a fresh 0..N-1 index.
    """
    frames = []
    for shard in _parquet_files(Path(path)):
        try:
            df = pd.read_parquet(shard)
        except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
            raise PreferenceDataError(
                f"preference data '{shard}': cannot be read as parquet ({exc}). Fix: repair or re-export the file"
            ) from None
        frames.append(with_origin(validate_preference_frame(df, str(shard)), str(shard)))
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    out["source_file"] = out["source_file"].astype("category")
    logger.info("read %d preference pairs from %s (%d file(s))", len(out), path, len(frames))
    return out


def with_origin(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """``df`` with the columns naming its rows' file and position in it (kept if already there)."""
    if "source_file" in df.columns:
        return df
    df = df.copy()
    df["source_file"] = pd.Categorical([source] * len(df))
    df["source_row"] = np.arange(len(df), dtype=np.int64)
    return df


def row_origin(row: Mapping[str, Any] | pd.Series, index: Any = None) -> str:
    """``file F, row N`` for a row read by :func:`read_preference_dataset`, else ``row <index>``."""
    try:
        return f"file {row['source_file']}, row {int(row['source_row'])}"
    except (KeyError, TypeError, ValueError):
        return f"row {index}"


def write_preference_dataset(rows_or_df: pd.DataFrame | Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Validate and write pairs to one parquet file atomically (temp file + ``os.replace``).

    ``rows_or_df`` is a DataFrame or an iterable of row mappings with the schema's columns.
    """
    df = rows_or_df if isinstance(rows_or_df, pd.DataFrame) else pd.DataFrame(list(rows_or_df))
    path = Path(path)
    validate_preference_frame(df, str(path))
    df = df.drop(columns=[c for c in ORIGIN_COLUMNS if c in df.columns])
    # memoryview cells do not serialise; normalise images to bytes and labels to float64.
    for col in ("jpg_0", "jpg_1"):
        df[col] = df[col].map(bytes)
    for col in ("label_0", "label_1"):
        df[col] = df[col].astype(np.float64)
    with atomic_path(path) as tmp:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
    logger.info("wrote %d preference pairs to %s", len(df), path)
    return path


# ----------------------------------------------------------------------------------------------
# Images


def decode_image(b: bytes, index: Any = None) -> torch.Tensor:
    """Decode encoded image bytes to a float RGB tensor (3, H, W) in [0, 1]."""
    where = "" if index is None else f" ({index})" if isinstance(index, str) else f" at row {index}"
    try:
        with Image.open(io.BytesIO(bytes(b))) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # no memory addresses: messages are recorded
        raise PreferenceDataError(
            f"cannot decode image bytes{where} ({type(exc).__name__}: {detail}). Fix: re-encode that image as PNG or "
            "JPEG (see encode_image) or drop the row"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def encode_image(img: Image.Image | np.ndarray | torch.Tensor, format: str = "PNG", quality: int = 95) -> bytes:
    """Encode an image to bytes (PNG lossless by default; JPEG uses ``quality``).

    Accepts a PIL image, a uint8 array (H, W, 3) or (H, W), or a float tensor (3, H, W) in [0, 1]
    (rounded to the nearest 8-bit level, so k/255 values round-trip exactly through PNG).
    """
    if isinstance(img, torch.Tensor):
        if img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
            raise ValueError(f"expected a float tensor of shape (3, H, W), got {img.dtype} {tuple(img.shape)}")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image tensor values must lie in [0, 1], got [{lo:.4f}, {hi:.4f}]: clamp(0, 1) it first")
        img = (img.detach().cpu().float() * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
            raise ValueError(f"expected a uint8 array (H, W, 3) or (H, W), got {img.dtype} {img.shape}")
        img = Image.fromarray(np.ascontiguousarray(img))
    if not isinstance(img, Image.Image):
        raise TypeError(f"encode_image takes a PIL image, a uint8 numpy array or a float tensor, got {type(img).__name__}")
    fmt = format.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # JPEG has no alpha
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def iter_pairs(
    df: pd.DataFrame, batch_size: int, drop_last: bool = False
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(captions, img0 (B,3,H,W), img1 (B,3,H,W), labels (B,2) float32)`` in row order.

    All images of a batch must share one size (resize them when writing the data otherwise).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PreferenceDataError(f"iter_pairs: the frame lacks columns {missing}. Fix: read it with read_preference_dataset")
    n = len(df)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        part = df.iloc[start : start + batch_size]
        idx = part.index.tolist()
        img0 = [decode_image(b, i) for b, i in zip(part["jpg_0"], idx)]
        img1 = [decode_image(b, i) for b, i in zip(part["jpg_1"], idx)]
        sizes = {tuple(t.shape) for t in img0 + img1}
        if len(sizes) > 1:
            raise PreferenceDataError(
                f"rows {idx[0]}..{idx[-1]} mix image sizes {sorted(sizes)}. Fix: resize all images to one size"
            )
        labels = torch.tensor(part[["label_0", "label_1"]].to_numpy(dtype=np.float32))
        yield list(part["caption"]), torch.stack(img0), torch.stack(img1), labels
