"""One layer of a ``KVCache``: its storage (``Layer``), allocated and resized here; the cache
(``longattn.cache``) owns the policies (capacities, appends, evictions).

Invariants the cache keeps: positions -1 mark empty slots; every slot past its (row, KV head)'s
length holds zero keys and values and position -1 (as allocated; an eviction empties what it
frees: ``longattn.checkpoint`` and ``KVCache.decode_step``'s undo rely on it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.cache_pages import metadata_dtype
from longattn.cache_summary import Summary


@dataclass
class Layer:
    keys: torch.Tensor  # [B, Hkv, cap, D]
    values: torch.Tensor  # [B, Hkv, cap, D]
    pos: torch.Tensor  # [B, Hkv, cap] int64, -1 = empty
    # row_len and next_pos are replaced, never written in place: a checkpoint keeps references
    row_len: torch.Tensor  # [B, Hkv] int64 slots used per row and head (cpu)
    next_pos: torch.Tensor  # [B] int64 next default position per row (cpu)
    # [B, Hkv, cap / page, 2 * D]: per page the element-wise key min (first D) and max (last D), side
    # by side so that page bounds stream as one contiguous tensor; bfloat16 rounded outward (min
    # down, max up: still bounds of the keys, half the bytes of float32 to read per selection),
    # float64 for a float64 cache
    page_bounds: torch.Tensor
    page_sum: torch.Tensor  # float32
    page_count: torch.Tensor  # [B, Hkv, cap / page] int64
    projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # slots [lo, hi) whose page metadata and projections are out of date: refreshed when a select
    # hook asks for them, so dense decode never pays for metadata it does not read
    stale: tuple[int, int] | None = None

    def mark_stale(self, lo: int, hi: int) -> None:
        self.stale = (
            (lo, hi) if self.stale is None else (min(lo, self.stale[0]), max(hi, self.stale[1]))
        )

    @property
    def page_min(self) -> torch.Tensor:
        return self.page_bounds[..., : self.page_bounds.shape[-1] // 2]

    @property
    def page_max(self) -> torch.Tensor:
        return self.page_bounds[..., self.page_bounds.shape[-1] // 2 :]

    n_seen: int = 0
    seq_len: int = 0
    # every row holds exactly positions 0..seq_len-1 in slots 0..seq_len-1 (no padding, no eviction):
    # the cache-owned fast path appends and attends without per-call position checks
    dense: bool = True
    # every KV head of a row holds the same tokens in the same slots
    uniform: bool = True
    # evicted at least once: storage grows by an eighth (not by doubling), so a compressed layer's
    # capacity stays near what it holds
    bounded: bool = False
    # per-slot statistics [B, Hkv, cap] kept by eviction policies (accumulated attention, ...),
    # moved with their tokens by every eviction and resize
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B, Hkv, Dk'] int64: the key channels stored (``prune_channels``); None: every channel
    channels: torch.Tensor | None = None
    # one compensation token per (row, KV head) for the tokens evicted with ``summarize``
    # (``longattn.cache_summary``); replaced, never written in place; None: no token
    summary: Summary | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


@functools.lru_cache(maxsize=64)
def row_head_index(batch: int, heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The row and KV head indices [B, 1, 1], [1, Hkv, 1] of a per-head append's ``index_put_``
    (kept: a decode step pays microseconds for each tensor it builds)."""
    return (
        torch.arange(batch, device=device).view(-1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1),
    )


def allocate(k: torch.Tensor, cap: int, page_size: int) -> Layer:
    """An empty layer of ``cap`` slots (a multiple of ``page_size``) for keys like ``k`` [B, Hkv,
    T, D]."""
    batch, heads, _, dim = k.shape
    pages = cap // page_size
    dev = k.device
    return Layer(
        # zeros, not garbage: a gathered page's unused tail is masked, but 0 * NaN would leak
        keys=torch.zeros(batch, heads, cap, dim, dtype=k.dtype, device=dev),
        values=torch.zeros(batch, heads, cap, dim, dtype=k.dtype, device=dev),
        pos=torch.full((batch, heads, cap), -1, dtype=torch.int64, device=dev),
        row_len=torch.zeros(batch, heads, dtype=torch.int64),
        next_pos=torch.zeros(batch, dtype=torch.int64),
        page_bounds=torch.zeros(
            batch, heads, pages, 2 * dim, dtype=metadata_dtype(k.dtype), device=dev
        ),
        page_sum=torch.zeros(batch, heads, pages, dim, dtype=torch.float32, device=dev),
        page_count=torch.zeros(batch, heads, pages, dtype=torch.int64, device=dev),
    )


def resize(entry: Layer, cap: int, page_size: int) -> None:
    """Reallocate ``entry`` to ``cap`` slots (a multiple of ``page_size``, at least its used
    ones): the used slots and pages kept, the rest empty (zeros, position -1)."""
    used = entry.seq_len
    pages_used = -(-used // page_size)

    def bigger(old: torch.Tensor, axis: int, size: int, fill: float | None, keep: int):
        shape = list(old.shape)
        shape[axis] = size
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if fill is not None:
            new.fill_(fill)
        new.narrow(axis, 0, keep).copy_(old.narrow(axis, 0, keep))
        return new

    pages = cap // page_size
    entry.keys = bigger(entry.keys, 2, cap, 0.0, used)
    entry.values = bigger(entry.values, 2, cap, 0.0, used)
    entry.pos = bigger(entry.pos, 2, cap, -1, used)
    entry.page_bounds = bigger(entry.page_bounds, 2, pages, 0.0, pages_used)
    entry.page_sum = bigger(entry.page_sum, 2, pages, 0.0, pages_used)
    entry.page_count = bigger(entry.page_count, 2, pages, 0, pages_used)
    entry.stats = {n: bigger(t, 2, cap, 0.0, used) for n, t in entry.stats.items()}
    for name, (matrix, buf) in list(entry.projections.items()):
        entry.projections[name] = (matrix, bigger(buf, 2, cap, 0.0, used))


def fits_step(entry: Layer, q: Any, k: Any, v: Any) -> bool:
    """Whether q [1, H, 1, D], k, v [1, Hkv, 1, D] fit ``KVCache.decode_step`` on ``entry``:
    tensors of the layer's dtype and device, its shapes, q's last axis contiguous, no autograd
    (the dtypes and devices the C++ kernel runs are its own check)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    keys, values = entry.keys, entry.values
    if q.stride(-1) != 1:
        return False
    if any(t.dtype != keys.dtype or t.device != keys.device or t.requires_grad for t in (q, k, v)):
        return False
    # appended keys arrive with every channel; a channel-pruned layer stores its kept ones
    pruned = entry.channels is not None
    if pruned and not entry.channels.is_contiguous():
        return False
    n_kv, dim = keys.shape[1], (values if pruned else keys).shape[3]
    return (
        keys.shape[0] == 1
        and tuple(k.shape) == (1, n_kv, 1, dim)
        and tuple(v.shape) == (1, n_kv, 1, values.shape[3])
        and q.shape[0] == 1
        and q.shape[2] == 1
        and q.shape[3] == dim
        and q.shape[1] % n_kv == 0
    )


def undo_step(entry: Layer, before: tuple) -> None:
    """Put back what ``KVCache.decode_step`` changed, whatever it had done: the slots at each KV
    head's former length empty again (zero keys and values, position -1: what every slot past a
    head's length holds) and the fields it replaced (``before``: row_len, next_pos, n_seen,
    seq_len, stale)."""
    row_len = before[0]
    slots = (*row_head_index(1, row_len.shape[1], entry.keys.device), row_len.unsqueeze(-1))
    for name, empty in (("keys", 0), ("values", 0), ("pos", -1)):
        getattr(entry, name)[slots] = empty
    entry.row_len, entry.next_pos, entry.n_seen, entry.seq_len, entry.stale = before
