"""Preference data that does not fit in memory: an index of captions and labels, image bytes on demand.

A :class:`PreferenceSource` is a Pick-a-Pic-schema dataset on disk: a parquet file, a folder of
parquet shards, or a hub dataset opened through ``datasets`` (Arrow files, memory-mapped). Reading
it has two parts:

* :meth:`PreferenceSource.index` reads only the small columns (caption, labels, ``has_label``) of
  every row, keeps the usable rows and counts the others by reason (a bad row is skipped, never a
  crash). With ``digest=True`` it also hashes every row's image bytes, streamed one record batch at
  a time; process p of N hashes only its share of the row groups and the digests are gathered.
* :class:`RowFetcher` returns the image bytes of given rows, reading only the row groups that hold
  them, one record batch at a time. Each DataLoader worker owns one fetcher.

Peak memory is the index (a few dozen bytes per row plus captions) plus one record batch per
reader, whatever the size of the dataset. Row groups are read in record batches of
:data:`RECORD_BATCH_ROWS` rows, so a file written as one giant row group streams too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..scorers.preprocess import looks_like_hub_id
from .pickapic import REQUIRED_COLUMNS, PreferenceDataError, _parquet_files

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
INDEX_COLUMNS = ("caption", "label_0", "label_1")
RECORD_BATCH_ROWS = 64  # rows per record batch when streaming image bytes (~20 MB of Pick-a-Pic JPEGs)
_LABEL_TOL = 1e-6

# Why a row was skipped (the metric names: ``rows_skipped_<reason>``).
SKIP_REASONS = ("unlabelled", "bad_caption", "bad_label", "missing_image", "undecodable_image")


@dataclass
class PairIndex:
    """The usable rows of a source: a frame with caption, label_0, label_1, source_file, source_row.

    ``source_row`` is the row's position in its file; ``file_id`` (a column) indexes
    :attr:`PreferenceSource.files`. ``row_digest`` (uint64, only with ``digest=True``) hashes the
    row's caption, label and image bytes. ``skipped`` counts the rows left out, by reason.
    """

    frame: pd.DataFrame
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few "file F, row N: reason" lines

    def __len__(self) -> int:
        return len(self.frame)


def _as_bytes(v: Any) -> bytes | None:
    if isinstance(v, dict):  # `datasets` Image features: {"bytes": ..., "path": ...}
        v = v.get("bytes")
    if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > 0:
        return bytes(v)
    return None


def row_digest(caption: str, label_0: float, img_0: bytes, img_1: bytes) -> int:
    """A 64-bit content hash of one row: what noisy_pairs fingerprints its data with."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{caption}\x00{float(label_0):.6f}\x00{len(img_0)}\x00".encode())
    h.update(img_0)
    h.update(img_1)
    return int.from_bytes(h.digest(), "little") | 1  # odd: 0 marks "no image bytes"


def usable_mask(captions: list[Any], l0: np.ndarray, l1: np.ndarray, has_label: np.ndarray | None
                ) -> tuple[np.ndarray, list[str | None]]:
    """Which rows of a batch are usable, and the skip reason of each row (None when usable)."""
    n = len(captions)
    reasons: list[str | None] = [None] * n
    labels = np.stack([l0, l1], axis=1).astype(np.float64) if n else np.zeros((0, 2))
    finite = np.isfinite(labels).all(axis=1)
    in_range = ((labels >= -_LABEL_TOL) & (labels <= 1 + _LABEL_TOL)).all(axis=1)
    sums = np.abs(labels.sum(axis=1) - 1.0) <= _LABEL_TOL
    for i, cap in enumerate(captions):
        if has_label is not None and not bool(has_label[i]):
            reasons[i] = "unlabelled"
        elif not isinstance(cap, str) or not cap.strip():
            reasons[i] = "bad_caption"
        elif not (finite[i] and in_range[i] and sums[i]):
            reasons[i] = "bad_label"
    return np.array([r is None for r in reasons], dtype=bool), reasons


def _float_array(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


class _Backend:
    """How rows are read: parquet files, or one Arrow table."""

    files: list[str]

    def num_rows(self, file_id: int) -> int: ...

    def row_groups(self, file_id: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of the file's row groups."""
        ...

    def iter_batches(self, file_id: int, group: int, columns: list[str]) -> Iterable[dict[str, list]]:
        """The group's rows as column lists, one record batch at a time."""
        ...

    def reopened(self) -> "_Backend":
        """A reader of the same data with its own file handles (for another process or worker)."""
        return self


class _ParquetBackend(_Backend):
    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq

        self.files = [str(f) for f in files]
        self._pq = pq
        self._handles: dict[int, Any] = {}
        for fid in range(len(self.files)):
            schema = self._file(fid).schema_arrow
            missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
            if missing:
                raise PreferenceDataError(
                    f"preference data '{self.files[fid]}': missing columns {missing} (found {schema.names}). Fix: "
                    f"provide all of {list(REQUIRED_COLUMNS)} (rename columns if they are spelled differently)")
        self.has_label = all("has_label" in self._file(f).schema_arrow.names for f in range(len(self.files)))

    def __getstate__(self) -> dict:  # file handles stay in their process (DataLoader workers open their own)
        return {"files": self.files, "has_label": self.has_label}

    def reopened(self) -> "_ParquetBackend":
        new = object.__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __setstate__(self, state: dict) -> None:
        import pyarrow.parquet as pq

        self.__dict__.update(state)
        self._pq, self._handles = pq, {}

    def _file(self, fid: int):
        if fid not in self._handles:
            try:
                self._handles[fid] = self._pq.ParquetFile(self.files[fid], pre_buffer=False)
            except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
                raise PreferenceDataError(f"preference data '{self.files[fid]}': cannot be read as parquet ({exc}). "
                                          "Fix: repair or re-export the file") from None
        return self._handles[fid]

    def num_rows(self, fid: int) -> int:
        return self._file(fid).metadata.num_rows

    def row_groups(self, fid: int) -> list[tuple[int, int]]:
        meta, out, start = self._file(fid).metadata, [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            out.append((start, start + n))
            start += n
        return out

    def iter_batches(self, fid: int, group: int, columns: list[str]) -> Iterable[dict[str, list]]:
        for batch in self._file(fid).iter_batches(batch_size=RECORD_BATCH_ROWS, row_groups=[group], columns=columns,
                                                  use_threads=False):
            yield {c: batch.column(c).to_pylist() for c in columns}


class _ArrowBackend(_Backend):
    """A `datasets` Dataset: its Arrow table is memory-mapped, so slices cost no RAM."""

    def __init__(self, name: str, table, reopen: tuple[str, str] | None = None):
        self.files, self.table, self.reopen = [name], table, reopen
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise PreferenceDataError(f"preference data '{name}': missing columns {missing} (found "
                                      f"{table.column_names}). Fix: provide all of {list(REQUIRED_COLUMNS)}")
        self.has_label = "has_label" in table.column_names

    def __getstate__(self) -> dict:
        # A hub dataset is reopened from its memory-mapped cache in the other process, not copied.
        if self.reopen is not None:
            return {"files": self.files, "has_label": self.has_label, "reopen": self.reopen}
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "table" not in state:
            self.table = _hub_table(*state["reopen"])

    def num_rows(self, fid: int) -> int:
        return self.table.num_rows

    def row_groups(self, fid: int) -> list[tuple[int, int]]:
        n, size = self.table.num_rows, 4096  # pseudo row groups: the unit of work sharing and seeking
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def iter_batches(self, fid: int, group: int, columns: list[str]) -> Iterable[dict[str, list]]:
        start, stop = self.row_groups(fid)[group]
        for s in range(start, stop, RECORD_BATCH_ROWS):
            part = self.table.slice(s, min(RECORD_BATCH_ROWS, stop - s)).select(columns)
            yield {c: part.column(c).to_pylist() for c in columns}


def _hub_table(source: str, split: str):
    try:
        import datasets  # optional: only hub sources need it (the `real` extra)
    except ImportError:
        raise PreferenceDataError(
            f"preference data '{source}' is a hub id, which needs the `datasets` package (not installed). Fix: "
            f"`pip install -e '.[real]'`, or export the split '{split}' to parquet and pass its path") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 - hub/offline failures come in many types
        raise PreferenceDataError(
            f"could not load split '{split}' of hub dataset '{source}' ({type(exc).__name__}: {exc}). Fix: check the "
            "id and split, or download it where there is network and pass a local parquet path") from exc
    return ds.data.table if hasattr(ds.data, "table") else ds.data


def _open_hub(source: str, split: str) -> _ArrowBackend:
    return _ArrowBackend(f"{source}[{split}]", _hub_table(source, split), reopen=(source, split))


class PreferenceSource:
    """A Pick-a-Pic-schema dataset, read without loading it: see the module docstring."""

    def __init__(self, backend: _Backend, name: str):
        self.backend, self.name = backend, name

    @classmethod
    def open(cls, source: str | os.PathLike, split: str = "train") -> "PreferenceSource":
        """A local parquet file / folder of shards, or a hub id (owner/name) through ``datasets``."""
        path = Path(source).expanduser()
        if path.exists():
            return cls(_ParquetBackend(_parquet_files(path)), str(source))
        if not looks_like_hub_id(str(source)):
            raise PreferenceDataError(f"preference data '{source}': no such file or folder, and not a hub id "
                                      "(owner/name). Fix: check the path")
        return cls(_open_hub(str(source), split), f"{source}[{split}]")

    @classmethod
    def from_table(cls, table, name: str = "<table>") -> "PreferenceSource":
        """An in-memory or memory-mapped Arrow table (e.g. a `datasets` Dataset's ``.data.table``)."""
        return cls(_ArrowBackend(name, table), name)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str = "<frame>") -> "PreferenceSource":
        """Rows held in memory (tests, small data) behind the same interface."""
        import pyarrow as pa

        cols = [c for c in df.columns if c not in ("source_file", "source_row", "file_id", "row_digest")]
        return cls.from_table(pa.Table.from_pandas(df[cols].reset_index(drop=True), preserve_index=False), name)

    @property
    def files(self) -> list[str]:
        return self.backend.files

    def index(self, digest: bool = False, rank: int = 0, world: int = 1) -> PairIndex:
        """The usable rows (see :class:`PairIndex`); ``digest`` adds each row's content hash.

        With ``world`` > 1 every process reads the small columns of every row, but hashes only the
        row groups ``g`` with ``g % world == rank`` (in file order); the hashes are gathered with
        ``torch.distributed``, so every process returns the same index.
        """
        b = self.backend
        cols = list(INDEX_COLUMNS) + (["has_label"] if b.has_label else [])
        frames, skipped, examples = [], Counter(), []
        groups = [(fid, g) for fid in range(len(b.files)) for g in range(len(b.row_groups(fid)))]
        digests: dict[tuple[int, int], np.ndarray] = {}
        for gi, (fid, g) in enumerate(groups):
            start = b.row_groups(fid)[g][0]
            caps: list[Any] = []
            l0: list[Any] = []
            l1: list[Any] = []
            has: list[Any] = []
            for part in b.iter_batches(fid, g, cols):
                caps += part["caption"]
                l0 += part["label_0"]
                l1 += part["label_1"]
                has += part.get("has_label", [])
            try:
                a0, a1 = _float_array(l0), _float_array(l1)
            except (TypeError, ValueError):
                raise PreferenceDataError(f"preference data '{b.files[fid]}': labels are not numeric. Fix: store "
                                          "label_0/label_1 as floats") from None
            ok, reasons = usable_mask(caps, a0, a1, np.array(has) if b.has_label else None)
            if digest and gi % world == rank:
                # Rows without image bytes get digest 0 (a real digest is odd): dropped after gathering.
                d = np.zeros(len(caps), dtype=np.uint64)
                i = 0
                for part in b.iter_batches(fid, g, list(IMAGE_COLUMNS)):
                    for x0, x1 in zip(part["jpg_0"], part["jpg_1"]):
                        x0, x1 = _as_bytes(x0), _as_bytes(x1)
                        if ok[i] and x0 is not None and x1 is not None:
                            d[i] = row_digest(caps[i], a0[i], x0, x1)
                        i += 1
                digests[(fid, g)] = d
            for i in np.flatnonzero(~ok):
                skipped[reasons[i]] += 1
                if len(examples) < 5 and reasons[i] != "unlabelled":
                    examples.append(f"file {b.files[fid]}, row {start + i}: {reasons[i]}")
            keep = np.flatnonzero(ok)
            frames.append(pd.DataFrame({
                "caption": [caps[i] for i in keep], "label_0": a0[keep], "label_1": a1[keep],
                "file_id": np.full(len(keep), fid, dtype=np.int32), "source_row": (start + keep).astype(np.int64),
                "_group": np.full(len(keep), gi, dtype=np.int64), "_pos": keep.astype(np.int64)}))
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(INDEX_COLUMNS))
        if digest:
            frame = self._merge_digests(frame, digests, skipped, examples, b.files, groups, world)
        frame["source_file"] = pd.Categorical.from_codes(frame["file_id"].to_numpy(), categories=list(b.files))
        frame = frame.drop(columns=["_group", "_pos"])
        if len(frame) == 0:
            raise PreferenceDataError(f"preference data '{self.name}': no usable rows (skipped: {dict(skipped)}). "
                                      "Fix: check the labels and captions of the data (see the log for examples)")
        if skipped:
            bad = {k: v for k, v in skipped.items() if k != "unlabelled"}
            if bad:
                log.warning("%s: skipped %d bad rows (%s), e.g. %s", self.name, sum(bad.values()), bad,
                            "; ".join(examples[:3]))
        log.info("%s: %d usable preference pairs in %d file(s)", self.name, len(frame), len(b.files))
        return PairIndex(frame, skipped, examples)

    @staticmethod
    def _merge_digests(frame: pd.DataFrame, digests: dict, skipped: Counter, examples: list[str], files: list[str],
                       groups: list[tuple[int, int]], world: int) -> pd.DataFrame:
        """Every process's row-group digests in every process; rows without image bytes are dropped."""
        if world > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, digests)
            digests = {k: v for p in parts for k, v in p.items()}
        per_group = [digests[key] for key in groups]
        d = np.array([per_group[gi][pos] for gi, pos in zip(frame["_group"], frame["_pos"])], dtype=np.uint64)
        missing = d == 0
        if missing.any():
            skipped["missing_image"] += int(missing.sum())
        for fid, row in list(zip(frame["file_id"][missing], frame["source_row"][missing]))[:max(0, 5 - len(examples))]:
            examples.append(f"file {files[fid]}, row {row}: missing_image")
        frame = frame[~missing].reset_index(drop=True)
        frame["row_digest"] = d[~missing]
        return frame

    def fetcher(self) -> "RowFetcher":
        """A reader of image bytes with its own file handles: make one per process or DataLoader worker."""
        return RowFetcher(self.backend.reopened())


class RowFetcher:
    """Image bytes of index rows, streamed: rows asked for in file order cost one pass over their groups."""

    def __init__(self, backend: _Backend):
        self.backend = backend
        self._cursor: tuple[int, int] | None = None  # (file, group) being streamed
        self._batches: Any = None
        self._batch: dict[str, list] | None = None
        self._batch_start = 0  # row of the file where self._batch starts

    def _seek(self, fid: int, row: int) -> dict[str, list]:
        groups = self.backend.row_groups(fid)
        g = next(i for i, (a, b) in enumerate(groups) if a <= row < b)
        behind = self._batch is not None and row < self._batch_start
        if self._cursor != (fid, g) or behind:
            self._cursor = (fid, g)
            self._batches = iter(self.backend.iter_batches(fid, g, list(IMAGE_COLUMNS)))
            self._batch, self._batch_start = None, groups[g][0]
        while self._batch is None or row >= self._batch_start + len(self._batch["jpg_0"]):
            if self._batch is not None:
                self._batch_start += len(self._batch["jpg_0"])
            self._batch = next(self._batches)
        return self._batch

    def images(self, file_ids: Iterable[int], rows: Iterable[int]) -> list[tuple[bytes | None, bytes | None]]:
        """(jpg_0, jpg_1) bytes of each (file, row), in the order given; None for a missing image."""
        want = list(zip((int(f) for f in file_ids), (int(r) for r in rows)))
        out: list[tuple[bytes | None, bytes | None]] = [(None, None)] * len(want)
        for i in sorted(range(len(want)), key=lambda j: want[j]):
            fid, row = want[i]
            batch = self._seek(fid, row)
            k = row - self._batch_start
            out[i] = (_as_bytes(batch["jpg_0"][k]), _as_bytes(batch["jpg_1"][k]))
        return out

    def frame(self, index: pd.DataFrame) -> pd.DataFrame:
        """``index`` with its rows' ``jpg_0``/``jpg_1`` bytes added (for data small enough to hold)."""
        imgs = self.images(index["file_id"], index["source_row"])
        out = index.copy()
        out["jpg_0"] = [a for a, _ in imgs]
        out["jpg_1"] = [b for _, b in imgs]
        return out


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Process ``rank``'s contiguous part of ``n`` rows (the first ``n % world`` parts one longer)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (1 if rank < extra else 0))


__all__ = ["PreferenceSource", "PairIndex", "RowFetcher", "row_digest", "usable_mask", "SKIP_REASONS",
           "RECORD_BATCH_ROWS", "shard_rows"]
