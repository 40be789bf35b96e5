"""Eviction storage of a ``KVCache`` layer: moving the kept slots (``compact``) and the compensation
tokens of what is dropped. Compensation tokens (RazorAttention, arXiv:2407.15891, its Eq. 4-5): the
tokens an eviction drops from a (batch row, KV head) are folded into one token holding the mean of
their keys and the mean of their values, and attention weighs that token by how many tokens it
stands for:

    out = (n exp(s q.k_mean) v_mean + sum_held exp(s q.k_j) v_j) / (n exp(s q.k_mean) + sum_held exp(s q.k_j))

which is attention over the held keys plus ``n`` copies of ``(k_mean, v_mean)``: when the dropped
tokens were identical it is exactly the attention over all of them. Every query that attends the
layer after the eviction sees the token (the dropped tokens all precede it).

A ``Summary`` is replaced, never written in place, so a cache checkpoint that keeps the reference
restores it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from longattn.kernels.merge import merge_partials
from longattn.types import AttnOutput, accumulation_dtype


class Summary(NamedTuple):
    """One compensation token per (batch row, KV head) of a layer."""

    keys: torch.Tensor  # [B, Hkv, Dk] mean of the dropped keys (the cache's dtype)
    values: torch.Tensor  # [B, Hkv, Dv] mean of the dropped values
    count: torch.Tensor  # [B, Hkv] int64 tokens folded in (0: no token for that head)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def fold(
    keys: torch.Tensor,
    values: torch.Tensor,
    dropped: torch.Tensor,
    old: Summary | None,
) -> Summary | None:
    """The summary after dropping ``dropped`` (bool [B, Hkv, T]) of ``keys`` [B, Hkv, T, Dk] and
    ``values`` [B, Hkv, T, Dv] on top of ``old``: running means in the accumulation dtype (float32,
    float64 for a float64 cache), stored in the cache's dtype. None while nothing was ever dropped."""
    n_new = dropped.sum(dim=-1)  # [B, Hkv]
    if old is None and not bool(n_new.any()):
        return None
    acc = accumulation_dtype(keys.dtype)
    weights = dropped.to(acc)
    sum_k = torch.einsum("bht,bhtd->bhd", weights, keys.to(acc))
    sum_v = torch.einsum("bht,bhtd->bhd", weights, values.to(acc))
    count = n_new.to(torch.int64)
    if old is not None:
        n_old = old.count.to(acc).unsqueeze(-1)
        sum_k = sum_k + old.keys.to(acc) * n_old
        sum_v = sum_v + old.values.to(acc) * n_old
        count = count + old.count
    denom = count.clamp(min=1).to(acc).unsqueeze(-1)
    return Summary((sum_k / denom).to(keys.dtype), (sum_v / denom).to(values.dtype), count)


def attend(q: torch.Tensor, summary: Summary, scale: float) -> AttnOutput:
    """The compensation tokens alone, as one attention part: for q [B, H, Tq, Dk] (each query head
    reads its KV head's token) ``lse = scale * q.k_mean + log n`` ( -inf where n = 0) and
    ``out = v_mean``; merged with the held keys' part by log-sum-exp."""
    batch, n_heads, q_len, _ = q.shape
    group = n_heads // summary.keys.shape[1]
    acc = accumulation_dtype(q.dtype)
    k = summary.keys.to(acc).repeat_interleave(group, dim=1)  # [B, H, Dk]
    count = summary.count.repeat_interleave(group, dim=1)  # [B, H]
    logits = torch.einsum("bhtd,bhd->bht", q.to(acc), k) * scale
    bias = torch.where(
        count > 0, count.to(acc).log(), torch.full_like(count, -torch.inf, dtype=acc)
    )
    lse = logits + bias.unsqueeze(-1)
    v = summary.values.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, H, 1, Dv]
    out = v.expand(batch, n_heads, q_len, v.shape[-1]).to(q.dtype)
    return AttnOutput(out, lse, None)


def with_summary(result: AttnOutput, q: torch.Tensor, summary: Summary, scale: float) -> AttnOutput:
    """``result`` (attention over a layer's held keys, with its lse) merged with the layer's
    compensation tokens."""
    if result.lse is None:
        raise ValueError("a compensated cache layer needs the held keys' lse to merge its tokens")
    part = attend(q, summary, scale)
    lse_dtype = result.lse.dtype
    out, lse = merge_partials([result.out, part.out], [result.lse, part.lse.to(lse_dtype)])
    return AttnOutput(out, lse, result.state)


def compact(entry: Any, keep: torch.Tensor, lengths: torch.Tensor, n_max: int) -> None:
    """Move the kept slots of a cache layer (``longattn.cache_layer.Layer``) to the front of their
    (row, KV head), in their order, with their positions and per-slot statistics; the tail
    becomes empty slots (position -1, statistics 0, zero keys and values, as a fresh allocation
    holds: ``longattn.checkpoint`` and ``KVCache.decode_step`` rely on it). ``keep`` bool [B, Hkv, seq_len], ``lengths``
    [B, Hkv] its counts, ``n_max`` their maximum."""
    # kept slots first, in their order: a stable sort of the drop flags
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n_max]
    # whole key / value rows by one index_select over the (row, head, slot) axis of the
    # contiguous storage (a gather would read an index as large as the keys)
    batch, heads, cap, _ = entry.keys.shape
    base = torch.arange(batch * heads, device=order.device).view(batch, heads, 1) * cap
    flat = (base + order).reshape(-1)
    tail = torch.arange(entry.capacity, device=order.device) >= lengths.to(order.device)[..., None]
    for name in ("keys", "values"):
        store = getattr(entry, name)
        dim = store.shape[-1]  # keys may hold fewer channels (prune_channels)
        kept = store.view(-1, dim).index_select(0, flat).view(batch, heads, n_max, dim)
        # past each head's own row: zeros, as allocated
        store[:, :, :n_max] = kept.masked_fill_(tail[:, :, :n_max, None], 0)
        store[:, :, n_max : keep.shape[-1]] = 0
    entry.pos[:, :, :n_max] = entry.pos.gather(2, order)
    entry.pos.masked_fill_(tail, -1)
    for stat in entry.stats.values():
        stat[:, :, :n_max] = stat.gather(2, order)
        stat.masked_fill_(tail, 0)
