"""KVCache: per-layer key/value storage with original positions and page metadata maintained at append.

Layout per layer: keys and values ``[B, Hkv, capacity, D]`` (GQA, never expanded), positions
``[B, capacity]`` int64 with -1 for empty slots. Capacity grows by doubling (rounded to whole pages), so
appending one token per step reallocates O(log T) times. Rows may hold different numbers of tokens
(``row_lengths``); a row's empty tail slots have position -1. Page metadata (per-page key min / max /
sum / count, and any requested low-dimensional projections of the keys) is updated for the touched pages
at every append, so selection never rescans all keys.

Every mutating call validates all of its input before changing anything: a rejected call leaves the
cache exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.checkpoint import Checkpoint, restore, take
from longattn.kernels.selection import row_mass, top_index_cpp
from longattn.types import SelectView
from longattn.validation import check_finite

MIN_CAPACITY = 256


def metadata_dtype(key_dtype: torch.dtype) -> torch.dtype:
    """dtype of the page key bounds and low-dimensional keys kept for keys of ``key_dtype``:
    bfloat16 (half the bytes a selection reads), float64 for a float64 cache."""
    return torch.float64 if key_dtype == torch.float64 else torch.bfloat16


def round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded toward ``toward`` (-inf: a lower bound; +inf: an upper bound)
    wherever the conversion is inexact, so a rounded page min / max still bounds the page's keys."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong = y.to(x.dtype) > x if toward < 0 else y.to(x.dtype) < x
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, toward)), y)


@dataclass
class _Layer:
    keys: torch.Tensor  # [B, Hkv, cap, D]
    values: torch.Tensor  # [B, Hkv, cap, D]
    pos: torch.Tensor  # [B, cap] int64, -1 = empty
    row_len: torch.Tensor  # [B] int64 slots used per row (cpu)
    next_pos: torch.Tensor  # [B] int64 next default position per row (cpu)
    # [B, Hkv, cap / page, 2 * D]: per page the element-wise key min (first D) and max (last D), side
    # by side so that page bounds stream as one contiguous tensor; bfloat16 rounded outward (min
    # down, max up: still bounds of the keys, half the bytes of float32 to read per selection),
    # float64 for a float64 cache
    page_bounds: torch.Tensor
    page_sum: torch.Tensor  # float32
    page_count: torch.Tensor  # [B, cap / page] int64
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

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class KVCache:
    """Keys, values and original positions of every layer of a model, growing by amortised doubling.

    ``KVCache(n_layers, page_size=16)``; storage is allocated lazily at a layer's first ``append``
    (batch, KV heads, head dim, dtype and device are taken from the keys). ``state`` is a dict shared by
    all layers where selection methods keep cross-layer state (TidalDecode); ``workspace`` holds the
    decode kernel's reusable buffers.
    """

    def __init__(self, n_layers: int, *, page_size: int = 16, initial_capacity: int = MIN_CAPACITY):
        for name, value in (("n_layers", n_layers), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache {name} must be an int > 0, got {value!r}")
        if isinstance(initial_capacity, bool) or not isinstance(initial_capacity, int):
            raise TypeError(f"initial_capacity must be an int, got {initial_capacity!r}")
        if initial_capacity <= 0 or initial_capacity % page_size:
            raise ValueError(
                f"initial_capacity ({initial_capacity}) must be > 0 and a multiple of "
                f"page_size ({page_size})"
            )
        self.n_layers = n_layers
        self.page_size = page_size
        self.initial_capacity = initial_capacity
        self._layers: list[_Layer | None] = [None] * n_layers
        self.state: dict[str, Any] = {}
        self.workspace: Any = None  # created by the decode path on first use

    # ------------------------------------------------------------------ reading
    def _get(self, layer: int) -> _Layer | None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {self.n_layers} layers")
        return self._layers[layer]

    def _need(self, layer: int) -> _Layer:
        entry = self._get(layer)
        if entry is None:
            raise ValueError(f"layer {layer} of the cache is empty (nothing appended yet)")
        return entry

    def keys(self, layer: int) -> torch.Tensor:
        """[B, Hkv, seq_len, D] view of the stored keys (no copy)."""
        entry = self._need(layer)
        return entry.keys[:, :, : entry.seq_len]

    def values(self, layer: int) -> torch.Tensor:
        """[B, Hkv, seq_len, D] view of the stored values (no copy)."""
        entry = self._need(layer)
        return entry.values[:, :, : entry.seq_len]

    def positions(self, layer: int) -> torch.Tensor:
        """[B, seq_len] int64 original positions; -1 marks an empty slot."""
        entry = self._need(layer)
        return entry.pos[:, : entry.seq_len]

    def seq_len(self, layer: int) -> int:
        """Slots in use (the longest row); 0 for a layer that holds nothing."""
        entry = self._get(layer)
        return 0 if entry is None else entry.seq_len

    def row_lengths(self, layer: int) -> torch.Tensor:
        """[B] int64 slots in use per row."""
        return self._need(layer).row_len.clone()

    def n_seen(self, layer: int) -> int:
        """Tokens ever appended to ``layer`` (per row; evicted tokens included)."""
        entry = self._get(layer)
        return 0 if entry is None else entry.n_seen

    def capacity(self, layer: int) -> int:
        entry = self._get(layer)
        return 0 if entry is None else entry.capacity

    def is_dense(self, layer: int) -> bool:
        """Whether every row holds exactly positions ``0 .. seq_len - 1`` (no padding, nothing evicted);
        True for a layer that holds nothing."""
        entry = self._get(layer)
        return entry is None or entry.dense

    def has_empty_slots(self, layer: int) -> bool:
        """Whether any slot below ``seq_len`` holds no token (padding or a shorter row)."""
        return bool((self.positions(layer) < 0).any())

    # ------------------------------------------------------------------ writing
    def append(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Append ``k, v`` [B, Hkv, T_new, D] to ``layer``.

        ``positions`` [T_new] or [B, T_new] int (-1 = padding slot); by default each row continues from
        its last real position + 1 (= ``n_seen`` when nothing was padded). Real positions must stay
        strictly increasing along each row.
        """
        self.append_checked(layer, k, v, self.check_append(layer, k, v, positions))

    def append_checked(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None
    ) -> None:
        """``append`` without validation, for callers that already ran ``check_append`` on exactly
        these tensors (``pos`` is its result, [B, T_new]). ``pos=None`` continues a dense layer
        (``is_dense``) at positions ``seq_len ..``; the caller has checked k and v with
        ``check_kv``."""
        entry = self._layers[layer]
        if entry is None:
            entry = self._allocate(k, k.shape[2])
            self._layers[layer] = entry
        t_new = k.shape[2]
        if pos is None:
            self._append_dense(entry, k, v)
            return
        need = int(entry.row_len.max()) + t_new
        if need > entry.capacity:
            self._resize(entry, need)
        starts = entry.row_len.tolist()
        if entry.dense:  # still dense if every row continues at its next slot with no padding
            expect = torch.arange(entry.seq_len, entry.seq_len + t_new, device=pos.device)
            entry.dense = len(set(starts)) == 1 and bool((pos == expect).all())
        if len(set(starts)) == 1:
            s = starts[0]
            entry.keys[:, :, s : s + t_new].copy_(k)
            entry.values[:, :, s : s + t_new].copy_(v)
            entry.pos[:, s : s + t_new].copy_(pos)
        else:
            for b, s in enumerate(starts):
                entry.keys[b, :, s : s + t_new].copy_(k[b])
                entry.values[b, :, s : s + t_new].copy_(v[b])
                entry.pos[b, s : s + t_new].copy_(pos[b])
        real_max = torch.where(pos >= 0, pos, -1).amax(dim=1).cpu()
        entry.next_pos = torch.maximum(entry.next_pos, real_max + 1)
        entry.row_len += t_new
        entry.n_seen += t_new
        entry.seq_len = int(entry.row_len.max())
        entry.mark_stale(min(starts), entry.seq_len)

    def _append_dense(self, entry: _Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        if not entry.dense:
            raise ValueError("append_checked(pos=None) needs a dense layer (see is_dense)")
        s, t_new = entry.seq_len, k.shape[2]
        if s + t_new > entry.capacity:
            self._resize(entry, s + t_new)
        entry.keys[:, :, s : s + t_new].copy_(k)
        entry.values[:, :, s : s + t_new].copy_(v)
        torch.arange(s, s + t_new, out=entry.pos[0, s : s + t_new])
        if entry.pos.shape[0] > 1:
            entry.pos[1:, s : s + t_new].copy_(entry.pos[:1, s : s + t_new])
        entry.next_pos += t_new
        entry.row_len += t_new
        entry.n_seen += t_new
        entry.seq_len = s + t_new
        entry.mark_stale(s, entry.seq_len)

    def check_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> _Layer | None:
        """Validate the tensors of an append to ``layer`` (types, shapes, dtype, device) without
        changing anything; returns the layer's storage (None while it is empty)."""
        entry = self._get(layer)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [B, Hkv, T, D], got shape {tuple(t.shape)}")
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"k and v differ: {tuple(k.shape)} {k.dtype} {k.device} vs "
                f"{tuple(v.shape)} {v.dtype} {v.device}"
            )
        if not k.dtype.is_floating_point:
            raise TypeError(f"k, v must be floating point, got {k.dtype}")
        check_finite("k", k)
        check_finite("v", v)
        if entry is not None:
            b, h, _, d = entry.keys.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
                raise ValueError(
                    f"layer {layer} holds [B={b}, Hkv={h}, D={d}]; cannot append "
                    f"[B={k.shape[0]}, Hkv={k.shape[1]}, D={k.shape[3]}]"
                )
            if k.dtype != entry.keys.dtype or k.device != entry.keys.device:
                raise TypeError(
                    f"layer {layer} holds {entry.keys.dtype} on {entry.keys.device}; "
                    f"cannot append {k.dtype} on {k.device}"
                )
        return entry

    def check_append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Validate an append without changing anything; returns the positions [B, T_new] it would write."""
        entry = self.check_kv(layer, k, v)
        batch, _, t_new, _ = k.shape
        next_pos = (
            entry.next_pos if entry is not None else torch.zeros(batch, dtype=torch.int64)
        ).to(k.device)
        if positions is None:
            return next_pos.view(-1, 1) + torch.arange(t_new, device=k.device)
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
            raise TypeError("positions must be an integer torch.Tensor")
        if positions.dtype == torch.bool:
            raise TypeError("positions must be an integer torch.Tensor, not bool")
        pos = positions.to(device=k.device, dtype=torch.int64)
        if pos.dim() == 1:
            pos = pos.view(1, -1)
        if pos.dim() != 2 or pos.shape[-1] != t_new or pos.shape[0] not in (1, batch):
            raise ValueError(
                f"positions must be [{t_new}] or [{batch}, {t_new}], got {tuple(positions.shape)}"
            )
        pos = pos.expand(batch, t_new)
        if pos.numel() and int(pos.min()) < -1:
            raise ValueError(f"positions must be >= 0 (or -1 for padding), got {int(pos.min())}")
        # strictly increasing real positions, continuing after what each row already holds
        running = torch.cummax(torch.cat([next_pos.view(-1, 1) - 1, pos], dim=1), dim=1).values
        real = pos >= 0
        if not bool((pos > running[:, :-1])[real].all()):
            raise ValueError(
                "positions must be strictly increasing along each row and after the positions "
                f"the cache already holds (next free position per row: {next_pos.tolist()})"
            )
        return pos

    def evict(self, layer: int, keep: torch.Tensor) -> None:
        """Drop every token whose ``keep`` entry is False. keep: bool [B, seq_len].

        Kept tokens move to the front of their row in their original order (positions stay unique and
        increasing); a row's freed tail becomes empty slots (-1). Empty slots are dropped whatever
        ``keep`` says. ``n_seen`` is unchanged.
        """
        entry = self._need(layer)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError("keep must be a bool torch.Tensor [B, seq_len]")
        expected = (entry.keys.shape[0], entry.seq_len)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep must have shape {list(expected)}, got {list(keep.shape)}")
        keep = keep.to(entry.pos.device) & (entry.pos[:, : entry.seq_len] >= 0)
        lengths = keep.sum(dim=1).cpu()
        for b in range(keep.shape[0]):
            idx = keep[b].nonzero().flatten()
            n = idx.numel()
            entry.keys[b, :, :n] = entry.keys[b, :, idx]
            entry.values[b, :, :n] = entry.values[b, :, idx]
            entry.pos[b, :n] = entry.pos[b, idx]
            entry.pos[b, n:] = -1
        entry.row_len = lengths.to(torch.int64)
        entry.seq_len = int(lengths.max()) if lengths.numel() else 0
        entry.dense = False
        # storage follows what is kept: below a quarter of the capacity it halves (to twice the
        # tokens held, not below the initial capacity), so a bounded method holds bounded memory
        # and an append right after the eviction does not grow it back
        target = self._round(max(self.initial_capacity, 2 * entry.seq_len))
        if 4 * entry.seq_len <= entry.capacity and target < entry.capacity:
            self._resize(entry, target, exact=True)
        entry.mark_stale(0, entry.capacity)

    def drop_positions(self, layer: int, positions: torch.Tensor) -> None:
        """Evict the tokens at original ``positions`` ([n] for every row, or [B, n]).

        Every listed position must be in the cache (in every row it is listed for); otherwise a
        ``ValueError`` names the missing ones and nothing is evicted.
        """
        held = self.positions(layer)  # [B, T]
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
            raise TypeError("positions must be an integer torch.Tensor")
        pos = positions.to(held.device, torch.int64)
        pos = pos.view(1, -1).expand(held.shape[0], -1) if pos.dim() == 1 else pos
        if pos.dim() != 2 or pos.shape[0] != held.shape[0]:
            raise ValueError(f"positions must be [n] or [B, n], got {tuple(positions.shape)}")
        for b in range(held.shape[0]):
            missing = pos[b][~torch.isin(pos[b], held[b][held[b] >= 0])]
            if missing.numel():
                raise ValueError(f"row {b}: positions {missing.tolist()} are not in the cache")
        keep = torch.stack([~torch.isin(held[b], pos[b]) for b in range(held.shape[0])])
        self.evict(layer, keep)

    def checkpoint(self, layer: int, t_new: int, refresh: bool = True) -> Checkpoint:
        """What ``rollback`` needs to undo an append of ``t_new`` tokens to ``layer`` and whatever a
        call then does to it (``longattn.checkpoint.take``)."""
        return take(self, self._get(layer), layer, t_new, refresh)

    def rollback(self, point: Checkpoint) -> None:
        """Put ``point.layer`` back exactly as it was at ``checkpoint`` (bit for bit)."""
        restore(self, point)

    def reserve(self, layer: int, capacity: int) -> None:
        """Grow ``layer`` (already holding tokens) to at least ``capacity`` slots now (benchmarks).
        A capacity the layer already has changes nothing."""
        entry = self._need(layer)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"reserve capacity must be an int, got {capacity!r}")
        if capacity <= 0:
            raise ValueError(f"reserve capacity must be > 0 slots, got {capacity}")
        if capacity > entry.capacity:
            b, h, _, d = entry.keys.shape
            need = 2 * b * h * self._round(capacity) * d * entry.keys.element_size()
            try:
                self._resize(entry, capacity, exact=True)
            except (RuntimeError, MemoryError) as exc:  # the allocator's refusal, said plainly
                raise ValueError(
                    f"reserve({layer}, {capacity}) needs {need / 2**30:.1f} GiB of keys and "
                    f"values, which could not be allocated ({type(exc).__name__})"
                ) from None

    def nbytes(self) -> int:
        """Bytes of the keys and values in used slots of every layer (what the tokens need).

        ``capacity_nbytes`` is what the storage really holds (allocated slots and metadata)."""
        total = 0
        for entry in self._layers:
            if entry is not None:
                b, h, _, d = entry.keys.shape
                total += 2 * b * h * entry.seq_len * d * entry.keys.element_size()
        return total

    def capacity_nbytes(self) -> int:
        """Bytes of memory the cache holds: every layer's allocated keys, values, positions, page
        metadata and low-dimensional key projections (``nbytes`` counts used key/value slots only)."""
        total = 0
        for entry in self._layers:
            if entry is not None:
                held = [entry.keys, entry.values, entry.pos, entry.page_bounds, entry.page_sum]
                held += [entry.page_count] + [buf for _, buf in entry.projections.values()]
                total += sum(t.numel() * t.element_size() for t in held)
        return total

    def reset(self) -> None:
        """Forget every layer and the selection state (storage is released)."""
        self._layers = [None] * self.n_layers
        self.state = {}
        self.workspace = None

    # ------------------------------------------------------------------ metadata
    def projected_keys(self, layer: int, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, seq_len, r] ``keys @ matrix`` for matrix [Hkv, D, r], computed in float32
        (float64 for a float64 cache) and kept in ``metadata_dtype`` (bfloat16; float64).

        The first request computes it over the stored keys; later appends keep it up to date. A request
        under the same ``name`` with a different matrix recomputes it.
        """
        entry = self._need(layer)
        self._sync(entry)
        _, h, _, d = entry.keys.shape
        if matrix.dim() != 3 or matrix.shape[:2] != (h, d):
            raise ValueError(
                f"projection {name!r} must be [Hkv={h}, D={d}, r], got {tuple(matrix.shape)}"
            )
        wide = torch.float64 if entry.keys.dtype == torch.float64 else torch.float32
        matrix = matrix.to(device=entry.keys.device, dtype=wide)
        known = entry.projections.get(name)
        if known is None or not torch.equal(known[0], matrix):
            buf = torch.zeros(
                *entry.keys.shape[:3], matrix.shape[2], dtype=metadata_dtype(entry.keys.dtype)
            )
            entry.projections[name] = (matrix, buf)
            self._refresh_projection(entry, matrix, buf, 0, entry.seq_len)
        return entry.projections[name][1][:, :, : entry.seq_len]

    def select_view(
        self, layer: int, q_pos: torch.Tensor, scale: float, calibration: Any = None
    ) -> SelectView:
        """The read-only view a ``select`` hook receives for ``layer``."""
        entry = self._need(layer)
        self._sync(entry)
        pages = -(-entry.seq_len // self.page_size)
        bounds = entry.page_bounds[:, :, :pages]
        return SelectView(
            q_pos=q_pos,
            keys=self.keys(layer),
            positions=self.positions(layer),
            scale=scale,
            layer=layer,
            page_size=self.page_size,
            page_min=entry.page_min[:, :, :pages],
            page_max=entry.page_max[:, :, :pages],
            page_bounds=bounds,
            page_sum=entry.page_sum[:, :, :pages],
            page_count=entry.page_count[:, :pages],
            project=lambda name, matrix: self.projected_keys(layer, name, matrix),
            state=self.state,
            calibration=calibration,
            n_layers=self.n_layers,
            row_mass=row_mass,
            top_index=top_index_cpp,
        )

    def storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-capacity (keys, values, positions) of ``layer`` for gathering kernels (do not write)."""
        entry = self._need(layer)
        return entry.keys, entry.values, entry.pos

    # ------------------------------------------------------------------ internals
    def _allocate(self, k: torch.Tensor, t_new: int) -> _Layer:
        batch, heads, _, dim = k.shape
        cap = self._round(max(self.initial_capacity, t_new))
        pages = cap // self.page_size
        dev = k.device
        return _Layer(
            # zeros, not garbage: a gathered page's unused tail is masked, but 0 * NaN would leak
            keys=torch.zeros(batch, heads, cap, dim, dtype=k.dtype, device=dev),
            values=torch.zeros(batch, heads, cap, dim, dtype=k.dtype, device=dev),
            pos=torch.full((batch, cap), -1, dtype=torch.int64, device=dev),
            row_len=torch.zeros(batch, dtype=torch.int64),
            next_pos=torch.zeros(batch, dtype=torch.int64),
            page_bounds=torch.zeros(
                batch, heads, pages, 2 * dim, dtype=metadata_dtype(k.dtype), device=dev
            ),
            page_sum=torch.zeros(batch, heads, pages, dim, dtype=torch.float32, device=dev),
            page_count=torch.zeros(batch, pages, dtype=torch.int64, device=dev),
        )

    def _round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def _resize(self, entry: _Layer, need: int, exact: bool = False) -> None:
        """Reallocate to ``need`` slots (``exact``) or at least double; the used slots are kept."""
        cap = self._round(need if exact else max(need, 2 * entry.capacity))
        used = entry.seq_len
        pages_used = -(-used // self.page_size)

        def bigger(old: torch.Tensor, axis: int, size: int, fill: float | None, keep: int):
            shape = list(old.shape)
            shape[axis] = size
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if fill is not None:
                new.fill_(fill)
            new.narrow(axis, 0, keep).copy_(old.narrow(axis, 0, keep))
            return new

        pages = cap // self.page_size
        entry.keys = bigger(entry.keys, 2, cap, 0.0, used)
        entry.values = bigger(entry.values, 2, cap, 0.0, used)
        entry.pos = bigger(entry.pos, 1, cap, -1, used)
        entry.page_bounds = bigger(entry.page_bounds, 2, pages, 0.0, pages_used)
        entry.page_sum = bigger(entry.page_sum, 2, pages, 0.0, pages_used)
        entry.page_count = bigger(entry.page_count, 1, pages, 0, pages_used)
        for name, (matrix, buf) in list(entry.projections.items()):
            entry.projections[name] = (matrix, bigger(buf, 2, cap, 0.0, used))

    def _sync(self, entry: _Layer) -> None:
        """Bring the page metadata and projections up to date with the stored keys."""
        if entry.stale is not None:
            lo, hi = entry.stale
            entry.stale = None
            self._refresh_pages(entry, lo, hi)

    def _refresh_pages(self, entry: _Layer, lo: int, hi: int) -> None:
        """Recompute the metadata of the pages overlapping slots [lo, hi)."""
        ps = self.page_size
        p0, p1 = lo // ps, min(-(-hi // ps), entry.capacity // ps)
        if p1 <= p0:
            return
        s0, s1 = p0 * ps, p1 * ps
        if entry.dense and p1 - p0 == 1 and entry.seq_len > s0:  # one decode step's page
            self._refresh_dense_page(entry, p0, s0, min(s1, entry.seq_len))
            return
        batch, heads, _, dim = entry.keys.shape
        keys = entry.keys[:, :, s0:s1].reshape(batch, heads, p1 - p0, ps, dim)
        empty = (entry.pos[:, s0:s1] < 0).view(batch, 1, p1 - p0, ps, 1)
        low = keys.masked_fill(empty, torch.inf).amin(dim=3)
        high = keys.masked_fill(empty, -torch.inf).amax(dim=3)
        self._store_bounds(entry, slice(p0, p1), low, high)
        entry.page_sum[:, :, p0:p1] = keys.float().masked_fill(empty, 0.0).sum(dim=3)
        entry.page_count[:, p0:p1] = (~empty).view(batch, p1 - p0, ps).sum(dim=2)
        # an empty page holds zeros (not +-inf) so bounds stay finite; selection masks it by count
        none = (entry.page_count[:, p0:p1] == 0).view(batch, 1, p1 - p0, 1)
        entry.page_min[:, :, p0:p1].masked_fill_(none, 0.0)
        entry.page_max[:, :, p0:p1].masked_fill_(none, 0.0)
        for matrix, buf in entry.projections.values():
            self._refresh_projection(entry, matrix, buf, s0, min(s1, entry.seq_len))

    def _refresh_dense_page(self, entry: _Layer, page: int, lo: int, hi: int) -> None:
        """``_refresh_pages`` for one page of a dense layer: slots [lo, hi) hold tokens in every
        row, the rest of the page is empty, so slicing replaces masking."""
        keys = entry.keys[:, :, lo:hi]
        self._store_bounds(entry, page, keys.amin(dim=2), keys.amax(dim=2))
        entry.page_sum[:, :, page] = keys.float().sum(dim=2)
        entry.page_count[:, page] = hi - lo
        for matrix, buf in entry.projections.values():
            self._refresh_projection(entry, matrix, buf, lo, hi)

    @staticmethod
    def _store_bounds(entry: _Layer, pages: int | slice, low: torch.Tensor, high: torch.Tensor):
        """Store page key min / max, rounded outward to the bounds' dtype."""
        dtype = entry.page_bounds.dtype
        entry.page_min[:, :, pages] = round_outward(low, dtype, -torch.inf)
        entry.page_max[:, :, pages] = round_outward(high, dtype, torch.inf)

    @staticmethod
    def _refresh_projection(
        entry: _Layer, matrix: torch.Tensor, buf: torch.Tensor, lo: int, hi: int
    ) -> None:
        if hi > lo:
            # [B, Hkv, n, D] @ [Hkv, D, r] -> [B, Hkv, n, r]
            buf[:, :, lo:hi] = torch.matmul(entry.keys[:, :, lo:hi].to(matrix.dtype), matrix)
