"""Real-size preference data through the streaming reader and the noisy-pair stage: rows/s, peak RSS.

    python benchmarks/data_scale.py                         # 1 GB and 5.2 GB folders, 1 and 2 processes
    python benchmarks/data_scale.py --sizes-gb 5.2 --pairs 512 --processes 1 2 4
    python benchmarks/data_scale.py --sizes-gb 1 --processes 1 --pm-steps 20   # + stored vs on the fly

Generates a Pick-a-Pic-schema parquet folder of real row size (two JPEGs of ~150 KB per row, a
caption, labels, ``has_label`` and Pick-a-Pic's other columns; 256 rows per row group, ~1,800 rows
per file) once per size, cached outside the repository (``--cache``, default
``~/.cache/spo/data_scale``). Images come from a pool of distinct 512 px JPEGs, each row's bytes
made unique by a tail after the JPEG end marker (decoders ignore it; parquet cannot deduplicate it).

For each size it measures:

* ``index``: :meth:`PreferenceSource.index` with content digests (every image byte read and
  hashed, what the noisy-pair stage does at start-up), in this process;
* ``noisy_pairs``: the stage itself (``python -m spo_core.stages.noisy_pairs``, under
  ``torch.distributed.run`` for N > 1 processes) with a tiny random SD-1.5 (same diffusers classes,
  64 px) writing the real 224 px output, ``--pairs`` training pairs, 2 DataLoader workers per process.

Peak memory is sampled every 200 ms over the whole process tree: PSS summed over all processes and
DataLoader workers (pages the forked workers share are counted once), and the RSS of the largest
single process. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger("data_scale")
GB, MIB = 1e9, 2**20
ROWS_PER_GROUP, ROWS_PER_FILE = 256, 1792
WORDS = ("a photo of a red fox in the snow, cinematic lighting, 35mm, highly detailed, portrait of an old "
         "sailor, watercolor painting of a lighthouse at dawn, cyberpunk city street at night, neon").split()


def _jpeg_pool(n: int, seed: int = 0, side: int = 512) -> list[bytes]:
    """Distinct JPEGs of about 150 KB: smooth colour fields plus grain (what photos compress like)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((side, side), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 21, (side, side, 3))
        img = np.clip(base + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def generate(folder: Path, size_gb: float, seed: int = 0) -> dict:
    """Write (once) a Pick-a-Pic-schema folder of about ``size_gb`` GB; return its description."""
    spec = {"size_gb": size_gb, "seed": seed, "rows_per_group": ROWS_PER_GROUP, "rows_per_file": ROWS_PER_FILE,
            "version": 2}
    done = folder / "SPEC.json"
    if done.is_file() and json.loads(done.read_text()).get("spec") == spec:
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    pool = _jpeg_pool(96, seed)
    row_bytes = 2 * float(np.mean([len(b) for b in pool])) + 300
    rows = int(size_gb * GB / row_bytes)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    for f, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        pick = rng.integers(0, len(pool), (n, 2))
        tails = rng.integers(0, 2**63, (n, 2), dtype=np.int64)
        jpg0 = [pool[a] + int(t).to_bytes(8, "little") for a, t in zip(pick[:, 0], tails[:, 0])]
        jpg1 = [pool[b] + int(t).to_bytes(8, "little") for b, t in zip(pick[:, 1], tails[:, 1])]
        label0 = rng.choice([1.0, 0.0, 0.5], size=n, p=[0.45, 0.45, 0.1])
        captions = [" ".join(rng.choice(WORDS, size=rng.integers(6, 20))) for _ in range(n)]
        table = pa.table({
            "are_different": pa.array(np.ones(n, dtype=bool)),
            "best_image_uid": pa.array([f"{start + i:012d}" for i in range(n)]),
            "caption": pa.array(captions),
            "created_at": pa.array(np.full(n, 1_680_000_000, dtype="datetime64[s]")),
            "has_label": pa.array(rng.random(n) > 0.02),
            "image_0_uid": pa.array([f"{start + i:012d}a" for i in range(n)]),
            "image_0_url": pa.array([f"https://example.invalid/{start + i}a.jpg" for i in range(n)]),
            "image_1_uid": pa.array([f"{start + i:012d}b" for i in range(n)]),
            "image_1_url": pa.array([f"https://example.invalid/{start + i}b.jpg" for i in range(n)]),
            "jpg_0": pa.array(jpg0, type=pa.binary()),
            "jpg_1": pa.array(jpg1, type=pa.binary()),
            "label_0": pa.array(label0),
            "label_1": pa.array(1.0 - label0),
            "model_0": pa.array(["stable-diffusion-xl"] * n),
            "model_1": pa.array(["stable-diffusion-2-1"] * n),
            "ranking_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "user_id": pa.array(rng.integers(0, 10_000, n)),
            "num_example_per_prompt": pa.array(np.ones(n, dtype=np.int64)),
        })
        tmp = folder / f".train-{f:05d}.parquet.tmp"
        # No dictionary for the image columns: JPEG bytes do not repeat in real data.
        pq.write_table(table, tmp, row_group_size=ROWS_PER_GROUP, use_dictionary=["caption", "model_0", "model_1"])
        tmp.rename(folder / f"train-{f:05d}.parquet")
    info = {"spec": spec, "rows": rows, "files": len(list(folder.glob("*.parquet"))),
            "bytes": sum(p.stat().st_size for p in folder.glob("*.parquet")),
            "mean_jpeg_bytes": round(row_bytes / 2), "generate_s": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info, indent=2))
    return info


class TreeRSS:
    """Peak memory of a process tree, sampled: PSS summed over the tree (pages shared by forked
    DataLoader workers counted once), and the RSS of its largest process."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root, self.interval = psutil.Process(pid), interval
        self.total = self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss, rss = [], []
            for p in procs:
                try:
                    full = p.memory_full_info()
                    pss.append(full.pss)
                    rss.append(full.rss)
                except psutil.Error:
                    pass
            self.total, self.largest = max(self.total, sum(pss)), max(self.largest, max(rss, default=0))
            time.sleep(self.interval)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_index(folder: Path) -> dict:
    """Index with digests in a fresh process (its RSS is then the reader's alone)."""
    code = ("import json,time,resource,sys; from spo_core.data.stream import PreferenceSource; t=time.perf_counter(); "
            f"ix=PreferenceSource.open({str(folder)!r}).index(digest=True); s=time.perf_counter()-t; "
            "print(json.dumps({'rows': len(ix), 'seconds': s, 'skipped': dict(ix.skipped), "
            "'ru_maxrss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    with TreeRSS(proc.pid) as rss:
        out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"index run failed ({proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return {"rows": res["rows"], "seconds": round(res["seconds"], 1), "rows_per_s": round(res["rows"] / res["seconds"]),
            "mb_per_s": round(sum(p.stat().st_size for p in folder.glob("*.parquet")) / 1e6 / res["seconds"]),
            "peak_pss_mib": round(rss.total / MIB), "peak_rss_mib": round(rss.largest / MIB), "skipped": res["skipped"]}


def bench_noisy_pairs(folder: Path, work: Path, processes: int, pairs: int, workers: int, port: int) -> dict:
    cfg = {"noisy_pairs": {"model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 64},
                           "data": str(folder), "eval_pairs": 0, "image_size": 224, "batch_size": 8,
                           "shard_size": 64, "max_pairs": pairs, "output_dir": str(work / "out"), "device": "cpu",
                           "num_workers": workers, "num_threads": 1}}
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    stage = ["-m", "spo_core.stages.noisy_pairs", "--params", str(params)]
    cmd = [sys.executable, *stage] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port), *stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPO_METRICS_DIR": str(work / "metrics")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeRSS(proc.pid) as rss:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"noisy_pairs with {processes} process(es) failed:\n{err[-3000:]}")
    m = json.loads((work / "metrics" / "noisy_pairs.json").read_text())
    out_bytes = sum(p.stat().st_size for p in (work / "out" / "train").glob("shard-*"))
    build_s = m["seconds_per_pair"] * m["pairs_written"]
    return {"processes": processes, "pairs": m["pairs_stored"], "wall_s": round(wall, 1),
            "build_s": round(build_s, 1), "pairs_per_s_build": round(m["pairs_written"] / build_s, 2),
            "startup_s": round(wall - build_s, 1), "peak_pss_total_mib": round(rss.total / MIB),
            "peak_rss_largest_process_mib": round(rss.largest / MIB),
            "output_bytes_per_pair": round(out_bytes / max(m["pairs_stored"], 1))}


def bench_pm_modes(folder: Path, work: Path, pairs: int, steps: int, workers: int) -> dict:
    """train_pm on stored shards vs on the fly (noisy_pairs.train_pairs): seconds per step, disk."""
    from spo_core.preference.tiny import save_tiny_clip

    clip = save_tiny_clip(work / "clip", image_size=32, patch_size=8)
    out: dict = {"pairs": pairs, "steps": steps, "batch_size": 8}
    for mode in ("stored", "on_the_fly"):
        cfg = {"noisy_pairs": {"model": {"pretrained": "tiny:sd15", "kind": "sd15", "resolution": 64},
                               "data": str(folder), "eval_pairs": 0, "image_size": 224, "batch_size": 8,
                               "shard_size": 64, "max_pairs": pairs, "output_dir": str(work / mode), "device": "cpu",
                               "num_workers": workers, "num_threads": 1, "train_pairs": mode},
               "train_pm": {"base": str(clip), "data_dir": str(work / mode), "output_dir": str(work / f"pm_{mode}"),
                            "variants": ["aware"], "batch_size": 8, "max_steps": steps, "checkpoint_every": steps,
                            "device": "cpu", "num_workers": workers, "num_threads": 1}}
        params = work / f"{mode}.yaml"
        params.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SPO_METRICS_DIR": str(work / f"metrics_{mode}")}
        for stage in ("noisy_pairs", "train_pm"):
            res = subprocess.run([sys.executable, "-m", f"spo_core.stages.{stage}", "--params", str(params)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{stage} ({mode}) failed:\n{res.stderr[-3000:]}")
        npm = json.loads((work / f"metrics_{mode}" / "noisy_pairs.json").read_text())
        details = json.loads((work / f"pm_{mode}" / "metrics.json").read_text()) if (work / f"pm_{mode}" / "metrics.json").is_file() \
            else json.loads((work / f"metrics_{mode}" / "train_pm.json").read_text())
        disk = sum(p.stat().st_size for p in (work / mode / "train").iterdir())
        out[mode] = {"noisy_pairs_build_s": round(npm["seconds_per_pair"] * npm["pairs_written"], 1),
                     "train_pm_s_per_step": round(details["train_s/aware"] / steps, 3), "train_set_bytes": disk}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 5.2], help="folder sizes to generate")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="noisy_pairs process counts")
    parser.add_argument("--pairs", type=int, default=256, help="training pairs noisy_pairs builds per run")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spo" / "data_scale")
    parser.add_argument("--pm-steps", type=int, default=0,
                        help="also time train_pm on stored vs on-the-fly noisy pairs (the smallest folder), N steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for size in args.sizes_gb:
        folder = args.cache / f"pickapic_{size:g}gb"
        info = generate(folder, size)
        log.info("data %s: %d rows, %d files, %.2f GB, mean JPEG %d bytes", folder, info["rows"], info["files"],
                 info["bytes"] / GB, info["mean_jpeg_bytes"])
        row = {"size_gb": round(info["bytes"] / GB, 2), "rows": info["rows"], "mean_jpeg_kb": round(info["mean_jpeg_bytes"] / 1e3),
               "index": bench_index(folder), "noisy_pairs": []}
        log.info("  index with digests: %s", row["index"])
        for n in args.processes:
            with tempfile.TemporaryDirectory(prefix="spo-data-scale-") as tmp:
                r = bench_noisy_pairs(folder, Path(tmp), n, args.pairs, args.workers, port=29600 + n)
            log.info("  noisy_pairs: %s", r)
            row["noisy_pairs"].append(r)
        results.append(row)
    modes = None
    if args.pm_steps:
        with tempfile.TemporaryDirectory(prefix="spo-pm-modes-") as tmp:
            modes = bench_pm_modes(args.cache / f"pickapic_{min(args.sizes_gb):g}gb", Path(tmp), 8 * args.pm_steps,
                                   args.pm_steps, args.workers)
        log.info("train_pm stored vs on the fly: %s", modes)
    print(json.dumps({"benchmark": "data_scale", "pairs": args.pairs, "workers": args.workers, "results": results,
                      "train_pm_modes": modes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
