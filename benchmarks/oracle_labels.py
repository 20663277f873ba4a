"""SPO with exact step labels: the toy world's ground-truth reward as the step scorer.

    python benchmarks/oracle_labels.py [--labels true|reversed|random] [--rounds 15] [key=value ...]

Run in a clone whose ``params.yaml`` (any toy profile) has been through ``dvc repro toy_pretrain
prompts``. It trains ``train_spo`` as configured there, except that every candidate is scored by the
ground-truth reward of its x0 estimate (reversed, or random, on request), the pair threshold is 0,
and the monitor scores 64 held-out prompts every 5 rounds (or at the end). It separates what the step scorer costs
SPO from what the recipe and the base allow: if true labels do not raise the monitored reward, no
preference model will. ``key=value`` overrides ``train_spo`` fields (``sampler.k=8``, ``optim.lr=1e-4``).
The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("SPO_DISABLE_MLFLOW", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from spo_core.config import SPOConfig  # noqa: E402
from spo_core.methods.spo import SPOMethod  # noqa: E402
from spo_core.stages.trainer_stage import run_training  # noqa: E402


class OracleScorer:
    """The ground-truth reward, with its sign flipped (``reversed``) or replaced by noise (``random``)."""

    name = "oracle"

    def __init__(self, reward, labels: str, seed: int = 1):
        self.reward, self.labels = reward, labels
        self.gen = torch.Generator().manual_seed(seed)

    def score(self, images, prompts, timesteps=None):
        s = self.reward.score(images, prompts)
        if self.labels == "random":
            return torch.rand(s.shape, generator=self.gen)
        return -s if self.labels == "reversed" else s


def config(params: str, rounds: int, output_dir: str, overrides: list[str]) -> SPOConfig:
    with open(params) as f:
        raw = yaml.safe_load(f)["train_spo"]
    raw["scorer"] = {"name": "toy_reward", "path": raw["monitor"]["scorer"]["path"]}
    raw["sampler"]["threshold"] = 0.0
    raw["train"].update(rounds=rounds, checkpoint_every=10 * rounds, output_dir=output_dir)
    raw["monitor"].update(num_prompts=64, every=5 if rounds % 5 == 0 else rounds)  # the last round is monitored
    for kv in overrides:
        key, _, value = kv.partition("=")
        *path, last = key.split(".")
        node = raw
        for p in path:
            node = node[p]
        node[last] = yaml.safe_load(value)
    return SPOConfig.model_validate(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", choices=["true", "reversed", "random"], default="true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SPO_METRICS_DIR"] = tmp  # not the clone's tracked metrics/
        cfg = config(args.params, args.rounds, tmp, args.overrides)
        out = run_training("oracle_labels", cfg, lambda policy, reward: SPOMethod(
            cfg.sampler, cfg.loss, OracleScorer(reward, args.labels)))
    start, end = out["monitor_toy_reward_start"], out["monitor_toy_reward_end"]
    print(f"labels {args.labels}, {args.rounds} rounds {args.overrides}: ground-truth reward {start:.3f} -> {end:.3f}")
    print(json.dumps({"labels": args.labels, "rounds": args.rounds, "overrides": args.overrides,
                      "reward_start": start, "reward_end": end, "seconds_per_round": out["seconds_per_round"]}))


if __name__ == "__main__":
    main()
