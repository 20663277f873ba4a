"""Report outputs: markdown tables, labelled image grids, and atomic file writes.

Every writer here goes through :func:`atomic_path`: the content is written to a temporary file in
the destination folder and moved into place with ``os.replace``, so a reader (DVC, MLflow, a person)
never sees a half-written file and a failed write leaves an existing file untouched.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from .utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "GridLayout",
    "grid_layout",
    "image_grid",
    "markdown_table",
    "save_png_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    if not isinstance(text, str):
        raise TypeError(f"write_text_atomic needs a str, got {type(text).__name__}: convert it with str() first")
    return _write_bytes_atomic(text.encode("utf-8"), path)


def _json_default(obj: Any) -> Any:
    # Metrics often arrive as numpy / torch scalars or paths; everything else is an error.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"object of type {type(obj).__name__} is not JSON-serialisable: convert it to a number, string, list or dict"
    )


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically; returns the path.

    numpy/torch scalars and arrays and paths are converted; any other unknown type raises
    ``TypeError`` before anything touches the disk.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, default=_json_default) + "\n"
    return write_text_atomic(text, path)


def save_png_atomic(img: Image.Image | torch.Tensor, path: str | os.PathLike) -> Path:
    """Save a PIL image (or a float (3, H, W) tensor in [0, 1]) as PNG atomically; returns the path."""
    if isinstance(img, torch.Tensor):
        img = _tensor_to_pil(img)
    if not isinstance(img, Image.Image):
        raise TypeError(f"save_png_atomic needs a PIL image or a (3, H, W) tensor, got {type(img).__name__}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return _write_bytes_atomic(buf.getvalue(), path)


# ----------------------------------------------------------------------------------------------
# Markdown tables


def _format_cell(value: Any, float_fmt: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        text = str(bool(value))
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = "n/a" if math.isnan(float(value)) else float_fmt.format(float(value))
    elif value is None or value is pd.NA or value is pd.NaT:
        text = "n/a"
    else:
        text = str(value)
    # A pipe or a newline would break the row.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(df: pd.DataFrame, float_fmt: str = "{:.4f}", index: bool = False) -> str:
    """Render ``df`` as a GitHub-flavoured markdown table (numeric columns right-aligned).

    Floats use ``float_fmt``; NaN/None show as ``n/a``. With ``index=True`` the index becomes the
    first column (named after the index, or ``index``).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"markdown_table needs a pandas DataFrame, got {type(df).__name__}")
    if index:
        df = df.reset_index()
    headers = [_format_cell(str(c), float_fmt) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    rows = [[_format_cell(v, float_fmt) for v in row] for row in df.itertuples(index=False, name=None)]
    widths = [max([3, len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(headers), rule, *[line(r) for r in rows]]) + "\n"


# ----------------------------------------------------------------------------------------------
# Image grids

_PAD = 2  # pixels between cells and around the labels
_MAX_COL_LABEL_W = 160  # column labels wider than this wrap onto more lines
_MAX_ROW_LABEL_W = 240


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(t.shape)}")
    arr = (t.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def _wrap(font, text: str, max_w: int) -> list[str]:
    """Greedy word wrap to ``max_w`` pixels; words longer than a line are split by characters."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_size(font, candidate)[0] <= max_w:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_size(font, word)[0] > max_w and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_size(font, word[:cut])[0] > max_w:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of an :func:`image_grid`; boxes are (left, top, right, bottom), right/bottom exclusive."""

    width: int
    height: int
    cell_w: int  # upscaled image size
    cell_h: int
    col_w: int  # column slot width (>= cell_w so that a column label fits)
    row_h: int
    left: int  # x where the first column starts (after the row-label band)
    top: int  # y where the first row starts (after the column-label band)
    row_lines: tuple[tuple[str, ...], ...]
    col_lines: tuple[tuple[str, ...], ...]
    line_h: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x0 = self.left + col * (self.col_w + _PAD) + (self.col_w - self.cell_w) // 2
        y0 = self.top + row * (self.row_h + _PAD) + (self.row_h - self.cell_h) // 2
        return x0, y0, x0 + self.cell_w, y0 + self.cell_h


def grid_layout(
    rows: int,
    cols: int,
    height: int,
    width: int,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    scale: int = 1,
) -> GridLayout:
    """Compute where each cell and label of an image grid goes (pure; used by :func:`image_grid`)."""
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    for name, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries but the grid has {n}: give one label per {name[:3]}")
    font = _font()
    line_h = _text_size(font, "Ag|")[1] + 1
    cell_w, cell_h = width * scale, height * scale

    col_lines: tuple[tuple[str, ...], ...] = ()
    col_w = cell_w
    if col_labels is not None:
        natural = max((_text_size(font, str(s))[0] for s in col_labels), default=0)
        col_w = max(cell_w, min(natural, _MAX_COL_LABEL_W))
        col_lines = tuple(tuple(_wrap(font, str(s), col_w)) for s in col_labels)
    row_lines: tuple[tuple[str, ...], ...] = ()
    label_w = 0
    if row_labels is not None:
        row_lines = tuple(tuple(_wrap(font, str(s), _MAX_ROW_LABEL_W)) for s in row_labels)
        label_w = max((_text_size(font, ln)[0] for lines in row_lines for ln in lines), default=0) + 2 * _PAD
    row_h = max([cell_h] + [len(lines) * line_h for lines in row_lines])
    top = (max(len(lines) for lines in col_lines) * line_h + 2 * _PAD) if col_lines else 0
    left = label_w
    return GridLayout(
        width=left + cols * col_w + (cols + 1) * _PAD,
        height=top + rows * row_h + (rows + 1) * _PAD,
        cell_w=cell_w,
        cell_h=cell_h,
        col_w=col_w,
        row_h=row_h,
        left=left + _PAD,
        top=top + _PAD,
        row_lines=row_lines,
        col_lines=col_lines,
        line_h=line_h,
    )


def image_grid(
    images: torch.Tensor,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    scale: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Lay out ``images`` (R, C, 3, H, W), floats in [0, 1], as a labelled RGB grid.

    Images are upscaled by the integer ``scale`` with nearest-neighbour (so tiny 16x16 samples stay
    crisp); labels use PIL's default font, black on ``background``, wrapped when long. Pass ``None``
    for either label list to leave that band out. :func:`grid_layout` gives the cell positions.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 5 or images.shape[2] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"image_grid needs a tensor of shape (rows, cols, 3, H, W), got {shape}")
    rows, cols, _, height, width = images.shape
    layout = grid_layout(rows, cols, height, width, row_labels, col_labels, scale)
    canvas = Image.new("RGB", (layout.width, layout.height), background)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for r in range(rows):
        for c in range(cols):
            tile = _tensor_to_pil(images[r, c])
            if scale != 1:
                tile = tile.resize((layout.cell_w, layout.cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, layout.cell_box(r, c)[:2])
    for c, lines in enumerate(layout.col_lines):
        x_slot = layout.left + c * (layout.col_w + _PAD)
        for i, ln in enumerate(lines):
            x = x_slot + (layout.col_w - _text_size(font, ln)[0]) // 2
            draw.text((x, _PAD + i * layout.line_h), ln, fill=(0, 0, 0), font=font)
    for r, lines in enumerate(layout.row_lines):
        y_slot = layout.top + r * (layout.row_h + _PAD) + (layout.row_h - len(lines) * layout.line_h) // 2
        for i, ln in enumerate(lines):
            draw.text((_PAD, y_slot + i * layout.line_h), ln, fill=(0, 0, 0), font=font)
    return canvas
