"""Selection scorers for decode-time methods, reached through ``SelectView`` (``view.row_mass``,
``view.top_index``): the softmax mass a query group gives each page or token of the cache, and the
top-k of those scores.

Kept apart from ``decode.py`` (attention itself): a method's ``select`` hook decides *which* keys a
step attends to with these, then the decode kernels attend over that choice. Both run in the C++
decode extension (``csrc/decode.cpp``) where it can, with PyTorch paths computing the same.
"""

from __future__ import annotations

import torch

from longattn.kernels import extension
from longattn.kernels.decode import CPP_DTYPES, decode_cpp_unavailable


def row_mass(
    rows: torch.Tensor,
    table: torch.Tensor,
    present: torch.Tensor,
    scale: float,
    *,
    cpp_kernel: bool | None = None,
) -> torch.Tensor:
    """[B, Hkv, N] float32: per table entry, the softmax mass it draws, summed over query rows.

    ``mass[b, h, n] = sum_r softmax_n(scale * rows[b, h, r] . table[b, h, n])`` over the entries with
    ``present[b, n]``; absent entries get -inf, a row with no present entry adds nothing.
    rows [B, Hkv, R, E] (a KV head's GQA group of query rows, in some feature space); table
    [B, Hkv, N, E] per entry features (last axis contiguous); present [B, N] bool. Quest scores
    pages with rows ``[min(q, 0) | max(q, 0)]`` against the page key bounds ``[min | max]``, i.e. the
    bound ``sum_d max(q_d min_d, q_d max_d)``; Loki / Double Sparsity score tokens with
    low-dimensional queries against the cache's low-dimensional keys.

    ``cpp_kernel`` (default: when it can run) streams the table once for all rows in C++; with a
    bfloat16 table (width a multiple of 32) on a CPU with AVX512-BF16 it rounds the rows to
    bfloat16 for the bf16 dot-product instruction (fp32 accumulation), which moves each score by
    about 2^-9 of its magnitude. The PyTorch path computes the same in float32.
    """
    rows = rows.float()
    if cpp_kernel is None:
        cpp_kernel = table.dtype in CPP_DTYPES and decode_cpp_unavailable(rows) is None
    if cpp_kernel:
        reason = decode_cpp_unavailable(rows, None)
        if reason is not None:
            raise RuntimeError(f"C++ row scorer unavailable: {reason}")
        return extension.load("decode").row_mass(rows.contiguous(), table, present, float(scale))
    # [B, Hkv, R, N]: entries on the last axis (a softmax over a strided axis is 5x slower)
    scores = _products(rows, table).transpose(-1, -2).contiguous()
    absent = ~present[:, None, :]  # [B, 1, N]
    scores.mul_(scale).masked_fill_(absent.unsqueeze(2), -torch.inf)
    # a row with no present entry gives NaN, cleared
    mass = torch.softmax(scores, dim=-1).sum(2).nan_to_num_(0.0)
    return mass.masked_fill_(absent, -torch.inf)


def _products(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, N, R] float32 ``table[b, h, n] . rows[b, h, r]`` in the table's dtype (one batched
    product in fp32 / fp64; one 2-D product per (batch row, head) in bf16, which is faster than a
    batched bf16 product of this shape)."""
    batch, n_kv, n_entries = table.shape[:3]
    rows = rows.to(table.dtype)
    if table.dtype != torch.bfloat16:
        return torch.matmul(table, rows.transpose(-1, -2)).float()
    prods = [table[b, h] @ rows[b, h].T for b in range(batch) for h in range(n_kv)]
    return torch.stack(prods).float().view(batch, n_kv, n_entries, -1)


def top_index_cpp(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """``longattn.method.top_index`` by the C++ kernel (one nth_element and one ordered pass
    per row; equal scores at the threshold go to the lowest indices), or None where it cannot run
    (not CPU float32, no kernel) so the caller uses the PyTorch one."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.shape[-1] == 0:
        return None
    if extension.unavailable("decode") is not None:
        return None
    return extension.load("decode").top_index(scores.contiguous(), k)
