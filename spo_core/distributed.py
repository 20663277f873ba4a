"""Several processes, one result: gathering a round's items, sharing them out, reducing metrics.

Each process samples its own prompts, and filters such as SPO's threshold keep a different number
of items on each. Training on local counts would make the processes run different numbers of
backward passes, and DDP's all-reduces would then hang or pair up the wrong gradients. Instead every
process gathers the round's items from all processes, sorts them into an order that does not depend
on the number of processes, applies one shared permutation, and takes its slice of each global
micro-batch. Weighting each slice by its share of the micro-batch makes N processes compute exactly
the gradient one process computes on the whole micro-batch (tested with 2 gloo processes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .models.diffusion import Conditioning
from .rows import Rows

# Round metrics that add up over processes; every other metric is averaged.
SUMMED_METRICS = ("pairs", "sample_unet_evals", "train_unet_evals", "segments", "pairs_kept", "decode_chunks",
                  "train_items", "dropped_items")


def _world(acc) -> tuple[int, int]:
    return (acc.process_index, acc.num_processes) if acc is not None else (0, 1)


def _all_gather_padded(t: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """All processes' tensors (first dims ``counts``), padded to one size for the collective."""
    n = max(counts)
    dtype = t.dtype
    x = t.to(torch.uint8) if dtype == torch.bool else t  # gloo has no bool all_gather
    pad = torch.zeros((n - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    x = torch.cat([x, pad]).contiguous()
    out = [torch.empty_like(x) for _ in counts]
    dist.all_gather(out, x)
    return [o[:c].to(dtype) for o, c in zip(out, counts)]


def gather_conditioning(acc, cond: Conditioning) -> Conditioning:
    """The round's conditioning of all processes, process-major (process p's rows start at p * P)."""
    _, world = _world(acc)
    if world == 1:
        return cond
    counts = [len(cond)] * world
    cat = lambda t: torch.cat(_all_gather_padded(t, counts))  # noqa: E731
    added = lambda d: None if d is None else {k: cat(v) for k, v in d.items()}  # noqa: E731
    prompts: list[Any] = [None] * world
    dist.all_gather_object(prompts, list(cond.prompts))
    return Conditioning(cond=cat(cond.cond), uncond=cat(cond.uncond), cond_added=added(cond.cond_added),
                        uncond_added=added(cond.uncond_added), prompts=[p for part in prompts for p in part])


def gather_rows(acc, items: Rows, prompts_per_process: int) -> Rows:
    """All processes' items in one order that does not depend on the number of processes.

    ``prompt_index`` becomes an index into :func:`gather_conditioning`'s result; items are sorted by
    (order, global prompt), which is how one process holding every prompt would list them.
    """
    rank, world = _world(acc)
    if world > 1:
        local = torch.tensor([len(items)], device=items.prompt_index.device)
        sizes = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(sizes, local)
        counts = [int(s) for s in sizes]
        fields = {}
        for name, t in items.tensors().items():
            parts = _all_gather_padded(t, counts)
            if name == "prompt_index":
                parts = [p + r * prompts_per_process for r, p in enumerate(parts)]
            fields[name] = torch.cat(parts)
        items = type(items)(**fields)
    total_prompts = prompts_per_process * world
    key = items.order.long() * total_prompts + items.prompt_index.long()
    if len(items) and len(torch.unique(key)) != len(items):
        raise RuntimeError("round items are not unique per (order, prompt): a method must give each item of a prompt "
                           "its own order value")
    return items.select(torch.argsort(key.cpu()))


def micro_batch_share(batch: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, float]:
    """This process's part of a global micro-batch (indices) and the weight of its mean loss.

    Sum over processes of weight * mean(local losses), averaged by DDP over ``world`` processes,
    equals the mean over the whole micro-batch. A process with no item still runs one (the batch's
    first, weight 0) so that every process runs the same forward/backward passes.
    """
    part = torch.tensor_split(batch, world)[rank]
    if len(part) == 0:
        return batch[:1], 0.0
    return part, len(part) * world / len(batch)


def reduce_metrics(acc, metrics: dict[str, float]) -> dict[str, float]:
    """Metrics of all processes: sums for counts (:data:`SUMMED_METRICS`), means for the rest.

    A key missing on some processes is averaged over those that have it.
    """
    _, world = _world(acc)
    if world == 1:
        return dict(metrics)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {k: float(v) for k, v in metrics.items()})
    out: dict[str, float] = {}
    for key in sorted({k for p in parts for k in p}):
        vals = [p[key] for p in parts if key in p]
        finite = [v for v in vals if not math.isnan(v)]
        if key in SUMMED_METRICS:
            out[key] = float(sum(vals))
        else:
            out[key] = float(sum(finite) / len(finite)) if finite else float("nan")
    return out


def reduce_sums(acc, values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of a float vector over processes."""
    _, world = _world(acc)
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values
