"""Merge partial attention results computed over disjoint key sets, by log-sum-exp."""

from __future__ import annotations

import torch


def merge_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(out_i, lse_i)`` pairs into the attention over the union of their key sets.

    outs: each [..., Tq, D]; lses: each [..., Tq] (float32 or float64). A part with ``lse = -inf`` (no
    visible key) contributes nothing; a row that is empty in every part stays ``out = 0, lse = -inf``.
    Returns ``(out, lse)`` with ``out`` in the dtype of ``outs[0]`` and ``lse`` in the dtype of ``lses[0]``.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"need matching non-empty lists, got {len(outs)} outs and {len(lses)} lses"
        )
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = torch.stack(lses)  # [P, ..., Tq]
    lse_max = lse_stack.amax(0)
    safe_max = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    weights = torch.exp(lse_stack - safe_max)  # [P, ..., Tq]; exp(-inf) = 0 for empty parts
    total = weights.sum(0)
    acc_dtype = torch.float64 if lse_stack.dtype == torch.float64 else torch.float32
    out = torch.zeros(outs[0].shape, dtype=acc_dtype, device=outs[0].device)
    for w, o in zip(weights, outs):
        out.addcmul_(o.to(acc_dtype), w.unsqueeze(-1).to(acc_dtype))
    denom = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    out = (out / denom).to(outs[0].dtype)
    lse = torch.where(total > 0, safe_max + torch.log(total), torch.full_like(total, -torch.inf))
    return out, lse
