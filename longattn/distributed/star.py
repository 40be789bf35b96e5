"""Star Attention: two-phase blockwise-local then global attention across ranks.

Acharya et al. 2024, Star Attention: Efficient LLM Inference over Long Sequences,
arXiv:2411.17116. The sequence (context, then ``n_query`` query tokens) is sharded contiguously
(``layout.py``'s rule); the query tokens are the last ``n_query`` tokens, held by the last rank.

* Phase 1 (context encoding): each rank's context block attends causally to itself, prefixed with
  the *anchor block* — the first ``anchor`` tokens of rank 0's block (default: all of it), broadcast
  once. Rank 0 needs no prefix. As a mask on global positions: key j is visible to query i iff
  ``j <= i`` and (j is in i's block or ``j < anchor``); an approximation of causal attention.
* Phase 2 (query encoding): the query tokens are broadcast to every rank; each rank attends them to
  its own keys (the last rank: its context and the query tokens themselves, causally) and returns
  ``(out, lse)``; one all-gather of these partials and a log-sum-exp merge give the last rank the
  query tokens' output, which is exact causal attention.

Deviation from paper: the paper's anchor block has the block size; ``anchor`` lets it be shorter.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longattn.distributed import comm
from longattn.distributed.layout import shard_positions
from longattn.distributed.ring import check_lengths
from longattn.kernels.merge import merge_partials
from longattn.kernels.tiled import tiled_attention
from longattn.types import AttnOutput, accumulation_dtype
from longattn.validation import check_tensors


def causal_mask(b, h, q_pos, kv_pos):
    return kv_pos <= q_pos


def causal_bounds(h, q_lo, q_hi, kv_lo, kv_hi):
    return kv_lo <= q_hi, kv_hi <= q_lo


def star_visible(length: int, world: int, n_query: int, anchor: int | None = None):
    """The [T, T] boolean mask that Star Attention computes exactly (see the module doc)."""
    block = torch.empty(length, dtype=torch.long)
    for rank in range(world):
        block[shard_positions(length, rank, world, "contiguous")] = rank
    first = shard_positions(length, 0, world, "contiguous").numel()
    anchor = first if anchor is None else min(anchor, first)
    pos = torch.arange(length)
    local = (block[:, None] == block[None, :]) | (pos[None, :] < anchor)
    local[length - n_query :] = True  # phase 2: the query tokens see every earlier key
    return local & (pos[None, :] <= pos[:, None])


def _meta(q, k, v, n_query, anchor, scale) -> dict:
    check_tensors(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"each rank's queries and keys are the same tokens: q has {q.shape[2]}, k {k.shape[2]}"
        )
    if isinstance(n_query, bool) or not isinstance(n_query, int) or n_query < 1:
        raise ValueError(f"n_query must be an int >= 1, got {n_query!r}")
    if anchor is not None and (isinstance(anchor, bool) or not isinstance(anchor, int)
                               or anchor < 0):  # fmt: skip
        raise ValueError(f"anchor must be None or an int >= 0, got {anchor!r}")
    if scale is not None and (isinstance(scale, bool) or not math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return {"length": q.shape[2], "dtype": str(q.dtype), "batch": q.shape[0],
            "query heads": q.shape[1], "kv heads": k.shape[1], "head_dim": q.shape[3],
            "n_query": n_query, "anchor": anchor, "scale": scale}  # fmt: skip


def star_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_query: int,
    group: Any = None,
    anchor: int | None = None,
    scale: float | None = None,
    timeout: float = comm.DEFAULT_TIMEOUT_S,
) -> AttnOutput:
    """Star Attention of this rank's contiguous shard q [B, H, T_r, D], k, v [B, Hkv, T_r, D]
    (see the module doc). Returns ``AttnOutput(out [B, H, T_r, D] in q's dtype, lse [B, H, T_r],
    None)``: phase 1 rows for context tokens, the merged phase 2 rows for the query tokens."""
    wait = comm.check_timeout(timeout)
    rank, world = comm.rank_world(group)
    metas = comm.agree(group, world, lambda: _meta(q, k, v, n_query, anchor, scale))
    comm.check_same(metas, ("dtype", "batch", "query heads", "kv heads", "head_dim", "n_query",
                            "anchor", "scale"))  # fmt: skip
    lengths = [m["length"] for m in metas]
    total = check_lengths(lengths, "contiguous")
    if n_query > lengths[-1]:
        raise ValueError(f"n_query={n_query} exceeds the last rank's {lengths[-1]} tokens")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    positions = shard_positions(total, rank, world, "contiguous")
    n_anchor = lengths[0] if anchor is None else min(anchor, lengths[0])
    kv = torch.stack([k, v])  # [2, B, Hkv, T_r, D]
    if rank == 0:
        anchor_kv = kv[:, :, :, :n_anchor].clone()  # [2, B, Hkv, A, D]
    else:  # a buffer of rank 0's anchor length (this rank's shard may be shorter)
        anchor_kv = kv.new_empty((*kv.shape[:3], n_anchor, kv.shape[4]))
    if world > 1:
        comm.broadcast(anchor_kv, 0, group, wait)
    n_context = q.shape[2] - (n_query if rank == world - 1 else 0)
    out, lse = _phase1(q, kv, anchor_kv, positions, n_context, rank, scale)
    q_out, q_lse = _phase2(q, kv, positions, (rank, world), n_query, total, scale, group, wait)
    if rank == world - 1:
        out[:, :, n_context:], lse[:, :, n_context:] = q_out.to(out.dtype), q_lse
    return AttnOutput(out, lse, None)


def _phase1(q, kv, anchor_kv, positions, n_context, rank, scale):
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -torch.inf, dtype=acc)
    if n_context == 0:
        return out, lse
    keys = kv[:, :, :, :n_context]
    kv_pos = positions[:n_context]
    if rank > 0:  # the anchor block's keys precede the block's
        keys = torch.cat([anchor_kv, keys], dim=3)
        kv_pos = torch.cat([torch.arange(anchor_kv.shape[3]), kv_pos])
    part = tiled_attention(
        q[:, :, :n_context].to(acc), keys[0], keys[1], scale=scale,
        q_pos=positions[None, :n_context], kv_pos=kv_pos[None], mask_fn=causal_mask,
        bounds_fn=causal_bounds,
    )  # fmt: skip
    out[:, :, :n_context] = part.out.to(q.dtype)
    lse[:, :, :n_context] = part.lse
    return out, lse


def _phase2(q, kv, positions, where, n_query, total, scale, group, wait):
    """The query tokens over every rank's keys: local partials, one all-gather, an lse merge."""
    rank, world = where
    acc = accumulation_dtype(q.dtype)
    if rank == world - 1:
        query = q[:, :, -n_query:].to(acc).contiguous()  # [B, H, n_query, D]
    else:
        query = torch.empty((*q.shape[:2], n_query, q.shape[3]), dtype=acc)
    if world > 1:
        comm.broadcast(query, world - 1, group, wait)
    q_pos = torch.arange(total - n_query, total)
    part = tiled_attention(
        query, kv[0], kv[1], scale=scale, q_pos=q_pos[None], kv_pos=positions[None],
        mask_fn=causal_mask, bounds_fn=causal_bounds,
    )  # fmt: skip
    if world == 1:
        return part.out, part.lse
    packed = torch.cat([part.out.flatten(), part.lse.flatten()])
    gathered = comm.all_gather(packed, world, group, wait)
    n_out = part.out.numel()
    outs = [g[:n_out].view_as(part.out) for g in gathered]
    lses = [g[n_out:].view_as(part.lse) for g in gathered]
    return merge_partials(outs, lses)
