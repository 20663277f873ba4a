"""Training efficiency of an ablation's variants: monitored reward against compute.

Every trainer can score fixed-seed samples of fixed prompts every few rounds (``monitor``; the
toy world's ground-truth reward by default). This module reads those curves from each variant's
``history.json``, plots reward against cumulative UNet evaluations and against training wall
time, and says how much compute each variant needed to reach a reference variant's final reward
(the paper's "compute to match Diffusion-DPO" comparison).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .reporting import markdown_table
from .utils import atomic_path

if TYPE_CHECKING:
    from .ablation import AblationSpec

log = logging.getLogger(__name__)

MONITOR = "monitor_"


@dataclass
class Efficiency:
    columns: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> efficiency.* metrics
    sections: list[str] = field(default_factory=list)  # markdown for the report
    images: list[Path] = field(default_factory=list)


def curve(history: list[dict], start: float | None) -> pd.DataFrame:
    """``unet_evals``, ``seconds`` (cumulative training compute) and ``reward`` at each monitored
    round; the monitored value before training (``start``) is the point at zero compute."""
    seconds = np.cumsum([h.get("seconds", 0.0) for h in history])
    rows = [] if start is None else [{"round": -1, "unet_evals": 0.0, "seconds": 0.0, "reward": start}]
    for h, s in zip(history, seconds):
        keys = [k for k in h if k.startswith(MONITOR)]
        if keys:
            rows.append({"round": h["round"], "unet_evals": float(h.get("cumulative_unet_evals", 0)),
                         "seconds": float(s), "reward": float(h[keys[0]])})
    return pd.DataFrame(rows, columns=["round", "unet_evals", "seconds", "reward"])


def compute_to_reach(c: pd.DataFrame, target: float) -> tuple[float, float]:
    """(UNet evaluations, seconds) at the first monitored point with reward >= target; NaN if never."""
    hit = c[c["reward"] >= target]
    if hit.empty:
        return float("nan"), float("nan")
    first = hit.iloc[0]
    return float(first["unet_evals"]), float(first["seconds"])


def _start_value(row: dict[str, float], stage: str) -> float | None:
    keys = [k for k in row if k.startswith(f"{stage}.{MONITOR}") and k.endswith("_start")]
    return float(row[keys[0]]) if keys else None


def load_curves(spec: "AblationSpec", names: list[str], rows: dict[str, dict[str, float]]) -> dict[str, pd.DataFrame]:
    from .ablation import variant_plan

    out = {}
    for v in names:
        stage, cfg, _ = variant_plan(spec, v)[0]
        path = Path(cfg.train.output_dir) / "history.json"
        if not path.is_file():
            log.warning("no training history at %s: variant %s has no efficiency curve", path, v)
            continue
        c = curve(json.loads(path.read_text()), _start_value(rows.get(v, {}), stage))
        if len(c):
            out[v] = c
    return out


def plot(curves: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, c in curves.items():
        axes[0].plot(c["unet_evals"], c["reward"], marker="o", ms=3, label=name)
        axes[1].plot(c["seconds"], c["reward"], marker="o", ms=3, label=name)
    axes[0].set_xlabel("UNet evaluations (sampling + training, cumulative)")
    axes[1].set_xlabel("training wall time (s)")
    axes[0].set_ylabel("monitored reward (held-out prompts, fixed seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def efficiency(spec: "AblationSpec", names: list[str], rows: dict[str, dict[str, float]]) -> Efficiency:
    """Curves, a plot ``<report_dir>/<table>_efficiency.png`` and, with ``efficiency_reference``,
    the compute each variant needs to reach that variant's final monitored reward."""
    curves = load_curves(spec, names, rows)
    res = Efficiency()
    if not curves:
        return res
    image = plot(curves, Path(spec.report_dir) / f"{spec.table}_efficiency.png", f"{spec.table}: reward vs compute")
    res.images.append(image)
    ref = spec.efficiency_reference
    refs = [r for r in spec.runs_of(ref) if r in curves] if ref else []
    # with seeds, the reference is the mean final reward over the reference's seeds
    target = float(np.mean([curves[r]["reward"].iloc[-1] for r in refs])) if refs else None
    records = []
    for v, c in curves.items():
        cols = {"efficiency.final_reward": float(c["reward"].iloc[-1]),
                "efficiency.unet_evals": float(c["unet_evals"].iloc[-1]),
                "efficiency.train_seconds": float(c["seconds"].iloc[-1])}
        if target is not None:
            evals, secs = compute_to_reach(c, target)
            cols.update({"efficiency.unet_evals_to_reference": evals, "efficiency.seconds_to_reference": secs})
        res.columns[v] = cols
        records.append({"variant": v, **{k.split(".", 1)[1]: x for k, x in cols.items()}})
    whose = f"{ref}'s" if len(refs) == 1 else f"{ref}'s mean ({len(refs)} seeds)"
    what = (f"; `*_to_reference`: compute at the first monitored point reaching {whose} final reward "
            f"({target:.4f}), NaN if never reached" if target is not None else "")
    res.sections.append(
        "## Training efficiency\n\n"
        f"Monitored reward against compute (plot: `{image.as_posix()}`){what}. UNet evaluations count "
        "sampling and training forward passes; wall time excludes the monitor's own sampling.\n\n"
        + markdown_table(pd.DataFrame.from_records(records)))
    return res
