"""PowerAttention: local blocks plus blocks at power-of-two distances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import Method, check_positive, register


def _is_power_of_two(x: torch.Tensor) -> torch.Tensor:
    return (x > 0) & ((x & (x - 1)) == 0)


@register("power")
@dataclass(frozen=True)
class PowerAttention(Method):
    """Causal block pattern: query block i sees key block j when ``i - j`` is below ``window`` or is a
    power of two, so the receptive field doubles with every layer and has no gaps. Chen et al. 2025,
    arXiv:2503.03588.

    Positions are grouped into blocks of ``block_size``; inside the current block the mask is causal.
    """

    block_size: int = 64
    window: int = 1

    def __post_init__(self) -> None:
        check_positive(type(self).__name__, block_size=self.block_size, window=self.window)

    @property
    def is_causal(self) -> bool:
        return True

    def mask(self, b, h, q_pos, kv_pos):
        dist = torch.div(q_pos, self.block_size, rounding_mode="floor") - torch.div(
            kv_pos, self.block_size, rounding_mode="floor"
        )
        return (kv_pos <= q_pos) & ((dist < self.window) | _is_power_of_two(dist))

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        bs = self.block_size
        d_min, d_max = q_lo // bs - kv_hi // bs, q_hi // bs - kv_lo // bs
        causal_any, causal_all = kv_lo <= q_hi, kv_hi <= q_lo
        # the largest power of two <= d_max lies in [d_min, d_max] iff it is >= d_min
        top = torch.exp2(torch.floor(torch.log2(d_max.clamp(min=1).double()))).long()
        pow_any = (d_max >= 1) & (top >= d_min)
        any_ = causal_any & ((d_min < self.window) | pow_any)
        all_ = causal_all & ((d_max < self.window) | ((d_min == d_max) & _is_power_of_two(d_min)))
        return any_, all_
