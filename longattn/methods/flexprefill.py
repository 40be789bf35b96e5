"""FlexPrefill: per head and input, a Jensen-Shannon switch between a query-aware and a
vertical-slash pattern, each with cumulative-attention budgets. Lai et al. 2025, arXiv:2502.20766.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_p_blocks
from longattn.methods.minference import line_scores, vs_choice
from longattn.types import PrefillPlan


def cumulative_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """int64 [...]: per row of ``scores`` [..., n] (non-negative), the fewest highest entries whose
    sum reaches ``gamma`` of the row's sum (at least one)."""
    ranked = torch.sort(scores, dim=-1, descending=True).values
    before = ranked.cumsum(-1) - ranked
    return (before < gamma * ranked.sum(-1, keepdim=True)).sum(-1).clamp(min=1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last axis."""
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)  # noqa: E731  0 log 0 = 0
    return (kl(p) + kl(q)) / 2


@register("flexprefill")
@dataclass(frozen=True)
class FlexPrefill(SparsePrefill):
    """FlexPrefill (Lai et al. 2025, arXiv:2502.20766). Per head, the last query block's block
    distribution estimated from pooled q.k is compared with its true one (its queries' softmax
    summed per key block): where ``sqrt(JS) < tau`` the estimate is trusted and every query block
    keeps the fewest pooled-score blocks reaching ``gamma`` of its estimated mass (query-aware);
    elsewhere the head runs vertical-slash with the fewest key columns and diagonals reaching
    ``gamma`` of the last block's attention (columns as token columns, diagonals as the key blocks
    they cross).

    gamma:      the cumulative-attention threshold, in (0, 1].
    tau:        the threshold on the square root of the Jensen-Shannon divergence, >= 0.
    block_size: the index block, which is also the query subset (the last block of queries).
    ``budget`` is not read: gamma sets each head's budget.
    Deviation from paper: vertical lines run as token columns merged by log-sum-exp, not as the
    key blocks that hold them.
    """

    gamma: float = 0.9
    tau: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"{name}.gamma must be in (0, 1], got {self.gamma}")
        if not self.tau >= 0.0 or math.isinf(self.tau):
            raise ValueError(f"{name}.tau must be a finite number >= 0, got {self.tau}")

    def plan(self, view) -> PrefillPlan:
        block = view.block_size
        pooled = view.pooled_logits()  # [B, H, nq, nk], -inf off causal
        estimate = torch.softmax(pooled, dim=-1).nan_to_num(0.0)
        columns, diagonals = line_scores(view, block)  # the last query block's attention
        n_k = view.causal.shape[1]
        pad = n_k * block - columns.shape[-1]
        true = torch.nn.functional.pad(columns, (0, pad)).unflatten(-1, (n_k, block)).sum(-1)
        true = true / true.sum(-1, keepdim=True).clamp(min=1e-30)  # [B, H, nk]
        query_aware = js_divergence(estimate[:, :, -1], true).clamp(min=0).sqrt() < self.tau
        aware_blocks = top_p_blocks(estimate, view.causal, self.gamma)
        vs_blocks, vs_cols = vs_choice(
            view,
            columns,
            diagonals,
            cumulative_count(columns, self.gamma),
            cumulative_count(diagonals, self.gamma),
        )
        pick = query_aware[:, :, None, None]  # [B, H, 1, 1]
        # the columns are one list per head, broadcast over the query blocks: kept so
        cols = vs_cols[:, :, :1].masked_fill(pick, -1).expand_as(vs_cols)
        return PrefillPlan(torch.where(pick, aware_blocks, vs_blocks), cols)
