"""A BPE tokenizer for the toy grammar, trained with ``tokenizers`` and saved as a CLIPTokenizer.

The merges are learned on the prompts with CLIP's conventions (lower case, whitespace words,
``</w>`` end-of-word suffix), then written next to CLIP's byte-level base vocabulary by
:func:`spo_core.models.tiny.write_clip_tokenizer`, so ``CLIPTokenizer.from_pretrained`` loads it and
every grammar word becomes a single token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from ..models.tiny import write_clip_tokenizer

log = logging.getLogger(__name__)


def learn_merges(corpus: list[str], max_merges: int = 4096) -> list[tuple[str, str]]:
    """BPE merges learned on ``corpus``; training stops early once every word is one token."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = sorted({ch for text in corpus for ch in text.lower() if not ch.isspace()})
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) * 2 + max_merges, min_frequency=1, show_progress=False,
                                  end_of_word_suffix="</w>", initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def train_tokenizer(corpus: list[str], out_dir: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Learn merges on ``corpus`` and write a CLIPTokenizer directory at ``out_dir``; returns it loaded."""
    merges = learn_merges(corpus)
    write_clip_tokenizer(out_dir, merges, max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir))
    log.info("tokenizer: %d merges, vocabulary %d", len(merges), len(tokenizer))
    return tokenizer
