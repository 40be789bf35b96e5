"""Block top-p prefill: each query block visits the key blocks holding most of its estimated
attention mass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_p_blocks


@register("block_topp")
@dataclass(frozen=True)
class BlockTopP(SparsePrefill):
    """Per query block and head, the fewest key blocks whose estimated attention mass reaches
    ``budget`` of the row's (cumulative, top-p), plus the library's sink and local blocks. A block's
    mass is estimated as ``size * exp(mean(q) . mean(k) * scale)``, normalised over the causal
    blocks (the top-p budget of FlexPrefill's query-aware pattern, Lai et al. 2025,
    arXiv:2502.20766, on pooled blocks)."""

    budget: float = 0.9

    def plan(self, view) -> torch.Tensor:
        logits = view.pooled_logits()  # [B, H, nq, nk], -inf off causal
        n_k = view.k.shape[2]
        sizes = torch.full((logits.shape[-1],), float(view.block_size), device=logits.device)
        sizes[-1] = n_k - (logits.shape[-1] - 1) * view.block_size
        mass = torch.softmax(logits + sizes.log(), dim=-1).nan_to_num(0.0)
        return top_p_blocks(mass, view.causal, self.budget)
