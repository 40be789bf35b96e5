"""Attention sinks plus a sliding window (StreamingLLM, MInference's "A-shape")."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import Method, check_non_negative, check_positive, register

POSITION_POLICIES = ("original", "cache")


@register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(Method):
    """Causal attention to the first ``sinks`` positions and the last ``window`` keys (self included).
    Xiao et al. 2023, arXiv:2309.17453.

    The mask and the retention use the tokens' original positions (unique and increasing); a cache that
    evicts to this pattern keeps exactly the keys this mask allows for the newest query.

    ``positions`` is the rotary position policy, which a model integration applies (the pattern is
    the same under both): ``"original"`` rotates keys and queries at the tokens' original positions,
    so a model stops at its ``max_position_embeddings``; ``"cache"`` rotates them at their slots in
    the cache, as in the paper (sinks at 0..sinks-1, the window after them, a query at its own slot),
    so positions stay below ``sinks + window`` plus the tokens of one call and the stream is
    unbounded. Deviation from paper: fed in chunks, the queries of a chunk take the chunk's slots, so
    the distance to the sinks grows by up to the chunk length minus one (token by token it is exact).
    """

    sinks: int = 4
    window: int = 1024
    positions: str = "original"

    def __post_init__(self) -> None:
        check_non_negative(type(self).__name__, sinks=self.sinks)
        check_positive(type(self).__name__, window=self.window)
        if self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"StreamingLLM positions must be one of {', '.join(POSITION_POLICIES)}, "
                f"got {self.positions!r}"
            )

    @property
    def is_causal(self) -> bool:
        return True

    def mask(self, b, h, q_pos, kv_pos):
        return (kv_pos <= q_pos) & ((kv_pos < self.sinks) | (q_pos - kv_pos < self.window))

    @property
    def sink_window(self) -> tuple[int, int]:
        return self.sinks, self.window

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
