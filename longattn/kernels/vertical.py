"""Attention over token columns per query block: the vertical lines of a vertical-slash plan.

MInference (Jiang et al. 2024, arXiv:2407.02490) runs a vertical-slash head in two passes: the
slash lines as key-block ranges on the block-sparse kernel, and the vertical lines as token columns
gathered per query block, the two merged by log-sum-exp. This module is the second pass and the
merge; the library drops columns a visited block covers, so no key counts twice.
Deviation from paper: PyTorch gather + matmul per chunk of query blocks, not a fused GPU kernel.
"""

from __future__ import annotations

import torch

from longattn.kernels.merge import merge_partials
from longattn.types import AttnOutput, accumulation_dtype

# Gathered keys and scores held at once (elements), so long prompts stay within memory.
CHUNK_ELEMENTS = 1 << 24


def column_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    block_size: int,
    scale: float,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's attention over its query block's ``columns``, causal by position.

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; columns int64 [Bi, Hi, nq, n] key slots (-1 unused),
    nq = ceil(Tq / block_size); q_pos [Bp, Tq], kv_pos [Bp, Tk] (-1 padding).
    Returns (out [B, H, Tq, D], lse [B, H, Tq]) in the accumulation dtype (float64 for float64
    inputs, else float32); a query that sees no column gets zeros and lse = -inf.
    """
    batch, heads, q_len, dim = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    n_q, n_cols = columns.shape[2], columns.shape[3]
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(batch, heads, n_q * block_size, dim, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, n_q * block_size), -torch.inf, dtype=acc, device=q.device)
    if n_cols == 0:
        return out[:, :, :q_len], lse[:, :, :q_len]
    pad = n_q * block_size - q_len
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(batch, heads, n_q, block_size, dim)
    q_pos = torch.nn.functional.pad(q_pos, (0, pad), value=-1).expand(batch, -1)
    q_pos = q_pos.view(batch, 1, n_q, block_size, 1)
    cols = columns.expand(batch, heads, n_q, n_cols)
    kv_head = torch.arange(heads, device=q.device) // (heads // n_kv)
    base = (torch.arange(batch, device=q.device)[:, None] * n_kv + kv_head) * kv_len  # [B, H]
    key_pos = kv_pos.expand(batch, kv_len)
    k_rows, v_rows = k.reshape(-1, dim), v.reshape(-1, dim)  # [B * Hkv * Tk, D]
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_cols * (dim + block_size)))
    for lo in range(0, n_q, step):
        hi = min(n_q, lo + step)
        slot = cols[:, :, lo:hi]  # [B, H, c, n]
        flat = (base[:, :, None, None] + slot.clamp(min=0)).reshape(-1)
        shape = (batch, heads, hi - lo, n_cols, dim)
        k_cols = k_rows.index_select(0, flat).view(shape).to(acc)
        v_cols = v_rows.index_select(0, flat).view(shape).to(acc)
        pos = torch.gather(key_pos, 1, slot.clamp(min=0).reshape(batch, -1)).view(slot.shape)
        pos = torch.where(slot >= 0, pos, -1).unsqueeze(3)  # [B, H, c, 1, n]
        rows = q_pos[:, :, lo:hi]  # [B, 1, c, bs, 1]
        visible = (pos >= 0) & (rows >= 0) & (pos <= rows)  # [B, H, c, bs, n]
        logits = (q_blocks[:, :, lo:hi].to(acc) @ k_cols.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~visible, -torch.inf)
        part_lse = torch.logsumexp(logits, dim=-1)  # [B, H, c, bs]
        finite = torch.where(torch.isfinite(part_lse), part_lse, torch.zeros_like(part_lse))
        weights = torch.exp(logits - finite.unsqueeze(-1))  # masked: exp(-inf) = 0
        rows_out = slice(lo * block_size, hi * block_size)
        out[:, :, rows_out] = (weights @ v_cols).flatten(2, 3)
        lse[:, :, rows_out] = part_lse.flatten(2, 3)
    return out[:, :, :q_len], lse[:, :, :q_len]


def with_columns(
    blocks: AttnOutput,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    block_size: int,
    scale: float,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
) -> AttnOutput:
    """The block pass's result ``blocks`` merged by log-sum-exp with the ``columns`` pass (disjoint
    key sets); out in the query dtype, lse in the block pass's dtype."""
    col_out, col_lse = column_attention(q, k, v, columns, block_size, scale, q_pos, kv_pos)
    # the column part first: the merge accumulates in its (wider) dtype, rounded once at the end
    out, lse = merge_partials([col_out, blocks.out], [col_lse, blocks.lse.to(col_lse.dtype)])
    return AttnOutput(out.to(q.dtype), lse.to(blocks.lse.dtype), blocks.state)
