"""MoA-style heterogeneous sliding windows: a different causal span per attention head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longattn.method import Method, check_non_negative, check_positive, register


@register("per_head_window")
@dataclass(frozen=True)
class PerHeadWindow(Method):
    """Causal sliding window whose span depends on the head: head ``h`` sees the last
    ``windows[h % len(windows)]`` keys plus the first ``sinks`` positions. Fu et al. 2024 (MoA),
    arXiv:2406.14909.

    Deviation from paper: MoA searches the per-head spans (``span = alpha + beta * N``) with a profiler;
    here the spans are given. ``PerHeadWindow.from_rule(alphas, betas, n)`` evaluates MoA's rule.
    """

    windows: tuple[int, ...] = (64, 128, 256, 512)
    sinks: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.windows, tuple) or not self.windows:
            raise ValueError(
                f"{name}.windows must be a non-empty tuple of ints, got {self.windows!r}"
            )
        for i, w in enumerate(self.windows):
            check_positive(name, **{f"windows[{i}]": w})
        check_non_negative(name, sinks=self.sinks)

    @classmethod
    def from_rule(
        cls, alphas: Sequence[float], betas: Sequence[float], n: int, sinks: int = 0
    ) -> PerHeadWindow:
        """Spans ``round(alpha + beta * n)`` per head (MoA's elastic rule) for sequence length ``n``."""
        if len(alphas) != len(betas):
            raise ValueError(f"alphas and betas differ in length: {len(alphas)} vs {len(betas)}")
        return cls(tuple(max(1, round(a + b * n)) for a, b in zip(alphas, betas)), sinks)

    def _head_windows(self, h: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.windows, device=h.device)
        return table[h % len(self.windows)]

    @property
    def is_causal(self) -> bool:
        return True

    def mask(self, b, h, q_pos, kv_pos):
        dist = q_pos - kv_pos
        return (dist >= 0) & ((dist < self._head_windows(h)) | (kv_pos < self.sinks))

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        window = self._head_windows(h)
        causal_any, causal_all = kv_lo <= q_hi, kv_hi <= q_lo
        near_any = causal_any & (q_lo - kv_hi < window)
        return causal_any & (near_any | (kv_lo < self.sinks)), causal_all & (
            (q_hi - kv_lo < window) | (kv_hi < self.sinks)
        )
