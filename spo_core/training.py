"""The training loop shared by SPO and its online peers: rounds of sample-then-train.

A *method* (``spo_core.methods``) says how a round's data is collected and which loss it trains;
this module owns everything else: prompt order, LoRA, AdamW, accelerate (devices, mixed
precision, several processes), gradient accumulation, clipping, metrics, checkpoints and resume.

Every random draw of round r comes from generators seeded with (seed, r, process), so a resumed
run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .checkpoints import CheckpointError, CheckpointStore
from .config import BudgetError, LoraConfig, OptimConfig, TrainConfig
from .distributed import gather_conditioning, gather_rows, micro_batch_share, reduce_metrics, reduce_sums
from .models.diffusion import Conditioning, DiffusionPolicy
from .models.lora import attach_lora, lora_state_dict, save_lora, save_merged
from .rows import Rows
from .rollouts import RowRNG
from .utils import atomic_file
from .errors import SpoError

log = logging.getLogger(__name__)


class TrainingError(SpoError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Method(Protocol):
    name: str

    def collect(self, ctx: "RoundContext") -> tuple[Rows, dict[str, float]]:
        """Sample the round's training items with the current policy (no gradients). Offline methods
        set ``ctx.cond`` to the conditioning their items' ``prompt_index`` points into."""

    def loss(self, ctx: "RoundContext", batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of a micro-batch of items; metrics may include ``unet_evals``."""


@dataclass
class RoundContext:
    policy: DiffusionPolicy
    round: int
    prompts: list[str]
    cond: Conditioning | None  # the round's conditioning; during training, that of all processes
    generator: torch.Generator  # CPU generator for this round and process
    accelerator: Any
    rng: RowRNG | None = None  # one stream per prompt, keyed by its global position (sampling noise)


def round_seed(seed: int, round_idx: int, process: int = 0, stream: int = 0) -> int:
    # A simple injective mix keeps streams of different rounds/processes apart.
    return (seed * 1_000_003 + round_idx * 10_007 + process * 101 + stream) % (2**63 - 1)


def item_seed(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position * 7_919 + 17) % (2**63 - 1)


def round_positions(per_round: int, round_idx: int, process: int = 0, num_processes: int = 1) -> list[int]:
    """Global positions (in the endless stream of epochs) of this process's items for a round.

    ``per_round`` is global (``train.prompts_per_round``): process p of N takes the p-th of N equal
    slices of the round's positions, so N processes together see exactly what one process sees.
    """
    if per_round % num_processes:
        raise BudgetError(f"train.prompts_per_round={per_round} is a global budget that this run's {num_processes} "
                          f"processes cannot share equally: set it to a multiple of {num_processes}, or run "
                          f"on a number of processes that divides it")
    local = per_round // num_processes
    start = round_idx * per_round + process * local
    return list(range(start, start + local))


def prompts_for_round(prompts: list, per_round: int, round_idx: int, seed: int,
                      process: int = 0, num_processes: int = 1) -> list:
    """This process's items of a round's ``per_round`` (global): consecutive slices of per-epoch permutations."""
    n = len(prompts)
    if n == 0:
        raise ValueError("the prompt set is empty")
    out = []
    for pos in round_positions(per_round, round_idx, process, num_processes):
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(prompts[int(perm[off])])
    return out


# Configuration keys a resumed run may change; every other key must match the checkpoint's.
RESUME_MAY_CHANGE = (
    "train.rounds", "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.output_dir",
    "train.save_merged", "train.export_kohya", "train.gradient_checkpointing", "train.allow_tf32", "train.max_lora_weight",
    "optim.lr", "optim.max_grad_norm", "sampler.decode_batch_size", "monitor", "device",
    "launch",  # budgets are global: another number of processes continues the same run
)


def diverged(lora: dict[str, torch.Tensor], limit: float | None) -> str | None:
    """Why these LoRA weights must not be checkpointed (non-finite, or beyond ``limit``), or None."""
    bad = [k for k, v in lora.items() if not bool(torch.isfinite(v).all())]
    if bad:
        return f"non-finite values in {len(bad)} tensors, e.g. {bad[0]}"
    top = max((float(v.abs().max()) for v in lora.values() if v.numel()), default=0.0)
    if limit is not None and top > limit:
        return f"largest |weight| {top:.3g} > train.max_lora_weight {limit:g}"
    return None


def make_accelerator(mixed_precision: str = "no", device: torch.device | str | None = None):
    """The run's Accelerator, created before any model is placed: it sets each process's GPU, and
    ``accelerator.device`` is where that process's policy, scorer and monitor must live."""
    from accelerate import Accelerator

    # cpu=True makes a torchrun / accelerate launch on CPUs use MULTI_CPU (gloo) data parallelism.
    if device is None or str(device) == "auto":
        on_cpu = not torch.cuda.is_available()
    else:
        on_cpu = torch.device(device).type == "cpu"
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainingError("optim.name=adamw8bit needs bitsandbytes (a CUDA machine): `pip install bitsandbytes`, "
                                "or set optim.name=adamw") from exc
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _load_lora_into(policy: DiffusionPolicy, lora: dict[str, torch.Tensor], path: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    own = lora_state_dict(policy)
    if set(own) != set(lora) or any(own[k].shape != lora[k].shape for k in own):
        raise TrainingError(f"checkpoint '{path}' does not match this LoRA configuration (rank or target modules differ); "
                            f"resume with the config it was trained with, or start without --resume")
    set_peft_model_state_dict(policy.denoiser, lora)


def train_rounds(
    policy: DiffusionPolicy,
    method: Method,
    prompts: list[str] | None,
    lora_cfg: LoraConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    resume: bool = False,
    on_round_end: Callable[[int, DiffusionPolicy], dict[str, float]] | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a LoRA on ``policy`` with ``method`` for ``train_cfg.rounds`` rounds.

    ``prompts`` is the prompt set rounds draw from (None for offline methods that bring their own
    data). ``run_config`` is the resolved configuration a checkpoint must match to be resumed
    (default: the LoRA, optimiser and training sections). Returns the final metrics and the
    per-round history; writes the LoRA to ``train_cfg.output_dir/lora`` and checkpoints to
    ``train_cfg.output_dir/checkpoints``.

    With several processes, each samples its share of the round's prompts; the round's items are
    then gathered, put in one order and shared out (:mod:`spo_core.distributed`), so N processes
    train exactly what one process trains with the same (global) budgets.
    """
    from tqdm.auto import tqdm

    # Accumulation is done by _train_on per round (accelerate's counter would carry across rounds).
    acc = accelerator or make_accelerator(train_cfg.mixed_precision, device)
    if acc.device.type == "cuda" and train_cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(train_cfg.output_dir)
    store = CheckpointStore(out / "checkpoints", keep=train_cfg.keep_checkpoints, prefix="round")
    config = run_config if run_config is not None else {
        "lora": lora_cfg.model_dump(mode="json"), "optim": optim_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json")}
    policy.to(acc.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)  # the LoRA init is part of the seeded run
        params = attach_lora(policy, lora_cfg)
    if train_cfg.gradient_checkpointing:
        policy.denoiser.enable_gradient_checkpointing()
    opt = make_optimizer(params, optim_cfg)
    start, history = 0, []
    if not resume and acc.is_main_process:
        stale = store.clear()
        if stale:
            log.warning("starting from round 0 (no --resume): removed %d checkpoint(s) of an earlier run in %s",
                        stale, store.root)
    unet_wrapped, opt = acc.prepare(policy.denoiser, opt)
    if resume:
        try:
            ckpt = store.resume(config, RESUME_MAY_CHANGE)
        except CheckpointError as exc:
            raise TrainingError(str(exc)) from exc
        if ckpt is None:
            log.warning("--resume given but no checkpoint in %s: starting from round 0", store.root)
        else:
            _load_lora_into(policy, ckpt.tensors["lora"], ckpt.path)
            opt.load_state_dict(ckpt.state["optimizer"])
            if acc.scaler is not None and ckpt.state.get("scaler"):
                acc.scaler.load_state_dict(ckpt.state["scaler"])
            _follow_config_lr(opt, optim_cfg.lr)
            history = list(ckpt.manifest.get("history", []))
            start = ckpt.step + 1
            log.info("resumed from %s (round %d done)", ckpt.path, ckpt.step)
    policy.forward_denoiser = unet_wrapped
    total_sample_evals = sum(h.get("sample_unet_evals", 0) for h in history)
    total_train_evals = sum(h.get("train_unet_evals", 0) for h in history)
    if acc.is_main_process:
        log.info("%s: %d process(es) share %d prompts per round and micro-batches of %d items", method.name,
                 acc.num_processes, train_cfg.prompts_per_round, train_cfg.train_batch_size)
    bar = tqdm(range(start, train_cfg.rounds), desc=f"{method.name} rounds", disable=not acc.is_local_main_process,
               initial=start, total=train_cfg.rounds)
    for r in bar:
        t0 = time.perf_counter()
        # Shuffling is shared by all processes (process 0's stream: one process reproduces N).
        shuffle = torch.Generator().manual_seed(round_seed(train_cfg.seed, r, 0))
        gen = torch.Generator().manual_seed(round_seed(train_cfg.seed, r, acc.process_index))
        policy.denoiser.eval()
        if prompts is None:  # offline methods draw their own data
            ctx = RoundContext(policy, r, [], None, gen, acc)
        else:
            rp = prompts_for_round(prompts, train_cfg.prompts_per_round, r, train_cfg.seed, acc.process_index, acc.num_processes)
            pos = round_positions(train_cfg.prompts_per_round, r, acc.process_index, acc.num_processes)
            ctx = RoundContext(policy, r, rp, policy.encode_prompts(rp), gen, acc,
                               rng=RowRNG([item_seed(train_cfg.seed, p) for p in pos]))
        data, metrics = method.collect(ctx)
        metrics = reduce_metrics(acc, metrics)
        local_prompts = len(ctx.cond)
        ctx.cond = gather_conditioning(acc, ctx.cond)
        data = gather_rows(acc, data, local_prompts)
        t_sample = time.perf_counter() - t0
        policy.denoiser.train()
        step_stats = _train_on(ctx, method, data, params, opt, optim_cfg, train_cfg, shuffle)
        policy.denoiser.eval()
        metrics.update(step_stats)
        total_sample_evals += metrics.get("sample_unet_evals", 0)
        total_train_evals += metrics.get("train_unet_evals", 0)
        metrics.update(round=r, sample_seconds=t_sample, seconds=time.perf_counter() - t0,
                       cumulative_unet_evals=total_sample_evals + total_train_evals)
        if on_round_end is not None:
            metrics.update(on_round_end(r, policy))
        history.append(metrics)
        if log_fn is not None and acc.is_main_process:
            log_fn(metrics, r)
        # refresh=False: the bar redraws at its own (sparse off a terminal) interval, not once per round
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", keep=f"{metrics.get('keep_fraction', 0):.2f}",
                        refresh=False)
        if (r + 1) % train_cfg.checkpoint_every == 0 or r + 1 == train_cfg.rounds:
            lora = lora_state_dict(policy)
            problem = diverged(lora, train_cfg.max_lora_weight)  # every process sees the same weights
            if problem:
                last = store.latest()
                raise TrainingError(f"the LoRA diverged in round {r} ({problem}): not checkpointed (the last good "
                                    f"checkpoint is {last.name if last else 'none'}). Fix: continue from it with a lower "
                                    f"learning rate: --resume --set optim.lr={optim_cfg.lr / 10:g}")
            if acc.is_main_process:
                state = {"optimizer": opt.state_dict()}
                if acc.scaler is not None:
                    state["scaler"] = acc.scaler.state_dict()
                store.save(r, {"lora": lora}, state, config, RESUME_MAY_CHANGE, extra={"history": history})
        acc.wait_for_everyone()
    policy.forward_denoiser = policy.denoiser
    if history and not any(h.get("optimizer_steps", 0) for h in history):
        raise TrainingError(
            f"no optimiser step in {len(history)} round(s): every round had no training item (all pairs filtered, e.g. "
            f"mean keep_fraction {sum(h.get('keep_fraction', 0) for h in history) / len(history):.2f}); nothing was "
            f"saved. Fix: lower sampler.threshold, or check the scorer and the data")
    result = {"history": history, "lora_dir": str(out / "lora")}
    if acc.is_main_process:
        save_lora(policy, out / "lora", lora_cfg, export_kohya=train_cfg.export_kohya)
        with atomic_file(out / "history.json", "w") as fh:
            json.dump(history, fh, indent=1)
        if train_cfg.save_merged:
            save_merged(policy, out / "merged")
    return result


def _follow_config_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """A resumed optimiser takes the configuration's learning rate (the way to continue a diverged
    run more gently), not the one saved in its state."""
    for group in opt.param_groups:
        if group["lr"] != lr:
            log.info("resume: learning rate %g -> %g (optim.lr)", group["lr"], lr)
            group["lr"] = lr


def _train_on(ctx: RoundContext, method: Method, data: Rows, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
              optim_cfg: OptimConfig, train_cfg: TrainConfig, shuffle: torch.Generator) -> dict[str, float]:
    """Train on the round's items (those of all processes, in the same order on each).

    Global micro-batches of ``train_batch_size`` items (over all processes) follow one shared
    permutation; each process trains its share with the weight that makes DDP's average the whole
    micro-batch's mean, so every process runs the same passes whatever its sampler kept.
    """
    acc = ctx.accelerator
    rank, world = acc.process_index, acc.num_processes
    n = len(data)
    if n == 0:
        return {"train_items": 0, "optimizer_steps": 0, "train_unet_evals": 0}
    bs = train_cfg.train_batch_size  # global: each process takes its share (micro_batch_share)
    accum = train_cfg.gradient_accumulation_steps
    sums: dict[str, float] = {}
    count, steps, grad_norms, evals = 0, 0, [], 0
    for epoch in range(train_cfg.epochs_per_round):
        order = torch.randperm(n, generator=shuffle)
        starts = list(range(0, n, bs))
        for mi, s in enumerate(starts):
            local, weight = micro_batch_share(order[s:s + bs], rank, world)
            batch = data.select(local)
            # Accumulation groups never cross a round (or epoch) boundary: the last group may be short.
            g0 = mi - mi % accum
            group = min(accum, len(starts) - g0)
            sync = mi == g0 + group - 1
            with contextlib.nullcontext() if sync else acc.no_sync(ctx.policy.forward_denoiser):
                with acc.autocast():
                    loss, m = method.loss(ctx, batch)
                bad = reduce_sums(acc, torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=acc.device))
                if bad.item() > 0:  # every process stops together (one alone would hang the others)
                    raise TrainingError(f"non-finite loss in round {ctx.round}: lower optim.lr or check the "
                                        f"data; the last good checkpoint is kept, resume with --resume after fixing")
                acc.backward(loss * (weight / group))
            if sync:
                if optim_cfg.max_grad_norm is not None:
                    # Pass the list, not a consumed generator: the reference code's clipping was a no-op.
                    gn = acc.clip_grad_norm_(params, optim_cfg.max_grad_norm)
                    grad_norms.append(float(gn))
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            evals += int(m.pop("unet_evals", 0))
            k = len(local) if weight > 0 else 0
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + float(v) * k
            count += k
    keys = sorted(sums)
    totals = reduce_sums(acc, torch.tensor([sums[k] for k in keys] + [count, evals], dtype=torch.float64,
                                           device=acc.device)).tolist()
    out = {key: v / max(totals[-2], 1) for key, v in zip(keys, totals)}
    out.update(train_items=n, optimizer_steps=steps, train_unet_evals=int(totals[-1]))
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out
