"""Shared value types: the one output type of `attention` and the shape vocabulary.

Shape vocabulary used in comments throughout the package:
    B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per KV head,
    Tq query length, Tk key length, D head dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

# Accuracy of the least accurate exp among the implementations: ATen's vectorised ``exp_u20`` (used
# by the CPU flash kernel behind ``sdpa``, ``decode`` and ``sparse``) is within 20 ulp; the C++
# kernels' polynomial and torch's Sleef exp are within 1 ulp. Every derived bound uses it.
EXP_ULPS = 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums and the log-sum-exp are kept: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj`` (tensors, and tuples, lists, dicts and dataclass-free containers
    of them, e.g. a linear method's recurrent state), each once."""
    found: dict[int, torch.Tensor] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return list(found.values())


def recurrent_state_nbytes(state: dict) -> int:
    """Bytes of the recurrent states that state-carrying methods (linear attention, SLA,
    Infini-attention) keep in a cache's ``state`` under ``"linear/<layer>"`` keys."""
    held = [r.state for key, r in state.items() if str(key).startswith("linear/")]
    return sum(t.numel() * t.element_size() for t in tensors_in(held))


def _key_dtype(bound: int) -> torch.dtype:
    """The narrowest integer dtype holding 0 .. bound - 1 (narrow keys: a faster top-k)."""
    return torch.int16 if bound <= 2**15 else torch.int32 if bound <= 2**31 else torch.int64


class AttnOutput(NamedTuple):
    """Result of every attention call, whatever the method.

    out:   [B, H, Tq, D] in the query dtype.
    lse:   [B, H, Tq] float32 log-sum-exp of the scaled scores over the visible keys, or None when the
           implementation has no softmax normaliser (linear attention). A fully masked query row has
           ``out == 0`` and ``lse == -inf``.
    state: method-specific runtime information (selected indices, density, ...) or None.
    """

    out: torch.Tensor
    lse: torch.Tensor | None
    state: Any = None


class FeatureView(NamedTuple):
    """What a ``feature_map`` hook sees beside its input (``longattn.method.LinearAttention``).

    role:        ``"query"`` or ``"key"``: the tensor being mapped.
    layer:       the model layer of the call (per-layer learned maps, per-layer random draws).
    scale:       the call's softmax scale (``1/sqrt(D)`` by default): a map that mimics
                 ``exp(scale q.k)`` applies ``scale ** 0.5`` to each side.
    calibration: this layer's tensors from the method's calibration file, or None without one.
    expansion:   for a ``forward`` method, the library's C++ attention over classified key blocks
                 (``longattn.kernels.expansion.expansion_attention``: exact critical blocks,
                 first-order expansions of marginal ones), or None; it returns None where it
                 cannot run and the method computes the same attention itself.
    """

    role: str
    layer: int
    scale: float
    calibration: dict[str, torch.Tensor] | None = None
    expansion: Callable[..., torch.Tensor | None] | None = None


class DecodeSelection(NamedTuple):
    """What a decode-time ``select`` hook chose: per (batch row, KV head), cache slots to attend.

    index: [B, Hkv, n] int64 indices into one cache layer, ascending along the last axis (or
           [B, H, n]: one selection per query head); -1 marks an
           unused entry (fewer candidates than the budget). Each entry names ``unit`` consecutive slots:
           ``unit == 1`` for tokens, the cache page size for pages (page ``p`` = slots
           ``[p * unit, (p + 1) * unit)``).
    unit:  slots per entry.

    All query heads of a KV head's group, and all ``Tq`` queries of the step, share the selection; the
    kernel still masks each query causally by position.
    """

    index: torch.Tensor
    unit: int = 1

    def slots(self) -> torch.Tensor:
        """[B, Hkv, n * unit] selected slot indices (-1 where the entry is unused)."""
        if self.unit == 1:
            return self.index
        offsets = torch.arange(self.unit, device=self.index.device)
        slots = self.index.unsqueeze(-1) * self.unit + offsets  # [B, Hkv, n, unit]
        slots = torch.where(self.index.unsqueeze(-1) < 0, -1, slots)
        return slots.flatten(-2)

    def to_mask(self, seq_len: int) -> torch.Tensor:
        """bool [B, Hkv, seq_len]: True on selected slots."""
        slots = self.slots()
        b, h, _ = slots.shape
        mask = torch.zeros(b, h, seq_len + 1, dtype=torch.bool, device=slots.device)
        # unused entries (-1) and slots past seq_len (the tail of the last page) land in a spare column
        target = torch.where((slots < 0) | (slots >= seq_len), seq_len, slots)
        mask.scatter_(-1, target, True)
        return mask[..., :seq_len]


@dataclass(frozen=True)
class SelectView:
    """What a decode-time ``select(q, view)`` hook may read of one cache layer (all read-only).

    q_pos:      [Bp, Tq] int64 positions of the queries (Bp in {1, B}).
    keys:       [B, Hkv, T, D] stored keys (a view of the cache, no copy); T = ``seq_len``.
    positions:  [B, T] int64 original positions, -1 for empty slots.
    scale:      softmax scale of the call.
    layer:      layer index.
    page_size:  slots per cache page.
    page_min, page_max: [B, Hkv, P, D] element-wise key min / max per page (empty slots excluded;
                zeros for an empty page: mask pages by ``page_count``), P = ceil(T / page_size).
                Maintained at append time; bfloat16 (float64 for a float64 cache), rounded outward
                (min down, max up), so they still bound every key of the page.
    page_bounds: [B, Hkv, P, 2 * D] page_min and page_max side by side (one contiguous tensor).
    page_sum:   [B, Hkv, P, D] float32 sum of the keys per page; ``page_count`` [B, P] real slots per page.
    project:    ``project(name, matrix [Hkv, D, r]) -> [B, Hkv, T, r]`` low-dimensional keys
                ``keys @ matrix`` (bfloat16; float64 for a float64 cache); the cache keeps them up
                to date at append time once requested.
    state:      dict shared by all layers of the cache for selection state that must persist across
                layers within a step (TidalDecode); never stored in the method.
    calibration: per-layer calibration tensors of the method (name -> tensor), or None.
    n_layers:   layers in the cache.
    row_mass:   ``row_mass(rows [B, Hkv, R, E], table [B, Hkv, N, E], present [B, N], scale) ->
                [B, Hkv, N]`` float32: per entry, ``sum_r softmax_n(scale * rows_r . table_n)`` over
                present entries (-inf elsewhere), table read once for all rows
                (``longattn.kernels.selection.row_mass``; in C++ where it can run).
    top_index:  ``top_index(scores, k)`` -> the library's C++ top-k (see
                ``longattn.method.top_index``), or None where it cannot run; pass it on to
                ``top_index(scores, k, view.top_index)``.
    """

    q_pos: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor
    scale: float
    layer: int
    page_size: int
    page_min: torch.Tensor
    page_max: torch.Tensor
    page_sum: torch.Tensor
    page_count: torch.Tensor
    page_bounds: torch.Tensor
    project: Callable[[str, torch.Tensor], torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, torch.Tensor] | None = None
    n_layers: int = 1
    row_mass: Callable[..., torch.Tensor] | None = None
    top_index: Callable[[torch.Tensor, int], torch.Tensor | None] | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class ScoreView:
    """What an eviction ``score(view)`` hook may read of one cache layer (all read-only).

    keys, values: [B, Hkv, T, D] stored keys and values (views of the cache, no copy).
    positions:  [B, Hkv, T] int64 original positions per KV head; -1 marks an empty slot (its score
                is ignored).
    queries:    [B, H, w, D] the observation window: the last ``w`` queries this layer attended with
                (``w <= method.window``; ``w == 0`` when none were kept). Their positions are
                ``q_pos`` [B, w].
    scale:      softmax scale of the calls.
    layer, n_layers: this layer and the cache's layer count.
    n_seen:     tokens ever appended to the layer (evicted ones included).
    weights:    ``weights(q [B, H, n, D], q_pos [B, n]) -> [B, H, n, T]`` float32 softmax
                probabilities of ``q`` over the held keys, causal by position (a query that sees no
                key gets zeros); computed by the library without materialising more than ``n x T``.
    accumulated: [B, Hkv, T] float32 attention each held key received from every query since it
                arrived, summed over the query heads of its KV head (H2O's heavy-hitter statistic),
                or None unless the method lists ``"accumulated"`` in ``needs``.
    last_hit:   [B, Hkv, T] int64 position of the latest query under which the key drew at least
                the mean weight (``1 / keys visible``) in some head of its group (-1: never); None
                unless ``"accumulated"`` is in ``needs``.
    calibration: per-layer calibration tensors of the method (name -> [Hkv, ...]), or None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    q_pos: torch.Tensor
    scale: float
    layer: int
    n_layers: int
    n_seen: int
    weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accumulated: torch.Tensor | None = None
    last_hit: torch.Tensor | None = None
    calibration: dict[str, torch.Tensor] | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]


@dataclass(frozen=True)
class PrefillView:
    """What a prefill ``plan(view)`` hook may read of one call (all read-only).

    q [B, H, Tq, D], k [B, Hkv, Tk, D]: the call's queries and keys (a cache's views in chunked
    prefill); q_pos [Bp, Tq], kv_pos [Bp, Tk] int64 positions (-1 padding); scale: softmax scale.
    block_size: the index block; nq = ceil(Tq / block_size), nk = ceil(Tk / block_size).
    causal [nq, nk] bool: blocks holding a causal pair (the only ones a plan can visit);
    causal_full [nq, nk]: blocks whose every pair is visible.
    forced [nq, nk]: the blocks the library adds whatever the plan (the method's sink and local
    blocks); a budget counts them (``longattn.methods.block_topk.top_k_blocks``).
    layer: the cache layer (0 without a cache).
    The estimators, computed by the library once per call, float32, without materialising Tq x Tk
    for long prompts:
    pooled_logits() -> [B, H, nq, nk]: ``scale * mean(q) . mean(k)`` per block pair, -inf off causal.
    last_weights(n) -> [B, H, n, Tk]: softmax weights of the last ``n`` queries (causal).
    block_mass() -> [B, H, nq, nk]: exact attention mass per key block, averaged over each query
    block's queries (the oracle; O(Tq x Tk) work).
    calibration: the method's per-layer calibration tensors for ``layer`` (name -> [Hkv, ...]),
    loaded and checked against the call's shape by the library, or None.
    key_maxima(k, q_t [N, D, bs], q_pos [N, bs], rows [N, W], count [N], some [N, W],
    rep_pos [N, W]) -> [N, W] float32 or None: per row of queries (as columns) and each of its
    first ``count`` key rows (of ``k.reshape(-1, D)``), the best ``q . k`` over the row's queries,
    where ``some`` only over those at positions >= max(rep_pos, 0); the library's C++ kernel
    (``longattn.kernels.key_maxima``), None where it cannot run (the hook computes them itself).
    key_search(k, q, q_pos [Bp, nq, bs], kv_pos, n_cand [nq], k_row [nq], n_blocks, scale) ->
    bool [B, H, nq, n_blocks] or None: HiP's whole hierarchical search per query block, the
    blocks its PyTorch search over ``key_maxima`` finds (``longattn.kernels.key_maxima``), None
    where it cannot run.
    int_margins(q_int [B, H, nq, bs, D], k_int [B, Hkv, nk, bs, D], q_scale [B, H, nq],
    k_scale [B, Hkv, nk], anchor [B, H, nq * bs], q_pos [Bp, nq * bs], kv_pos [Bp, nk * bs],
    causal, full, scale) -> [B, H, nq, nk] float32 or None: per causal block pair, the best
    ``P_ij * q_scale * k_scale * scale - anchor_i`` over its visible pairs, ``P`` the products of
    integer-valued (|x| <= 127) query and key rows; the library's C++ kernel
    (``longattn.kernels.int_margins``, 8-bit dot products), None where it cannot run.
    """

    q: torch.Tensor
    k: torch.Tensor
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    scale: float
    block_size: int
    causal: torch.Tensor
    causal_full: torch.Tensor
    forced: torch.Tensor
    layer: int
    pooled_logits: Callable[[], torch.Tensor]
    last_weights: Callable[[int], torch.Tensor]
    block_mass: Callable[[], torch.Tensor]
    calibration: dict[str, torch.Tensor] | None = None
    key_maxima: Callable[..., torch.Tensor | None] | None = None
    key_search: Callable[..., torch.Tensor | None] | None = None
    int_margins: Callable[..., torch.Tensor | None] | None = None


class PrefillPlan(NamedTuple):
    """A ``plan`` hook's choice with token columns (vertical lines), beside its key blocks.

    blocks:  bool [Bi, Hi, nq, nk], the key blocks each query block visits (as a plain layout); in
             ``AttnOutput.state`` the ``BlockIndex`` that ran.
    columns: int64 [Bi, Hi, nq, n_cols] key slots each query block also attends (causal within
             them), -1 unused. The library drops slots that a visited block already covers, so no
             key counts twice, and attends the rest in a second pass merged by log-sum-exp.
    """

    blocks: Any
    columns: torch.Tensor


@dataclass(frozen=True, eq=False)
class BlockIndex:
    """Which key blocks each query block visits, per (batch, head): the currency of sparse kernels.

    Padded (ELL) layout, ``n_q_blocks = ceil(q_len / block_size)``, ``n_kv_blocks = ceil(kv_len /
    block_size)``:
        kv_blocks [Bi, Hi, n_q_blocks, max_visits] int64: visited key blocks, strictly increasing in
                  the first ``counts`` slots of a row; the remaining slots are ``-1``.
        counts    [Bi, Hi, n_q_blocks] int64: number of visited key blocks per query block.
        partial   [Bi, Hi, n_q_blocks, max_visits] bool: the block needs the element mask (diagonal,
                  pattern edges); a visited block that is not partial is fully visible.
    ``Bi`` is 1 or the batch size, ``Hi`` is 1 or the number of *query* heads (a per-head index under
    GQA still reads the shared K/V head; nothing is expanded).

    Element visibility is: the block is listed, and where it is ``partial`` the caller's mask says so.
    """

    kv_blocks: torch.Tensor
    counts: torch.Tensor
    partial: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def visited(self) -> int:
        """Total number of visited (query block, key block) pairs over the index's batch and heads."""
        return int(self.counts.sum())

    @classmethod
    def from_block_mask(
        cls,
        layout: torch.Tensor,
        block_size: int,
        *,
        partial: torch.Tensor | None = None,
        q_len: int | None = None,
        kv_len: int | None = None,
    ) -> BlockIndex:
        """From a boolean block layout ``[Bl, Hl, n_q_blocks, n_kv_blocks]`` (3-D and 2-D forms get
        leading ones). ``partial`` (same shape, optional) marks blocks that need the element mask.
        Lengths default to whole blocks.
        """
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got {getattr(layout, 'dtype', layout)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be an int > 0, got {block_size!r}")
        if not 2 <= layout.dim() <= 4:
            raise ValueError(
                f"layout must be [B, H, nq, nk] (or 3-D / 2-D), got {tuple(layout.shape)}"
            )
        while layout.dim() < 4:
            layout = layout.unsqueeze(0)
        if partial is None:
            partial = torch.zeros_like(layout)
        elif partial.shape != layout.shape[-partial.dim() :] or partial.dtype != torch.bool:
            raise ValueError(
                f"partial must be a bool tensor shaped like layout {tuple(layout.shape)}"
            )
        partial = partial.expand(layout.shape)
        n_q, n_kv = layout.shape[-2:]
        q_len = n_q * block_size if q_len is None else q_len
        kv_len = n_kv * block_size if kv_len is None else kv_len
        if -(-q_len // block_size) != n_q or -(-kv_len // block_size) != n_kv:
            raise ValueError(
                f"layout has {n_q} x {n_kv} blocks, but q_len={q_len}, kv_len={kv_len} with "
                f"block_size={block_size} need {-(-q_len // block_size)} x {-(-kv_len // block_size)}"
            )
        counts = layout.sum(-1)
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        # Keys j for visited blocks, n_kv + j for the others: the ``width`` smallest, in order, are
        # the visited block ids first, increasing (distinct keys: no tie to break)
        ids = torch.arange(n_kv, device=layout.device, dtype=_key_dtype(2 * n_kv))
        order = torch.topk(torch.where(layout, ids, ids + n_kv), width, dim=-1, largest=False)
        order = order.indices
        slot = torch.arange(width, device=layout.device)
        used = slot < counts.unsqueeze(-1)
        kv_blocks = torch.where(used, order, -1)
        part = torch.gather(partial, -1, order) & used
        return cls(kv_blocks, counts, part, block_size, q_len, kv_len)

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visited, partial) block layouts, each bool [Bi, Hi, n_q_blocks, n_kv_blocks]."""
        shape = (*self.counts.shape, self.n_kv_blocks + 1)
        idx = torch.where(self.kv_blocks < 0, self.n_kv_blocks, self.kv_blocks)
        visited = torch.zeros(shape, dtype=torch.bool, device=idx.device)
        visited.scatter_(-1, idx, True)
        partial = torch.zeros(shape, dtype=torch.bool, device=idx.device)
        partial.scatter_(-1, idx, self.partial)
        return visited[..., :-1], partial[..., :-1]

    def to_dense(self, mask_fn=None, q_pos=None, kv_pos=None) -> torch.Tensor:
        """Element visibility, bool [Bi, Hi, q_len, kv_len] (for the oracle; O(T^2), small T only).

        With ``mask_fn(b, h, q_pos, kv_pos)`` the partial blocks are restricted by it (positions default
        to ``arange``); without it the listed blocks are fully visible.
        """
        visited, partial = self.layout()
        bs = self.block_size

        def expand(x: torch.Tensor) -> torch.Tensor:
            x = x.repeat_interleave(bs, -2).repeat_interleave(bs, -1)
            return x[..., : self.q_len, : self.kv_len]

        dense = expand(visited)
        if mask_fn is None:
            return dense
        dev = dense.device
        q_pos = torch.arange(self.q_len, device=dev).view(1, -1) if q_pos is None else q_pos
        kv_pos = torch.arange(self.kv_len, device=dev).view(1, -1) if kv_pos is None else kv_pos
        b = torch.arange(dense.shape[0], device=dev).view(-1, 1, 1, 1)
        h = torch.arange(dense.shape[1], device=dev).view(1, -1, 1, 1)
        elem = mask_fn(b, h, q_pos[:, None, :, None], kv_pos[:, None, None, :])
        return dense & (~expand(partial) | elem)

    def to_block_mask(self, mask_mod=None, n_heads: int | None = None):
        """FlexAttention's ``BlockMask`` (``from_kv_blocks``): partial blocks use ``mask_mod``.

        Without ``mask_mod`` the partial blocks are treated as full. ``n_heads`` expands an index shared
        by all heads (Hi = 1) when Flex needs the head count.
        """
        from torch.nn.attention.flex_attention import BlockMask

        full = ~self.partial if mask_mod is not None else torch.ones_like(self.partial)
        valid = self.kv_blocks >= 0

        # Flex reads the number of key blocks from the width of the index: pad rows to n_kv_blocks.
        extra = self.n_kv_blocks - self.kv_blocks.shape[-1]
        blocks = torch.nn.functional.pad(self.kv_blocks, (0, max(extra, 0)), value=-1)
        pad = lambda x: torch.nn.functional.pad(x, (0, max(extra, 0)))  # noqa: E731

        def pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keep = pad(keep & valid)
            order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
            ids = torch.gather(blocks, -1, order).clamp(min=0)
            return keep.sum(-1).to(torch.int32), ids.to(torch.int32)

        part_num, part_idx = pack(~full)
        full_num, full_idx = pack(full)
        kv_num, kv_idx = (part_num, part_idx) if mask_mod is not None else (full_num * 0, full_idx)
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    def validate(self, batch: int, n_heads: int, q_len: int, kv_len: int) -> None:
        """Check that this index fits a call (shapes, lengths) and is well formed: block ids in range,
        strictly increasing (no duplicates), counts within the row. ``ValueError`` names what is wrong.
        """
        kv, counts, partial = self.kv_blocks, self.counts, self.partial
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise ValueError(
                f"BlockIndex is for q_len={self.q_len}, kv_len={self.kv_len}; the call has "
                f"q_len={q_len}, kv_len={kv_len}"
            )
        if kv.dim() != 4 or partial.shape != kv.shape or counts.shape != kv.shape[:3]:
            raise ValueError(
                f"BlockIndex tensors must be kv_blocks/partial [Bi, Hi, nq, width] and counts "
                f"[Bi, Hi, nq]; got {tuple(kv.shape)}, {tuple(partial.shape)}, {tuple(counts.shape)}"
            )
        if kv.dtype.is_floating_point or partial.dtype != torch.bool:
            raise ValueError(
                f"kv_blocks must be integer and partial bool, got {kv.dtype}, {partial.dtype}"
            )
        bi, hi, nq, width = kv.shape
        if bi not in (1, batch) or hi not in (1, n_heads) or nq != self.n_q_blocks:
            raise ValueError(
                f"BlockIndex shape [Bi={bi}, Hi={hi}, nq={nq}] does not fit batch={batch}, "
                f"heads={n_heads}, {self.n_q_blocks} query blocks of {self.block_size}"
            )
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > width):
            raise ValueError(
                f"counts must lie in [0, {width}], got {int(counts.min())}..{int(counts.max())}"
            )
        used = torch.arange(width, device=kv.device) < counts.unsqueeze(-1)
        ids = kv[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_kv_blocks):
            raise ValueError(
                f"kv block ids must lie in [0, {self.n_kv_blocks}), got {int(ids.min())}..{int(ids.max())}"
            )
        both = used[..., 1:] & used[..., :-1]
        if bool((kv[..., 1:] <= kv[..., :-1])[both].any()):
            raise ValueError(
                "kv block ids must be strictly increasing per row (sorted, no duplicates)"
            )
