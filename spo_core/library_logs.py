"""Library log records that tell a user nothing they can act on, dropped at their source logger.

Installed when ``spo_core`` is imported, with sparse progress bars when not on a terminal.
Everything else from diffusers, transformers and MLflow passes through ``logging`` unchanged.
"""

from __future__ import annotations

import logging
import os
import sys

# source logger -> message fragments to drop
DROPPED = {
    # ModelMixin.to(dtype) warns even when the list of modules to keep in float32 is empty.
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
    # Importing diffusers' pipelines names transformers' image processors; without torchvision
    # (not needed here: images are preprocessed in torch) transformers warns about its PIL fallback.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
}

# Loggers whose INFO records only narrate (MLflow's system-metrics thread: 4 lines per run).
QUIETED = ("mlflow.system_metrics.system_metrics_monitor",)


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def install() -> None:
    # Outside a terminal (dvc repro's log, CI, Prefect) a progress bar redraws at most every 30 s
    # instead of ten times a second (MAXINTERVAL too: tqdm's monitor thread otherwise redraws a
    # stalled bar every 10 s). tqdm reads TQDM_* when it is imported, which is after this.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")
        os.environ.setdefault("TQDM_MAXINTERVAL", "30")
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))
