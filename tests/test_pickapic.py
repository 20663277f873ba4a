"""Tests for spo_core.data.pickapic with tiny synthetic images."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spo_core.data.pickapic import (
    PreferenceDataError,
    decode_image,
    encode_image,
    iter_pairs,
    read_preference_dataset,
    write_preference_dataset,
)


def _img(seed: int, h: int = 4, w: int = 6) -> torch.Tensor:
    # Values on the 8-bit grid so that PNG round-trips exactly.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0


def _rows(n: int = 5) -> list[dict]:
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    return [
        {
            "caption": f"a caption {i}",
            "jpg_0": encode_image(_img(2 * i)),
            "jpg_1": encode_image(_img(2 * i + 1)),
            "label_0": labels[i % 3][0],
            "label_1": labels[i % 3][1],
            "extra": i,
        }
        for i in range(n)
    ]


def test_encode_decode_round_trip_all_inputs():
    t = _img(0)
    assert torch.equal(decode_image(encode_image(t)), t)
    arr = (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert torch.equal(decode_image(encode_image(arr)), t)
    assert torch.equal(decode_image(encode_image(Image.fromarray(arr))), t)
    gray = decode_image(encode_image(arr[:, :, 0]))
    assert gray.shape == (3, 4, 6) and torch.equal(gray[0], gray[2])
    jpeg = encode_image(torch.full((3, 8, 8), 0.5), format="JPEG")
    assert jpeg[:2] == b"\xff\xd8"
    assert torch.allclose(decode_image(jpeg), torch.full((3, 8, 8), 0.5), atol=3 / 255)
    assert Image.open(io.BytesIO(encode_image(t))).format == "PNG"


def test_encode_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_image(torch.full((3, 2, 2), 1.5))
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="PIL image"):
        encode_image([1, 2, 3])


def test_decode_error_names_row():
    with pytest.raises(PreferenceDataError, match="row 17.*re-encode"):
        decode_image(b"garbage", index=17)


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "out" / "pairs.parquet"
    write_preference_dataset(_rows(), path)
    assert os.listdir(path.parent) == ["pairs.parquet"]
    df = read_preference_dataset(path)
    assert list(df["caption"]) == [f"a caption {i}" for i in range(5)]
    assert list(df["extra"]) == list(range(5))  # extra columns survive
    assert torch.equal(decode_image(df["jpg_1"][3]), _img(7))


def test_read_folder_of_shards(tmp_path):
    rows = _rows(5)
    write_preference_dataset(pd.DataFrame(rows[3:]), tmp_path / "shard-1.parquet")
    write_preference_dataset(rows[:3], tmp_path / "shard-0.parquet")
    df = read_preference_dataset(tmp_path)
    assert list(df.index) == list(range(5))
    assert list(df["caption"]) == [r["caption"] for r in rows]


def test_iter_pairs_batches(tmp_path):
    write_preference_dataset(_rows(5), tmp_path / "p.parquet")
    df = read_preference_dataset(tmp_path / "p.parquet")
    batches = list(iter_pairs(df, batch_size=2))
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    captions, img0, img1, labels = batches[1]
    assert captions == ["a caption 2", "a caption 3"]
    assert img0.shape == (2, 3, 4, 6) and img0.dtype == torch.float32
    assert torch.equal(img0[0], _img(4)) and torch.equal(img1[1], _img(7))
    assert torch.equal(labels, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert [len(b[0]) for b in iter_pairs(df, 2, drop_last=True)] == [2, 2]


def test_iter_pairs_mixed_sizes_and_bad_bytes():
    rows = _rows(2)
    rows[1]["jpg_0"] = encode_image(_img(9, h=5, w=5))
    with pytest.raises(PreferenceDataError, match="mix image sizes"):
        list(iter_pairs(pd.DataFrame(rows), 2))
    rows = _rows(3)
    rows[2]["jpg_1"] = b"broken"
    with pytest.raises(PreferenceDataError, match="row 2"):
        list(iter_pairs(pd.DataFrame(rows), 3))


def _bad_file(tmp_path, mutate) -> str:
    df = pd.DataFrame(_rows(3))
    df = mutate(df)
    path = tmp_path / "bad.parquet"
    df.to_parquet(path)
    return str(path)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.drop(columns=["jpg_1", "label_1"]), r"missing columns \['jpg_1', 'label_1'\]"),
        (lambda d: d.assign(label_0=[1.0, 1.5, 0.5], label_1=[0.0, -0.5, 0.5]), r"outside \[0, 1\] at rows \[1\]"),
        (lambda d: d.assign(label_0=[1.0, 0.5, 0.5], label_1=[0.0, 0.0, 0.5]), r"!= 1 at rows \[1\]"),
        (lambda d: d.assign(label_1=[0.0, np.nan, 0.5]), r"non-finite labels at rows \[1\]"),
        (lambda d: d.assign(caption=["ok", "  ", "ok"]), r"empty captions at rows \[1\]"),
        (lambda d: d.assign(caption=["ok", "ok", None]), r"non-string captions at rows \[2\]"),
        (lambda d: d.assign(jpg_0=[b"x", b"", b"y"]), r"images in 'jpg_0' at rows \[1\]"),
        (lambda d: d.iloc[:0], "no rows"),
    ],
)
def test_validation_errors_name_file_problem_fix(tmp_path, mutate, match):
    path = _bad_file(tmp_path, mutate)
    with pytest.raises(PreferenceDataError, match=match) as info:
        read_preference_dataset(path)
    assert path in str(info.value) and "Fix:" in str(info.value)


def test_invalid_rows_are_not_written(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_preference_dataset(_rows(2), path)
    rows = _rows(2)
    rows[0]["label_0"] = 2.0
    with pytest.raises(PreferenceDataError, match="outside"):
        write_preference_dataset(rows, path)
    assert len(read_preference_dataset(path)) == 2
    assert os.listdir(tmp_path) == ["pairs.parquet"]


def test_missing_paths(tmp_path):
    with pytest.raises(PreferenceDataError, match="does not exist"):
        read_preference_dataset(tmp_path / "nope.parquet")
    with pytest.raises(PreferenceDataError, match="no .parquet files"):
        read_preference_dataset(tmp_path)
    (tmp_path / "x.parquet").write_bytes(b"nope")
    with pytest.raises(PreferenceDataError, match="cannot be read as parquet"):
        read_preference_dataset(tmp_path / "x.parquet")
