"""TOVA: keep the keys the latest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import window_weights


@register("tova")
@dataclass(frozen=True)
class TOVA(Evict):
    """Token Omission Via Attention: the score of a held key is the softmax weight the latest query
    (the last of the observation window) gives it, averaged over the query heads of its KV head.
    Oren et al. 2024, arXiv:2401.06104.

    Only the last query is read, so ``window`` defaults to 1.
    Deviation from paper: the paper averages over all heads of a layer (one decision per layer) and
    evicts one token per decode step once the cache is full; here one score per KV head (averaged
    over its GQA group, the cache being per KV head) and compression on the library's schedule
    (``when=decode,every=1`` is the paper's).
    """

    window: int = 1

    def score(self, view: Any) -> torch.Tensor:
        return window_weights(view, "TOVA", last=1).mean(dim=(2, 3))  # [B, Hkv, T]
