"""Do the step scorers' labels point towards better final images? (see spo_core.label_fidelity)

    python benchmarks/step_label_fidelity.py [--prompts 64] [--steps 4,7,10,13,16,19] \
        [--scorer NAME=SCORER:PATH ...] [--lookahead N] [--compare A:B ...] [--params params.yaml]

Run in a clone after ``dvc repro`` (or at least ``toy_pretrain prompts``). The policy, sampler
settings, final scorer (``monitor.scorer``) and held-out prompts come from ``train_spo`` in
``params.yaml``. Step scorers default to the ground truth of the x0 estimate (``x0_truth``) plus
each of ``artifacts/toy/pickscore`` (the plain model of ``train_pm``) and ``artifacts/pm/{agnostic,aware}``
that exists;
``ceiling`` is the final score itself (the largest gap any labels could reach). ``--compare A:B``
prints, per step, scorer A's gap minus scorer B's paired over the prompts with a 95% normal interval
(default: ``pm_aware:toy_pickscore``, the paper's Table 4 as SPO uses the models, when both exist; with
``--lookahead N`` also their ``@laN`` rows). The last line is a JSON object.
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
from spo_core.label_fidelity import paired_gap_difference, step_label_fidelity  # noqa: E402
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
    ap.add_argument("--compare", action="append", default=[], metavar="A:B",
                    help="paired gap difference of step scorer A minus B (names as in the table)")
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
    compare = [tuple(c.split(":")) for c in args.compare]
    if any(len(c) != 2 or not all(c) for c in compare):
        ap.error(f"--compare {args.compare}: write A:B with two step scorers' names, e.g. pm_aware:toy_pickscore")
    if not compare and {"pm_aware", "toy_pickscore"} <= set(specs):
        compare = [("pm_aware", "toy_pickscore")]
    la = [(f"{a}@la{args.lookahead}", f"{b}@la{args.lookahead}") for a, b in compare] if args.lookahead else []
    unknown = sorted({n for pair in compare for n in pair} - set(specs))
    if unknown:
        ap.error(f"--compare names {unknown} are not step scorers here: use some of {sorted(specs)}")
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
    by = {(r.step, r.scorer): r for r in rows}
    paired = []
    for a, b in compare + la:
        for step in steps:
            mean, se = paired_gap_difference(by[(step, a)], by[(step, b)])
            paired.append({"step": step, "t_score": by[(step, a)].t_score, "a": a, "b": b, "diff": mean, "se": se,
                           "ci95": [mean - 1.96 * se, mean + 1.96 * se]})
    if paired:
        print("paired gap differences over the prompts (a - b, 95% normal interval)")
        for p in paired:
            print(f"{p['step']:>4} {p['t_score']:>5.0f} {p['a'] + ' - ' + p['b']:<40} {p['diff']:>+8.4f} "
                  f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
    print(f"{len(prompts)} prompts, k = {s.k}, final scorer {mon.name}; {wall:.0f} s")
    table = [{k: v for k, v in asdict(r).items() if k != "per_prompt"} for r in rows]
    print(json.dumps({"prompts": len(prompts), "k": s.k, "wall_s": round(wall, 1), "rows": table, "paired": paired}))


if __name__ == "__main__":
    try:
        main()
    except (SpoError, FileNotFoundError) as exc:  # missing artifacts: run `dvc repro` first
        raise SystemExit(f"step_label_fidelity: {exc}") from None
