"""Block top-k prefill: each query block visits the key blocks of highest mean-pooled q.k.

Also the home of the block choices the other plan methods share (``top_k_blocks``,
``top_p_blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register


def top_count(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool like ``scores`` [..., n]: per row the ``counts`` [...] (broadcast, each in [1, n])
    highest scores, ties towards the earlier column: the first ``counts`` of a stable descending
    sort, found without sorting. The row's ``counts``-th largest value is the threshold; every
    score above it is kept, then the earliest scores equal to it until the count is reached."""
    counts = counts.expand(scores.shape[:-1]).unsqueeze(-1)  # [..., 1]
    largest = int(counts.max()) if counts.numel() else 1
    top = torch.topk(scores, largest, dim=-1, sorted=True).values  # [..., largest]
    threshold = top.gather(-1, counts - 1)  # [..., 1] the counts-th largest
    above = scores > threshold
    tied = scores == threshold
    room = counts - above.sum(-1, keepdim=True)  # how many tied scores still fit
    return above | (tied & (tied.cumsum(-1) <= room))


def top_k_blocks(
    scores: torch.Tensor,
    causal: torch.Tensor,
    fraction: float,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool like ``scores`` [B, H, nq, nk]: per query block, ``ceil(fraction * its causal
    blocks)`` causal key blocks: the ``forced`` ones [nq, nk] (the library's sinks and local
    blocks, counted in the budget) first, then the highest-scoring (ties towards the earlier
    block)."""
    per_row = torch.ceil(causal.sum(-1).double() * fraction).long().clamp(min=1)  # [nq]
    scores = scores.masked_fill(~causal, -math.inf)
    if forced is not None:
        scores.masked_fill_(forced & causal, math.inf)
    return top_count(scores, per_row.clamp(max=scores.shape[-1])) & causal


def top_p_blocks(mass: torch.Tensor, causal: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool like ``mass`` [B, H, nq, nk] (non-negative, any scale): per query block, the fewest
    highest-mass causal key blocks whose mass reaches ``fraction`` of the row's causal mass (the
    block that crosses it included; ties towards the earlier block)."""
    mass = mass.masked_fill(~causal, 0.0)
    total = mass.sum(-1, keepdim=True)
    ranked, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = ranked.cumsum(-1) - ranked  # mass of the blocks ranked ahead
    keep_ranked = before < fraction * total
    keep_ranked[..., 0] = True  # at least the best block, also for a row of zero mass
    chosen = torch.zeros_like(keep_ranked)
    chosen.scatter_(-1, order, keep_ranked)
    return chosen & causal


@register("block_topk")
@dataclass(frozen=True)
class BlockTopK(SparsePrefill):
    """Per query block and head, the ``budget`` fraction of its causal key blocks: the library's
    sink and local blocks, then those with the highest ``mean(q) . mean(k)`` (pooled over each
    block).
    The block-pooled estimate of block-sparse prefill (MInference's block-sparse pattern, Jiang et
    al. 2024, arXiv:2407.02490, without its per-head pattern search)."""

    def plan(self, view) -> torch.Tensor:
        return top_k_blocks(view.pooled_logits(), view.causal, self.budget, view.forced)
