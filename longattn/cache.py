"""KVCache: per-layer key/value storage with original positions and page metadata maintained at append.

Layout per layer: keys and values ``[B, Hkv, capacity, D]`` (GQA, never expanded), positions
``[B, Hkv, capacity]`` int64 with -1 for empty slots: each (row, KV head) holds its own tokens, so a
head-wise eviction policy really frees memory (``head_positions``, ``head_lengths``; while every head
of a row holds the same tokens, ``positions`` and ``row_lengths`` give them per row). Capacity grows
by doubling (rounded to whole pages), so appending one token per step reallocates O(log T) times;
after an eviction it follows what is kept (see ``evict``). Rows and heads may hold different numbers
of tokens; empty tail slots have position -1, and past the longest row zero keys and values (as
allocated; what an eviction frees there is zeroed). Page metadata (per-page key min / max /
sum / count, and any requested low-dimensional projections of the keys) is updated for the touched pages
at every append, so selection never rescans all keys.

Every mutating call validates all of its input before changing anything: a rejected call leaves the
cache exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from longattn.cache_channels import check_channels, gather_channels, prune_layer
from longattn.cache_layer import Layer, allocate, fits_step, resize, row_head_index, undo_step
from longattn.cache_pages import projected_keys, refresh_pages
from longattn.cache_summary import Summary, compact, fold
from longattn.checkpoint import Checkpoint, restore, shortest_row, take
from longattn.kernels.decode import decode_cpp_unavailable, decode_step_cpp
from longattn.kernels.selection import row_mass, top_index_cpp
from longattn.types import AttnOutput, SelectView, recurrent_state_nbytes
from longattn.validation import check_append_kv, check_append_positions, check_keep

MIN_CAPACITY = 256


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
        self._layers: list[Layer | None] = [None] * n_layers
        self.state: dict[str, Any] = {}
        self.workspace: Any = None  # created by the decode path on first use

    # ------------------------------------------------------------------ reading
    def _get(self, layer: int) -> Layer | None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {self.n_layers} layers")
        return self._layers[layer]

    def _need(self, layer: int) -> Layer:
        entry = self._get(layer)
        if entry is None:
            raise ValueError(f"layer {layer} of the cache is empty (nothing appended yet)")
        return entry

    def keys(self, layer: int) -> torch.Tensor:
        """[B, Hkv, seq_len, D] view of the stored keys (no copy); [.., Dk'] once the layer's key
        channels are pruned (``key_channels``)."""
        entry = self._need(layer)
        return entry.keys[:, :, : entry.seq_len]

    def values(self, layer: int) -> torch.Tensor:
        """[B, Hkv, seq_len, D] view of the stored values (no copy)."""
        entry = self._need(layer)
        return entry.values[:, :, : entry.seq_len]

    def positions(self, layer: int) -> torch.Tensor:
        """[B, seq_len] int64 original positions; -1 marks an empty slot. Only while every KV head of
        a row holds the same tokens (``is_uniform``); ``head_positions`` always works."""
        entry = self._need(layer)
        self._need_uniform(layer, entry, "positions")
        return entry.pos[:, 0, : entry.seq_len]

    def head_positions(self, layer: int) -> torch.Tensor:
        """[B, Hkv, seq_len] int64 original positions per KV head; -1 marks an empty slot."""
        entry = self._need(layer)
        return entry.pos[:, :, : entry.seq_len]

    def is_uniform(self, layer: int) -> bool:
        """Whether every KV head of each row holds the same tokens in the same slots (nothing was
        evicted head by head); True for a layer that holds nothing."""
        entry = self._get(layer)
        return entry is None or entry.uniform

    @staticmethod
    def _need_uniform(layer: int, entry: Layer, what: str) -> None:
        if not entry.uniform:
            raise ValueError(
                f"layer {layer} keeps different tokens per KV head (a head-wise eviction): "
                f"{what} per row do not exist; use head_positions / head_lengths"
            )

    def seq_len(self, layer: int) -> int:
        """Slots in use (the longest row); 0 for a layer that holds nothing."""
        entry = self._get(layer)
        return 0 if entry is None else entry.seq_len

    def row_lengths(self, layer: int) -> torch.Tensor:
        """[B] int64 slots in use per row (while every KV head holds the same tokens)."""
        entry = self._need(layer)
        self._need_uniform(layer, entry, "row lengths")
        return entry.row_len[:, 0].clone(memory_format=torch.contiguous_format)

    def head_lengths(self, layer: int) -> torch.Tensor:
        """[B, Hkv] int64 slots in use per row and KV head."""
        return self._need(layer).row_len.clone()

    def device(self, layer: int) -> torch.device | None:
        """The device of ``layer``'s storage; None while it holds nothing."""
        entry = self._get(layer)
        return None if entry is None else entry.pos.device

    def next_positions(self, layer: int) -> torch.Tensor | None:
        """[B] int64 (CPU) each row's last real position + 1, the default position of its next
        token; None while ``layer`` holds nothing. Replaced, never written, by an append."""
        entry = self._get(layer)
        return None if entry is None else entry.next_pos

    def n_seen(self, layer: int) -> int:
        """Tokens ever appended to ``layer`` (per row; evicted tokens included), or seen by a linear
        method's recurrent state (``longattn.linear.LinearRecord``)."""
        entry = self._get(layer)
        linear = self.state.get(f"linear/{layer}")
        return linear.n_seen if linear is not None else 0 if entry is None else entry.n_seen

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
        return bool((self.head_positions(layer) < 0).any())

    # ------------------------------------------------------------------ writing
    def append(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Append ``k, v`` [B, Hkv, T_new, D] to ``layer`` (a channel-pruned layer stores the keys'
        kept channels, see ``prune_channels``).

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
        if entry.channels is not None:  # a channel-pruned layer stores the same key channels
            k = gather_channels(k, entry.channels)
        t_new = k.shape[2]
        if pos is None:
            self._append_dense(entry, k, v)
            return
        # entry.seq_len is int(row_len.max()); few tensor ops: each costs microseconds at decode
        need = entry.seq_len + t_new
        if need > entry.capacity:
            self._resize(entry, need)
        first = shortest_row(entry)
        same = first == entry.seq_len
        if entry.dense:  # still dense if every row continues at its next slot with no padding
            expect = torch.arange(entry.seq_len, entry.seq_len + t_new, device=pos.device)
            entry.dense = same and bool((pos == expect).all())
        head_pos = pos.unsqueeze(1)  # [B, 1, T_new], broadcast over the KV heads
        if same:
            entry.keys[:, :, first : first + t_new].copy_(k)
            entry.values[:, :, first : first + t_new].copy_(v)
            entry.pos[:, :, first : first + t_new].copy_(head_pos)
        else:  # each (row, head) continues at its own next slot
            # index_put_, not scatter_: scatter_ on bf16 storage costs ~0.7 ms a call on CPU
            # row_len: [B, Hkv] on the CPU, replaced (not written) further down
            slots = entry.row_len.unsqueeze(-1)
            slots = slots if k.device.type == "cpu" else slots.to(k.device)
            slots = slots if t_new == 1 else slots + torch.arange(t_new, device=k.device)
            where = (*row_head_index(k.shape[0], k.shape[1], k.device), slots)  # [B, Hkv, T_new]
            entry.keys.index_put_(where, k)
            entry.values.index_put_(where, v)
            entry.pos.index_put_(where, head_pos)
        # padding is -1, below every real position
        real_max = pos.view(-1) if t_new == 1 else pos.amax(dim=1)
        real_max = real_max if real_max.device.type == "cpu" else real_max.cpu()
        entry.next_pos = torch.maximum(entry.next_pos, real_max + 1)
        entry.row_len = entry.row_len + t_new
        entry.n_seen += t_new
        entry.seq_len = need
        entry.mark_stale(first, entry.seq_len)

    def _append_dense(self, entry: Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        if not entry.dense:
            raise ValueError("append_checked(pos=None) needs a dense layer (see is_dense)")
        s, t_new = entry.seq_len, k.shape[2]
        if s + t_new > entry.capacity:
            self._resize(entry, s + t_new)
        entry.keys[:, :, s : s + t_new].copy_(k)
        entry.values[:, :, s : s + t_new].copy_(v)
        entry.pos[:, :, s : s + t_new] = torch.arange(s, s + t_new, device=k.device)
        entry.next_pos = entry.next_pos + t_new
        entry.row_len = entry.row_len + t_new
        entry.n_seen += t_new
        entry.seq_len = s + t_new
        entry.mark_stale(s, entry.seq_len)

    def decode_step(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        position: torch.Tensor | None = None,
        sink_window: tuple[int, int] | None = None,
    ) -> tuple[AttnOutput, int] | None:
        """Append one token ``k, v`` [1, Hkv, 1, D] to ``layer`` at its row's next position and
        attend ``q`` [1, H, 1, D] causally over what the layer then holds, in one C++ call: the
        checks, each KV head's append and the attention (``kernels/csrc/decode.cpp``,
        ``decode_step``). ``position``: the new token's position as a one-element int64 tensor
        (None: the row's next). A channel-pruned layer (ThinK) stores the key's kept channels and
        q attends through them. ``sink_window`` (sinks, window): q sees only the positions below
        ``sinks`` and its last ``window`` ones (``Method.sink_window``). Returns the output and
        the most keys of a KV head that no later query of ``sink_window`` sees (0 without it); or
        None, with nothing changed, where this path does not apply (an empty or summarised layer,
        a batch, a full storage, another position, a dtype or device the kernel does not run) or
        the inputs are not finite: ``longattn.attention``'s general path then runs the call, with
        its checks and errors."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            return None
        entry = self._layers[layer]
        if entry is None or entry.summary is not None or entry.seq_len >= entry.capacity:
            return None
        if not fits_step(entry, q, k, v):
            return None
        if position is not None and int(position.view(())) != int(entry.next_pos.view(())):
            return None
        if decode_cpp_unavailable(q, q.dtype, v.shape[-1]) is not None:
            return None
        before = (entry.row_len, entry.next_pos, entry.n_seen, entry.seq_len, entry.stale)
        try:  # from the call on: an interruption anywhere puts the cache back (undo_step)
            # a channel-pruned layer (ThinK): k and q reduced to its kept channels
            args = (entry.keys, entry.values, entry.pos, entry.row_len, entry.next_pos, scale)
            tensors, shortest, dead = decode_step_cpp(q, k, v, *args, entry.channels, sink_window)
            if not tensors:  # a non-finite input, nothing written
                return None
            out, lse, entry.row_len, entry.next_pos = tensors
            entry.n_seen, entry.seq_len = entry.n_seen + 1, entry.seq_len + 1
            entry.mark_stale(shortest, entry.seq_len)
        except BaseException:
            undo_step(entry, before)
            raise
        return AttnOutput(out, lse, None), dead

    def check_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, finite: bool = True
    ) -> Layer | None:
        """Validate the tensors of an append to ``layer`` (types, shapes, dtype, device; finite
        unless the caller checked that) without changing anything; returns the layer's storage
        (None while it is empty)."""
        entry = self._get(layer)
        # values hold every channel of a channel-pruned layer: appended keys arrive with them all
        held = None if entry is None else (entry.values.shape, entry.keys.dtype, entry.keys.device)
        check_append_kv(layer, k, v, held, finite)
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
        return check_append_positions(positions, next_pos, batch, t_new)

    def evict(self, layer: int, keep: torch.Tensor, *, capacity=None, summarize=False) -> None:
        """Drop every token whose ``keep`` entry is False.

        keep: bool [B, seq_len] (every KV head alike) or [B, Hkv, seq_len] (per head: the heads of a
        row may then hold different tokens, see ``head_positions``). Kept tokens move to the front of
        their (row, head) in their original order (positions stay unique and increasing); the freed
        tail becomes empty slots (-1). Empty slots are dropped whatever ``keep`` says. ``n_seen`` is
        unchanged.

        Storage follows what is kept, and once a layer was evicted later appends grow it by an
        eighth, not by doubling. With ``capacity`` (slots per head, at least what is kept) the
        layer is resized to exactly that, rounded up to a page: a bounded method holds its budget
        plus less than a page. Without it, storage shrinks to what is kept plus an eighth (not
        below the initial capacity) once it is more than one and a half times that.

        ``summarize``: fold the dropped tokens of each (row, head) into the layer's compensation
        token, which later attention weighs by its count (``longattn.cache_summary``).
        """
        entry = self._need(layer)
        keep = check_keep(layer, keep, entry.pos.shape[:2], entry.seq_len, entry.pos.device)
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0
        ):
            raise ValueError(f"evict capacity must be an int > 0 slots, got {capacity!r}")
        real = entry.pos[:, :, : entry.seq_len] >= 0
        keep = keep & real
        lengths = keep.sum(dim=-1).cpu()  # [B, Hkv]
        n_max = int(lengths.max()) if lengths.numel() else 0
        if capacity is not None and capacity < n_max:
            raise ValueError(f"evict capacity {capacity} is below the {n_max} tokens kept")
        if summarize:  # before the kept tokens move over the dropped ones
            seq = entry.seq_len
            entry.summary = fold(
                entry.keys[:, :, :seq], entry.values[:, :, :seq], real & ~keep, entry.summary
            )
        compact(entry, keep, lengths, n_max)
        entry.row_len = lengths.to(torch.int64)
        entry.seq_len = n_max
        entry.dense = False
        if entry.uniform and keep.shape[1] > 1:
            entry.uniform = bool((entry.pos[:, :, :n_max] == entry.pos[:, :1, :n_max]).all())
        entry.bounded = True
        if capacity is not None:
            if self._round(capacity) != entry.capacity:
                self._resize(entry, capacity, exact=True)
        else:
            room = max(self.page_size, entry.seq_len // 8)
            target = self._round(max(self.initial_capacity, entry.seq_len + room))
            if 2 * entry.capacity > 3 * target:  # hysteresis: no reallocation at every step
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

    def summary(self, layer: int) -> Summary | None:
        """The layer's compensation tokens (``evict(summarize=True)``), or None."""
        entry = self._get(layer)
        return None if entry is None else entry.summary

    def key_channels(self, layer: int) -> torch.Tensor | None:
        """[B, Hkv, Dk'] int64 key channels ``layer`` stores, or None while it stores them all."""
        entry = self._get(layer)
        return None if entry is None else entry.channels

    def prune_channels(self, layer: int, channels: torch.Tensor) -> None:
        """From now on store only key ``channels`` [B, Hkv, Dk'] of ``layer`` (ascending per row and
        KV head, ``Dk' < D``; ThinK), see ``longattn.cache_channels``: the keys' storage shrinks,
        later appends store the same channels of their keys, values keep every channel. Once per
        layer (a pruned layer refuses), checked before anything changes."""
        entry = self._need(layer)
        if entry.channels is not None:
            raise ValueError(f"layer {layer}'s key channels are pruned already")
        b, h, _, d = entry.keys.shape
        prune_layer(entry, check_channels(layer, channels, b, h, d))

    def checkpoint(
        self, layer: int, t_new: int, refresh: bool = True, whole: bool = False
    ) -> Checkpoint:
        """What ``rollback`` needs to undo an append of ``t_new`` tokens to ``layer`` and whatever a
        call then does to it (``longattn.checkpoint.take``; ``whole`` for a call that may evict)."""
        return take(self, self._get(layer), layer, t_new, refresh, whole)

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
            d += entry.values.shape[-1]  # key and value channels (fewer keys where pruned)
            need = b * h * self._round(capacity) * d * entry.keys.element_size()
            try:
                self._resize(entry, capacity, exact=True)
            except (RuntimeError, MemoryError) as exc:  # the allocator's refusal, said plainly
                raise ValueError(
                    f"reserve({layer}, {capacity}) needs {need / 2**30:.1f} GiB of keys and "
                    f"values, which could not be allocated ({type(exc).__name__})"
                ) from None

    def nbytes(self) -> int:
        """Bytes of the keys and values in used slots of every layer (what the tokens need), with
        the compensation tokens.

        ``capacity_nbytes`` is what the storage really holds (allocated slots and metadata)."""
        total = 0
        for entry in self._layers:
            if entry is not None:
                per_slot = entry.keys[:, :, 0].numel() + entry.values[:, :, 0].numel()
                total += per_slot * entry.seq_len * entry.keys.element_size()
                total += 0 if entry.summary is None else entry.summary.nbytes()
        return total

    def capacity_nbytes(self) -> int:
        """Bytes of memory the cache holds: every layer's allocated keys, values, positions, page
        metadata, low-dimensional key projections and per-slot statistics, and linear methods'
        recurrent states (``nbytes`` counts used key/value slots only)."""
        total = 0
        for entry in self._layers:
            if entry is not None:
                held = [entry.keys, entry.values, entry.pos, entry.page_bounds, entry.page_sum]
                held += [entry.page_count] + [buf for _, buf in entry.projections.values()]
                held += list(entry.stats.values())
                total += sum(t.numel() * t.element_size() for t in held)
                total += 0 if entry.summary is None else entry.summary.nbytes()
        return total + recurrent_state_nbytes(self.state)

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
        return projected_keys(entry, name, matrix)

    def select_view(
        self, layer: int, q_pos: torch.Tensor, scale: float, calibration: Any = None
    ) -> SelectView:
        """The read-only view a ``select`` hook receives for ``layer``."""
        entry = self._need(layer)
        self._need_uniform(layer, entry, "a select method's page view")
        if entry.channels is not None:
            raise ValueError(f"layer {layer}'s keys are channel-pruned: a select method needs all")
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
            page_count=entry.page_count[:, 0, :pages],
            project=lambda name, matrix: self.projected_keys(layer, name, matrix),
            state=self.state,
            calibration=calibration,
            n_layers=self.n_layers,
            row_mass=row_mass,
            top_index=top_index_cpp,
        )

    def storage(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-capacity keys, values [B, Hkv, cap, D] and positions [B, cap] of ``layer`` (every
        KV head holding the same tokens) for gathering kernels (do not write)."""
        entry = self._need(layer)
        self._need_uniform(layer, entry, "storage positions")
        return entry.keys, entry.values, entry.pos[:, 0]

    def stat(self, layer: int, name: str) -> torch.Tensor:
        """[B, Hkv, seq_len] float32 per-slot statistic ``name`` of ``layer`` (zeros when first
        asked for), moved with its tokens by every eviction and resize: eviction policies keep
        accumulated attention here. Write it through ``set_stat``."""
        entry = self._need(layer)
        if name not in entry.stats:
            entry.stats[name] = torch.zeros(entry.pos.shape, device=entry.pos.device)
        return entry.stats[name][:, :, : entry.seq_len]

    def clear_stats(self) -> None:
        """Forget every layer's per-slot statistics (a copy of a cache handed to a method that
        keeps none)."""
        for entry in self._layers:
            if entry is not None:
                entry.stats = {}

    def set_stat(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Replace statistic ``name`` of ``layer`` by ``value`` [B, Hkv, seq_len] (a new tensor, so
        that ``rollback`` restores the old one)."""
        entry = self._need(layer)
        full = torch.zeros(entry.pos.shape, device=entry.pos.device)
        full[:, :, : entry.seq_len] = value
        entry.stats = {**entry.stats, name: full}

    # ------------------------------------------------------------------ internals
    def _allocate(self, k: torch.Tensor, t_new: int) -> Layer:
        return allocate(k, self._round(max(self.initial_capacity, t_new)), self.page_size)

    def _round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def _resize(self, entry: Layer, need: int, exact: bool = False) -> None:
        """Reallocate to ``need`` slots (``exact``), or grow to at least double (by an eighth for a
        layer an eviction bounded); the used slots are kept."""
        step = max(self.page_size, entry.capacity // 8) if entry.bounded else entry.capacity
        cap = self._round(need if exact else max(need, entry.capacity + step))
        resize(entry, cap, self.page_size)

    def _sync(self, entry: Layer) -> None:
        """Bring the page metadata and projections up to date with the stored keys."""
        if entry.stale is not None:
            lo, hi = entry.stale
            entry.stale = None
            refresh_pages(entry, self.page_size, lo, hi)
