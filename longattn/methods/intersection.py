"""Both of two static patterns at once: a key is visible only where both methods allow it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longattn.method import Method


@dataclass(frozen=True)
class Intersection(Method):
    """Keys visible under ``first`` and under ``second`` (the AND of two ``mask`` methods).

    A composition wrapper, not a registered method (its fields are methods, which a method string cannot
    spell). The Hugging Face integration uses it to keep a layer's own sliding window under any method.
    """

    name: ClassVar[str] = "intersection"

    first: Method | None = None
    second: Method | None = None

    def __post_init__(self) -> None:
        for field, method in (("first", self.first), ("second", self.second)):
            if not isinstance(method, Method) or method.hook != "mask":
                raise ValueError(
                    f"Intersection.{field} must be a method with a 'mask' hook, got {method!r}"
                )

    @property
    def is_causal(self) -> bool:
        return self.first.is_causal or self.second.is_causal

    @property
    def max_positions(self) -> int | None:
        limits = [m.max_positions for m in (self.first, self.second) if m.max_positions is not None]
        return min(limits) if limits else None

    def mask(self, b, h, q_pos, kv_pos):
        return self.first.mask(b, h, q_pos, kv_pos) & self.second.mask(b, h, q_pos, kv_pos)

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        bounds = [m.block_bounds(h, q_lo, q_hi, kv_lo, kv_hi) for m in (self.first, self.second)]
        known = [b for b in bounds if b is not None]
        if not known:
            return None
        any_ = known[0][0]
        for other in known[1:]:
            any_ = any_ & other[0]
        if len(known) < len(bounds):
            # One side has no bounds: its "all" is unknown, so no tile may be declared fully visible.
            return any_, torch.zeros_like(torch.as_tensor(known[0][1]), dtype=torch.bool)
        return any_, known[0][1] & known[1][1]

    def retain(self, kv_pos, newest):
        """A key stays if both methods keep it (one that drops it makes it invisible to both)."""
        keeps = [
            keep
            for keep in (m.retain(kv_pos, newest) for m in (self.first, self.second))
            if keep is not None
        ]
        if not keeps:
            return None
        return keeps[0] & keeps[1] if len(keeps) == 2 else keeps[0]

    def describe(self) -> str:
        return f"{self.first.describe()} & {self.second.describe()}"
