"""Per-item training data of a round: dataclasses whose fields are tensors sharing a first dimension.

Every method's round data (SPO's step pairs, D3PO's trajectory pairs, DDPO's transitions,
Diffusion-DPO's latent pairs) is a :class:`Rows`: it can be indexed, concatenated, moved and
gathered across processes field by field. Two fields are required, because the trainer gathers
and orders items the same way for every method:

- ``prompt_index``: the item's row in the round's :class:`~spo_core.models.diffusion.Conditioning`;
- ``order``: a number that is unique among the items of one prompt (e.g. the step index), so that
  (order, global prompt) sorts a round's items into one order whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

import torch

R = TypeVar("R", bound="Rows")


class Rows:
    """Mixin for ``@dataclass`` classes whose fields are all tensors of shape (N, ...)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.field_names()}

    def __len__(self) -> int:
        return int(self.prompt_index.shape[0])  # type: ignore[attr-defined]

    def select(self: R, idx: torch.Tensor) -> R:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return type(self)(**{k: v[idx.to(v.device)] for k, v in self.tensors().items()})

    def to(self: R, device) -> R:
        return type(self)(**{k: v.to(device) for k, v in self.tensors().items()})

    @classmethod
    def cat(cls: type[R], parts: list[R]) -> R:
        return cls(**{k: torch.cat([p.tensors()[k] for p in parts]) for k in cls.field_names()})

    def empty_like(self: R) -> R:
        return self.select(torch.zeros(0, dtype=torch.long))
