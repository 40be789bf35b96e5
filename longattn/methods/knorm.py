"""KNorm: keep the keys of smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import score_dtype


@register("knorm")
@dataclass(frozen=True)
class KNorm(Evict):
    """Score = ``-||k||_2``: keys of small norm draw the most attention, so they are kept. Devoto et
    al. 2024, arXiv:2406.11430. Needs no query and no attention weights.

    The cache's keys are post-RoPE, whose rotation preserves the norm.
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: Any) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys, dim=-1, dtype=score_dtype(view.keys))
