"""Attendre: a FIFO memory that evicts the least recently or least frequently attended keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import require, score_dtype

POLICIES = ("lru", "lfu")


@register("attendre")
@dataclass(frozen=True)
class Attendre(Evict):
    """Memory eviction by attendance. Yang and Hua 2024, arXiv:2401.04881.

    ``policy="lru"`` (least recently attended): the score of a held key is the position of the
    latest query that attended it (``view.last_hit``: at least the mean weight in some head of its
    group), its own position if none has since it arrived, so that keys never attended leave
    first-in first-out. ``policy="lfu"`` (least frequently attended): the attention the key
    accumulated (``view.accumulated``).
    Deviation from paper: "frequency" is the accumulated attention mass, not a count of hits; the
    retrieval of evicted entries by the paper's wait-to-attend mechanism is not part of eviction;
    one score per KV head (its GQA group). Positions are exact in float32 below 2^24.
    """

    policy: str = "lru"

    needs: ClassVar[frozenset[str]] = frozenset({"accumulated"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy not in POLICIES:
            raise ValueError(f"Attendre.policy must be one of {POLICIES}, got {self.policy!r}")

    def score(self, view: Any) -> torch.Tensor:
        dtype = score_dtype(view.keys)
        if self.policy == "lfu":
            return require(view, "Attendre", "accumulated").to(dtype)
        last_hit = require(view, "Attendre", "last_hit")
        return torch.maximum(last_hit, view.positions).to(dtype)
