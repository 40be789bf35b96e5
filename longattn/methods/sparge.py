"""SpargeAttn-style prefill: a pooled prediction of the attention map, trusted only where blocks are
self-similar, then a cumulative (top-p) choice over it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_p_blocks


def block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, h, T, D] -> [B, h, ceil(T / block)] float32: the mean pairwise cosine similarity of each
    block's tokens (diagonal included), ``|mean(x_i / |x_i|)|^2``, in O(T D) without the pairs.
    The last block averages over the tokens it has."""
    batch, heads, t, dim = x.shape
    n = -(-t // block)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    unit = torch.nn.functional.pad(unit, (0, 0, 0, n * block - t))
    sums = unit.view(batch, heads, n, block, dim).sum(dim=3)  # [B, h, n, D]
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = t - (n - 1) * block
    return (sums / counts.view(1, 1, n, 1)).square().sum(-1)


def block_sizes(n_tokens: int, block: int, device) -> torch.Tensor:
    """[ceil(n_tokens / block)] float32 token count of each block (the last one may be short)."""
    n = -(-n_tokens // block)
    sizes = torch.full((n,), float(block), device=device)
    sizes[-1] = n_tokens - (n - 1) * block
    return sizes


@register("sparge")
@dataclass(frozen=True)
class Sparge(SparsePrefill):
    """SpargeAttn's block filter (Zhang et al. 2025, arXiv:2502.18137): the attention map predicted
    from mean-pooled query and key blocks, ``softmax(scale * mean(q) . mean(k))`` weighted by key
    block size, and per query block the fewest key blocks reaching ``budget`` (tau, cumulative) of
    the predicted mass. A pooled block is a fair summary only when its tokens agree, so a query
    block whose self-similarity (mean pairwise cosine of its tokens) is below ``theta`` visits all
    its causal key blocks, and a key block below ``theta`` is visited by every query block.

    theta: self-similarity threshold in [-1, 1] (the paper's per-model tuned hyperparameter); at
           -1 every block is trusted.
    Deviation from paper: the second stage, the in-kernel P.V skip (lambda), belongs to the
    block-sparse kernel, not to this plan; SpargeAttn's per-layer hyperparameter search is not done.
    """

    budget: float = 0.9
    theta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
            raise TypeError(f"Sparge.theta must be a float, got {self.theta!r}")
        if not -1.0 <= self.theta <= 1.0:
            raise ValueError(f"Sparge.theta must be in [-1, 1], got {self.theta}")

    def plan(self, view) -> torch.Tensor:
        logits = view.pooled_logits()  # [B, H, nq, nk], -inf off causal
        sizes = block_sizes(view.k.shape[2], view.block_size, logits.device)
        mass = torch.softmax(logits + sizes.log(), dim=-1).nan_to_num(0.0)
        chosen = top_p_blocks(mass, view.causal, self.budget)
        q_unsure = block_self_similarity(view.q, view.block_size) < self.theta  # [B, H, nq]
        k_unsure = block_self_similarity(view.k, view.block_size) < self.theta  # [B, Hkv, nk]
        k_unsure = k_unsure.repeat_interleave(view.q.shape[1] // view.k.shape[1], dim=1)
        return (chosen | q_unsure.unsqueeze(-1) | k_unsure.unsqueeze(-2)) & view.causal
