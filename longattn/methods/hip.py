"""HiP-style prefill: a hierarchical top-k search for each query block's key blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.anchor_attention import gather_keys, query_blocks

# Score of a chunk whose representative key no query of the block may see: below every real score,
# above the empty chunks (-inf), so a real chunk always outranks an empty one.
UNSEEN = torch.finfo(torch.float32).min


def initial_chunks(n_cand: torch.Tensor, k_row: torch.Tensor, width: int):
    """(start, end) [nq, width] int64 key-block ranges: each row's ``n_cand`` candidate blocks cut
    into ``k_row`` near-equal chunks; the slots past ``k_row`` are empty (start = end = n_cand)."""
    slot = torch.arange(width, device=n_cand.device)
    used = slot < k_row.unsqueeze(-1)
    n = n_cand.unsqueeze(-1)
    k = k_row.clamp(min=1).unsqueeze(-1)
    start = torch.where(used, slot * n // k, n)
    end = torch.where(used, (slot + 1) * n // k, n)
    return start, end


def chunk_scores(view, q, q_pos, start, end) -> torch.Tensor:
    """[B, H, nq, C]: per chunk [start, end) of key blocks, the best ``scale * q . k_rep`` over the
    query block's queries, ``k_rep`` the chunk's middle key; UNSEEN where no query of the block may
    see it, -inf for an empty chunk."""
    t_k = view.k.shape[2]
    lo = start * view.block_size
    hi = (end * view.block_size).clamp(max=t_k)
    rep = ((lo + hi - 1) // 2).clamp(0, t_k - 1)  # [B, H, nq, C]
    logits = (q @ gather_keys(view.k, rep).transpose(-1, -2)) * view.scale  # [B, H, nq, bs, C]
    kv_pos = view.kv_pos.view(view.kv_pos.shape[0], 1, 1, -1).expand(*rep.shape[:3], -1)
    rep_pos = torch.gather(kv_pos, -1, rep).unsqueeze(-2)  # [B, H, nq, 1, C]
    qp = q_pos.view(q_pos.shape[0], 1, *q_pos.shape[1:], 1)  # [Bp, 1, nq, bs, 1]
    visible = (rep_pos <= qp) & (rep_pos >= 0) & (qp >= 0)
    best = logits.masked_fill(~visible, UNSEEN).amax(-2)
    return best.masked_fill(end <= start, -math.inf)


def keep_best(scores, start, end, k_row, empty):
    """Per row the ``k_row`` best chunks (ties towards the earlier), compacted into
    ``scores.shape[-1] // 2`` slots in block order; the unused slots empty."""
    width = scores.shape[-1] // 2
    k_row = k_row.view(1, 1, -1, 1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < k_row
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(-1, order, rank_kept.expand_as(order))
    slots = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    used = torch.arange(width, device=scores.device) < k_row
    empty = empty.view(1, 1, -1, 1)
    return (
        torch.where(used, torch.gather(start, -1, slots), empty),
        torch.where(used, torch.gather(end, -1, slots), empty),
    )


@register("hip")
@dataclass(frozen=True)
class HiP(SparsePrefill):
    """HiP attention's hierarchical pruning (Lee et al. 2024, arXiv:2406.09827), per query block:
    the key range up to the diagonal is cut into ``k`` chunks (``k`` the ``budget`` fraction of
    the row's causal blocks); each round splits every chunk in two, scores each half by its
    representative (middle) key as the best ``scale * q . k`` over the block's queries, and keeps
    the ``k`` best halves, until every chunk is one key block: ``k`` blocks in ``log2(n / k)``
    rounds, O(T k log T) work instead of O(T^2). Ties go to the earlier chunk.

    Deviation from paper: the search runs on the key-block grid (its smallest chunk is the index
    block, not a token) and a query block shares one search (the paper's block approximation);
    HiP's mask caching across decode steps is not done (decode is dense here).
    """

    def plan(self, view) -> torch.Tensor:
        q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
        batch, heads, n_q = q.shape[:3]
        causal = view.causal
        n_cand = causal.long().cumsum(-1).argmax(-1) + 1  # [nq] key blocks up to the diagonal
        k_row = torch.ceil(causal.sum(-1).double() * self.budget).long().clamp(min=1)
        k_row = torch.minimum(k_row, n_cand)
        width = int(k_row.max())
        start, end = initial_chunks(n_cand, k_row, width)
        start = start.expand(batch, heads, n_q, width)
        end = end.expand(batch, heads, n_q, width)
        while int((end - start).max()) > 1:
            mid = start + (end - start + 1) // 2
            start = torch.stack([start, mid], -1).flatten(-2)  # [B, H, nq, 2C] in block order
            end = torch.stack([mid, end], -1).flatten(-2)
            scores = chunk_scores(view, q, q_pos, start, end)
            start, end = keep_best(scores, start, end, k_row, n_cand)
        n_k = causal.shape[1]
        found = (end - start == 1) & (start < n_k)
        layout = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.bool, device=q.device)
        layout.scatter_(-1, torch.where(found, start, n_k), True)
        return layout[..., :n_k] & causal
