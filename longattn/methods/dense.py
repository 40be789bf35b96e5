"""Full softmax attention, the baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import Method, register


@register("dense")
@dataclass(frozen=True)
class Dense(Method):
    """Full softmax attention, causal by default. Vaswani et al. 2017, arXiv:1706.03762.

    ``causal=False`` lets every query see every key (encoders).
    """

    causal: bool = True

    @property
    def is_causal(self) -> bool:
        return self.causal

    def mask(self, b, h, q_pos, kv_pos):
        if self.causal:
            return kv_pos <= q_pos
        return torch.ones_like(q_pos - kv_pos, dtype=torch.bool)

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        if not self.causal:
            return torch.tensor(True), torch.tensor(True)
        return kv_lo <= q_hi, kv_hi <= q_lo
