"""Library log records that tell a user nothing they can act on, dropped at their source logger.

Installed when ``spo_core`` is imported. Everything else from diffusers, transformers and MLflow
passes through ``logging`` unchanged.
"""

from __future__ import annotations

import logging

# source logger -> message fragments to drop
DROPPED = {
    # ModelMixin.to(dtype) warns even when the list of modules to keep in float32 is empty.
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
    # Importing diffusers' pipelines names transformers' image processors; without torchvision
    # (not needed here: images are preprocessed in torch) transformers warns about its PIL fallback.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def install() -> None:
    for name, fragments in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))
