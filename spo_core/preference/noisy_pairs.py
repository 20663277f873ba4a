"""Noisy preference pairs: what the step-aware preference model is trained and evaluated on.

For a human-labelled pair (caption, image 0, image 1, labels) and a timestep t, both images are
encoded, noised to x_t with ONE shared noise draw, and denoised in one guided (CFG) call of the
frozen base model to the estimate x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), which is
decoded to an image. The preference label stays the human one (REFERENCE.md section 3).

On-disk format (one directory per set, e.g. ``train/`` and ``eval/``)::

    manifest.json              settings fingerprint, counts, "complete" flag
    shard-00000.safetensors    image_0, image_1 (n, 3, S, S) uint8; timestep (n,) int64;
                               label (n, 2) float32; pair_index, entry_index (n,) int64
    shard-00000.json           {"captions": [...]} (written before the safetensors file)

Shards are the unit of resumption: each is written atomically, and a shard whose safetensors
entry_index covers the planned entry range is complete and skipped on a re-run. Entry k draws its t
(if not fixed) and its noise from a generator seeded by (seed, set salt, k) only, so a resumed or
extended run writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..data.pickapic import PreferenceDataError, decode_image, row_origin
from ..data.stream import PreferenceSource, RowFetcher, shard_rows
from ..scorers.preprocess import center_crop, resize_shortest_side
from ..utils import atomic_dir, atomic_file
from ..errors import InputError

log = logging.getLogger(__name__)

FORMAT = "spo-noisy-pairs"
FORMAT_VERSION = 3  # 2: content digests of the image bytes; 3: skipped entries, entry_range, row digests
MANIFEST = "manifest.json"
TRAIN_SALT, EVAL_SALT = 0, 1
DRAW = -1  # plan marker: draw t ~ U{0..T-1} from the entry's generator


class NoisyPairsError(InputError, RuntimeError):
    """A noisy-pair directory that cannot be built or read; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# Sources and splits


def open_source(source: str, split: str = "train") -> PreferenceSource:
    """Pick-a-Pic-schema pairs: a local parquet file / folder of shards, or a hub id via ``datasets``."""
    return PreferenceSource.open(source, split)


def decisive(df: pd.DataFrame) -> pd.DataFrame:
    """Pairs with a strict preference (ties dropped): the ones accuracy is measured on."""
    return df[(df["label_0"] - df["label_1"]).abs() > 1e-6]


def _caption_rank(caption: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{caption}".encode()).hexdigest()


def split_holdout(df: pd.DataFrame, eval_pairs: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Carve ``eval_pairs`` decisive pairs out of ``df`` by whole captions (seeded, order-free).

    Every row of a held-out caption leaves the training split, so no evaluation prompt is trained on.
    """
    if eval_pairs <= 0:
        return df.reset_index(drop=True), df.iloc[:0]
    counts = decisive(df).groupby("caption").size()
    chosen, total = [], 0
    for cap in sorted(counts.index, key=lambda c: _caption_rank(c, seed)):
        if total >= eval_pairs:
            break
        chosen.append(cap)
        total += int(counts[cap])
    held = df["caption"].isin(set(chosen))
    train_df = df[~held].reset_index(drop=True)
    eval_df = decisive(df[held]).head(eval_pairs).reset_index(drop=True)
    if len(train_df) == 0:
        raise NoisyPairsError(f"holding out {eval_pairs} pairs leaves no training pairs ({len(df)} pairs, "
                              f"{df['caption'].nunique()} captions). Fix: lower eval_pairs or give eval_data")
    if total < eval_pairs:
        log.warning("only %d decisive pairs available for evaluation (asked for %d)", total, eval_pairs)
    return train_df, eval_df


@torch.no_grad()
def relabel_with_scorer(df: pd.DataFrame, source: PreferenceSource, scorer, threshold: float = 0.1, batch_size: int = 32,
                        rank: int = 0, world: int = 1) -> pd.DataFrame:
    """Replace labels by ``scorer``'s judgement of the clean images (the reference's SDXL recipe).

    p = softmax([s0, s1]); (1, 0) if p0 - p1 > threshold, (0, 1) if p1 - p0 > threshold, else a tie.
    Process ``rank`` of ``world`` scores its contiguous part of the rows; the scores are gathered.
    A row whose image does not decode becomes a tie (it is skipped later, when its image is needed).
    """
    part_rows = shard_rows(len(df), rank, world)
    mine = df.iloc[part_rows]
    fetch = source.fetcher()
    s0 = np.zeros(len(mine), dtype=np.float64)
    s1 = np.zeros(len(mine), dtype=np.float64)
    for start in tqdm(range(0, len(mine), batch_size), desc="relabel", unit="batch", disable=len(mine) <= batch_size):
        part = mine.iloc[start:start + batch_size]
        blobs = fetch.images(part["file_id"], part["source_row"])
        where = [row_origin(row, i) for i, row in part.iterrows()]
        images, owners = [], []
        for j, (pair, w) in enumerate(zip(blobs, where)):
            try:
                images += [decode_image(pair[0], w), decode_image(pair[1], w)]
                owners.append(j)
            except PreferenceDataError:
                pass
        caps = [str(part["caption"].iloc[j]) for j in owners for _ in (0, 1)]
        scores = np.zeros(len(images))
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, img in enumerate(images):  # the scorer batches images of one size
            by_size.setdefault(tuple(img.shape), []).append(j)
        for idx in by_size.values():
            scores[idx] = scorer.score(torch.stack([images[j] for j in idx]), [caps[j] for j in idx]).double().cpu().numpy()
        for n, j in enumerate(owners):
            s0[start + j], s1[start + j] = scores[2 * n], scores[2 * n + 1]
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (s0, s1))
        s0 = np.concatenate([p[0] for p in parts])
        s1 = np.concatenate([p[1] for p in parts])
    p = torch.softmax(torch.tensor(np.stack([s0, s1], 1)), dim=1).numpy()
    diff = p[:, 0] - p[:, 1]
    out = df.copy()
    out["label_0"] = np.where(diff > threshold, 1.0, np.where(diff < -threshold, 0.0, 0.5))
    out["label_1"] = 1.0 - out["label_0"]
    log.info("relabelled %d pairs: %.1f%% ties", len(out), 100 * float((out["label_0"] == 0.5).mean()) if len(out) else 0)
    return out


# ----------------------------------------------------------------------------------------------
# Plans and per-entry randomness


@dataclass(frozen=True)
class EntryPlan:
    """What to build: entry k uses row ``pair_index[k]`` at ``timestep[k]`` (DRAW: random)."""

    pair_index: np.ndarray
    timestep: np.ndarray
    salt: int

    def __len__(self) -> int:
        return len(self.pair_index)


def train_plan(num_pairs: int, repeats: int = 1, max_pairs: int | None = None) -> EntryPlan:
    """Each pair ``repeats`` times with a random t (entry k -> pair k mod N), bounded by ``max_pairs``."""
    n = num_pairs * repeats if max_pairs is None else min(num_pairs * repeats, max_pairs)
    k = np.arange(n, dtype=np.int64)
    return EntryPlan(k % max(num_pairs, 1), np.full(n, DRAW, dtype=np.int64), TRAIN_SALT)


def eval_plan(num_pairs: int, timesteps: list[int]) -> EntryPlan:
    """Every pair at every timestep, grouped by timestep."""
    pair = np.tile(np.arange(num_pairs, dtype=np.int64), len(timesteps))
    t = np.repeat(np.asarray(timesteps, dtype=np.int64), num_pairs)
    return EntryPlan(pair, t, EVAL_SALT)


def entry_generator(seed: int, salt: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, salt, index): resumable and device-independent."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(salt), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_entry(seed: int, salt: int, index: int, timestep: int, latent_shape: tuple[int, ...],
               num_train_timesteps: int = 1000) -> tuple[int, torch.Tensor]:
    """(t, noise) of one entry: t first (if drawn), then the noise shared by both images."""
    g = entry_generator(seed, salt, index)
    t = int(torch.randint(0, num_train_timesteps, (1,), generator=g)) if timestep == DRAW else int(timestep)
    return t, torch.randn(latent_shape, generator=g)


# ----------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class BuildSettings:
    image_size: int | None = 224  # stored side; None: the diffusion model's resolution
    guidance_scale: float = 5.0
    batch_size: int = 8
    shard_size: int = 512
    seed: int = 0
    clean_at_zero: bool = False  # t == 0 entries store the clean image instead of a one-step estimate
    num_train_timesteps: int = 1000


def to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side to ``size`` then centre crop (CLIP's geometry, PIL-like bicubic)."""
    return center_crop(resize_shortest_side(images, size), size)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def estimate_x0_images(policy, images_0: torch.Tensor, images_1: torch.Tensor, captions: list[str], timesteps: torch.Tensor,
                       noise: torch.Tensor, guidance_scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded one-step x0 estimates of both images of B pairs, in one guided network call.

    ``images_*``: (B, 3, R, R) in [0, 1] at the policy's resolution; ``noise``: (B, C, h, w), shared
    by the two images of a pair; ``timesteps``: (B,) on the 0..1000 scale of the preference model
    (the policy's process maps them to its own times: DDIM timesteps, or flow times t / 1000 with
    x_t = (1 - t) x0 + t eps). Returns two (B, 3, R, R) tensors in [0, 1].
    """
    b = images_0.shape[0]
    dev = policy.device
    proc = policy.process
    latents = policy.encode_images(torch.cat([images_0, images_1]).to(dev))
    eps = torch.cat([noise, noise]).to(dev, latents.dtype)
    t = proc.from_1000(torch.cat([timesteps, timesteps]).to(dev))
    x_t = proc.add_noise(latents, eps, t)
    cond = policy.encode_prompts(captions).select(list(range(b)) * 2)
    out = policy.predict(x_t, t, cond, guidance_scale)
    decoded = policy.decode(proc.x0(x_t, t, out))
    return decoded[:b], decoded[b:]


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


DIGEST_BLOCK = 4096  # rows per block digest: a changed row is located to its block


def _frame_digest(df: pd.DataFrame) -> tuple[str, list[str]]:
    """A content hash of the rows (their ``row_digest``: captions, labels, image bytes), and one per block."""
    if "row_digest" not in df.columns:
        raise ValueError("the rows carry no row_digest: index the source with PreferenceSource.index(digest=True)")
    d = np.ascontiguousarray(df["row_digest"].to_numpy(dtype=np.uint64))
    blocks = [hashlib.blake2b(d[i:i + DIGEST_BLOCK].tobytes(), digest_size=8).hexdigest()
              for i in range(0, len(d), DIGEST_BLOCK)]
    return hashlib.blake2b("".join(blocks).encode(), digest_size=16).hexdigest(), blocks


def _mismatch(out: Path, old: dict[str, Any], fingerprint: dict[str, Any], blocks: list[str], df: pd.DataFrame,
              source: PreferenceSource) -> str:
    """Say what differs between an existing set and this run: which settings, or which rows of which file."""
    old_fp = old.get("fingerprint") or {}
    differ = sorted(k for k in set(old_fp) | set(fingerprint) if old_fp.get(k) != fingerprint.get(k))
    if set(differ) <= {"data_digest", "num_rows"}:
        old_blocks = old.get("data_blocks") or []
        i = next((j for j, (a, b) in enumerate(zip(old_blocks, blocks)) if a != b), min(len(old_blocks), len(blocks)))
        lo, hi = i * DIGEST_BLOCK, min((i + 1) * DIGEST_BLOCK, len(df)) - 1
        part = df.iloc[lo:hi + 1]
        bad = ""
        for (a, b), (idx, row) in zip(source.fetcher().images(part["file_id"], part["source_row"]), part.iterrows()):
            for col, blob in (("jpg_0", a), ("jpg_1", b)):
                try:
                    decode_image(blob)
                except PreferenceDataError:
                    bad = f"; {col} of {row_origin(row, idx)} does not decode"
                    break
            if bad:
                break
        where = f"rows {lo}-{hi}" if lo <= hi else f"the row count ({old_fp.get('num_rows')} -> {len(df)})"
        return (f"{out} was built from other data: {where} differ{bad}. Fix: if the data change is intended, delete "
                f"{out} and rerun; otherwise restore the data (the existing shards stay usable)")
    detail = ", ".join(f"{k}: {json.dumps(old_fp.get(k), sort_keys=True)} -> {json.dumps(fingerprint.get(k), sort_keys=True)}"
                       for k in differ if k not in ("data_digest", "num_rows"))
    return (f"{out} holds noisy pairs built with other settings ({detail}). Fix: restore those settings, or delete "
            f"{out} to rebuild")


def _shard_range(path: Path) -> tuple[int, int] | None:
    """The [start, stop) entry range a shard file was built for, or None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            r = f.get_tensor("entry_range")
        return int(r[0]), int(r[1])
    except Exception:  # noqa: BLE001 - an unreadable shard is rebuilt
        return None


def _read_manifest(out: Path) -> dict[str, Any] | None:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(out / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_shard(out_dir: Path, index: int, tensors: dict[str, torch.Tensor], captions: list[str], start: int, stop: int,
                skipped: list[dict[str, Any]] | None = None) -> Path:
    """Write shard ``index``, built for entries [start, stop): captions json first, then the safetensors file.

    ``tensors["entry_index"]`` lists the entries it holds (default: all of [start, stop)); entries
    whose images did not decode are left out and listed in ``skipped`` (json). Both writes are
    atomic and the safetensors file, which records the range, goes last: a shard whose safetensors
    file has the planned range is complete.
    """
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    tensors.setdefault("entry_index", torch.arange(start, stop, dtype=torch.int64))
    n = len(tensors["entry_index"])
    tensors.setdefault("pair_index", tensors["entry_index"].clone())
    tensors["entry_range"] = torch.tensor([start, stop], dtype=torch.int64)
    for key in ("image_0", "image_1", "timestep", "label", "pair_index"):
        if key not in tensors or tensors[key].shape[0] != n:
            raise ValueError(f"shard {index}: '{key}' must hold {n} rows")
    if tensors["image_0"].dtype != torch.uint8 or tensors["image_0"].shape != tensors["image_1"].shape:
        raise ValueError("image_0 / image_1 must be uint8 tensors of one shape (n, 3, S, S)")
    if len(captions) != n:
        raise ValueError(f"shard {index}: {len(captions)} captions for {n} pairs")
    tensors["timestep"] = tensors["timestep"].long()
    tensors["label"] = tensors["label"].float()
    name = _shard_name(index)
    with atomic_file(out_dir / f"{name}.json", "w") as fh:
        json.dump({"captions": list(captions), "skipped": list(skipped or [])}, fh)
    path = out_dir / f"{name}.safetensors"
    with atomic_file(path, "wb") as fh:
        # The range lives in tensors, not in header metadata: safetensors writes metadata keys in
        # hash order, which would make identical shards differ byte-wise.
        fh.write(safetensors_save(tensors))
    return path


def write_noisy_pair_set(out_dir: str | os.PathLike, image_0: torch.Tensor, image_1: torch.Tensor, timestep: torch.Tensor,
                         label: torch.Tensor, captions: list[str], shard_size: int = 512,
                         source: dict[str, Any] | None = None) -> Path:
    """Write pairs produced elsewhere (uint8 (n, 3, S, S) images) as a complete noisy-pair set.

    The whole set is written atomically and replaces ``out_dir``.
    """
    n = image_0.shape[0]
    num_shards = math.ceil(n / shard_size)
    h = hashlib.sha256()
    for x in (image_0, image_1, timestep.long(), label.float()):
        h.update(x.contiguous().cpu().numpy().tobytes())
    h.update("\x00".join(captions).encode())
    fingerprint = {"format": FORMAT, "format_version": FORMAT_VERSION, "data_digest": h.hexdigest()[:16]}
    with atomic_dir(out_dir) as tmp:
        for s in range(num_shards):
            a, b = s * shard_size, min((s + 1) * shard_size, n)
            write_shard(tmp, s, {"image_0": image_0[a:b], "image_1": image_1[a:b], "timestep": timestep[a:b],
                                 "label": label[a:b]}, captions[a:b], a, b)
        _write_manifest(tmp, {"fingerprint": fingerprint, "source": source or {}, "num_pairs": n,
                              "num_shards": num_shards, "image_size": int(image_0.shape[-1]),
                              "shard_size": shard_size, "complete": True})
    return Path(out_dir)


@dataclass
class BuildStats:
    pairs_total: int  # entries planned
    pairs_written: int  # entries built by this run (all processes)
    shards_total: int
    shards_written: int
    seconds: float
    pairs_stored: int = 0  # entries in the finished set (planned minus skipped)
    pairs_skipped: int = 0  # entries left out because an image did not decode

    @property
    def seconds_per_pair(self) -> float:
        return self.seconds / self.pairs_written if self.pairs_written else 0.0


class _EntryBatches(IterableDataset):
    """The decoded inputs of one process's shards, batch by batch: what DataLoader workers prepare.

    Worker w of W takes shards ``todo[w::W]`` and yields their batches in order (one item: up to
    ``batch_size`` consecutive entries of one shard), so image reading and JPEG decoding run in the
    workers while the main process runs the model.
    """

    def __init__(self, source: PreferenceSource, df: pd.DataFrame, plan: EntryPlan, todo: list[tuple[int, int, int]],
                 settings: BuildSettings, resolution: int, latent_shape: tuple[int, ...]):
        self.source = source
        rows = plan.pair_index
        self.file_id = df["file_id"].to_numpy()
        self.source_row = df["source_row"].to_numpy()
        self.source_file = [str(f) for f in df["source_file"].cat.categories]
        self.captions = df["caption"].tolist()
        self.labels = df[["label_0", "label_1"]].to_numpy(dtype=np.float32)
        self.rows, self.timestep, self.salt = rows, plan.timestep, plan.salt
        self.todo, self.settings, self.resolution, self.latent_shape = todo, settings, resolution, latent_shape

    def batches_of(self, start: int, stop: int) -> int:
        return math.ceil((stop - start) / self.settings.batch_size)

    def _item(self, fetch: RowFetcher, shard: int, ks: range) -> dict[str, Any]:
        st = self.settings
        rows = self.rows[list(ks)]
        blobs = fetch.images(self.file_id[rows], self.source_row[rows])
        ok, clean0, clean1, skipped = [], [], [], []
        for k, r, (b0, b1) in zip(ks, rows, blobs):
            where = f"file {self.source_file[self.file_id[r]]}, row {int(self.source_row[r])}"
            try:
                x0 = to_square(decode_image(b0, where)[None], self.resolution)[0]
                x1 = to_square(decode_image(b1, where)[None], self.resolution)[0]
            except PreferenceDataError as exc:
                skipped.append({"entry": int(k), "origin": where, "reason": str(exc).split(" Fix:")[0]})
                ok.append(False)
                continue
            ok.append(True)
            clean0.append(x0)
            clean1.append(x1)
        keep = [k for k, good in zip(ks, ok) if good]
        draws = [draw_entry(st.seed, self.salt, k, int(self.timestep[k]), self.latent_shape, st.num_train_timesteps)
                 for k in keep]
        empty = torch.zeros(0, 3, self.resolution, self.resolution)
        kept_rows = self.rows[keep]
        return {
            "shard": shard,
            "entries": torch.tensor(keep, dtype=torch.int64),
            "pair_index": torch.from_numpy(kept_rows.astype(np.int64)),
            "clean0": torch.stack(clean0) if clean0 else empty,
            "clean1": torch.stack(clean1) if clean1 else empty,
            "t": torch.tensor([d[0] for d in draws], dtype=torch.long),
            "noise": torch.stack([d[1] for d in draws]) if draws else torch.zeros(0, *self.latent_shape),
            "captions": [str(self.captions[r]) for r in kept_rows],
            "label": torch.from_numpy(self.labels[kept_rows]),
            "skipped": skipped,
        }

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        fetch = self.source.fetcher()  # this worker's own file handles
        bs = self.settings.batch_size
        for shard, start, stop in self.todo[wid::nw]:
            for b0 in range(start, stop, bs):
                yield self._item(fetch, shard, range(b0, min(b0 + bs, stop)))


def _world() -> tuple[int, int]:
    """(rank, world size) of a torchrun / accelerate launch (the process group is set up by the caller)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather_sum(values: list[int], world: int) -> list[int]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t]


def _stored_counts(out: Path, num_shards: int) -> tuple[int, list[dict[str, Any]]]:
    """Entries stored in a set's shards, and the entries its shards list as skipped."""
    stored, skipped = 0, []
    for s in range(num_shards):
        f = out / f"{_shard_name(s)}.safetensors"
        with safe_open(str(f), framework="pt") as h:
            stored += int(h.get_slice("entry_index").get_shape()[0])
        skipped += json.loads(f.with_suffix(".json").read_text()).get("skipped", [])
    return stored, skipped


def _fingerprint(policy, df: pd.DataFrame, plan: EntryPlan, settings: BuildSettings) -> tuple[dict[str, Any], list[str]]:
    """What a set's content depends on: settings, data (content digest), model; and the block digests."""
    digest, blocks = _frame_digest(df)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "settings": asdict(settings), "salt": plan.salt,
        "data_digest": digest, "num_rows": len(df),
        "model": {"class": type(policy.denoiser).__name__, "kind": policy.kind, "resolution": policy.resolution,
                  "dtype": str(policy.dtype), "unet_parameters": sum(p.numel() for p in policy.denoiser.parameters())},
    }, blocks


def build_noisy_pairs(policy, source: PreferenceSource, df: pd.DataFrame, out_dir: str | os.PathLike, plan: EntryPlan,
                      settings: BuildSettings, source_info: dict[str, Any] | None = None,
                      num_workers: int = 0) -> BuildStats:
    """Write the entries of ``plan`` (rows of the index ``df`` of ``source``) as shards; skip complete ones.

    Under torchrun / accelerate launch, process p builds the shards s with s % N == p; every
    entry's randomness depends only on (seed, set, entry), so the shards are the same whatever the
    number of processes. ``num_workers`` DataLoader workers read and decode the images. Entries
    whose images do not decode are left out and counted. Raises :class:`NoisyPairsError` if
    ``out_dir`` holds shards built with other settings or data.
    """
    rank, world = _world()
    out = Path(out_dir)
    size = settings.image_size or policy.resolution
    fingerprint, blocks = _fingerprint(policy, df, plan, settings)
    n = len(plan)
    num_shards = math.ceil(n / settings.shard_size)
    # The source is recorded but not fingerprinted: the same data under another path may resume.
    manifest = {"fingerprint": fingerprint, "data_blocks": blocks, "source": source_info or {}, "num_pairs": n,
                "num_shards": num_shards, "image_size": size, "shard_size": settings.shard_size, "complete": False}
    old = _read_manifest(out)
    # An older format, or a set computed on the fly (no shards), holds nothing worth keeping.
    older_format = old is not None and ((old.get("fingerprint") or {}).get("format_version") != FORMAT_VERSION
                                        or "on_the_fly" in old)
    if old is not None and not older_format and old.get("fingerprint") != fingerprint:
        raise NoisyPairsError(_mismatch(out, old, fingerprint, blocks, df, source))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if older_format:
            log.info("%s was written in an older format (version %s): rebuilding it", out,
                     (old.get("fingerprint") or {}).get("format_version"))
        _write_manifest(out, manifest)
        for stale in sorted(out.glob("shard-*.safetensors")):  # shards beyond a shrunk plan must not be read
            if older_format or int(stale.stem.split("-")[1]) >= num_shards:
                stale.unlink()
                stale.with_suffix(".json").unlink(missing_ok=True)
    _barrier(world)
    todo = []
    for s in range(rank, num_shards, world):
        start, stop = s * settings.shard_size, min((s + 1) * settings.shard_size, n)
        if _shard_range(out / f"{_shard_name(s)}.safetensors") != (start, stop):
            todo.append((s, start, stop))
    pending = sum(stop - start for _, start, stop in todo)
    log.info("%s: %d pairs in %d shards; process %d of %d builds %d of them", out, n, num_shards, rank, world, pending)
    t0 = time.perf_counter()
    batches = _EntryBatches(source, df, plan, todo, settings, policy.resolution, policy.latent_shape)
    expected = {s: batches.batches_of(start, stop) for s, start, stop in todo}
    ranges = {s: (start, stop) for s, start, stop in todo}
    # Spawned, not forked, workers: a fork of a process with live threads (MLflow's system metrics,
    # an in-process Prefect flow) can die in the child. The readers reopen their files there.
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None,
                        multiprocessing_context="spawn" if num_workers else None)
    open_shards: dict[int, dict[str, Any]] = {}
    with tqdm(total=pending, desc=f"noisy pairs -> {out.name}", unit="pair", disable=pending == 0 or rank != 0) as bar:
        for item in loader:
            buf = open_shards.setdefault(item["shard"], {"parts": [], "captions": [], "skipped": [], "seen": 0})
            if len(item["entries"]):
                est0, est1 = estimate_x0_images(policy, item["clean0"], item["clean1"], item["captions"], item["t"],
                                                item["noise"], settings.guidance_scale)
                if settings.clean_at_zero:
                    zero = (item["t"] == 0).view(-1, 1, 1, 1).to(est0.device)
                    est0 = torch.where(zero, item["clean0"].to(est0), est0)
                    est1 = torch.where(zero, item["clean1"].to(est1), est1)
                buf["parts"].append({"image_0": to_uint8(to_square(est0, size)), "image_1": to_uint8(to_square(est1, size)),
                                     "timestep": item["t"], "label": item["label"], "pair_index": item["pair_index"],
                                     "entry_index": item["entries"]})
                buf["captions"] += item["captions"]
            buf["skipped"] += item["skipped"]
            buf["seen"] += 1
            bar.update(len(item["entries"]) + len(item["skipped"]))
            if buf["seen"] == expected[item["shard"]]:
                s = item["shard"]
                parts = buf["parts"] or [{"image_0": torch.zeros(0, 3, size, size, dtype=torch.uint8),
                                          "image_1": torch.zeros(0, 3, size, size, dtype=torch.uint8),
                                          "timestep": torch.zeros(0, dtype=torch.long), "label": torch.zeros(0, 2),
                                          "pair_index": torch.zeros(0, dtype=torch.long),
                                          "entry_index": torch.zeros(0, dtype=torch.long)}]
                tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                write_shard(out, s, tensors, buf["captions"], *ranges[s], skipped=buf["skipped"])
                if buf["skipped"]:
                    log.warning("shard %d: skipped %d entries whose images do not decode, e.g. %s", s,
                                len(buf["skipped"]), buf["skipped"][0]["origin"])
                del open_shards[s]
    seconds = time.perf_counter() - t0
    written, shards_written = _gather_sum([pending, len(todo)], world)
    _barrier(world)
    stored, skipped = _stored_counts(out, num_shards)
    if rank == 0:
        manifest.update({"complete": True, "num_pairs": stored, "num_planned": n, "num_skipped": len(skipped)})
        _write_manifest(out, manifest)
    _barrier(world)
    return BuildStats(n, written, num_shards, shards_written, seconds, stored, len(skipped))


# ----------------------------------------------------------------------------------------------
# Reading


class NoisyPairs(Dataset):
    """A built noisy-pair directory as a torch Dataset (images read lazily from memory-mapped shards).

    Items: ``image_0``/``image_1`` (3, S, S) uint8, ``timestep`` () int64, ``label`` (2,) float32,
    ``caption`` str.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None or not manifest.get("complete"):
            raise NoisyPairsError(f"{self.path} is not a complete noisy-pair set (no complete {MANIFEST}). Fix: run "
                                  "the noisy_pairs stage to the end (it resumes where it stopped)")
        self.manifest = manifest
        self.image_size = int(manifest["image_size"])
        self.shards = [self.path / f"{_shard_name(s)}.safetensors" for s in range(manifest["num_shards"])]
        shard_of, offset, timesteps, labels, self.captions = [], [], [], [], []
        for s, f in enumerate(self.shards):
            if not f.is_file():
                raise NoisyPairsError(f"{f} is missing although {MANIFEST} says complete. Fix: re-run noisy_pairs")
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor("timestep")
                timesteps.append(t)
                labels.append(h.get_tensor("label"))
            self.captions += json.loads(f.with_suffix(".json").read_text())["captions"]
            shard_of.append(torch.full((len(t),), s, dtype=torch.int64))
            offset.append(torch.arange(len(t), dtype=torch.int64))
        self.shard_of = torch.cat(shard_of) if shard_of else torch.zeros(0, dtype=torch.int64)
        self.offset = torch.cat(offset) if offset else torch.zeros(0, dtype=torch.int64)
        self.timesteps = torch.cat(timesteps) if timesteps else torch.zeros(0, dtype=torch.int64)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, 2)
        if not (len(self.captions) == len(self.timesteps) == manifest["num_pairs"]):
            raise NoisyPairsError(f"{self.path}: shard contents ({len(self.timesteps)} pairs) disagree with {MANIFEST} "
                                  f"({manifest['num_pairs']}). Fix: delete the folder and re-run noisy_pairs")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getstate__(self) -> dict:  # open file handles do not cross process boundaries
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.shards[s]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, o = int(self.shard_of[i]), int(self.offset[i])
        h = self._handle(s)
        return {
            "image_0": h.get_slice("image_0")[o: o + 1][0],
            "image_1": h.get_slice("image_1")[o: o + 1][0],
            "timestep": self.timesteps[i],
            "label": self.labels[i],
            "caption": self.captions[i],
        }

    def timestep_values(self) -> list[int]:
        return sorted(set(self.timesteps.tolist()))


class OnTheFlyPairs(Dataset):
    """A noisy-pair set computed while training, as the reference code does: no shards on disk.

    Items (read in DataLoader workers) are the decoded clean images with the entry's t and noise;
    :meth:`finish` turns a collated batch into what :class:`NoisyPairs` yields (uint8 x0-estimate
    images) with one guided call of the frozen base model, loaded once per process. Entry k draws
    the t and noise the stored build would draw, so the inputs match a stored set up to the
    floating-point effect of other UNet batch compositions (at most one 8-bit level in tests).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None or "on_the_fly" not in manifest:
            raise NoisyPairsError(f"{self.path} is not an on-the-fly noisy-pair set. Fix: run noisy_pairs with "
                                  "train_pairs: on_the_fly")
        self.manifest = manifest
        spec = manifest["on_the_fly"]
        fp = manifest["fingerprint"]
        self.settings = BuildSettings(**fp["settings"])
        self.image_size = int(manifest["image_size"])
        index = pd.read_parquet(self.path / ON_THE_FLY_INDEX)
        self.file_id, self.source_row = index["file_id"].to_numpy(), index["source_row"].to_numpy()
        self.row_captions = index["caption"].tolist()
        self.row_labels = index[["label_0", "label_1"]].to_numpy(dtype=np.float32)
        self.pair_index, self.plan_timestep = np.load(self.path / "plan.npy")
        self.salt, self.model_cfg = int(spec["salt"]), spec["model"]
        self.resolution = int(fp["model"]["resolution"])
        self.source = PreferenceSource.open(manifest["source"]["data"], manifest["source"].get("split", "train"))
        if list(self.source.files) != list(spec["files"]):
            raise NoisyPairsError(f"the source of {self.path} ({manifest['source']['data']}) now has other files than "
                                  "when the set was made. Fix: rerun noisy_pairs")
        self.captions = [self.row_captions[r] for r in self.pair_index]
        self.labels = torch.from_numpy(self.row_labels[self.pair_index])
        self._fetch: tuple[int, RowFetcher] | None = None
        self._policy = None

    def __len__(self) -> int:
        return len(self.pair_index)

    def __getstate__(self) -> dict:  # workers open their own reader; the model stays in the main process
        return {**self.__dict__, "_fetch": None, "_policy": None}

    def _fetcher(self) -> RowFetcher:
        if self._fetch is None or self._fetch[0] != os.getpid():  # one per DataLoader worker
            self._fetch = (os.getpid(), self.source.fetcher())
        return self._fetch[1]

    def __getitem__(self, k: int) -> dict[str, Any]:
        r = int(self.pair_index[k])
        (b0, b1), = self._fetcher().images([self.file_id[r]], [self.source_row[r]])
        where = f"file {self.source.files[self.file_id[r]]}, row {int(self.source_row[r])}"
        clean0 = to_square(decode_image(b0, where)[None], self.resolution)[0]
        clean1 = to_square(decode_image(b1, where)[None], self.resolution)[0]
        return {"clean_0": clean0, "clean_1": clean1, "entry": torch.tensor(int(k)), "label": self.labels[k],
                "caption": self.captions[k]}

    def finish(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """The batch's x0-estimate images (uint8) and timesteps, computed now."""
        if self._policy is None:
            from ..config import ModelConfig
            from ..models.diffusion import load_policy

            self._policy = load_policy(ModelConfig(**self.model_cfg), device=torch.device(device))
            self._policy.denoiser.requires_grad_(False)
        policy, st = self._policy, self.settings
        draws = [draw_entry(st.seed, self.salt, int(k), int(self.plan_timestep[int(k)]), policy.latent_shape,
                            st.num_train_timesteps) for k in batch["entry"]]
        t = torch.tensor([d[0] for d in draws], dtype=torch.long)
        noise = torch.stack([d[1] for d in draws])
        est0, est1 = estimate_x0_images(policy, batch["clean_0"], batch["clean_1"], list(batch["caption"]), t, noise,
                                        st.guidance_scale)
        return {"image_0": to_uint8(to_square(est0, self.image_size)), "image_1": to_uint8(to_square(est1, self.image_size)),
                "timestep": t, "label": batch["label"], "caption": batch["caption"]}


def open_pairs(path: str | os.PathLike) -> NoisyPairs | OnTheFlyPairs:
    """A noisy-pair set as written by the stage: stored shards, or computed on the fly."""
    manifest = _read_manifest(Path(path))
    return OnTheFlyPairs(path) if manifest is not None and "on_the_fly" in manifest else NoisyPairs(path)


ON_THE_FLY_INDEX = "index.parquet"


def write_on_the_fly_set(policy, model_cfg, df: pd.DataFrame, out_dir: str | os.PathLike, plan: EntryPlan,
                         settings: BuildSettings, source_info: dict[str, Any], files: list[str]) -> int:
    """Record what :class:`OnTheFlyPairs` needs to compute ``plan``'s entries during training.

    Nothing is denoised here: the folder holds the manifest (fingerprint, model, source, plan) and
    the index of the rows used (captions, labels, file and row; no images). Returns its entries.
    """
    fingerprint, blocks = _fingerprint(policy, df, plan, settings)
    fingerprint["on_the_fly"] = True
    if _world()[0] != 0:
        return len(plan)
    with atomic_dir(out_dir, defer=False) as tmp:
        pd.DataFrame({"file_id": df["file_id"].to_numpy(), "source_row": df["source_row"].to_numpy(),
                      "caption": df["caption"].astype(str).to_numpy(), "label_0": df["label_0"].to_numpy(),
                      "label_1": df["label_1"].to_numpy()}).to_parquet(tmp / ON_THE_FLY_INDEX, index=False)
        np.save(tmp / "plan.npy", np.stack([plan.pair_index, plan.timestep]))
        _write_manifest(tmp, {"fingerprint": fingerprint, "data_blocks": blocks, "source": source_info,
                              "num_pairs": len(plan), "image_size": settings.image_size or policy.resolution,
                              "complete": True, "on_the_fly": {"model": model_cfg.model_dump(mode="json"),
                                                               "files": files, "salt": plan.salt}})
    return len(plan)


# ----------------------------------------------------------------------------------------------
# The stage


def _process_group(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun / accelerate launch, join the process group.

    torch.distributed directly: accelerate's PartialState reports one process for CPU-only (gloo)
    launches although the group holds several.
    """
    import torch.distributed as dist

    from ..stages.common import launched
    from ..utils import resolve_device

    if not launched():
        return 0, 1, resolve_device(device)
    gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if gpu:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    else:
        dev = resolve_device(device)
    return rank, world, dev


def _skip_metrics(prefix: str, index) -> dict[str, float]:
    return {f"{prefix}rows_skipped_{reason}": int(index.skipped.get(reason, 0))
            for reason in ("unlabelled", "bad_caption", "bad_label", "missing_image")}


def run_noisy_pairs(cfg) -> dict[str, float]:
    """Build ``<output_dir>/train`` and ``<output_dir>/eval`` from a :class:`NoisyPairsConfig`."""
    from ..models.diffusion import load_policy

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world, device = _process_group(cfg.device)
    policy = load_policy(cfg.model, device=device)
    source = open_source(cfg.data, cfg.split)
    index = source.index(digest=True, rank=rank, world=world)
    data = index.frame
    held_source = open_source(cfg.eval_data, cfg.eval_split) if cfg.eval_data is not None else None
    held_index = held_source.index(digest=True, rank=rank, world=world) if held_source is not None else None
    held = held_index.frame if held_index is not None else None
    if cfg.relabel is not None:
        # Relabel before choosing held-out pairs: accuracy is measured on pairs the judge finds
        # decisive, as the reference does after relabelling.
        from ..scorers.base import build_scorer

        judge = build_scorer(cfg.relabel.name, path=cfg.relabel.path, device=policy.device, **cfg.relabel.options)
        data = relabel_with_scorer(data, source, judge, cfg.relabel_threshold, rank=rank, world=world)
        if held is not None:
            held = relabel_with_scorer(held, held_source, judge, cfg.relabel_threshold, rank=rank, world=world)
        del judge
    if held is not None:
        train_df = data
        eval_df = decisive(held).head(cfg.eval_pairs).reset_index(drop=True)
        overlap = len(set(train_df["caption"]) & set(eval_df["caption"]))
        if overlap:
            log.warning("%d held-out captions also occur in the training data", overlap)
    else:
        train_df, eval_df = split_holdout(data, cfg.eval_pairs, cfg.seed)
    settings = BuildSettings(image_size=cfg.image_size, guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size,
                             shard_size=cfg.shard_size, seed=cfg.seed, num_train_timesteps=cfg.num_train_timesteps)
    out = Path(cfg.output_dir)
    plan = train_plan(len(train_df), cfg.repeats, cfg.max_pairs)
    info = {"data": cfg.data, "split": cfg.split}
    if cfg.train_pairs == "on_the_fly":
        n = write_on_the_fly_set(policy, cfg.model, train_df, out / "train", plan, settings, info, source.files)
        train = BuildStats(n, 0, 0, 0, 0.0, n, 0)
        log.info("%s/train: %d entries recorded; train_pm computes them on the fly", out, n)
    else:
        train = build_noisy_pairs(policy, source, train_df, out / "train", plan, settings, source_info=info,
                                  num_workers=cfg.num_workers)
    metrics: dict[str, float] = {
        "pairs_total": train.pairs_total,
        "pairs_written": train.pairs_written,
        "pairs_stored": train.pairs_stored,
        "entries_skipped_undecodable": train.pairs_skipped,
        "seconds_per_pair": round(train.seconds_per_pair, 6),
        "source_pairs": len(data),
        "train_source_pairs": len(train_df),
        "processes": world,
        **_skip_metrics("", index),
    }
    if len(eval_df):
        eval_settings = BuildSettings(**{**asdict(settings), "clean_at_zero": cfg.clean_eval_at_zero})
        ev = build_noisy_pairs(policy, held_source or source, eval_df, out / "eval",
                               eval_plan(len(eval_df), cfg.eval_timesteps), eval_settings,
                               source_info={"data": cfg.eval_data or cfg.data,
                                            "split": cfg.eval_split if cfg.eval_data else cfg.split,
                                            "holdout": cfg.eval_data is None}, num_workers=cfg.num_workers)
        metrics.update({"eval_pairs": len(eval_df), "eval_entries_total": ev.pairs_total,
                        "eval_entries_written": ev.pairs_written, "eval_entries_stored": ev.pairs_stored,
                        "eval_entries_skipped_undecodable": ev.pairs_skipped,
                        "eval_seconds_per_pair": round(ev.seconds_per_pair, 6)})
        if held_index is not None:
            metrics.update(_skip_metrics("eval_", held_index))
    log.info("noisy pairs: %s", metrics)
    return metrics
