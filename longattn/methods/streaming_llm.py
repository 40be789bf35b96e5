"""Attention sinks plus a sliding window (StreamingLLM, MInference's "A-shape")."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import Method, check_non_negative, check_positive, register


@register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(Method):
    """Causal attention to the first ``sinks`` positions and the last ``window`` keys (self included).
    Xiao et al. 2023, arXiv:2309.17453.

    Positions are the tokens' original positions; a cache that evicts to this pattern keeps exactly the
    keys this mask allows for the newest query.
    """

    sinks: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        check_non_negative(type(self).__name__, sinks=self.sinks)
        check_positive(type(self).__name__, window=self.window)

    @property
    def is_causal(self) -> bool:
        return True

    def mask(self, b, h, q_pos, kv_pos):
        return (kv_pos <= q_pos) & ((kv_pos < self.sinks) | (q_pos - kv_pos < self.window))

    def retain(self, kv_pos, newest):
        # the next query (newest + 1) sees kv > newest + 1 - window; later ones see less
        return (kv_pos < self.sinks) | (kv_pos > newest + 1 - self.window)

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        causal_any, causal_all = kv_lo <= q_hi, kv_hi <= q_lo
        near_any = (q_lo - kv_hi < self.window) & causal_any
        near_all = q_hi - kv_lo < self.window
        return causal_any & ((kv_lo < self.sinks) | near_any), causal_all & (
            (kv_hi < self.sinks) | near_all
        )
