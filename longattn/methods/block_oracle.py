"""The oracle of block-sparse prefill: blocks chosen by their exact attention mass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_k_blocks, top_p_blocks

ORACLE_MODES = ("topk", "topp")


@register("block_oracle")
@dataclass(frozen=True)
class BlockOracle(SparsePrefill):
    """Per query block and head, the key blocks of highest *exact* attention mass (each query's
    softmax weights summed per key block, averaged over the query block): ``mode="topk"`` keeps the
    ``budget`` fraction of causal blocks (the library's sink and local blocks among them), ``"topp"`` the fewest blocks reaching ``budget`` of the
    mass. The ceiling every estimator is compared with at its density; it computes full attention
    to choose (O(T^2) work, chunked), so it is a measure, not a speedup."""

    mode: str = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ORACLE_MODES:
            raise ValueError(f"BlockOracle.mode must be one of {ORACLE_MODES}, got {self.mode!r}")

    def plan(self, view) -> torch.Tensor:
        mass = view.block_mass()
        if self.mode == "topk":
            return top_k_blocks(mass, view.causal, self.budget, view.forced)
        return top_p_blocks(mass, view.causal, self.budget)
