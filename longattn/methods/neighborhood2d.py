"""Neighborhood attention over a 2-D token grid (NATTEN), with dilation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import Method, check_positive, register


def _axis_neighbors(q: torch.Tensor, k: torch.Tensor, length: int, kernel: int, dilation: int):
    """Along one axis of ``length`` cells: is key coordinate ``k`` in query ``q``'s clamped window?"""
    group = q % dilation
    index = torch.div(q, dilation, rounding_mode="floor")
    group_len = torch.div(length - group + dilation - 1, dilation, rounding_mode="floor")
    start = torch.minimum((index - kernel // 2).clamp(min=0), (group_len - kernel).clamp(min=0))
    k_index = torch.div(k, dilation, rounding_mode="floor")
    return (k % dilation == group) & (k_index >= start) & (k_index < start + kernel)


@register("neighborhood2d")
@dataclass(frozen=True)
class Neighborhood2D(Method):
    """Each token of a ``height x width`` grid (row-major positions) attends to the ``kernel x kernel``
    tokens around it, spaced ``dilation`` apart; windows are shifted at the borders so that every query
    sees ``kernel**2`` keys. Hassani et al. 2023, arXiv:2204.07143; dilation per arXiv:2209.15001.

    Non-causal (vision / encoder pattern). Positions must lie inside the grid.
    """

    height: int = 32
    width: int = 32
    kernel: int = 7
    dilation: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(
            name, height=self.height, width=self.width, kernel=self.kernel, dilation=self.dilation
        )
        for axis, length in (("height", self.height), ("width", self.width)):
            if self.kernel * self.dilation > length:
                raise ValueError(
                    f"{name}: kernel*dilation={self.kernel * self.dilation} exceeds {axis}={length}"
                )

    @property
    def is_causal(self) -> bool:
        return False

    @property
    def max_positions(self) -> int:
        return self.height * self.width

    def mask(self, b, h, q_pos, kv_pos):
        w = self.width
        q_row, q_col = torch.div(q_pos, w, rounding_mode="floor"), q_pos % w
        k_row, k_col = torch.div(kv_pos, w, rounding_mode="floor"), kv_pos % w
        rows = _axis_neighbors(q_row, k_row, self.height, self.kernel, self.dilation)
        cols = _axis_neighbors(q_col, k_col, self.width, self.kernel, self.dilation)
        return rows & cols

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        # Clamped windows keep every neighbour within (kernel - 1) * dilation rows of the query.
        reach = (self.kernel - 1) * self.dilation
        w = self.width
        any_ = (q_lo // w - kv_hi // w <= reach) & (kv_lo // w - q_hi // w <= reach)
        return any_, torch.zeros_like(any_)
