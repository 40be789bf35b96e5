"""H2O: heavy hitters, the keys that accumulated the most attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import require, score_dtype


@register("h2o")
@dataclass(frozen=True)
class H2O(Evict):
    """Heavy-hitter oracle: the score of a held key is the attention it accumulated from every query
    since it arrived, summed over the query heads of its KV head; the recent tokens are the
    library's ``recent`` region. Zhang et al. 2023, arXiv:2306.14048.

    Deviation from paper: the paper evicts one token per decode step once the cache is full; here
    compression runs on the library's schedule (``when``; ``when=decode,every=1`` is the paper's),
    and one score per KV head (attention summed over its GQA group).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"accumulated"})

    def score(self, view: Any) -> torch.Tensor:
        return require(view, "H2O", "accumulated").to(score_dtype(view.keys))
