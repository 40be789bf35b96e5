"""HiP-style prefill: a hierarchical top-k search for each query block's key blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.anchor_attention import (
    CHUNK_ELEMENTS,
    flat_positions,
    key_rows,
    query_blocks,
    select_rows,
)
from longattn.methods.block_topk import top_count

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
    see it, -inf for an empty chunk.

    In chunks of query blocks, each product reduced in cache. A representative that every query
    of the block sees, or none, needs no mask; only those some queries see (near the diagonal,
    padding) take the masked maximum of their column."""
    t_k, dim = view.k.shape[2], view.k.shape[3]
    lo = start * view.block_size
    hi = (end * view.block_size).clamp(max=t_k)
    rep = ((lo + hi - 1) // 2).clamp(0, t_k - 1)  # [B, H, nq, C]
    batch, heads, n_q, width = rep.shape
    rows = key_rows(view.k, rep).flatten(0, 2)  # [N, C] rows of the flat keys
    kv_pos = view.kv_pos.view(view.kv_pos.shape[0], 1, 1, -1).expand(batch, heads, n_q, -1)
    rep_pos = torch.gather(kv_pos, -1, rep).flatten(0, 2)  # [N, C]
    qp = flat_positions(q_pos, batch, heads)  # [N, bs]
    lowest = torch.where((qp >= 0).all(-1), qp.amin(-1), -1).unsqueeze(-1)  # [N, 1]
    every = (rep_pos >= 0) & (rep_pos <= lowest)  # every query of the block sees it
    nobody = (rep_pos < 0) | (rep_pos > qp.amax(-1, keepdim=True))
    some = ~every & ~nobody  # [N, C]
    keys, q_flat = view.k.reshape(-1, dim), q.flatten(0, 2)  # [B * Hkv * Tk, D], [N, bs, D]
    best = torch.full(rows.shape, -math.inf, device=q.device)  # [N, C]
    step = max(1, CHUNK_ELEMENTS // (q_flat.shape[1] * width))
    for first, used in zip(range(0, rows.shape[0], step), used_columns(start, end, step)):
        part = slice(first, first + step)
        keys_part = select_rows(keys, rows[part, :used])  # [c, used, D]
        logits = q_flat[part].float() @ keys_part.transpose(-1, -2)  # [c, bs, used]
        torch.amax(logits, dim=1, out=best[part, :used])  # over the block's queries
        n, c = some[part, :used].nonzero(as_tuple=True)
        if n.numel():
            qpos = qp[part][n]  # [S, bs]
            seen = (rep_pos[part][n, c].unsqueeze(-1) <= qpos) & (qpos >= 0)
            column = logits[n, :, c].masked_fill_(~seen, -math.inf)  # [S, bs]
            best[first + n, c] = column.amax(-1)
    # the scale is positive: scaling the maxima equals the maxima of the scaled scores
    best = (best * view.scale).masked_fill_(nobody, -math.inf).view(batch, heads, n_q, width)
    best = best.masked_fill_(best == -math.inf, UNSEEN)
    return best.masked_fill_(end <= start, -math.inf)


def used_columns(start: torch.Tensor, end: torch.Tensor, step: int) -> list[int]:
    """Per run of ``step`` rows of ``start.flatten(0, 2)`` [B, H, nq, C], the columns up to the
    last non-empty chunk (the columns after it are empty, -inf, and need no scores)."""
    filled = (end > start) * torch.arange(1, start.shape[-1] + 1, device=start.device)
    last = filled.amax(-1).flatten()  # [N] one past each row's last non-empty chunk
    pad = -last.numel() % step
    return torch.nn.functional.pad(last, (0, pad)).view(-1, step).amax(-1).tolist()


def keep_best(scores, start, end, k_row, empty):
    """Per row the ``k_row`` best chunks (ties towards the earlier), compacted into
    ``scores.shape[-1] // 2`` slots in block order; the unused slots empty."""
    width = scores.shape[-1] // 2
    chosen = top_count(scores, k_row.view(1, 1, -1))  # [B, H, nq, 2C], k_row per row
    slot = torch.where(chosen, chosen.cumsum(-1) - 1, width)  # its place in block order
    shape = (*scores.shape[:-1], width + 1)  # a last column takes the chunks not kept
    empty = empty.view(1, 1, -1, 1).expand(shape).contiguous()
    kept_start = empty.scatter(-1, slot, start)[..., :width]
    kept_end = empty.scatter(-1, slot, end)[..., :width]
    return kept_start, kept_end


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
        q = q.float()  # widened once, not in every round (a no-op for float32)
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
