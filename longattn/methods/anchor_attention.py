"""AnchorAttention-style prefill: each query block's anchor (its best score over the sinks and its
local window) and the key stripes scoring within ``theta`` of it.

Also the home of the token-level helpers the estimators that read single keys share
(``gather_keys``, ``anchor_logits``, ``margin_blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_k_blocks


def gather_keys(k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, Tk, D], idx [B, H, ...] int64 key indices per *query* head -> [B, H, ..., D]
    float32, reading each query head's shared key head (GQA, ``h // (H / Hkv)``) without expanding
    K."""
    batch, n_kv, t_k, dim = k.shape
    heads = idx.shape[1]
    kv_head = torch.arange(heads, device=k.device) // (heads // n_kv)  # [H]
    base = (torch.arange(batch, device=k.device).view(-1, 1) * n_kv + kv_head.view(1, -1)) * t_k
    flat = idx + base.view(batch, heads, *([1] * (idx.dim() - 2)))
    return k.reshape(-1, dim)[flat.reshape(-1)].float().view(*idx.shape, dim)


def query_blocks(view) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, H, nq, bs, D] float32 zero-padded, q_pos [Bp, nq, bs] with -1 on padding)."""
    batch, heads, t_q, dim = view.q.shape
    bs = view.block_size
    n_q = -(-t_q // bs)
    q = torch.nn.functional.pad(view.q.float(), (0, 0, 0, n_q * bs - t_q))
    q_pos = torch.nn.functional.pad(view.q_pos, (0, n_q * bs - t_q), value=-1)
    return q.view(batch, heads, n_q, bs, dim), q_pos.view(-1, n_q, bs)


def anchor_logits(view) -> torch.Tensor:
    """[B, H, Tq padded to nq * bs] float32: each query's highest ``scale * q . k`` over the first key
    block (the sinks) and the two key blocks ending at its query block's diagonal (its local
    window), causal by position; -inf for padding queries."""
    bs = view.block_size
    t_k = view.k.shape[2]
    q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
    diagonal = view.causal.long().cumsum(-1).argmax(-1)  # [nq] last causal key block
    offsets = torch.arange(bs, device=q.device)
    starts = torch.stack([torch.zeros_like(diagonal), diagonal - 1, diagonal], -1).clamp(min=0)
    idx = (starts.unsqueeze(-1) * bs + offsets).flatten(-2).clamp(max=t_k - 1)  # [nq, 3 bs]
    batch, heads = q.shape[:2]
    keys = gather_keys(view.k, idx.expand(batch, heads, *idx.shape))  # [B, H, nq, 3 bs, D]
    logits = (q @ keys.transpose(-1, -2)) * view.scale  # [B, H, nq, bs, 3 bs]
    kp = view.kv_pos[:, idx]  # [Bp, nq, 3 bs]
    visible = (kp.unsqueeze(-2) <= q_pos.unsqueeze(-1)) & (kp.unsqueeze(-2) >= 0)
    visible = visible & (q_pos.unsqueeze(-1) >= 0)  # [Bp, nq, bs, 3 bs]
    logits = logits.masked_fill(~visible.unsqueeze(1), -math.inf)
    return logits.amax(-1).flatten(2)


def margin_blocks(
    margin: torch.Tensor, causal: torch.Tensor, floor: float, budget: float
) -> torch.Tensor:
    """bool [B, H, nq, nk]: causal key blocks whose ``margin`` (best score against the anchor) is at
    least ``floor``, at most the ``budget`` fraction of each row's causal blocks (the highest
    margins; ties towards the earlier block)."""
    return (margin >= floor) & top_k_blocks(margin, causal, budget)


def block_max(scores: torch.Tensor, block: int) -> torch.Tensor:
    """[..., Tk] -> [..., ceil(Tk / block)]: the maximum over each key block's columns."""
    t_k = scores.shape[-1]
    n_k = -(-t_k // block)
    padded = torch.nn.functional.pad(scores, (0, n_k * block - t_k), value=-math.inf)
    return padded.view(*scores.shape[:-1], n_k, block).amax(-1)


@register("anchor_attention")
@dataclass(frozen=True)
class AnchorAttention(SparsePrefill):
    """AnchorAttention (Zhang et al. 2025, arXiv:2505.23520): the anchor of a query is its highest
    score over the initial tokens and its local window (where the maxima of an attention row
    reliably sit); a query block's anchor is the mean over its queries. Queries are averaged per
    block and scored against every single key (stripes, one per key column); a stripe whose score
    is within ``theta`` of the anchor is significant, and a key block is visited when it holds a
    significant stripe (capped at the ``budget`` fraction of causal blocks, best margins first;
    1 is no cap).

    theta: the difference threshold, in softmax-logit units (a stripe within ``theta`` carries at
           least ``exp(-theta)`` of the anchor's weight).
    Deviation from paper: the paper loads the chosen stripes (single key columns) in its kernel;
    here a stripe is mapped onto its key block of the block grid, so a block is visited whole.
    """

    budget: float = 1.0
    theta: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
            raise TypeError(f"AnchorAttention.theta must be a float, got {self.theta!r}")
        if not 0.0 <= self.theta < math.inf:
            raise ValueError(f"AnchorAttention.theta must be finite and >= 0, got {self.theta}")

    def plan(self, view) -> torch.Tensor:
        batch, heads, _, dim = view.q.shape
        n_kv = view.k.shape[1]
        anchor = anchor_logits(view)  # [B, H, nq * bs]
        q, q_pos = query_blocks(view)
        valid = torch.isfinite(anchor).view(q.shape[:-1])  # [B, H, nq, bs]
        n_valid = valid.sum(-1).clamp(min=1)
        block_anchor = anchor.view(valid.shape).masked_fill(~valid, 0.0).sum(-1) / n_valid
        pooled = (q * valid.unsqueeze(-1)).sum(-2) / n_valid.unsqueeze(-1)  # [B, H, nq, D]
        n_q = pooled.shape[2]
        folded = pooled.view(batch, n_kv, -1, dim)  # [B, Hkv, G * nq, D]
        stripes = (folded @ view.k.float().transpose(-1, -2)) * view.scale
        stripes = stripes.view(batch, heads, n_q, -1)  # [B, H, nq, Tk]
        last = q_pos.amax(-1)  # [Bp, nq] newest position of each query block
        seen = (view.kv_pos.unsqueeze(1) <= last.unsqueeze(-1)) & (view.kv_pos.unsqueeze(1) >= 0)
        stripes = stripes.masked_fill(~seen.unsqueeze(1), -math.inf)
        margin = block_max(stripes, view.block_size) - block_anchor.unsqueeze(-1)
        return margin_blocks(margin, view.causal, -self.theta, self.budget)
