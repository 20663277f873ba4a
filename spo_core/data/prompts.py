"""Prompt sources: plain lists, text files, the SPO 4k JSON, PartiPrompts, Pick-a-Pic captions.

Every reader returns ``list[str]`` in file order, each prompt stripped, empty prompts dropped.
Malformed inputs raise :class:`PromptFileError` naming the file, the problem and the fix.
:func:`load_prompts` dispatches on the config's ``prompts.source``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from ..errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "PromptFileError",
    "SOURCES",
    "load_prompts",
    "read_list",
    "read_text_prompts",
    "read_spo_json",
    "read_partiprompts",
    "read_pickapic_prompts",
    "sample_prompts",
]

DEFAULT_PICKAPIC_SPLIT = "validation_unique"


class PromptFileError(InputError, ValueError):
    """A prompt file that cannot be read; the message names the file, the problem and the fix."""


def _fail(path: str | os.PathLike, problem: str, fix: str) -> PromptFileError:
    return PromptFileError(f"prompt file '{path}': {problem}. Fix: {fix}")


# Control characters (NUL bytes of a binary file, say) are never part of a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# CLIP text encoders read 77 tokens (about 300 characters of English); much more means the file is
# not one prompt per line.
LONG_PROMPT_CHARS = 1000


def _clean(raw: Iterable[str]) -> list[str]:
    out = [s for s in (_CONTROL.sub(" ", r).strip() for r in raw) if s]
    long = [i for i, s in enumerate(out) if len(s) > LONG_PROMPT_CHARS]
    if long:
        logger.warning("%d prompt(s) have more than %d characters (the first: prompt %d, %d characters); the text "
                       "encoder reads only the first 77 tokens of each. Fix: shorten them, or check that the file holds "
                       "one prompt per line", len(long), LONG_PROMPT_CHARS, long[0], len(out[long[0]]))
    return out


def _existing_file(path: str | os.PathLike | None, source: str) -> Path:
    if path is None:
        raise PromptFileError(f"prompt source '{source}' needs a path to a file; none was given. Fix: set prompts.path")
    p = Path(path)
    if not p.exists():
        raise _fail(p, "the file does not exist", "check the path (relative paths start at the working directory)")
    if not p.is_file():
        raise _fail(p, "this is a folder, not a file", "point at the file itself")
    if p.stat().st_size == 0:
        raise _fail(p, "the file is empty", "give a file that holds prompts")
    return p


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(p, f"not valid UTF-8 text ({exc})", "save the file as UTF-8") from None


def _nonempty(prompts: list[str], p: Path | str) -> list[str]:
    if not prompts:
        raise _fail(p, "no prompts found (only blank lines, comments or empty captions)", "add at least one prompt")
    return prompts


# ----------------------------------------------------------------------------------------------
# Readers


def read_list(prompts: Sequence[str] | None) -> list[str]:
    """Prompts given inline (the config's ``prompts.prompts``)."""
    if not prompts:
        raise ValueError("prompt source 'list' got no prompts: set prompts.prompts or choose another source")
    bad = [i for i, s in enumerate(prompts) if not isinstance(s, str)]
    if bad:
        raise ValueError(f"prompt source 'list': entries {bad[:5]} are not strings: quote them in the config")
    out = _clean(prompts)
    if not out:
        raise ValueError("prompt source 'list': every prompt is blank: give non-empty prompts")
    return out


def read_text_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' (after indentation) are skipped."""
    p = _existing_file(path, "text")
    lines = _read_text(p).splitlines()
    return _nonempty(_clean(ln for ln in lines if not ln.lstrip().startswith("#")), p)


def read_spo_json(path: str | os.PathLike) -> list[str]:
    """The SPO 4k training-prompt file: a JSON list of ``{"caption": str, "trainset_idx": int}``."""
    p = _existing_file(path, "spo_json")
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as exc:
        raise _fail(p, f"not valid JSON ({exc})", "repair the file or download it again") from None
    if not isinstance(data, list):
        raise _fail(p, f"expected a JSON list of objects, found a {type(data).__name__}", 'use [{"caption": ...}, ...]')
    captions: list[str] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "caption" not in item:
            raise _fail(p, f"entry {i} has no 'caption' key (got {str(item)[:80]!r})", 'give every entry a "caption"')
        cap = item["caption"]
        if not isinstance(cap, str):
            raise _fail(p, f"entry {i} has a non-string caption ({type(cap).__name__})", "make every caption a string")
        captions.append(cap)
    cleaned = _clean(captions)
    if len(cleaned) < len(captions):
        logger.warning("%s: skipped %d empty captions", p, len(captions) - len(cleaned))
    return _nonempty(cleaned, p)


def read_partiprompts(path: str | os.PathLike, category: str | None = None) -> list[str]:
    """PartiPrompts TSV (header ``Prompt, Category, Challenge, Note``), optionally one category only.

    The category match ignores case; an unknown category lists the ones that exist.
    """
    p = _existing_file(path, "partiprompts")
    try:
        # QUOTE_NONE: prompts contain literal double quotes; keep_default_na: "NA"/"null" are prompts too.
        df = pd.read_csv(p, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise _fail(p, f"cannot be parsed as a tab-separated table ({exc})", "save it as TSV with a header row") from None
    if "Prompt" not in df.columns:
        raise _fail(p, f"no 'Prompt' column (columns: {list(df.columns)})", "add a header row with a 'Prompt' column")
    if category is not None:
        if "Category" not in df.columns:
            raise _fail(p, "a category filter was asked for but there is no 'Category' column", "drop the filter")
        wanted = category.strip().lower()
        mask = df["Category"].str.strip().str.lower() == wanted
        if not mask.any():
            known = sorted(set(df["Category"].str.strip()) - {""})
            raise _fail(p, f"no prompts in category {category!r}", f"choose one of {known}")
        df = df[mask]
    return _nonempty(_clean(df["Prompt"]), p)


def _read_caption_table(p: Path) -> pd.Series:
    """The ``caption`` column of a local parquet (file or folder of shards), JSON or JSON-lines file."""
    suffix = p.suffix.lower()
    if p.is_dir():
        shards = sorted(p.glob("*.parquet"))
        if not shards:
            raise _fail(p, "the folder holds no .parquet files", "point at a parquet file or a folder of shards")
        return pd.concat([_read_caption_table(s) for s in shards], ignore_index=True)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            names = pq.read_schema(p).names
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise _fail(p, f"cannot be read as parquet ({exc})", "repair or re-download the file") from None
        if "caption" not in names:
            raise _fail(p, f"no 'caption' column (columns: {names})", "give a Pick-a-Pic file with a 'caption' column")
        # Read only the captions: Pick-a-Pic shards also carry megabytes of image bytes per row.
        return pd.read_parquet(p, columns=["caption"])["caption"]
    if suffix in {".json", ".jsonl"}:
        text = _read_text(p)
        try:
            if suffix == ".jsonl":
                records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(p, f"not valid JSON ({exc})", "repair the file (.jsonl: one JSON object per line)") from None
        if isinstance(records, dict) and "caption" in records:  # column-oriented {"caption": [...]}
            records = [{"caption": c} for c in records["caption"]]
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise _fail(p, "expected a list of objects with a 'caption' key", 'use [{"caption": ...}, ...]')
        missing = [i for i, r in enumerate(records) if "caption" not in r]
        if missing:
            raise _fail(p, f"entries {missing[:5]} have no 'caption' key", 'give every entry a "caption"')
        return pd.Series([r["caption"] for r in records], dtype=object)
    raise _fail(p, f"unsupported file type '{suffix}'", "use .parquet, .json or .jsonl (or a folder of .parquet shards)")


def _captions_from_hub(spec: str) -> list[Any]:
    repo, _, split = spec.partition(":")
    split = split or DEFAULT_PICKAPIC_SPLIT
    try:
        import datasets
    except ImportError:
        raise PromptFileError(
            f"prompt source 'pickapic': '{spec}' is not a local file, so it was taken as a hub dataset id, but the "
            "'datasets' library is not installed. Fix: `pip install datasets`, or download the split and pass a local "
            ".parquet/.json/.jsonl file"
        ) from None
    logger.info("reading captions of %s split %s through the datasets library", repo, split)
    # Streaming reads only as many rows as we consume and skips the image columns' download.
    ds = datasets.load_dataset(repo, split=split, streaming=True)
    ds = ds.select_columns(["caption"])
    return [row["caption"] for row in ds]


def read_pickapic_prompts(path: str | os.PathLike) -> list[str]:
    """Pick-a-Pic captions, deduplicated in first-seen order.

    ``path`` is a local parquet file or folder of shards, a .json/.jsonl file with a ``caption``
    field, or a hub dataset id ``owner/name[:split]`` (split defaults to ``validation_unique``),
    which needs the ``datasets`` library.
    """
    if path is None:
        raise PromptFileError("prompt source 'pickapic' needs a path (a local file or owner/name[:split]). Fix: set prompts.path")
    p = Path(path)
    looks_local = p.exists() or p.suffix.lower() in {".parquet", ".json", ".jsonl"} or str(path).startswith((".", "/"))
    if looks_local:
        if not p.exists():
            raise _fail(p, "the file does not exist", "check the path")
        if p.is_file() and p.stat().st_size == 0:
            raise _fail(p, "the file is empty", "give a file that holds captions")
        raw = list(_read_caption_table(p))
    else:
        raw = _captions_from_hub(str(path))
    bad = [i for i, c in enumerate(raw) if not isinstance(c, str)]
    if bad:
        raise _fail(path, f"rows {bad[:5]} have non-string captions", "fill or drop those rows")
    captions = list(dict.fromkeys(_clean(raw)))  # dict keeps first-seen order
    logger.info("%s: %d captions, %d unique non-empty", path, len(raw), len(captions))
    return _nonempty(captions, path)


# ----------------------------------------------------------------------------------------------
# Dispatch and sampling

SOURCES: dict[str, Callable[..., list[str]]] = {
    "list": lambda path, prompts, category: read_list(prompts),
    "text": lambda path, prompts, category: read_text_prompts(path),
    "toy": lambda path, prompts, category: read_text_prompts(path),  # the toy world writes text files
    "spo_json": lambda path, prompts, category: read_spo_json(path),
    "partiprompts": lambda path, prompts, category: read_partiprompts(path, category),
    "pickapic": lambda path, prompts, category: read_pickapic_prompts(path),
}


def load_prompts(
    source: str,
    path: str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    limit: int | None = None,
    category: str | None = None,
) -> list[str]:
    """Load prompts from ``source`` (one of :data:`SOURCES`); keep the first ``limit`` if given.

    ``category`` filters PartiPrompts and is an error for the other sources.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown prompt source '{source}': choose one of {sorted(SOURCES)}")
    if category is not None and source != "partiprompts":
        raise ValueError(f"a category filter only applies to source 'partiprompts', not '{source}': drop category")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    out = SOURCES[source](path, prompts, category)
    if limit is not None:
        out = out[: int(limit)]
    logger.info("loaded %d prompts from source '%s'%s", len(out), source, f" ({path})" if path else "")
    return out


def sample_prompts(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """A deterministic subset of ``n`` prompts drawn without replacement, kept in their original order.

    The subset for a smaller ``n`` is contained in the one for a larger ``n`` with the same seed
    (both take a prefix of the same permutation).
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    if n > len(prompts):
        raise ValueError(f"cannot sample {n} prompts from {len(prompts)} without replacement: lower n or add prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))[: int(n)]
    return [prompts[i] for i in sorted(order.tolist())]
