"""Do the step scorers' labels point towards better final images? (see spo_core.label_fidelity)

    python benchmarks/step_label_fidelity.py [--prompts 64] [--steps 4,7,10,13,16,19] \
        [--scorer NAME=SCORER:PATH ...] [--lookahead N] [--params params.yaml]

Run in a clone after ``dvc repro`` (or at least ``toy_pretrain prompts``). The policy, sampler
settings, final scorer (``monitor.scorer``) and held-out prompts come from ``train_spo`` in
``params.yaml``. Step scorers default to the ground truth of the x0 estimate (``x0_truth``) plus
each of ``artifacts/toy/pickscore`` (the plain model of ``train_pm``) and ``artifacts/pm/{agnostic,aware}``
that exists;
``ceiling`` is the final score itself (the largest gap any labels could reach). The last line is a
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from spo_core.config import SPOConfig  # noqa: E402
from spo_core.errors import SpoError  # noqa: E402
from spo_core.label_fidelity import step_label_fidelity  # noqa: E402
from spo_core.models.diffusion import load_policy  # noqa: E402
from spo_core.scorers.base import build_scorer  # noqa: E402
from spo_core.stages.trainer_stage import prompts_from  # noqa: E402

DEFAULT_SCORERS = {"toy_pickscore": ("toy_pickscore", "artifacts/toy/pickscore"),
                   "pm_agnostic": ("step_aware", "artifacts/pm/agnostic"),
                   "pm_aware": ("step_aware", "artifacts/pm/aware")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", default="4,7,10,13,16,19")
    ap.add_argument("--scorer", action="append", default=[], metavar="NAME=SCORER:PATH")
    ap.add_argument("--lookahead", type=int, default=0, help="also score each step scorer on an n-step eta-0 continuation of the candidates")
    args = ap.parse_args()
    torch.manual_seed(0)
    with open(args.params) as f:
        cfg = SPOConfig.model_validate(yaml.safe_load(f)["train_spo"])
    mon = cfg.monitor.scorer
    specs = dict(x0_truth=(mon.name, mon.path))
    if args.scorer:
        for s in args.scorer:
            name, _, rest = s.partition("=")
            kind, _, path = rest.partition(":")
            if not name or not kind:
                ap.error(f"--scorer {s!r}: write NAME=SCORER:PATH, e.g. aware=step_aware:artifacts/pm/aware")
            specs[name] = (kind, path or None)
    else:
        specs.update({n: v for n, v in DEFAULT_SCORERS.items() if os.path.isdir(v[1])})
    policy = load_policy(cfg.model, "cpu")
    final = build_scorer(mon.name, mon.path, "cpu", **mon.options)
    scorers = {n: build_scorer(kind, path, "cpu") for n, (kind, path) in specs.items()}
    prompts = prompts_from(cfg.monitor.prompts)[:args.prompts]
    seeds = [cfg.monitor.seed + i for i in range(len(prompts))]
    steps = [int(s) for s in args.steps.split(",")]
    s = cfg.sampler
    t0 = time.perf_counter()
    rows = step_label_fidelity(policy, prompts, seeds, scorers, final, steps, s.num_steps, s.k,
                               s.guidance_scale, s.eta, args.lookahead, s.decode_batch_size)
    wall = time.perf_counter() - t0
    print(f"{'step':>4} {'t':>5} {'scorer':<18} {'gap (final best - worst)':>26} {'agree':>6}")
    for r in rows:
        print(f"{r.step:>4} {r.t_score:>5.0f} {r.scorer:<18} {r.gap:>+17.4f} +- {r.gap_se:.4f} {r.agree:>6.3f}")
    print(f"{len(prompts)} prompts, k = {s.k}, final scorer {mon.name}; {wall:.0f} s")
    print(json.dumps({"prompts": len(prompts), "k": s.k, "wall_s": round(wall, 1), "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    try:
        main()
    except (SpoError, FileNotFoundError) as exc:  # missing artifacts: run `dvc repro` first
        raise SystemExit(f"step_label_fidelity: {exc}") from None
