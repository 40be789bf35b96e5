"""Sparse Transformer factorised patterns (strided and fixed), as the union of their two heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import Method, check_positive, register


@register("strided")
@dataclass(frozen=True)
class Strided(Method):
    """Causal factorised sparse attention. Child et al. 2019, arXiv:1904.10509.

    ``mode="strided"``: a key is visible if it is among the last ``stride`` keys or ``q - k`` is a
    multiple of ``stride``. ``mode="fixed"``: visible if it lies in the query's own block of ``stride``
    positions or is one of the last ``summary`` positions of any earlier block.
    Deviation from paper: the paper splits the two components across heads (or interleaves layers);
    here every head sees their union, which is the pattern's single-head form.
    """

    stride: int = 128
    mode: str = "strided"
    summary: int = 1

    def __post_init__(self) -> None:
        check_positive(type(self).__name__, stride=self.stride, summary=self.summary)
        if self.mode not in ("strided", "fixed"):
            raise ValueError(f"Strided.mode must be 'strided' or 'fixed', got {self.mode!r}")
        if self.summary > self.stride:
            raise ValueError(f"Strided.summary must be <= stride={self.stride}, got {self.summary}")

    @property
    def is_causal(self) -> bool:
        return True

    def mask(self, b, h, q_pos, kv_pos):
        dist = q_pos - kv_pos
        causal = dist >= 0
        if self.mode == "strided":
            return causal & ((dist < self.stride) | (dist % self.stride == 0))
        same_block = torch.div(q_pos, self.stride, rounding_mode="floor") == torch.div(
            kv_pos, self.stride, rounding_mode="floor"
        )
        return causal & (same_block | (kv_pos % self.stride >= self.stride - self.summary))

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        causal_any, causal_all = kv_lo <= q_hi, kv_hi <= q_lo
        s = self.stride
        if self.mode == "strided":
            d_min, d_max = q_lo - kv_hi, q_hi - kv_lo
            local_any, local_all = d_min < s, (d_min >= 0) & (d_max < s)
            # a multiple of s lies in [d_min, d_max] iff floor(d_max / s) * s >= d_min
            column_any = torch.div(d_max, s, rounding_mode="floor") * s >= d_min
            return causal_any & (local_any | column_any), causal_all & local_all
        block_q_lo, block_q_hi = q_lo // s, q_hi // s
        block_k_lo, block_k_hi = kv_lo // s, kv_hi // s
        same_any = (block_q_lo <= block_k_hi) & (block_k_lo <= block_q_hi)
        same_all = (
            (block_q_lo == block_q_hi) & (block_k_lo == block_k_hi) & (block_q_lo == block_k_lo)
        )
        # a summary column (k % s >= s - summary) lies in [kv_lo, kv_hi]
        summary_any = (block_k_hi > block_k_lo) | (kv_hi % s >= s - self.summary)
        return causal_any & (same_any | summary_any), causal_all & same_all
