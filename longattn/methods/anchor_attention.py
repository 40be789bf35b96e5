"""AnchorAttention-style prefill: each query block's anchor (its best score over the sinks and its
local window) and the key stripes scoring within ``theta`` of it.

Also the home of the token-level helpers the estimators that read single keys share
(``key_rows``, ``gather_keys``, ``query_blocks``, ``anchor_logits``, ``margin_blocks``) and of
``CHUNK_ELEMENTS``, the size of the score chunks they compute in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_k_blocks

# Scores of a chunk computed at once (floats): small enough to stay in cache, so the masking and
# the reductions that follow each product read it there, and no temporary of the whole matrix is
# ever allocated.
CHUNK_ELEMENTS = 1 << 18


def key_rows(k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, Tk, D], idx [B, H, ...] int64 key indices per *query* head -> int64 like idx:
    the row of ``k.reshape(-1, D)`` each index reads, each query head's shared key head (GQA,
    ``h // (H / Hkv)``)."""
    batch, n_kv, t_k, _ = k.shape
    heads = idx.shape[1]
    kv_head = torch.arange(heads, device=k.device) // (heads // n_kv)  # [H]
    base = (torch.arange(batch, device=k.device).view(-1, 1) * n_kv + kv_head.view(1, -1)) * t_k
    return idx + base.view(batch, heads, *([1] * (idx.dim() - 2)))


def gather_keys(k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, Tk, D], idx [B, H, ...] int64 key indices per *query* head -> [B, H, ..., D]
    float32, reading each query head's shared key head (GQA, ``h // (H / Hkv)``) without expanding
    K."""
    return select_rows(k.reshape(-1, k.shape[-1]), key_rows(k, idx))


def select_rows(keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """keys [N, D], rows int64 [...] -> [..., D] float32 (``index_select``: several times faster
    than advanced indexing on CPU)."""
    return keys.index_select(0, rows.reshape(-1)).float().view(*rows.shape, keys.shape[-1])


def query_blocks(view) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, H, nq, bs, D] in the queries' dtype, zero-padded, q_pos [Bp, nq, bs] with -1 on
    padding). A view of ``view.q`` when its length is a multiple of the block (no copy)."""
    batch, heads, t_q, dim = view.q.shape
    bs = view.block_size
    n_q = -(-t_q // bs)
    q = view.q
    if n_q * bs != t_q:
        q = torch.nn.functional.pad(q, (0, 0, 0, n_q * bs - t_q))
    q_pos = torch.nn.functional.pad(view.q_pos, (0, n_q * bs - t_q), value=-1)
    return q.view(batch, heads, n_q, bs, dim), q_pos.view(-1, n_q, bs)


def flat_positions(q_pos: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """q_pos [Bp, nq, bs] -> [B * H * nq, bs], the positions of each (row, head, query block) of
    ``q.flatten(0, 2)``."""
    return q_pos.unsqueeze(1).expand(batch, heads, *q_pos.shape[1:]).flatten(0, 2)


def hidden_bias(seen: torch.Tensor) -> torch.Tensor:
    """float32 like the bool ``seen``: 0 where seen, -inf elsewhere. Added to a score chunk it
    masks it as ``masked_fill`` would (for finite scores) at a fraction of the cost: on this CPU a
    bool-masked fill is several times slower than a float add, so the mask is turned into a bias
    once, before it is broadcast over heads."""
    return torch.zeros(seen.shape, device=seen.device).masked_fill_(~seen, -math.inf)


def anchor_logits(view) -> torch.Tensor:
    """[B, H, Tq padded to nq * bs] float32: each query's highest ``scale * q . k`` over the first key
    block (the sinks) and the two key blocks ending at its query block's diagonal (its local
    window), causal by position; -inf for padding queries. In chunks of query blocks: a chunk's
    keys gathered, scored, masked and reduced in cache."""
    bs = view.block_size
    t_k = view.k.shape[2]
    q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
    batch, heads, n_q = q.shape[:3]
    diagonal = view.causal.long().cumsum(-1).argmax(-1)  # [nq] last causal key block
    offsets = torch.arange(bs, device=q.device)
    starts = torch.stack([torch.zeros_like(diagonal), diagonal - 1, diagonal], -1).clamp(min=0)
    idx = (starts.unsqueeze(-1) * bs + offsets).flatten(-2).clamp(max=t_k - 1)  # [nq, 3 bs]
    rows = key_rows(view.k, idx.expand(batch, heads, *idx.shape))  # [B, H, nq, 3 bs]
    keys = view.k.reshape(-1, view.k.shape[-1])  # [B * Hkv * Tk, D]
    kp = view.kv_pos[:, idx]  # [Bp, nq, 3 bs]
    best = torch.empty(batch, heads, n_q, bs, device=q.device)
    step = max(1, CHUNK_ELEMENTS // (batch * heads * bs * idx.shape[-1]))
    for lo in range(0, n_q, step):
        part = slice(lo, lo + step)
        logits = q[:, :, part].float() @ select_rows(keys, rows[:, :, part]).transpose(-1, -2)
        qp, kpart = q_pos[:, part].unsqueeze(-1), kp[:, part].unsqueeze(-2)
        seen = (kpart <= qp) & (kpart >= 0) & (qp >= 0)  # [Bp, c, bs, 3 bs]
        logits += hidden_bias(seen).unsqueeze(1)  # [B, H, c, bs, 3 bs]
        torch.amax(logits, dim=-1, out=best[:, :, part])
    # the scale is positive: scaling the maxima equals the maxima of the scaled scores
    return (best * view.scale).view(batch, heads, n_q * bs)


def margin_blocks(
    margin: torch.Tensor, causal: torch.Tensor, floor: float, budget: float
) -> torch.Tensor:
    """bool [B, H, nq, nk]: causal key blocks whose ``margin`` (best score against the anchor) is at
    least ``floor``, at most the ``budget`` fraction of each row's causal blocks (the highest
    margins; ties towards the earlier block)."""
    return (margin >= floor) & top_k_blocks(margin, causal, budget)


def key_spans(t_k: int, block: int, step: int) -> list[tuple[int, int]]:
    """Key block ranges [lo, hi) of ``step`` whole blocks each; a last partial block alone."""
    full = t_k // block
    spans = [(lo, min(lo + step, full)) for lo in range(0, full, step)]
    return spans + ([(full, full + 1)] if full * block < t_k else [])


def stripe_block_max(view, pooled: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, H, nq, nk] float32: per query block and key block, the best ``scale * pooled . k`` over
    the block's keys the query block may see (position >= 0, at most ``last`` [Bp, nq], the query
    block's newest position); -inf where it sees none. ``pooled`` [B, H, nq, D] float32.

    In chunks of key blocks, each product masked and reduced to its block maxima in cache; query
    blocks with no causal pair in a chunk (``view.causal``: they see none of its keys) are not
    computed."""
    batch, heads, n_q, dim = pooled.shape
    n_kv, t_k = view.k.shape[1], view.k.shape[2]
    group, bs = heads // n_kv, view.block_size
    # [B, Hkv, nq * G, D]: query block major, so the rows from a query block on are a slice
    rows = pooled.view(batch, n_kv, group, n_q, dim).transpose(2, 3).reshape(batch, n_kv, -1, dim)
    best = torch.full((batch, n_kv, n_q, group, -(-t_k // bs)), -math.inf, device=pooled.device)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_q * bs))
    for lo, hi in key_spans(t_k, bs, step):
        needed = view.causal[:, lo:hi].any(-1)  # [nq]
        if not bool(needed.any()):
            continue
        first = int(needed.long().argmax())  # earlier query blocks see none of these keys
        keys = view.k[:, :, lo * bs : hi * bs].float()  # [B, Hkv, kc, D]
        logits = rows[:, :, first * group :] @ keys.transpose(-1, -2)  # [B, Hkv, nq' G, kc]
        kp = view.kv_pos[:, lo * bs : hi * bs].unsqueeze(1)  # [Bp, 1, kc]
        seen = (kp <= last[:, first:].unsqueeze(-1)) & (kp >= 0)  # [Bp, nq', kc]
        logits = logits.view(batch, n_kv, n_q - first, group, -1)
        logits += hidden_bias(seen).view(-1, 1, n_q - first, 1, seen.shape[-1])
        width = min(bs, t_k - lo * bs)
        best[:, :, first:, :, lo:hi] = logits.unflatten(-1, (-1, width)).amax(-1)
    # the scale is positive: scaling the maxima equals the maxima of the scaled scores
    best = best.transpose(2, 3).reshape(batch, heads, n_q, -1)
    return best * view.scale


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
        anchor = anchor_logits(view)  # [B, H, nq * bs]
        q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
        valid = torch.isfinite(anchor).view(q.shape[:-1])  # [B, H, nq, bs]
        n_valid = valid.sum(-1).clamp(min=1)
        block_anchor = anchor.view(valid.shape).masked_fill(~valid, 0.0).sum(-1) / n_valid
        if bool(valid.all()):  # every query counts: the block sums of q as they are
            summed = q.sum(-2, dtype=torch.float32)  # [B, H, nq, D]
        else:
            summed = (q.float() * valid.unsqueeze(-1)).sum(-2)
        pooled = summed / n_valid.unsqueeze(-1)  # [B, H, nq, D]
        stripes = stripe_block_max(view, pooled, q_pos.amax(-1))  # [B, H, nq, nk]
        margin = stripes - block_anchor.unsqueeze(-1)
        return margin_blocks(margin, view.causal, -self.theta, self.budget)
