"""The body shared by every training stage (SPO and its baselines): load, train, record.

Each ``train_*`` stage module only builds its method; loading the policy, prompts, scorer and
monitor, running the shared loop, writing the training curve and summarising happen here once.
"""

from __future__ import annotations

import logging
from typing import Callable

from .. import tracking
from ..config import MonitorConfig, PromptsConfig, SamplingConfig, TrainerBaseConfig
from ..data.prompts import load_prompts
from ..models.diffusion import DiffusionPolicy, load_policy
from ..rollouts import sample_images
from ..scorers.base import Scorer, build_scorer
from ..training import Method, make_accelerator, train_rounds
from ..reporting import image_grid
from ..utils import path_digest, seed_everything, staged
from .common import is_main_process, metrics_path, write_json

log = logging.getLogger(__name__)


# what `dvc metrics show` prints for a trainer; every figure is in MLflow and in train.output_dir/metrics.json
HEADLINE = ["final_loss", "monitor_*_end", "seconds_per_round"]


def prompts_from(cfg: PromptsConfig) -> list[str]:
    return load_prompts(**cfg.model_dump())


def curve_rows(history: list[dict]) -> list[dict]:
    """Per-round numbers for DVC plots: the keys every round has (DVC drops a file whose rows differ);
    the monitored reward, present only in monitored rounds, has its own file."""
    rows = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for h in history]
    shared = set.intersection(*(set(r) for r in rows)) if rows else set()
    return [{k: v for k, v in r.items() if k in shared} for r in rows]


LOSS_NOTE = (
    "How to read the loss: SPO's DPO loss is -log sigmoid(beta * margin), and the margin is tiny while the "
    "LoRA stays close to the reference, so the loss sits near log 2 = 0.693 for the whole run; that is "
    "expected. Watch the monitored reward (`monitor_*`, and the `monitor_samples` images), `score_gap` and "
    "`keep_fraction` instead; `ratio_w` / `ratio_l` show how far the policy has moved."
)


def _record_lineage(stage: str, cfg: TrainerBaseConfig, lora_dir, prompts: list[str] | None) -> None:
    """Prompts as a dataset input, the LoRA as a registered model with its base model and data."""
    import pandas as pd

    tracking.set_description(f"{stage}: LoRA on {cfg.model.pretrained}. {LOSS_NOTE}")
    source = None
    if prompts is not None:
        source = cfg.prompts.path or cfg.prompts.source
        tracking.log_dataset(pd.DataFrame({"prompt": prompts}), source=str(source), name="train_prompts",
                             context="training")
    scorer = getattr(cfg, "scorer", None)
    tags = {"base_model": cfg.model.pretrained, "model_kind": cfg.model.kind, "stage": stage,
            "prompts": str(source) if source else "offline preference pairs",
            "scorer": f"{scorer.name}:{scorer.path}" if scorer is not None else "none"}
    tracking.register_lora(lora_dir, f"{stage.removeprefix('train_').replace('_', '-')}-lora",
                           {"rank": cfg.lora.rank, "alpha": cfg.lora.lora_alpha, "rounds": cfg.train.rounds,
                            "lr": cfg.optim.lr, "seed": cfg.train.seed}, tags)


def sample_sheet(images, prompts: list[str], cols: int = 8):
    """Monitor samples as a grid of ``cols`` columns (prompts as labels while there is one row)."""
    import torch

    imgs = images.float().clamp(0, 1).cpu()
    n, cols = imgs.shape[0], min(cols, imgs.shape[0])
    rows = -(-n // cols)
    pad = torch.ones(rows * cols - n, *imgs.shape[1:])
    grid = torch.cat([imgs, pad]).view(rows, cols, *imgs.shape[1:])
    return image_grid(grid, None, prompts if rows == 1 else None, scale=max(1, 128 // max(imgs.shape[-1], 1)))


def input_digests(cfg: TrainerBaseConfig, needs_scorer: bool) -> dict[str, str | None]:
    """Fingerprints of the files a run trains from (base model, VAE, step scorer, prompts, offline pairs):
    a checkpoint resumes only on the same contents, not merely the same paths (a base retrained in place
    would otherwise continue a LoRA made for the old one)."""
    return {"model": path_digest(cfg.model.pretrained), "vae": path_digest(cfg.model.vae),
            "scorer": path_digest(cfg.scorer.path) if needs_scorer and cfg.scorer is not None else None,
            "prompts": path_digest(cfg.prompts.path), "dataset": path_digest(getattr(cfg, "dataset", None))}


def make_monitor(mon: MonitorConfig, sampler: SamplingConfig, device):
    """A per-round callback scoring fixed-seed samples of fixed prompts (None if not configured), drawn
    with the trainer's own sampler (steps, guidance and eta: on the flow process eta is the SDE's noise
    level, so the monitor sees the samples that training and evaluation see)."""
    if mon.scorer is None or mon.prompts is None:
        return None
    scorer = build_scorer(mon.scorer.name, mon.scorer.path, device, **mon.scorer.options)
    prompts = prompts_from(mon.prompts)[: mon.num_prompts]
    seeds = [mon.seed + i for i in range(len(prompts))]

    def callback(round_idx: int, policy: DiffusionPolicy, force: bool = False) -> dict[str, float]:
        if not force and round_idx % mon.every != mon.every - 1:
            return {}
        imgs = sample_images(policy, prompts, seeds, num_steps=sampler.num_steps, guidance_scale=sampler.guidance_scale,
                             eta=sampler.eta)
        # The same prompts and seeds every time: MLflow's image slider shows what training changed.
        tracking.log_image_at(sample_sheet(imgs, prompts), "monitor_samples", round_idx)
        return {f"monitor_{scorer.name}": float(scorer.score(imgs, prompts).float().mean())}

    return callback


def run_training(stage: str, cfg: TrainerBaseConfig, make_method: Callable[[DiffusionPolicy, Scorer | None], Method],
                 offline: bool = False, needs_scorer: bool = True) -> dict:
    """Train a LoRA with the method ``make_method(policy, scorer)`` builds; return summary metrics."""
    seed_everything(cfg.train.seed)
    # The Accelerator first: it gives each process its own GPU, and everything goes there.
    acc = make_accelerator(cfg.train.mixed_precision, cfg.device)
    device = acc.device
    policy = load_policy(cfg.model, device)
    scorer = build_scorer(cfg.scorer.name, cfg.scorer.path, device, **cfg.scorer.options) if needs_scorer else None
    method = make_method(policy, scorer)
    sampler = getattr(cfg, "sampler")
    monitor = make_monitor(cfg.monitor, sampler, device)
    start = monitor(-1, policy, force=True) if monitor is not None and not cfg.train.resume else {}
    res = train_rounds(policy, method, None if offline else prompts_from(cfg.prompts), cfg.lora, cfg.optim, cfg.train,
                       resume=cfg.train.resume, on_round_end=monitor, log_fn=lambda m, r: tracking.log_metrics(m, step=r),
                       accelerator=acc,
                       run_config={**cfg.model_dump(mode="json"), "input_contents": input_digests(cfg, needs_scorer)})
    hist = res["history"]
    if is_main_process():
        write_json(metrics_path(f"{stage}_curve"), curve_rows(hist), indent=1)
        # The monitored reward has its own plot file: DVC plots need the field in every row.
        monitored = [{"round": -1, **start}] if start else []
        monitored += [{"round": h["round"], **{k: v for k, v in h.items() if k.startswith("monitor_")}}
                      for h in hist if any(k.startswith("monitor_") for k in h)]
        if monitored:
            write_json(metrics_path(f"{stage}_monitor"), monitored, indent=1)
        tracking.log_artifact(staged(res["lora_dir"]), "lora")
        tracking.log_dict(cfg.model_dump(mode="json"), "config.json")
        tracking.log_dict(hist, "history.json")
        _record_lineage(stage, cfg, staged(res["lora_dir"]), None if offline else prompts_from(cfg.prompts))
    last = hist[-1] if hist else {}
    out = {
        "rounds": len(hist),
        "final_loss": last.get("loss", float("nan")),
        "total_unet_evals": last.get("cumulative_unet_evals", 0),
        "seconds_per_round": sum(h["seconds"] for h in hist) / max(len(hist), 1),
    }
    if any("keep_fraction" in h for h in hist):
        out["mean_keep_fraction"] = sum(h.get("keep_fraction", 0) for h in hist) / len(hist)
    for k, v in start.items():
        out[f"{k}_start"] = v
    mon = [h for h in hist if any(k.startswith("monitor_") for k in h)]
    if mon:
        out.update({f"{k}_end": v for k, v in mon[-1].items() if k.startswith("monitor_")})
    return out
