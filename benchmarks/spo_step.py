"""UNet evaluations per SPO training pair and seconds per round, on the tiny config.

    python benchmarks/spo_step.py [--rounds 3] [--profile tiny]

The reference implementation evaluates the policy and the reference model separately for the
win and the lose sample (4 guided evaluations per pair in training). Ours evaluates each distinct
x_t once per model: 2 per pair in single-step SPO. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")

from spo_core.config import load_spo_config  # noqa: E402
from spo_core.methods.spo import SPOMethod  # noqa: E402
from spo_core.models.diffusion import load_policy  # noqa: E402
from spo_core.scorers.base import build_scorer  # noqa: E402
from spo_core.stages.trainer_stage import prompts_from  # noqa: E402
from spo_core.training import train_rounds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_spo_config(args.profile, [f"train.rounds={args.rounds}", f"train.output_dir={tmp}"])
        policy = load_policy(cfg.model, "cpu")
        scorer = build_scorer(cfg.scorer.name, cfg.scorer.path, "cpu", **cfg.scorer.options)
        t0 = time.perf_counter()
        res = train_rounds(policy, SPOMethod(cfg.sampler, cfg.loss, scorer), prompts_from(cfg.prompts),
                           cfg.lora, cfg.optim, cfg.train)
        wall = time.perf_counter() - t0
    hist = res["history"]
    pairs = sum(h["pairs"] for h in hist)
    sample_evals = sum(h["sample_unet_evals"] for h in hist)
    train_evals = sum(h["train_unet_evals"] for h in hist)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "sample_unet_evals_per_pair": sample_evals / max(pairs, 1),
        "train_unet_evals_per_pair": train_evals / max(pairs, 1),
        "reference_train_unet_evals_per_pair": 4.0,
        "seconds_per_round": wall / len(hist),
        "pairs": pairs,
        "rounds": len(hist),
        "peak_rss_mb": round(rss_mb, 1),
    }
    print(f"profile {args.profile}: {len(hist)} rounds, {pairs} pairs, k={cfg.sampler.k}, steps={cfg.sampler.num_steps}", file=sys.stderr)
    for k, v in out.items():
        print(f"{k:40s} {v:.3f}" if isinstance(v, float) else f"{k:40s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
