"""Shared value types: the one output type of `attention` and the shape vocabulary.

Shape vocabulary used in comments throughout the package:
    B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per KV head,
    Tq query length, Tk key length, D head dimension.
"""

from __future__ import annotations

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
