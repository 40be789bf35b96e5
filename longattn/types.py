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


class DecodeSelection(NamedTuple):
    """What a decode-time ``select`` hook chose: per (batch row, KV head), cache slots to attend.

    index: [B, Hkv, n] int64 indices into one cache layer, ascending along the last axis; -1 marks an
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
                zeros for an empty page: mask pages by ``page_count``), P = ceil(T / page_size). Maintained at append time.
    page_sum:   [B, Hkv, P, D] float32 sum of the keys per page; ``page_count`` [B, P] real slots per page.
    project:    ``project(name, matrix [Hkv, D, r]) -> [B, Hkv, T, r]`` float32 low-dimensional keys
                ``keys @ matrix``; the cache keeps them up to date at append time once requested.
    state:      dict shared by all layers of the cache for selection state that must persist across
                layers within a step (TidalDecode); never stored in the method.
    calibration: per-layer calibration tensors of the method (name -> tensor), or None.
    n_layers:   layers in the cache.
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
    project: Callable[[str, torch.Tensor], torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, torch.Tensor] | None = None
    n_layers: int = 1

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]
