"""Training and evaluation of the preference-model variants of the paper's Table 4.

* ``plain``: the base CLIP (PickScore) untouched;
* ``agnostic``: the whole CLIP fine-tuned on noisy x0-estimate pairs, no time condition;
* ``aware``: the same with the DiT/adaLN-Zero time condition (:mod:`.time_clip`).

Loss: :func:`spo_core.losses.preference_loss` on the two scores of each pair. AdamW, accelerate
(mixed precision, gradient accumulation, any number of processes), atomic checkpoints every N
steps and resume. Accuracy is measured on held-out decisive pairs per timestep bucket.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPConfig, get_scheduler

from .. import tracking
from ..losses import preference_loss
from ..reporting import markdown_table, write_text_atomic
from ..stats import paired_diff_ci
from ..scorers.pickscore import PICKSCORE_PROCESSOR_ID
from ..scorers.preprocess import ScorerLoadError, clip_preprocess, load_pretrained, looks_like_hub_id, read_clip_image_config
from ..checkpoints import CheckpointStore, fingerprint
from ..config import BudgetError
from ..utils import atomic_dir, atomic_file, path_digest, resolve_device, staged
from .config import TrainPMConfig
from .noisy_pairs import NoisyPairs, OnTheFlyPairs, open_pairs
from .time_clip import TimeConditionedCLIP, write_processor

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------
# Inputs: tokenizer and image preprocessing shared by training, evaluation and the scorer


@dataclass
class PMInputs:
    """How (uint8 image, caption) pairs become CLIP inputs; the same transform the scorer applies."""

    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_length: int = 77

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or [0, 1] float -> normalised (B, 3, S, S) float32."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return clip_preprocess(x, self.image_size, self.mean, self.std, crop_rounding="floor")

    def tokens(self, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def save(self, out_dir: str | os.PathLike) -> None:
        write_processor(out_dir, self.tokenizer, self.image_size, self.mean, self.std)


def processor_source(base: str, processor: str | None) -> str:
    """Where tokenizer + preprocessing come from: explicit, else the base dir, else PickScore's processor."""
    if processor is not None:
        return processor
    if looks_like_hub_id(base) and not Path(base).exists():
        return PICKSCORE_PROCESSOR_ID  # PickScore_v1 ships no processor of its own
    return base


def load_inputs(base: str, processor: str | None, text_positions: int) -> PMInputs:
    src = processor_source(base, processor)
    try:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, src, "CLIP tokenizer")
    except ScorerLoadError as exc:
        raise ScorerLoadError(f"{exc}. Fix: set processor=<directory with the CLIP tokenizer and preprocessor_config.json>") from exc
    size, mean, std = read_clip_image_config(src, 224)
    return PMInputs(tokenizer, size, tuple(mean), tuple(std), max_length=min(77, int(text_positions)))


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def pair_scores(model: TimeConditionedCLIP, inputs: PMInputs, batch: dict[str, Any], device: torch.device,
                use_time: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of both images of each pair in ``batch`` (one vision and one text forward)."""
    b = batch["image_0"].shape[0]
    pix = inputs.pixels(torch.cat([batch["image_0"], batch["image_1"]]).to(device))
    ids, mask = inputs.tokens(batch["caption"], device)
    t = batch["timestep"].to(device)
    s = model(pix, ids, mask, torch.cat([t, t]) if use_time else None, torch.arange(b, device=device).repeat(2))
    return s[:b], s[b:]


def pair_correct(s0: torch.Tensor, s1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where the higher score is the preferred image, 0.5 for equal scores, 0 otherwise (decisive labels)."""
    pred = torch.sign(s0 - s1)
    truth = torch.sign(labels[:, 0] - labels[:, 1]).to(pred)
    return torch.where(pred == 0, torch.full_like(pred, 0.5), (pred == truth).to(pred))


@torch.no_grad()
def evaluate_correct(model: TimeConditionedCLIP, inputs: PMInputs, dataset: NoisyPairs, batch_size: int = 32,
                     device: torch.device | str = "cpu") -> dict[int, list[float]]:
    """Per decisive held-out pair, in dataset order, whether the model ranks it right: {t: [1 / 0.5 / 0]}.

    The order is the dataset's, so two models' lists pair up item by item (paired differences)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct: dict[int, list[float]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        lab = batch["label"]
        keep = (lab[:, 0] - lab[:, 1]).abs() > 1e-6
        if not keep.any():
            continue
        s0, s1 = pair_scores(model, inputs, batch, device)
        c = pair_correct(s0.cpu(), s1.cpu(), lab)
        for t, ok, k in zip(batch["timestep"].tolist(), c.tolist(), keep.tolist()):
            if k:
                correct.setdefault(int(t), []).append(ok)
    model.train(was_training)
    return dict(sorted(correct.items()))


def evaluate_accuracy(model: TimeConditionedCLIP, inputs: PMInputs, dataset: NoisyPairs, batch_size: int = 32,
                      device: torch.device | str = "cpu") -> dict[int, tuple[float, int]]:
    """Accuracy against the labels per timestep bucket: {t: (accuracy, decisive pairs)}. Ties are skipped."""
    return {t: (sum(v) / len(v), len(v)) for t, v in evaluate_correct(model, inputs, dataset, batch_size, device).items()}


def accuracy_stats(correct: dict[str, dict[int, list[float]]], reference: str = "plain") -> dict[str, dict[int, dict]]:
    """Accuracy with its standard error per variant and timestep, and each variant's paired difference
    from ``reference`` (same pairs) with a 95% t interval: {variant: {t: {accuracy, se, pairs, diff...}}}."""
    out: dict[str, dict[int, dict]] = {}
    for variant, by_t in correct.items():
        out[variant] = {}
        for t, ok in by_t.items():
            arr = np.asarray(ok, dtype=float)
            se = float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else float("nan")
            row = {"accuracy": float(arr.mean()), "se": se, "pairs": int(arr.size)}
            ref = correct.get(reference, {}).get(t)
            if variant != reference and ref is not None and len(ref) == arr.size and arr.size > 1:
                d, lo, hi = paired_diff_ci(arr, np.asarray(ref, dtype=float))
                row.update({f"diff_vs_{reference}": d, "diff_ci_low": lo, "diff_ci_high": hi,
                            "diff_se": float((arr - np.asarray(ref)).std(ddof=1) / np.sqrt(arr.size))})
            out[variant][t] = row
    return out


# ----------------------------------------------------------------------------------------------
# Training


class EpochShuffle(Sampler[int]):
    """A permutation per epoch that depends only on (seed, epoch): resumable without saved sampler state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _run_config(cfg: TrainPMConfig, variant: str, train_set: NoisyPairs) -> dict:
    """Everything that changes the trained weights; logging/eval/checkpoint cadence does not."""
    keys = ("base", "optim", "lr_scheduler", "warmup_steps", "batch_size", "gradient_accumulation_steps", "max_steps",
            "mixed_precision", "seed")
    # The base's content, not only its path: a base retrained in place must not resume old weights.
    return {"variant": variant, **cfg.model_dump(mode="json", include=set(keys)), "base_weights": path_digest(cfg.base),
            "data": train_set.manifest["fingerprint"], "pairs": len(train_set)}


def make_accelerator(cfg: TrainPMConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

    device = resolve_device(cfg.device)
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # A stage may run twice in one process (tests, in-process Prefect tasks) with another precision.
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.mixed_precision,
        # batch_size is global: each process takes its slice of every batch (the same pairs in the same
        # order whatever the number of processes), and the lr schedule steps once per optimiser step.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # Sync strictly every N micro-batches (not at epoch ends) so that step k always covers
        # micro-batches [kN, (k+1)N) and resuming at a step boundary replays the same data.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
    )


def train_variant(cfg: TrainPMConfig, variant: str, inputs: PMInputs, train_set: NoisyPairs, out_dir: Path,
                  ckpt_root: Path, accelerator, eval_set: NoisyPairs | None = None) -> dict[str, float]:
    """Train ``variant`` ('agnostic' or 'aware') and save it to ``out_dir``; returns training figures."""
    config = _run_config(cfg, variant, train_set)
    fp = fingerprint(config)
    done = out_dir / STATE_FILE
    if cfg.resume and done.is_file():
        state = json.loads(done.read_text())
        if state.get("fingerprint") == fp and state.get("step") == cfg.max_steps:
            log.info("%s: finished model in %s matches the config; not retraining", variant, out_dir)
            return {"steps": float(state["step"]), "final_loss": float(state.get("final_loss", float("nan"))),
                    "train_s": 0.0, "resumed_from": float(state["step"])}
    # One folder per configuration: a changed one (a DVC experiment) starts fresh, the same one resumes.
    store = CheckpointStore.for_run(ckpt_root, config, keep=cfg.keep_checkpoints)
    if not cfg.resume and accelerator.is_main_process:
        store.clear()
    try:
        return _train(cfg, variant, inputs, train_set, out_dir, store, accelerator, eval_set, config)
    finally:
        accelerator.free_memory()  # the Accelerator is shared by variants: drop this one's model and optimiser


def _train(cfg: TrainPMConfig, variant: str, inputs: PMInputs, train_set: NoisyPairs, out_dir: Path,
           store: CheckpointStore, accelerator, eval_set: NoisyPairs | None, config: dict) -> dict[str, float]:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the time embedder's init draws from the RNG
    model = TimeConditionedCLIP.from_clip(cfg.base, time_conditioned=variant == "aware")
    if cfg.gradient_checkpointing:
        model.clip.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.adam_eps)
    nproc = accelerator.num_processes
    if cfg.batch_size % nproc:
        raise BudgetError(f"batch_size={cfg.batch_size} is a global budget that this run's {nproc} processes cannot share "
                          f"equally: set it to a multiple of {nproc}, or run on a number of processes that divides it")
    # With split batches the AcceleratedScheduler steps once per optimiser step, whatever nproc.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    sampler = EpochShuffle(len(train_set), cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers)
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training pairs make no full batch of {cfg.batch_size}: lower batch_size or "
                         "build more noisy pairs")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step = 0
    ck = store.resume(config) if cfg.resume else None
    if ck is not None:
        accelerator.unwrap_model(model).load_state_dict(ck.tensors["model"])
        optimizer.load_state_dict(ck.state["optimizer"])
        scheduler.load_state_dict(ck.state["lr_scheduler"])
        if accelerator.scaler is not None and ck.state.get("scaler"):
            accelerator.scaler.load_state_dict(ck.state["scaler"])
        step = ck.step
        log.info("%s: resumed from %s (step %d)", variant, ck.path, step)
    resumed_from = step

    accum = cfg.gradient_accumulation_steps
    per_epoch = len(loader)
    micro = step * accum
    epoch, skip = divmod(micro, per_epoch)
    window: list[float] = []
    final_loss = float("nan")
    t0 = time.perf_counter()
    unwrapped = accelerator.unwrap_model(model)
    use_time = variant == "aware"
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train_pm {variant}", unit="step",
               disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            if isinstance(train_set, OnTheFlyPairs):  # noisy_pairs.train_pairs: on_the_fly
                batch = train_set.finish(batch, accelerator.device)
            with accelerator.accumulate(model):
                b = batch["image_0"].shape[0]
                pix = inputs.pixels(torch.cat([batch["image_0"], batch["image_1"]]).to(accelerator.device))
                ids, mask = inputs.tokens(batch["caption"], accelerator.device)
                t = batch["timestep"].to(accelerator.device)
                scores = model(pix, ids, mask, torch.cat([t, t]) if use_time else None,
                               torch.arange(b, device=accelerator.device).repeat(2))
                lab = batch["label"].to(accelerator.device)
                loss = preference_loss(scores[:b], scores[b:], lab[:, 0], lab[:, 1])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(float(accelerator.gather(loss.detach()).mean()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                final_loss = sum(window) / len(window)
                tracking.log_metrics({f"{variant}/loss": final_loss, f"{variant}/lr": scheduler.get_last_lr()[0]}, step=step)
                bar.set_postfix(loss=f"{final_loss:.4f}", refresh=False)
                window = []
            if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and accelerator.is_main_process:
                acc = evaluate_accuracy(unwrapped, inputs, eval_set, cfg.eval_batch_size, accelerator.device)
                tracking.log_metrics({f"{variant}/acc/t{t}": a for t, (a, _) in acc.items()}, step=step)
            if (step % cfg.checkpoint_every == 0 or step == cfg.max_steps) and accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
                if accelerator.scaler is not None:
                    state["scaler"] = accelerator.scaler.state_dict()
                store.save(step, {"model": unwrapped.state_dict()}, state, config)
            if step >= cfg.max_steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    if window:
        final_loss = sum(window) / len(window)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(out_dir, defer=False) as tmp:  # a finished variant survives a later failure
            unwrapped.save_pretrained(tmp)
            inputs.save(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({"variant": variant, "step": step, "fingerprint": fingerprint(config),
                                                      "final_loss": final_loss}, indent=2) + "\n")
        store.prune_other_runs()  # this configuration is complete: other configurations' checkpoints go
    trained = step - resumed_from
    return {"steps": float(step), "final_loss": final_loss, "train_s": seconds,
            "s_per_step": seconds / trained if trained else 0.0, "resumed_from": float(resumed_from)}


# ----------------------------------------------------------------------------------------------
# The stage


def accuracy_table(stats: dict[str, dict[int, dict]], field: str = "accuracy") -> pd.DataFrame:
    """Rows: variants; columns: ``field`` (accuracy, se, ...) at each timestep bucket, and the accuracy's mean."""
    ts = sorted({t for r in stats.values() for t in r})
    rows = []
    for variant, by_t in stats.items():
        if field != "accuracy" and not any(field in by_t.get(t, {}) for t in ts):
            continue
        row: dict[str, Any] = {"variant": variant}
        for t in ts:
            row[f"t={t}"] = by_t.get(t, {}).get(field, float("nan"))
        if field == "accuracy":
            row["mean"] = sum(r["accuracy"] for r in by_t.values()) / len(by_t) if by_t else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _diff_table(stats: dict[str, dict[int, dict]], reference: str = "plain") -> pd.DataFrame:
    """Each variant minus ``reference`` on the same pairs: 'diff [low, high]' per timestep."""
    ts = sorted({t for r in stats.values() for t in r})
    rows = []
    for variant, by_t in stats.items():
        cells = {f"t={t}": (f"{by_t[t][f'diff_vs_{reference}']:+.3f} [{by_t[t]['diff_ci_low']:+.3f}, "
                            f"{by_t[t]['diff_ci_high']:+.3f}]") for t in ts if f"diff_vs_{reference}" in by_t.get(t, {})}
        if cells:
            rows.append({"variant": variant, **cells})
    return pd.DataFrame(rows)


def accuracy_markdown(stats: dict[str, dict[int, dict]]) -> str:
    counts = {t: r["pairs"] for by_t in stats.values() for t, r in by_t.items()}
    md = ("Preference accuracy on held-out noisy pairs per timestep (paper Table 4 variants)\n\n"
          + markdown_table(accuracy_table(stats), float_fmt="{:.3f}")
          + "\n\nStandard error of each accuracy (over the held-out pairs)\n\n"
          + markdown_table(accuracy_table(stats, "se"), float_fmt="{:.3f}"))
    diffs = _diff_table(stats)
    if len(diffs):
        md += ("\n\nPaired difference from plain on the same pairs, with its 95% t interval\n\n"
               + markdown_table(diffs))
    return md + "\n\nHeld-out decisive pairs per timestep: " + ", ".join(
        f"t={t}: {n}" for t, n in sorted(counts.items())) + "\n"


def run_train_pm(cfg: TrainPMConfig) -> dict[str, float]:
    """Train the configured variants, evaluate all of them per timestep bucket, write the table."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = Path(cfg.data_dir)
    train_set = open_pairs(data / "train")
    eval_set = NoisyPairs(data / "eval") if (data / "eval" / "manifest.json").is_file() else None
    if eval_set is None:
        log.warning("%s has no eval/ set: no accuracy table (build one with noisy_pairs eval_pairs > 0)", data)
    out = Path(cfg.output_dir)
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out / "checkpoints"
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    clip_config = load_pretrained(CLIPConfig.from_pretrained, cfg.base, "CLIP config")
    inputs = load_inputs(cfg.base, cfg.processor, clip_config.text_config.max_position_embeddings)
    metrics: dict[str, float] = {"train_pairs": len(train_set)}
    correct: dict[str, dict[int, list[float]]] = {}
    for variant in cfg.variants:
        if variant == "plain":
            model = TimeConditionedCLIP.from_clip(cfg.base, time_conditioned=False)
        else:
            stats = train_variant(cfg, variant, inputs, train_set, out / variant, ckpt_root / variant, accelerator, eval_set)
            metrics.update({f"{k}/{variant}": v for k, v in stats.items()})
            model = TimeConditionedCLIP.from_pretrained(out / variant)
        if eval_set is not None and accelerator.is_main_process:
            t0 = time.perf_counter()
            correct[variant] = evaluate_correct(model.to(device), inputs, eval_set, cfg.eval_batch_size, device)
            metrics[f"eval_s/{variant}"] = round(time.perf_counter() - t0, 3)
    if correct:
        results = accuracy_stats(correct)
        for variant, by_t in results.items():
            for t, r in by_t.items():
                metrics[f"acc/{variant}/t{t}"] = r["accuracy"]
                metrics[f"se/{variant}/t{t}"] = r["se"]
                metrics[f"n/t{t}"] = r["pairs"]
                if "diff_vs_plain" in r:
                    metrics[f"diff_vs_plain/{variant}/t{t}"] = r["diff_vs_plain"]
                    metrics[f"diff_se_vs_plain/{variant}/t{t}"] = r["diff_se"]
            metrics[f"acc/{variant}/mean"] = sum(r["accuracy"] for r in by_t.values()) / max(len(by_t), 1)
        md = accuracy_markdown(results)
        write_text_atomic(md, out / "accuracy.md")
        with atomic_file(out / "accuracy.json", "w") as fh:
            json.dump({v: {str(t): r for t, r in by_t.items()} for v, by_t in results.items()}, fh, indent=2)
        tracking.log_table(accuracy_table(results), "pm_accuracy")
        tracking.log_artifact(staged(out / "accuracy.md"))
        log.info("preference accuracy:\n%s", md)
    return metrics
