"""The world directory: what the ``toy_world`` stage writes and every later stage reads.

Layout: ``world.json`` (the full :class:`WorldConfig`, held-out pairs and counts),
``train_prompts.txt`` / ``validation_prompts.txt`` (one prompt per line, readable by the ``toy``
prompt source) and ``tokenizer/`` (a CLIPTokenizer directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTokenizer

from ..utils import atomic_dir
from .config import ToyWorldConfig, WorldConfig
from .grammar import split_prompts, vocabulary
from .tokenizer import train_tokenizer

WORLD_JSON = "world.json"
TRAIN_PROMPTS = "train_prompts.txt"
VALIDATION_PROMPTS = "validation_prompts.txt"
TOKENIZER_DIR = "tokenizer"


@dataclass
class LoadedWorld:
    config: WorldConfig
    train_prompts: list[str]
    validation_prompts: list[str]
    heldout_pairs: list[tuple[str, str]]
    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(str(self.tokenizer_dir))


def write_world(cfg: ToyWorldConfig, out_dir: str | Path | None = None) -> dict:
    """Write the world directory atomically; returns its description (also in world.json)."""
    split = split_prompts(cfg.world)
    desc = {
        "world": cfg.world.model_dump(mode="json"),
        "heldout_pairs": [list(p) for p in split.heldout_pairs],
        "n_train": len(split.train),
        "n_validation": len(split.validation),
        "vocabulary": vocabulary(cfg.world),
    }
    with atomic_dir(out_dir or cfg.output_dir) as tmp:
        (tmp / TRAIN_PROMPTS).write_text("\n".join(split.train) + "\n")
        (tmp / VALIDATION_PROMPTS).write_text("\n".join(split.validation) + "\n")
        tok = train_tokenizer(split.train, tmp / TOKENIZER_DIR, max_length=cfg.tokenizer.max_length)
        desc["tokenizer_vocab_size"] = len(tok)
        (tmp / WORLD_JSON).write_text(json.dumps(desc, indent=2) + "\n")
    return desc


def load_world(world_dir: str | Path) -> LoadedWorld:
    root = Path(world_dir)
    missing = [n for n in (WORLD_JSON, TRAIN_PROMPTS, VALIDATION_PROMPTS, TOKENIZER_DIR) if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"'{root}' is not a toy world directory (missing {missing}): run the toy_world stage first "
            f"(python -m spo_core.stages.toy_world) or point world_dir at its output"
        )
    desc = json.loads((root / WORLD_JSON).read_text())

    def lines(name: str) -> list[str]:
        return [ln for ln in (root / name).read_text().splitlines() if ln.strip()]

    return LoadedWorld(
        config=WorldConfig.model_validate(desc["world"]),
        train_prompts=lines(TRAIN_PROMPTS),
        validation_prompts=lines(VALIDATION_PROMPTS),
        heldout_pairs=[tuple(p) for p in desc["heldout_pairs"]],
        root=root,
    )
