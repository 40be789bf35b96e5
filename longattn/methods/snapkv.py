"""SnapKV: keep the keys the observation window votes for, pooled so that clusters survive.

Also the home of the helpers the other eviction scorers share (``score_dtype``,
``window_weights``, ``require``): PyramidKV and AdaKV are SnapKV with another budget policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longattn.method import Evict, check_positive, register

POOLINGS = ("max", "avg")


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (so the float64 oracle scores the same keys), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def require(view: Any, name: str, field: str) -> torch.Tensor:
    """``view.<field>``, or a ValueError naming the method when the library did not provide it."""
    value = getattr(view, field)
    if value is None:
        raise ValueError(
            f"{name} scores with view.{field}, which is None: the method must list "
            f"'accumulated' in needs and the library must maintain it"
        )
    return value


def window_weights(view: Any, name: str, last: int = 0) -> torch.Tensor:
    """[B, Hkv, G, n, T] softmax weights of the observation window's queries (its ``last`` ones when
    ``last > 0``) over the held keys, grouped by KV head; zeros on empty slots."""
    queries, q_pos = view.queries, view.q_pos  # [B, H, w, D], [B, w]
    if queries.shape[2] == 0:
        raise ValueError(
            f"{name} scores with the observation window, but the view holds no queries (w=0)"
        )
    if last:
        queries, q_pos = queries[:, :, -last:], q_pos[:, -last:]
    weights = view.weights(queries, q_pos)  # [B, H, n, T]
    batch, n_heads, n, t = weights.shape
    n_kv = view.keys.shape[1]
    return weights.to(score_dtype(view.keys)).reshape(batch, n_kv, n_heads // n_kv, n, t)


def pool_by_position(
    votes: torch.Tensor, positions: torch.Tensor, kernel: int, pooling: str
) -> torch.Tensor:
    """1-D ``pooling`` (max or avg, zero padding counted as in SnapKV's code) of ``votes`` [B, Hkv,
    T] over each head's held keys taken in position order (empty slots last, with zero votes)."""
    if kernel == 1:
        return votes
    empty = positions < 0
    last = torch.iinfo(positions.dtype).max
    order = positions.masked_fill(empty, last).argsort(dim=-1, stable=True)  # [B, Hkv, T] slots
    ranked = votes.masked_fill(empty, 0.0).gather(-1, order).flatten(0, 1)  # [B*Hkv, T]
    pad = kernel // 2
    if pooling == "max":
        pooled = F.max_pool1d(ranked[:, None], kernel, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(ranked[:, None], kernel, stride=1, padding=pad)
    return torch.empty_like(votes).scatter_(-1, order, pooled.view_as(votes))


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(Evict):
    """Votes of the observation window, pooled along the keys, per KV head. Li et al. 2024,
    arXiv:2404.14469.

    Score of a held key: the softmax weight it draws from each of the last ``window`` queries,
    summed over those queries and over the query heads of its KV head, then smoothed by 1-D
    ``pooling`` (``max`` or ``avg``) with an odd ``kernel`` over the head's held keys in position
    order, so that the neighbours of a voted key are kept with it (clustered information).
    The window's own keys are kept by the library's ``recent`` region.
    Deviation from paper: one score per KV head (votes summed over its GQA group) since the cache
    is per KV head; the reference code's initialiser uses ``pooling=avg, kernel=5``
    (``snapkv:pooling=avg,kernel=5``), here max pooling with kernel 15 is the default: a fact
    spans more tokens than a 5-7 wide window keeps together where numbers are tokenised digit
    by digit (SmolLM2-135M needle at 25 % kept, 2K: kernel 7 8.3 %, kernel 15 the dense
    accuracy; ``docs/runs/issue13/needle_25pct_kernel/``).
    """

    kernel: int = 15
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(name, kernel=self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"{name}.kernel must be odd (centred pooling), got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{name}.pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def score(self, view: Any) -> torch.Tensor:
        votes = window_weights(view, type(self).__name__).sum(dim=(2, 3))  # [B, Hkv, T]
        return pool_by_position(votes, view.positions, self.kernel, self.pooling)
