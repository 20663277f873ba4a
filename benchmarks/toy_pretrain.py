"""Seconds per toy pretraining step and peak RSS (figures printed, not asserted).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/toy_pretrain.py [--steps 20] [--warmup 3] [--batch-size 64] [--threads N]

Builds the default toy world in a temporary directory and times ``steps`` optimiser steps of the
default toy base model (data rendering, tokenisation, forward, backward, AdamW) after ``warmup``
untimed ones. The 1-minute load average is printed because this machine may be shared: timings
under load are slower. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")

import torch  # noqa: E402

from spo_core.toyworld.config import ToyPretrainConfig, ToyWorldConfig  # noqa: E402
from spo_core.toyworld.pretrain import train_base  # noqa: E402
from spo_core.toyworld.world import load_world, write_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_world(ToyWorldConfig(), f"{tmp}/world")
        world = load_world(f"{tmp}/world")
        timings = {}
        for n in (args.warmup, args.warmup + args.steps):
            cfg = ToyPretrainConfig(steps=n, batch_size=args.batch_size, checkpoint_every=10**9, resume=False,
                                    checkpoint_dir=f"{tmp}/ckpt-{n}", log_every=10**9)
            t0 = time.perf_counter()
            result = train_base(cfg, world)
            timings[n] = time.perf_counter() - t0
        params = sum(p.numel() for p in result.policy.unet.parameters())
    # The difference of two runs cancels model building and the final checkpoint write.
    s_per_step = (timings[args.warmup + args.steps] - timings[args.warmup]) / args.steps
    out = {
        "s_per_step": round(s_per_step, 4),
        "batch_size": args.batch_size,
        "unet_parameters": params,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "steps_in_10_min": int(600 / s_per_step),
    }
    print(f"{out['s_per_step']:.3f} s per pretraining step (batch {args.batch_size}, {params} UNet parameters, "
          f"{out['threads']} threads), peak RSS {out['peak_rss_mb']} MB, load average {out['load_average_1min']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
