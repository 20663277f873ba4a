"""Tests for spo_core.reporting: tables, grids and atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spo_core.reporting import (
    atomic_path,
    grid_layout,
    image_grid,
    markdown_table,
    save_png_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_markdown_table_small_frame():
    df = pd.DataFrame({"model": ["base", "spo|lora"], "score": [20.5312345, np.nan], "n": [500, 12]})
    text = markdown_table(df, float_fmt="{:.2f}")
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "| model     | score |   n |"
    assert lines[1] == "| --------- | ----: | --: |"
    assert lines[2] == "| base      | 20.53 | 500 |"
    assert lines[3] == "| spo\\|lora |   n/a |  12 |"
    assert markdown_table(df).split("\n")[2].split("|")[2].strip() == "20.5312"


def test_markdown_table_with_index():
    df = pd.DataFrame({"v": [1.5]}, index=pd.Index(["x"], name="k"))
    assert markdown_table(df, index=True).split("\n")[0] == "| k   |      v |"
    with pytest.raises(TypeError, match="DataFrame"):
        markdown_table([1, 2])


def _grid_images(rows: int, cols: int, h: int = 4, w: int = 5) -> torch.Tensor:
    # Every cell a distinct solid colour, plus one marked pixel to check orientation.
    imgs = torch.zeros(rows, cols, 3, h, w)
    for r in range(rows):
        for c in range(cols):
            imgs[r, c, 0] = (r + 1) / (rows + 1)
            imgs[r, c, 1] = (c + 1) / (cols + 1)
            imgs[r, c, 2] = 0.2
    imgs[0, 0, :, 0, w - 1] = 1.0  # top-right pixel of the first cell is white
    return imgs


def test_image_grid_places_and_scales_cells():
    imgs = _grid_images(2, 3)
    scale = 4
    rows, cols = ["a red square", "b"], ["base", "SPO", "a long column label that wraps around"]
    grid = image_grid(imgs, rows, cols, scale=scale)
    layout = grid_layout(2, 3, 4, 5, rows, cols, scale)
    assert grid.size == (layout.width, layout.height) and grid.mode == "RGB"
    arr = np.asarray(grid)
    for r in range(2):
        for c in range(3):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            assert (x1 - x0, y1 - y0) == (5 * scale, 4 * scale)
            expected = (imgs[r, c] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            # Nearest-neighbour upscaling: every source pixel becomes a scale x scale block.
            np.testing.assert_array_equal(arr[y0:y1, x0:x1], expected.repeat(scale, 0).repeat(scale, 1))
    x0, y0, x1, _ = layout.cell_box(0, 0)
    assert tuple(arr[y0, x1 - 1]) == (255, 255, 255) and tuple(arr[y0, x0]) != (255, 255, 255)
    # Cells do not overlap and leave room for the labels.
    boxes = [layout.cell_box(r, c) for r in range(2) for c in range(3)]
    assert all(b[0] >= layout.left and b[1] >= layout.top for b in boxes)
    assert boxes[0][2] <= boxes[1][0] and boxes[0][3] <= boxes[3][1]
    # The label bands hold dark text pixels; the long column label wrapped onto several lines.
    assert (arr[: layout.top - 2, layout.left :] < 100).any()
    assert (arr[layout.top :, : layout.left - 2] < 100).any()
    assert len(layout.col_lines[2]) > 1


def test_image_grid_without_labels_is_tight():
    imgs = _grid_images(1, 2, h=16, w=16)
    grid = image_grid(imgs, None, None, scale=1)
    assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    arr = np.asarray(grid)
    assert tuple(arr[2, 2]) == tuple((imgs[0, 0, :, 0, 0] * 255).round().int().tolist())


def test_image_grid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="row_labels has 1 entries"):
        image_grid(_grid_images(2, 1), ["only one"], ["c"])
    with pytest.raises(ValueError, match=r"\(rows, cols, 3, H, W\)"):
        image_grid(torch.zeros(2, 3, 4, 4), None, None)
    with pytest.raises(ValueError, match="scale"):
        image_grid(_grid_images(1, 1), None, None, scale=0)


def test_write_json_atomic_sorted_and_creates_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_json_atomic({"b": np.float32(0.5), "a": [1, np.int64(2)], "t": torch.tensor(3.0)}, path)
    text = path.read_text()
    assert text == json.dumps({"a": [1, 2], "b": 0.5, "t": 3.0}, sort_keys=True, indent=2) + "\n"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_failed_json_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic({"ok": 1}, path)
    before = path.read_text()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_json_atomic({"bad": object()}, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failure_inside_atomic_path_removes_partial_temp(tmp_path):
    path = tmp_path / "img.png"
    save_png_atomic(Image.new("RGB", (2, 2), (1, 2, 3)), path)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_bytes(b"half a png")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["img.png"]
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)


def test_text_and_png_round_trip(tmp_path):
    write_text_atomic("héllo\n", tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(TypeError, match="str"):
        write_text_atomic(b"bytes", tmp_path / "r.md")
    t = torch.rand(3, 5, 7)
    save_png_atomic(t, tmp_path / "t.png")
    back = np.asarray(Image.open(tmp_path / "t.png"))
    np.testing.assert_array_equal(back, (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    # The temp file's private 0600 mode must not leak into the result.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "t.png").st_mode & 0o777 == 0o666 & ~umask
