"""Paired contrasts between two variants of a seed-expanded ablation: "is A better than B?".

An ablation's joint evaluation scores every variant's LoRA on the same prompts and image seeds, and a
spec with ``seeds`` trains each variant once per seed. For ``A - B`` the runs are paired by seed
(``A.s0`` with ``B.s0``, ...) and, within a seed, by item (prompt, image). Two intervals answer two
questions, and a contrast is called only when both exclude zero:

* ``seeds``: the Student-t interval over the per-seed mean differences (S - 1 degrees of freedom):
  would another training seed give the same sign, on these prompts?
* ``prompts``: the Student-t interval over the prompts of each prompt's difference averaged over its
  images and the seeds: would other prompts give the same sign, for these seeds?

With one seed only the prompt interval exists (``seeds`` is NaN) and nothing is called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .evaluation import _aligned
from .stats import mean_ci

COLUMNS = ["contrast", "scorer", "seeds", "prompts", "diff", "seeds_ci_low", "seeds_ci_high",
           "prompts_ci_low", "prompts_ci_high", "excludes_zero"]


def parse_contrast(text: str) -> tuple[str, str]:
    """``"aware - plain"`` -> ``("aware", "plain")``."""
    a, sep, b = text.partition(" - ")
    if not sep or not a.strip() or not b.strip():
        raise ValueError(f"contrast {text!r}: write 'A - B' with two variant names and spaces around the minus")
    return a.strip(), b.strip()


def _item_scores(scores: pd.DataFrame, model: str, column: str) -> pd.Series:
    part = _aligned(scores, model)
    if part.empty:
        raise ValueError(f"no scores for model '{model}' in the joint evaluation: rerun the ablation's compare step")
    return part[column]


def seed_paired_contrast(scores: pd.DataFrame, a_runs: Sequence[str], b_runs: Sequence[str], column: str,
                         level: float = 0.95) -> dict[str, float]:
    """A minus B on one scorer column; ``a_runs[i]`` and ``b_runs[i]`` were trained with the same seed."""
    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError(f"runs {list(a_runs)} and {list(b_runs)} do not pair by seed")
    per_seed, per_prompt = [], []
    for a, b in zip(a_runs, b_runs):
        sa, sb = _item_scores(scores, a, column), _item_scores(scores, b, column)
        if not sa.index.equals(sb.index):
            raise ValueError(f"'{a}' and '{b}' were not scored on the same items: evaluate them in one compare step")
        d = sa - sb
        per_seed.append(float(d.mean()))
        per_prompt.append(d.groupby(level="prompt_idx").mean())
    prompt_means = pd.concat(per_prompt, axis=1).mean(axis=1).to_numpy(np.float64)
    diff, p_lo, p_hi = mean_ci(prompt_means, level)
    s_lo = s_hi = math.nan
    if len(per_seed) > 1:
        _, s_lo, s_hi = mean_ci(per_seed, level)
    excludes = bool(len(per_seed) > 1 and (s_lo > 0 or s_hi < 0) and (p_lo > 0 or p_hi < 0)
                    and np.sign(s_lo) == np.sign(p_lo))
    return {"seeds": len(per_seed), "prompts": len(prompt_means), "diff": diff, "seeds_ci_low": s_lo,
            "seeds_ci_high": s_hi, "prompts_ci_low": p_lo, "prompts_ci_high": p_hi, "excludes_zero": excludes}


def contrast_table(scores: pd.DataFrame, contrasts: Sequence[str], runs_of, columns: Sequence[str],
                   level: float = 0.95) -> pd.DataFrame:
    """One row per (contrast, scorer column); ``runs_of(variant)`` lists a variant's runs in seed order."""
    rows = []
    for text in contrasts:
        a, b = parse_contrast(text)
        for col in columns:
            rows.append({"contrast": f"{a} - {b}", "scorer": col,
                         **seed_paired_contrast(scores, runs_of(a), runs_of(b), col, level)})
    return pd.DataFrame(rows, columns=COLUMNS)
