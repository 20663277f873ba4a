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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load_file, save_file

from .config import LoraConfig, OptimConfig, TrainConfig
from .models.diffusion import Conditioning, DiffusionPolicy
from .sampling import RowRNG
from .models.lora import attach_lora, lora_state_dict, save_lora, save_merged
from .utils import atomic_dir, atomic_file

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Method(Protocol):
    name: str

    def collect(self, ctx: "RoundContext") -> tuple[Any, dict[str, float]]:
        """Sample the round's training data with the current policy (no gradients)."""

    def num_items(self, data: Any) -> int: ...

    def select(self, data: Any, idx: torch.Tensor) -> Any: ...

    def loss(self, ctx: "RoundContext", batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of a micro-batch; metrics may include ``unet_evals``."""


@dataclass
class RoundContext:
    policy: DiffusionPolicy
    round: int
    prompts: list[str]
    cond: Conditioning | None  # None for offline methods
    generator: torch.Generator  # CPU generator for this round and process (shuffling, training noise)
    accelerator: Any
    rng: RowRNG | None = None  # one stream per prompt, keyed by its global position (sampling noise)


def round_seed(seed: int, round_idx: int, process: int = 0, stream: int = 0) -> int:
    # A simple injective mix keeps streams of different rounds/processes apart.
    return (seed * 1_000_003 + round_idx * 10_007 + process * 101 + stream) % (2**63 - 1)


def item_seed(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position * 7_919 + 17) % (2**63 - 1)


def round_positions(per_round: int, round_idx: int, process: int = 0, num_processes: int = 1) -> list[int]:
    """Global positions (in the endless stream of epochs) of this process's items for a round.

    Process p of N takes the p-th slice of the round's N * per_round positions, so N processes
    together see exactly what one process with N times the batch sees.
    """
    start = (round_idx * num_processes + process) * per_round
    return list(range(start, start + per_round))


def prompts_for_round(prompts: list, per_round: int, round_idx: int, seed: int,
                      process: int = 0, num_processes: int = 1) -> list:
    """This process's items for a round: consecutive slices of per-epoch permutations."""
    n = len(prompts)
    if n == 0:
        raise ValueError("the prompt set is empty")
    out = []
    for pos in round_positions(per_round, round_idx, process, num_processes):
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(prompts[int(perm[off])])
    return out


class Checkpointer:
    """LoRA + optimizer + history per checkpoint folder, written atomically; keeps the last few."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def list(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted((p for p in self.root.glob("round-*") if (p / "state.pt").exists()), key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def clear(self) -> int:
        """Remove every checkpoint (a fresh run must not prune its own checkpoints in favour of, or
        later resume from, those of an earlier run in a persisted output folder); returns how many."""
        old = self.list()
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return len(old)

    def save(self, round_idx: int, lora: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, history: list[dict]) -> Path:
        path = self.root / f"round-{round_idx:06d}"
        with atomic_dir(path) as tmp:
            save_file(lora, str(tmp / "lora.safetensors"))
            torch.save({"round": round_idx, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
            (tmp / "history.json").write_text(json.dumps(history))
        for old in self.list()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def load(path: Path) -> tuple[int, dict[str, torch.Tensor], dict, list[dict]]:
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            lora = load_file(str(path / "lora.safetensors"))
            history = json.loads((path / "history.json").read_text())
        except Exception as exc:
            raise TrainingError(f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}); "
                                f"delete it to resume from an earlier one") from exc
        return int(state["round"]), lora, state["optimizer"], history


def _load_lora_into(policy: DiffusionPolicy, lora: dict[str, torch.Tensor], path: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    own = lora_state_dict(policy)
    if set(own) != set(lora) or any(own[k].shape != lora[k].shape for k in own):
        raise TrainingError(f"checkpoint '{path}' does not match this LoRA configuration (rank or target modules differ); "
                            f"resume with the config it was trained with, or start without --resume")
    set_peft_model_state_dict(policy.unet, lora)


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
) -> dict[str, Any]:
    """Train a LoRA on ``policy`` with ``method`` for ``train_cfg.rounds`` rounds.

    ``prompts`` is the prompt set rounds draw from (None for offline methods that bring their own
    data). Returns the final metrics and the per-round history; writes the LoRA to
    ``train_cfg.output_dir/lora`` and checkpoints to ``train_cfg.output_dir/checkpoints``.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    # cpu=True makes a torchrun / accelerate launch on CPUs use MULTI_CPU (gloo) data parallelism.
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    # Accumulation is done by _train_on per round (accelerate's counter would carry across rounds).
    acc = accelerator or Accelerator(mixed_precision=train_cfg.mixed_precision, cpu=on_cpu)
    out = Path(train_cfg.output_dir)
    ckpt = Checkpointer(out / "checkpoints", keep=train_cfg.keep_checkpoints)
    policy.to(acc.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)  # the LoRA init is part of the seeded run
        params = attach_lora(policy, lora_cfg)
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay,
                            eps=optim_cfg.adam_eps)
    start, history = 0, []
    if not resume and acc.is_main_process:
        stale = ckpt.clear()
        if stale:
            log.warning("starting from round 0 (no --resume): removed %d checkpoint(s) of an earlier run in %s",
                        stale, ckpt.root)
    if resume:
        last = ckpt.latest()
        if last is None:
            log.warning("--resume given but no checkpoint in %s: starting from round 0", ckpt.root)
        else:
            done, lora, opt_state, history = Checkpointer.load(last)
            _load_lora_into(policy, lora, last)
            opt.load_state_dict(opt_state)
            start = done + 1
            log.info("resumed from %s (round %d done)", last, done)
    unet_wrapped, opt = acc.prepare(policy.unet, opt)
    policy.forward_unet = unet_wrapped
    total_sample_evals = sum(h.get("sample_unet_evals", 0) for h in history)
    total_train_evals = sum(h.get("train_unet_evals", 0) for h in history)
    bar = tqdm(range(start, train_cfg.rounds), desc=f"{method.name} rounds", disable=not acc.is_local_main_process,
               initial=start, total=train_cfg.rounds)
    for r in bar:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(round_seed(train_cfg.seed, r, acc.process_index))
        policy.unet.eval()
        if prompts is None:  # offline methods draw their own data
            ctx = RoundContext(policy, r, [], None, gen, acc)
        else:
            rp = prompts_for_round(prompts, train_cfg.prompts_per_round, r, train_cfg.seed, acc.process_index, acc.num_processes)
            pos = round_positions(train_cfg.prompts_per_round, r, acc.process_index, acc.num_processes)
            ctx = RoundContext(policy, r, rp, policy.encode_prompts(rp), gen, acc,
                               rng=RowRNG([item_seed(train_cfg.seed, p) for p in pos]))
        data, metrics = method.collect(ctx)
        t_sample = time.perf_counter() - t0
        policy.unet.train()
        step_stats = _train_on(ctx, method, data, params, opt, optim_cfg, train_cfg)
        policy.unet.eval()
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
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", keep=f"{metrics.get('keep_fraction', 0):.2f}")
        if acc.is_main_process and ((r + 1) % train_cfg.checkpoint_every == 0 or r + 1 == train_cfg.rounds):
            ckpt.save(r, lora_state_dict(policy), opt, history)
        acc.wait_for_everyone()
    policy.forward_unet = policy.unet
    result = {"history": history, "lora_dir": str(out / "lora")}
    if acc.is_main_process:
        save_lora(policy, out / "lora", lora_cfg, export_kohya=train_cfg.export_kohya)
        with atomic_file(out / "history.json", "w") as fh:
            json.dump(history, fh, indent=1)
        if train_cfg.save_merged:
            save_merged(policy, out / "merged")
    return result


def _train_on(ctx: RoundContext, method: Method, data: Any, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
              optim_cfg: OptimConfig, train_cfg: TrainConfig) -> dict[str, float]:
    acc = ctx.accelerator
    n = method.num_items(data) if data is not None else 0
    sums: dict[str, float] = {}
    count, steps, grad_norms, evals = 0, 0, [], 0
    if n == 0:
        return {"train_items": 0, "optimizer_steps": 0, "train_unet_evals": 0}
    bs = train_cfg.train_batch_size
    accum = train_cfg.gradient_accumulation_steps
    for epoch in range(train_cfg.epochs_per_round):
        order = torch.randperm(n, generator=ctx.generator)
        starts = list(range(0, n, bs))
        for mi, s in enumerate(starts):
            batch = method.select(data, order[s:s + bs])
            # Accumulation groups never cross a round (or epoch) boundary: the last group may be short.
            g0 = mi - mi % accum
            group = min(accum, len(starts) - g0)
            sync = mi == g0 + group - 1
            with contextlib.nullcontext() if sync else acc.no_sync(ctx.policy.forward_unet):
                with acc.autocast():
                    loss, m = method.loss(ctx, batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss.item()}) in round {ctx.round}: lower optim.lr or check the "
                                        f"data; the last good checkpoint is kept, resume with --resume after fixing")
                acc.backward(loss / group)
            if sync:
                if optim_cfg.max_grad_norm is not None:
                    # Pass the list, not a consumed generator: the reference code's clipping was a no-op.
                    gn = acc.clip_grad_norm_(params, optim_cfg.max_grad_norm)
                    grad_norms.append(float(gn))
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            evals += int(m.pop("unet_evals", 0))
            k = len(order[s:s + bs])
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + float(v) * k
            count += k
    out = {key: v / max(count, 1) for key, v in sums.items()}
    out.update(train_items=n, optimizer_steps=steps, train_unet_evals=evals)
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out
