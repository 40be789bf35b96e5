"""Undo for one cache layer: what a refused ``attention(..., cache=)`` call needs to leave the cache
bit for bit as it was (``KVCache.checkpoint`` / ``KVCache.rollback``).

A checkpoint keeps the layer's fields (tensor references, counters, flags) and copies of only what a
call can overwrite in place: the slots below the longest row that the append writes (a shorter
row's next slots) and, when the call may refresh page metadata (a select method), the stale pages
and projections. Slots past the longest row hold zero keys and values and position -1 (as
allocated; an eviction zeroes what it frees there): a rollback writes the ones the append wrote
back to that instead of copying them first, so a decode step's checkpoint copies nothing. A
growth or shrink replaces the tensors instead of writing them, so restoring the references undoes
it. O(new tokens + stale pages), not O(cache) -- except for a call that may compress the layer
(an eviction method), whose checkpoint copies the whole layer (``whole``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SLOT_TENSORS = ("keys", "values", "pos")  # written by an append; all [B, Hkv, slots, ...]
LAYER_TENSORS = (*SLOT_TENSORS, "page_bounds", "page_sum", "page_count")


@dataclass
class Checkpoint:
    layer: int
    entry: Any  # the cache's per-layer storage object, None for a layer still empty
    fields: dict[str, Any] | None
    saved: dict[str, torch.Tensor]
    state: dict[str, Any]
    # first saved slot, first stale slot, first page, first empty slot, end of the append's slots
    starts: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)


def shortest_row(entry: Any) -> int:
    """The fewest slots a (row, KV head) of a cache layer uses: ``seq_len`` for one row whose
    heads hold the same tokens (no read of ``row_len``: a decode step's tensor reads cost)."""
    return entry.seq_len if entry.uniform and entry.pos.shape[0] == 1 else int(entry.row_len.min())


def take(
    cache: Any, entry: Any, layer: int, t_new: int, refresh: bool, whole: bool = False
) -> Checkpoint:
    """A checkpoint of ``entry`` (``cache``'s storage of ``layer``) before ``t_new`` tokens are
    appended; ``refresh``: the call may bring page metadata up to date; ``whole``: the call may
    rewrite any slot (an eviction), so every tensor of the layer is copied."""
    state = dict(cache.state)
    if entry is None:
        return Checkpoint(layer, None, None, {}, state)
    if whole:
        fields = {
            n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in vars(entry).items()
        }
        fields["stats"] = {n: t.clone() for n, t in entry.stats.items()}
        fields["projections"] = {n: (m, b.clone()) for n, (m, b) in entry.projections.items()}
        return Checkpoint(layer, entry, fields, {}, state)
    lo = shortest_row(entry)
    hi = min(entry.seq_len + t_new, entry.capacity)  # seq_len: the longest row's length
    stale_lo = lo if entry.stale is None or not refresh else min(lo, entry.stale[0])
    p_lo = stale_lo // cache.page_size
    p_hi = -(-hi // cache.page_size) if refresh else p_lo  # an append alone only marks pages stale
    held_hi = max(lo, min(hi, entry.seq_len))  # the written slots a view shows
    saved = {
        name: getattr(entry, name).narrow(2, lo, held_hi - lo).clone()
        for name in SLOT_TENSORS
        if held_hi > lo
    }
    for name in ("page_bounds", "page_sum", "page_count") if p_hi > p_lo else ():
        saved[name] = getattr(entry, name).narrow(2, p_lo, p_hi - p_lo).clone()
    for name, (_, buf) in entry.projections.items() if refresh else ():
        saved[f"projection:{name}"] = buf[:, :, stale_lo:hi].clone()
    fields = dict(vars(entry))  # row_len and next_pos are replaced by an append, never written
    fields["projections"] = dict(entry.projections)
    return Checkpoint(layer, entry, fields, saved, state, (lo, stale_lo, p_lo, held_hi, hi))


def restore(cache: Any, point: Checkpoint) -> None:
    """Put ``point.layer`` of ``cache`` back exactly as it was at ``take``."""
    cache.state = point.state
    if point.entry is None:
        cache._layers[point.layer] = None
        return
    entry = point.entry
    moved = {n for n in LAYER_TENSORS if getattr(entry, n) is not point.fields[n]}
    vars(entry).update(point.fields)
    cache._layers[point.layer] = entry
    lo, stale_lo, p_lo, empty_lo, hi = point.starts
    for name, empty in (("keys", 0), ("values", 0), ("pos", -1)) if hi > empty_lo else ():
        if name not in moved:  # the slots the append wrote past the longest row: empty again
            getattr(entry, name)[:, :, empty_lo:hi] = empty
    for name, saved in point.saved.items():
        if name.startswith("projection:"):
            buf = entry.projections[name.split(":", 1)[1]][1]
            buf[:, :, stale_lo : stale_lo + saved.shape[2]].copy_(saved)
        elif name not in moved:  # a reallocated tensor was replaced, not written: nothing to copy
            start = lo if name in SLOT_TENSORS else p_lo
            getattr(entry, name).narrow(2, start, saved.shape[2]).copy_(saved)
