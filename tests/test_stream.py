"""The streaming preference reader and the noisy-pair stage on several processes.

The reader must return exactly the rows a whole-file read returns, skip and count bad rows, and the
noisy-pair stage must write the same shards with 1 or 2 processes and with or without DataLoader
workers, also when the processes' work differs (uneven shard counts, a bad image on one process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from spo_core.data import stream
from spo_core.data.pickapic import encode_image, read_preference_dataset
from spo_core.data.stream import PreferenceSource


def _rows(n: int, seed: int, size: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    return pd.DataFrame([dict(caption=f"prompt {seed}-{i} {['red', 'blue', 'green'][i % 3]}",
                              jpg_0=encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "JPEG"),
                              jpg_1=encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "JPEG"),
                              label_0=labels[i % 3][0], label_1=labels[i % 3][1]) for i in range(n)])


def _write(df: pd.DataFrame, path: Path, row_group_size: int, **extra) -> None:
    table = pa.Table.from_pandas(df.assign(**extra), preserve_index=False)
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    """Two shards: one of small row groups, one in a single row group; record batches of 2 rows."""
    monkeypatch.setattr(stream, "RECORD_BATCH_ROWS", 2)
    d = tmp_path / "pickapic"
    d.mkdir()
    _write(_rows(11, 0), d / "a.parquet", row_group_size=3)
    _write(_rows(7, 1), d / "b.parquet", row_group_size=100)
    return d


def test_streaming_reader_returns_the_rows_of_a_whole_read(folder):
    whole = read_preference_dataset(folder)
    src = PreferenceSource.open(folder)
    index = src.index(digest=True)
    assert sum(index.skipped.values()) == 0
    got = src.fetcher().frame(index.frame)
    cols = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "source_row"]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), whole[cols].reset_index(drop=True))
    assert got["source_file"].astype(str).tolist() == whole["source_file"].astype(str).tolist()
    # Rows asked for in any order come back in that order (a fetcher streams forward and re-seeks).
    order = np.random.default_rng(0).permutation(len(index.frame))
    part = index.frame.iloc[order]
    imgs = src.fetcher().images(part["file_id"], part["source_row"])
    assert [a for a, _ in imgs] == whole["jpg_0"].iloc[order].tolist()
    # The same rows held in memory give the same digests.
    mem = PreferenceSource.from_frame(whole).index(digest=True).frame
    assert mem["row_digest"].tolist() == index.frame["row_digest"].tolist()


def test_bad_rows_are_skipped_and_counted(tmp_path):
    df = _rows(10, 2)
    df.loc[1, "label_0"] = 0.7  # labels sum to 1.7
    df.loc[2, "label_1"] = float("nan")
    df.loc[3, "caption"] = "   "
    df.loc[4, "jpg_1"] = b""  # no image bytes
    has_label = [True] * 10
    has_label[5] = False  # Pick-a-Pic's unlabelled comparisons
    path = tmp_path / "bad.parquet"
    _write(df, path, row_group_size=4, has_label=has_label)
    index = PreferenceSource.open(path).index(digest=True)
    assert dict(index.skipped) == {"bad_label": 2, "bad_caption": 1, "missing_image": 1, "unlabelled": 1}
    assert index.frame["source_row"].tolist() == [0, 6, 7, 8, 9]
    assert any("row 1: bad_label" in e for e in index.examples)
    # Without digests the image columns are not read: the missing image is found when it is needed.
    assert PreferenceSource.open(path).index().frame["source_row"].tolist() == [0, 4, 6, 7, 8, 9]
    all_bad = tmp_path / "all_bad.parquet"
    _write(df.iloc[1:4], all_bad, row_group_size=4)
    with pytest.raises(stream.PreferenceDataError, match="no usable rows"):
        PreferenceSource.open(all_bad).index()


def _stage_cfg(data: Path, out: str, workers: int) -> dict:
    return {"noisy_pairs": {
        "model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 16},
        "data": str(data), "eval_pairs": 3, "eval_timesteps": [0, 500], "image_size": 16,
        "batch_size": 2, "shard_size": 3, "repeats": 1, "output_dir": out, "device": "cpu", "seed": 3,
        "num_workers": workers}}


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "SPO_DISABLE_MLFLOW": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "SPO_METRICS_DIR": str(cwd / "metrics")}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_write_exactly_the_shards_of_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(_rows(13, 4), data / "a.parquet", row_group_size=4)
    bad = _rows(6, 5)
    bad.loc[2, "jpg_0"] = b"\xff\xd8 not a jpeg"  # undecodable: skipped on whichever process builds it
    _write(bad, data / "b.parquet", row_group_size=4)
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(_stage_cfg(data, "one", workers=0)))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(_stage_cfg(data, "two", workers=2)))
    stage = ["-m", "spo_core.stages.noisy_pairs"]
    _run([sys.executable, *stage, "--params", "one.yaml"], tmp_path)
    # Started as DVC starts it: the stage relaunches itself as launch.num_processes processes.
    _run([sys.executable, *stage, "--params", "two.yaml", "--set", "launch.num_processes=2"], tmp_path)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    train_shards = [k for k in one if k.startswith("train/shard-") and k.endswith(".safetensors")]
    assert len(train_shards) == 6  # 16 training pairs in shards of 3: process 0 builds 3, process 1 builds 3
    for name in one:
        if name != "metrics.json":  # the stage's figures: timings differ
            assert one[name] == two[name], name
    import json

    manifest = json.loads(one["train/manifest.json"])
    assert (manifest["num_planned"], manifest["num_pairs"], manifest["num_skipped"]) == (16, 15, 1)
    assert json.loads(two["train/manifest.json"])["num_pairs"] == 15
    assert json.loads(two["metrics.json"])["processes"] == 2
    assert json.loads(two["metrics.json"])["pairs_written"] == json.loads(one["metrics.json"])["pairs_written"]


@pytest.mark.slow
def test_a_killed_stage_continues_from_its_shards_under_dvc_repro(tmp_path):
    """`persist: true` keeps the shards of a killed `dvc repro`; the next one builds only the rest."""
    import json
    import signal
    import time

    (tmp_path / "data").mkdir()
    _write(_rows(40, 6, size=16), tmp_path / "data" / "a.parquet", row_group_size=16)
    cfg = _stage_cfg(tmp_path / "data", "out", workers=1)
    cfg["noisy_pairs"].update({"eval_pairs": 0, "repeats": 4, "shard_size": 4, "batch_size": 4,
                               "data": "data"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"noisy_pairs": {
        "cmd": f"{sys.executable} -m spo_core.stages.noisy_pairs", "deps": ["data"], "params": ["noisy_pairs"],
        "outs": [{"out": {"persist": True}}]}}}))
    env = {**os.environ, "SPO_DISABLE_MLFLOW": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "SPO_METRICS_DIR": str(tmp_path / "metrics")}
    # Hard links: DVC caches the (large) output without a second copy; safe because every file is
    # replaced by rename, never rewritten in place.
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "cache.type", "hardlink"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    train = tmp_path / "out" / "train"
    proc = subprocess.Popen(["dvc", "repro", "-q"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(train.glob("shard-*.safetensors"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train.glob("shard-*.safetensors")}
    assert 3 <= len(kept) < 40, f"{len(kept)} shards when killed: the stage must be killed mid-way"
    assert not json.loads((train / "manifest.json").read_text())["complete"]

    res = subprocess.run(["dvc", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    built = int(json.loads((tmp_path / "metrics" / "noisy_pairs.json").read_text())["pairs_written"])
    assert built <= 160 - 4 * len(kept)  # the kept shards were not built again
    for name, stat in kept.items():
        p = train / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat, f"{name} was rewritten"
    assert json.loads((train / "manifest.json").read_text())["num_pairs"] == 160
    status = subprocess.run(["dvc", "status", "-q"], cwd=tmp_path, env=env)
    assert status.returncode == 0
    links = {p.name: p.stat().st_nlink for p in train.glob("shard-*")}
    assert min(links.values()) >= 2, f"outputs and cache should share their files: {links}"  # equal files share one
