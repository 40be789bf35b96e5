"""A user-given boolean block layout as a method: any precomputed block mask through the library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from longattn.method import Method, check_positive, register


@register("static_blocks")
@dataclass(frozen=True)
class StaticBlocks(Method):
    """Query block ``i`` sees key block ``j`` where ``layout[h, i, j]`` is true (blocks of
    ``block_size`` positions; ``causal`` also hides later keys inside a visible block). FlexAttention's
    block masks, Dong et al. 2024, arXiv:2412.05496; block-sparse FlashAttention, arXiv:2205.14135.

    ``layout`` is a bool tensor ``[n, n]`` or ``[Hl, n, n]`` (head ``h`` uses ``layout[h % Hl]``);
    positions must be below ``n * block_size``. Without a layout (``StaticBlocks()``, method strings)
    a seeded random causal layout of ``n_blocks`` blocks is generated: each block below the diagonal
    is visible with probability ``density``, the diagonal always. A given layout has no string form
    (``describe()`` raises); equality and hashing use a fingerprint of its contents.
    """

    layout: torch.Tensor | None = field(default=None, compare=False, repr=False)
    block_size: int = 128
    causal: bool = True
    n_blocks: int = 64
    density: float = 1.0
    seed: int = 0
    fingerprint: str = field(default="", init=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(name, block_size=self.block_size, n_blocks=self.n_blocks)
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"{name}.density must lie in [0, 1], got {self.density}")
        layout = self.layout
        if layout is None:
            gen = torch.Generator().manual_seed(self.seed)
            n = self.n_blocks
            layout = torch.rand(1, n, n, generator=gen) < self.density
            layout = (layout & torch.ones(n, n, dtype=torch.bool).tril()) | torch.eye(
                n, dtype=torch.bool
            )
            digest = ""
        else:
            if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
                raise TypeError(f"{name}.layout must be a bool tensor, got {layout!r:.80}")
            if layout.dim() == 2:
                layout = layout.unsqueeze(0)
            if layout.dim() != 3 or layout.shape[1] != layout.shape[2] or not layout.numel():
                raise ValueError(
                    f"{name}.layout must be [n, n] or [heads, n, n], got {tuple(layout.shape)}"
                )
            layout = layout.detach().to("cpu").contiguous()
            digest = hashlib.sha1(
                str(tuple(layout.shape)).encode() + layout.numpy().tobytes()
            ).hexdigest()
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "fingerprint", digest)

    @property
    def max_positions(self) -> int:
        return self.layout.shape[-1] * self.block_size

    @property
    def is_causal(self) -> bool:
        return self.causal

    def describe(self) -> str:
        if self.fingerprint:
            raise ValueError(
                "StaticBlocks with a given layout has no string form; pass the object itself"
            )
        fields = ("block_size", "causal", "n_blocks", "density", "seed")
        values = ",".join(f"{f}={str(getattr(self, f)).lower()}" for f in fields)
        return f"{self.name}:{values}"

    def _lookup(self, h, q_block, kv_block):
        table = self.layout.to(q_block.device)
        return table[h % table.shape[0], q_block, kv_block]

    def mask(self, b, h, q_pos, kv_pos):
        bs = self.block_size
        visible = self._lookup(h, q_pos.clamp(min=0) // bs, kv_pos.clamp(min=0) // bs)
        return visible & (kv_pos <= q_pos) if self.causal else visible

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        # Visible blocks in the rectangle of blocks a tile covers, by a 2-D prefix sum of the layout.
        table = self.layout.to(q_lo.device).long()
        n = table.shape[-1]
        prefix = torch.nn.functional.pad(table.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        bs = self.block_size
        q0, q1 = (q_lo // bs).clamp(0, n - 1), (q_hi // bs).clamp(0, n - 1) + 1
        k0, k1 = (kv_lo // bs).clamp(0, n - 1), (kv_hi // bs).clamp(0, n - 1) + 1
        hh = h % table.shape[0]
        total = prefix[hh, q1, k1] - prefix[hh, q0, k1] - prefix[hh, q1, k0] + prefix[hh, q0, k0]
        size = (q1 - q0).clamp(min=0) * (k1 - k0).clamp(min=0)
        any_, all_ = total > 0, (total == size) & (size > 0)
        if self.causal:
            any_, all_ = any_ & (kv_lo <= q_hi), all_ & (kv_hi <= q_lo)
        return any_, all_
