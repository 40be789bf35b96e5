"""Sliding-window (local) attention with optional dilation, causal or symmetric."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import Method, check_positive, register


@register("sliding_window")
@dataclass(frozen=True)
class SlidingWindow(Method):
    """Each query sees ``window`` keys spaced ``dilation`` apart, ending at itself. Beltagy et al. 2020
    (Longformer), arXiv:2004.05150; dilation as in Hassani et al. 2022 (DiNAT), arXiv:2209.15001.

    Causal: key distances ``q - k`` in {0, d, 2d, ..., (window - 1) d}. Non-causal (encoders): the same
    span on both sides, ``|q - k|`` in {0, d, ..., (window - 1) d}, so ``2 * window - 1`` keys.
    """

    window: int = 1024
    dilation: int = 1
    causal: bool = True

    def __post_init__(self) -> None:
        check_positive(type(self).__name__, window=self.window, dilation=self.dilation)

    @property
    def is_causal(self) -> bool:
        return self.causal

    @property
    def span(self) -> int:
        return (self.window - 1) * self.dilation

    def mask(self, b, h, q_pos, kv_pos):
        dist = q_pos - kv_pos
        near = (dist <= self.span) & (dist >= (0 if self.causal else -self.span))
        if self.dilation > 1:
            near = near & (dist % self.dilation == 0)
        return near

    @property
    def sink_window(self) -> tuple[int, int] | None:
        return (0, self.window) if self.causal and self.dilation == 1 else None

    def retain(self, kv_pos, newest):
        if not self.causal:
            return None  # a symmetric window needs keys on both sides of a query
        return kv_pos >= newest + 1 - self.span

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        lowest = 0 if self.causal else -self.span
        d_min, d_max = q_lo - kv_hi, q_hi - kv_lo
        any_ = (d_max >= lowest) & (d_min <= self.span)
        all_ = (d_min >= lowest) & (d_max <= self.span)
        if self.dilation > 1:
            all_ = all_ & (d_min == d_max) & (d_min % self.dilation == 0)
        return any_, all_
