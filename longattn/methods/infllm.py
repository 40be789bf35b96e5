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
        if self.sinks + self.window <= budget and bool(real.all()):
            return self._select_full(q, view, budget)
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
        n_all = block_sum.shape[2]
        local_blocks = torch.zeros(batch, n_all + 1, dtype=torch.bool)  # last: a sink for the rest
        local_blocks.scatter_(1, slot_block.expand(batch, t).masked_fill(~local, n_all), True)
        local_blocks = local_blocks[:, :n_all]
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

    def _select_full(self, q, view, budget: int) -> DecodeSelection:
        """``select`` for rows whose every slot holds a token (no padding, no eviction): the sinks
        are slots [0, sinks), the window the last ``window`` slots, and only the blocks between
        them are scored, from page-level products. O(blocks + budget) work past the scoring."""
        batch, n_kv, t, dim = view.keys.shape
        size, per = self.block_size, self.block_size // view.page_size
        lo = -(-min(self.sinks, t) // size)  # first block holding no sink
        hi = max(t - self.window, 0) // size  # blocks from here on hold window tokens
        head = torch.arange(min(self.sinks, t), device=q.device)
        tail = torch.arange(max(t - self.window, 0), t, device=q.device)
        parts = [head.expand(batch, n_kv, -1)]
        n_pick = min(max(0, (budget - self.sinks - self.window) // size), max(0, hi - lo))
        if n_pick:
            rows = q.float().reshape(batch, n_kv, -1, dim)  # [B, Hkv, R, D]
            sums = view.page_sum[:, :, lo * per : hi * per]  # whole blocks: size tokens each
            score = torch.matmul(sums, rows.transpose(-1, -2))  # [B, Hkv, pages, R]
            score = score.view(batch, n_kv, hi - lo, per, -1).sum(3).amax(-1) / size
            blocks = top_index(score, n_pick, view.top_index) + lo  # [B, Hkv, n_pick] ascending
            slots = blocks.unsqueeze(-1) * size + torch.arange(size, device=q.device)
            parts.append(slots.view(batch, n_kv, -1))
        parts.append(tail.expand(batch, n_kv, -1))
        index = torch.cat(parts, dim=-1)
        width = budget + size  # the general path's width
        index = torch.nn.functional.pad(index, (0, width - index.shape[-1]), value=-1)
        return DecodeSelection(index, 1)
