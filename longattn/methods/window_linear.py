"""WindowPlusLinear: BASED's exact sliding window plus Taylor linear attention, one call."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import register
from longattn.methods.taylor import Taylor


@register("window_linear")
@dataclass(frozen=True)
class WindowPlusLinear(Taylor):
    """Exact softmax over the newest ``window`` keys plus linear attention with the second-order
    Taylor map of exp over the older ones, under one shared normaliser: the BASED layer.
    Arora et al. 2024, arXiv:2402.18668.

    The same rule as ``Taylor`` (whose defaults are BASED's: window 64, feature dimension
    d' = 16, so 1 + 16 + 256 features): this is its named entry point for the hybrid, with a
    window that must be positive (``Taylor(window=0)`` is plain linear attention). The engine
    evaluates both parts in one chunkwise pass; a cache holds the state plus the last
    ``window - 1`` raw keys and values.
    Deviation from paper: as ``Taylor``, a fixed random d'-dimensional projection instead of
    BASED's learned one (a pretrained model has none).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window <= 0:
            raise ValueError(
                f"WindowPlusLinear.window must be positive, got {self.window} (window=0 is "
                "plain Taylor linear attention: use 'taylor')"
            )
