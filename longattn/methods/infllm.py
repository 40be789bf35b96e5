"""InfLLM: attention sinks + local window + the top memory blocks by representative keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import (
    Method,
    check_budget,
    check_non_negative,
    check_positive,
    register,
    token_budget,
    top_index,
)
from longattn.types import DecodeSelection


@register("infllm")
@dataclass(frozen=True)
class InfLLM(Method):
    """The first ``sinks`` and last ``window`` cached tokens, plus the memory blocks (``block_size``
    tokens) whose representative key scores highest against the step's queries, up to ``budget``
    tokens. Xiao et al. 2024, arXiv:2402.04617.

    Deviation from paper: a block's representative is its mean key (kept at append time as page sums),
    not a few representative tokens; no offloading; one selection per KV head.
    """

    budget: int = 1024
    fraction: float = 0.0
    sinks: int = 64
    window: int = 256
    block_size: int = 64

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_budget(name, self.budget, self.fraction)
        check_non_negative(name, sinks=self.sinks, window=self.window)
        check_positive(name, block_size=self.block_size)

    def select(self, q, view):
        budget = token_budget(self.budget, self.fraction, view.seq_len)
        if budget >= view.seq_len:
            return None
        if self.block_size % view.page_size:
            raise ValueError(
                f"InfLLM block_size={self.block_size} must be a multiple of the cache's page size "
                f"{view.page_size}"
            )
        batch, n_kv, t, dim = view.keys.shape
        real = view.positions >= 0  # [B, T]
        rank = real.cumsum(1) - 1  # order of each real slot in its row
        count = real.sum(1, keepdim=True)
        local = real & ((rank < self.sinks) | (rank >= count - self.window))  # [B, T]
        per = self.block_size // view.page_size
        n_pages = view.page_sum.shape[2]
        pad = (-n_pages) % per
        sums = torch.nn.functional.pad(view.page_sum, (0, 0, 0, pad))
        counts = torch.nn.functional.pad(view.page_count, (0, pad))
        block_sum = sums.view(batch, n_kv, -1, per, dim).sum(3)  # [B, Hkv, NB, D]
        block_count = counts.view(batch, -1, per).sum(2)  # [B, NB]
        mean = block_sum / block_count.clamp(min=1)[:, None, :, None]
        rows = q.float().reshape(batch, n_kv, -1, dim)
        score = (rows @ mean.transpose(-1, -2)).amax(dim=2)  # [B, Hkv, NB]
        slot_block = torch.arange(t, device=q.device) // self.block_size
        local_blocks = torch.zeros(batch, block_sum.shape[2], dtype=torch.bool)
        local_blocks.scatter_(1, slot_block.expand(batch, t).masked_fill(~local, 0), local)
        # only blocks holding no sink / window token compete, so the budget is not spent twice
        score = score.masked_fill((block_count == 0)[:, None] | local_blocks[:, None], -torch.inf)
        n_blocks = max(0, (budget - self.sinks - self.window) // self.block_size)
        chosen = torch.zeros(batch, n_kv, t, dtype=torch.bool)
        if n_blocks:
            blocks = top_index(score, n_blocks, view.top_index)  # [B, Hkv, n_blocks]
            hit = torch.zeros(batch, n_kv, block_sum.shape[2] + 1, dtype=torch.bool)
            hit.scatter_(2, blocks.masked_fill(blocks < 0, block_sum.shape[2]), True)
            chosen = hit[..., :-1].gather(2, slot_block.expand(batch, n_kv, t))
        chosen = (chosen | local[:, None]) & real[:, None]
        return DecodeSelection(
            top_index(
                chosen.float().masked_fill(~chosen, -torch.inf),
                budget + self.block_size,
                view.top_index,
            ),
            1,
        )
