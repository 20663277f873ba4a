"""The one checkpoint and resume mechanism of every trainer (SPO and its peers, the preference model,
the toy base model).

A checkpoint is a folder ``<root>/<prefix>-NNNNNN/`` (``round-`` for LoRA trainers, ``step-`` for the others) written atomically (temporary folder, then one
rename), holding

- ``*.safetensors``: named groups of tensors (weights: a LoRA, a whole model);
- ``state.pt``: the training state (optimiser, gradient scaler, lr schedule; plain tensors and
  numbers, loaded with ``weights_only=True``);
- ``manifest.json``: the step, the fingerprint and content of the resolved configuration, and any
  JSON the trainer adds (its history).

Resuming compares the saved configuration with the current one. Keys that shape the result must
match, and a refusal names each differing key with both values and lists the keys that may change
(e.g. the number of rounds, the learning rate: a diverged run continues from its last good
checkpoint with a lower ``optim.lr``, which the optimiser then follows).

Stages that resume by default from a folder outside DVC's outputs (toy pretraining, the preference
model) key their checkpoints by configuration instead (:meth:`CheckpointStore.for_run`):
``<root>/<fingerprint>/step-N/``. An identical configuration resumes its own checkpoints, a changed
one (``dvc exp run -S toy_pretrain.lr=...``) starts fresh in a folder of its own, and once a run
completes the other configurations' folders under ``<root>`` are removed (:meth:`prune_other_runs`),
so old checkpoints never pile up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from .utils import atomic_dir
from .errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "state.pt"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be resumed; the message names the folder and the fix."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _allowed(key: str, may_change: Iterable[str]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in may_change)


def fingerprint(config: dict[str, Any], may_change: Iterable[str] = ()) -> str:
    """Hash of the configuration keys that shape a run (those not in ``may_change``)."""
    flat = {k: v for k, v in flatten(config).items() if not _allowed(k, may_change)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(saved: dict[str, Any], current: dict[str, Any], may_change: Iterable[str] = ()) -> list[str]:
    """``key: saved -> current`` for every key that differs and may not change."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _allowed(key, may_change):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)


_FINGERPRINT_DIR = re.compile(r"^[0-9a-f]{16}$")


class CheckpointStore:
    """Folders ``<prefix>-NNNNNNNN`` under ``root``, written atomically; keeps the last ``keep``."""

    def __init__(self, root: str | Path, keep: int = 2, prefix: str = "step"):
        self.root = Path(root)
        self.keep = keep
        self.prefix = prefix
        self.runs_root: Path | None = None  # set by for_run: the folder holding every configuration's

    @classmethod
    def for_run(cls, root: str | Path, config: dict[str, Any], may_change: Iterable[str] = (), keep: int = 2,
                prefix: str = "step") -> "CheckpointStore":
        """The checkpoints of one configuration: ``<root>/<fingerprint of config>/``. The same
        configuration finds (and resumes) them again; a changed one gets an empty folder of its own."""
        store = cls(Path(root) / fingerprint(config, may_change), keep, prefix)
        store.runs_root = Path(root)
        return store

    def prune_other_runs(self) -> list[Path]:
        """Remove the checkpoints of every other configuration under :meth:`for_run`'s root (called
        when this run has completed: they could only resume runs that are no longer the current one),
        including those of the layout before configurations had folders (``<root>/<prefix>-N``)."""
        if self.runs_root is None or not self.runs_root.is_dir():
            return []
        old = [p for p in self.runs_root.iterdir() if p.is_dir() and p != self.root and (
            _FINGERPRINT_DIR.match(p.name) or (p.name.startswith(f"{self.prefix}-") and (p / MANIFEST).is_file()))]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        if old:
            log.info("removed the checkpoints of %d other configuration(s) under %s", len(old), self.runs_root)
        return old

    def list(self) -> list[Path]:
        if not self.root.exists():
            return []
        done = [p for p in self.root.glob(f"{self.prefix}-*") if (p / MANIFEST).is_file()]  # complete folders only
        return sorted(done, key=lambda p: int(p.name.rsplit("-", 1)[1]))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def clear(self) -> int:
        """Remove every checkpoint (a fresh run must neither prune its own checkpoints in favour of an
        earlier run's in a persisted output folder, nor later resume from them); returns how many."""
        old = self.list()
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return len(old)

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
             config: dict[str, Any], may_change: Iterable[str] = (), extra: dict[str, Any] | None = None) -> Path:
        path = self.root / f"{self.prefix}-{step:06d}"
        with atomic_dir(path) as tmp:
            for name, group in tensors.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
            torch.save(state, tmp / STATE)
            manifest = {"step": step, "fingerprint": fingerprint(config, may_change), "config": config,
                        "may_change": sorted(may_change), **(extra or {})}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        for old in self.list()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def load(path: Path) -> Checkpoint:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise CheckpointError(f"checkpoint '{path}' is corrupt or unreadable ({type(exc).__name__}: {first}); "
                                  f"delete that folder to resume from an earlier one") from exc
        return Checkpoint(path, int(manifest["step"]), tensors, state, manifest)

    def resume(self, config: dict[str, Any], may_change: Iterable[str] = ()) -> Checkpoint | None:
        """The latest checkpoint, if its configuration matches ``config`` (else a refusal naming the keys)."""
        last = self.latest()
        if last is None:
            return None
        ckpt = self.load(last)
        if ckpt.manifest.get("fingerprint") != fingerprint(config, may_change):
            diffs = config_differences(ckpt.manifest.get("config", {}), config, may_change)
            allowed = ", ".join(sorted(may_change)) or "none"
            raise CheckpointError(
                f"cannot resume from '{last}': the configuration differs in {'; '.join(diffs) or 'unlisted keys'}. "
                f"Fix: resume with the saved values, or start afresh without resume (its checkpoints are then "
                f"replaced). Keys that may change on resume: {allowed}")
        return ckpt
