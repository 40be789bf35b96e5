"""Key-channel pruning of a ``KVCache`` layer (ThinK, arXiv:2407.21018): the layer stores only some
channels of its keys, the same ones for every token of a (batch row, KV head), and attention
gathers the same channels of the queries. Values keep every channel.

A pruned layer's keys are ``[B, Hkv, capacity, Dk']`` with ``Dk' < D``, its channel index
``[B, Hkv, Dk']`` (ascending). Keys appended later arrive with all ``D`` channels and are stored
pruned by the same index (``gather_channels``).
"""

from __future__ import annotations

from typing import Any

import torch


def check_channels(layer: int, channels: Any, batch: int, n_kv: int, dim: int) -> torch.Tensor:
    """``channels`` as int64 [B, Hkv, Dk'] for a layer of ``dim`` key channels, or a clear error:
    an integer tensor of that shape with ``0 < Dk' < dim``, each (row, KV head) ascending and
    distinct in ``[0, dim)``."""
    if not isinstance(channels, torch.Tensor) or channels.dtype.is_floating_point:
        raise TypeError(f"channels must be an integer torch.Tensor, got {channels!r:.80}")
    if channels.dtype == torch.bool or channels.dim() != 3:
        raise TypeError(
            f"channels must be int [B, Hkv, Dk'], got {channels.dtype} {channels.shape}"
        )
    kept = channels.shape[2]
    if tuple(channels.shape[:2]) != (batch, n_kv) or not 0 < kept < dim:
        raise ValueError(
            f"channels for layer {layer} must be [B={batch}, Hkv={n_kv}, Dk'] with 0 < Dk' < "
            f"D={dim}, got {list(channels.shape)}"
        )
    idx = channels.to(torch.int64)
    if int(idx.min()) < 0 or int(idx.max()) >= dim or bool((idx.diff(dim=-1) <= 0).any()):
        raise ValueError(
            f"channels for layer {layer} must be ascending and distinct in [0, {dim}) per "
            f"(row, KV head), got min {int(idx.min())}, max {int(idx.max())}"
        )
    return idx


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Keys x [B, Hkv, T, D] reduced to ``channels`` [B, Hkv, Dk'] -> [B, Hkv, T, Dk']."""
    index = channels.to(x.device).unsqueeze(2).expand(-1, -1, x.shape[2], -1)
    return x.gather(-1, index)


def gather_query_channels(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Queries q [B, H, Tq, D] reduced to the channels [B, Hkv, Dk'] of their KV head (query head
    ``h`` belongs to KV head ``h // (H / Hkv)``) -> [B, H, Tq, Dk']."""
    batch, n_heads, q_len, dim = q.shape
    n_kv, kept = channels.shape[1], channels.shape[2]
    group = n_heads // n_kv
    grouped = q.reshape(batch, n_kv, group, q_len, dim)  # [B, Hkv, G, Tq, D]
    index = channels.to(q.device)[:, :, None, None, :].expand(batch, n_kv, group, q_len, kept)
    return grouped.gather(-1, index).reshape(batch, n_heads, q_len, kept)


def prune_layer(entry: Any, channels: torch.Tensor) -> None:
    """Reduce the storage of a cache layer (``longattn.cache_layer.Layer``) to key ``channels``
    [B, Hkv, Dk'] (checked): keys, page key bounds and sums are reallocated at the new width
    (the page metadata is marked stale, recomputed when read); key projections are dropped."""
    index = channels.to(entry.keys.device)
    entry.keys = gather_channels(entry.keys, index).contiguous()  # [B, Hkv, cap, Dk']
    kept = index.shape[-1]
    bounds, sums = entry.page_bounds, entry.page_sum
    entry.page_bounds = bounds.new_zeros(*bounds.shape[:3], 2 * kept)
    entry.page_sum = sums.new_zeros(*sums.shape[:3], kept)
    entry.projections = {}
    entry.channels = index.clone()
    if entry.summary is not None:  # a compensation token's key keeps the same channels
        entry.summary = entry.summary._replace(keys=entry.summary.keys.gather(-1, index))
    entry.mark_stale(0, entry.capacity)
