"""Paired contrasts between ablation variants (spo_core.contrasts): closed forms and spec checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spo_core.ablation import AblationSpec
from spo_core.contrasts import contrast_table, parse_contrast, seed_paired_contrast
from spo_core.stats import mean_ci


def scores_of(values: dict[str, list[float]], prompts: int = 3, images: int = 2) -> pd.DataFrame:
    """Item scores per model, items in (prompt, image) order."""
    rows = []
    for model, vals in values.items():
        for i, v in enumerate(vals):
            p, j = divmod(i, images)
            rows.append({"model": model, "prompt": f"p{p}", "prompt_idx": p, "image_idx": j, "seed": i, "r": v})
    return pd.DataFrame(rows)


def test_seed_paired_contrast_in_closed_form():
    a0, b0 = [0.5, 0.7, 0.2, 0.4, 0.9, 0.9], [0.4, 0.5, 0.2, 0.1, 0.6, 0.8]  # diffs .1 .2 0 .3 .3 .1
    a1, b1 = [0.3, 0.3, 0.6, 0.6, 0.2, 0.4], [0.3, 0.1, 0.5, 0.5, 0.2, 0.2]  # diffs 0 .2 .1 .1 0 .2
    scores = scores_of({"a.s0": a0, "a.s1": a1, "b.s0": b0, "b.s1": b1})
    got = seed_paired_contrast(scores, ["a.s0", "a.s1"], ["b.s0", "b.s1"], "r")
    d0, d1 = np.subtract(a0, b0), np.subtract(a1, b1)
    seed_means = [d0.mean(), d1.mean()]  # 1/6 and 0.1
    prompt_means = ((d0 + d1) / 2).reshape(3, 2).mean(axis=1)  # 0.125, 0.125, 0.15
    assert got["diff"] == pytest.approx(np.mean(seed_means)) and got["seeds"] == 2 and got["prompts"] == 3
    _, lo, hi = mean_ci(seed_means)
    assert (got["seeds_ci_low"], got["seeds_ci_high"]) == pytest.approx((lo, hi))
    _, lo, hi = mean_ci(prompt_means)
    assert (got["prompts_ci_low"], got["prompts_ci_high"]) == pytest.approx((lo, hi))
    # Two seeds: t with 1 degree of freedom (12.71) makes the seed interval wide enough to include 0.
    assert got["seeds_ci_low"] < 0 < got["prompts_ci_low"] and got["excludes_zero"] is False
    # The same difference in every seed and prompt: both intervals collapse on it, and it is called.
    same = scores_of({"a.s0": [0.3] * 6, "a.s1": [0.4] * 6, "b.s0": [0.1] * 6, "b.s1": [0.2] * 6})
    sure = seed_paired_contrast(same, ["a.s0", "a.s1"], ["b.s0", "b.s1"], "r")
    assert sure["diff"] == pytest.approx(0.2) and sure["excludes_zero"] is True
    # One seed: only the prompt interval exists, and nothing is called.
    one = seed_paired_contrast(same, ["a.s0"], ["b.s0"], "r")
    assert math.isnan(one["seeds_ci_low"]) and one["excludes_zero"] is False


def test_contrast_errors_and_table():
    assert parse_contrast(" aware - plain ") == ("aware", "plain")
    for bad in ("aware-plain", "aware - ", "aware"):
        with pytest.raises(ValueError, match="write 'A - B'"):
            parse_contrast(bad)
    scores = scores_of({"a.s0": [1.0] * 6, "b.s0": [0.0] * 6})
    with pytest.raises(ValueError, match="no scores for model 'c.s0'"):
        seed_paired_contrast(scores, ["c.s0"], ["b.s0"], "r")
    with pytest.raises(ValueError, match="do not pair by seed"):
        seed_paired_contrast(scores, ["a.s0"], ["b.s0", "b.s1"], "r")
    short = pd.concat([scores, scores_of({"c.s0": [0.0] * 4}, prompts=2)])
    with pytest.raises(ValueError, match="not scored on the same items"):
        seed_paired_contrast(short, ["a.s0"], ["c.s0"], "r")
    table = contrast_table(scores, ["a - b"], lambda v: [f"{v}.s0"], ["r"])
    assert table[["contrast", "scorer", "diff"]].values.tolist() == [["a - b", "r", 1.0]]


def test_spec_contrasts_need_a_compare_step_and_known_variants():
    base = {"table": "t", "variants": {"aware": [], "plain": ["scorer.name=toy_pickscore"]}, "seeds": [0, 1]}
    compare = {"stage": "evaluate", "lora": "{run}/lora", "set": ["output_dir={root}/compare"]}
    spec = AblationSpec.model_validate({**base, "compare": compare, "contrasts": ["aware - plain"]})
    assert spec.contrasts == ["aware - plain"] and spec.runs_of("aware") == ["aware.s0", "aware.s1"]
    with pytest.raises(ValueError, match="need a 'compare' step"):
        AblationSpec.model_validate({**base, "contrasts": ["aware - plain"]})
    with pytest.raises(ValueError, match=r"names \['agnostic'\], not variants"):
        AblationSpec.model_validate({**base, "compare": compare, "contrasts": ["aware - agnostic"]})


def test_report_section_from_the_joint_evaluation(tmp_path):
    from spo_core.ablation import contrast_section, contrasts_of

    spec = AblationSpec.model_validate({
        "table": "t", "variants": {"a": [], "b": []}, "seeds": [0, 1], "contrasts": ["a - b"],
        "compare": {"stage": "evaluate", "lora": "{run}/lora", "set": ["output_dir={root}/compare"]}})
    same = scores_of({"a.s0": [0.3] * 6, "a.s1": [0.4] * 6, "b.s0": [0.1] * 6, "b.s1": [0.2] * 6})
    same.to_parquet(tmp_path / "scores.parquet", index=False)
    table = contrasts_of(spec, tmp_path / "scores.parquet", list(spec.variants))
    assert table["scorer"].tolist() == ["r"]  # the numeric scorer columns, not the item keys or seeds
    section = contrast_section(table)
    assert "| a - b    | r      |     2 |       3 | +0.2000 |" in section and "| yes " in section
    # A run of only some variants (``--variant a``) leaves the contrast out and says so.
    partial = contrasts_of(spec, tmp_path / "missing.parquet", ["a.s0", "a.s1"])
    assert partial.empty and "No contrast had all its runs" in contrast_section(partial)
