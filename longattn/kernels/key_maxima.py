"""Key maxima in one C++ kernel (``csrc/key_maxima.cpp``): for rows of queries and, per row, a list of
key rows, each key's best dot product over the row's queries (optionally only over the queries at
or after a position). A plan estimator that scores a few representative keys against whole query
blocks (HiP's hierarchical search) reaches it through ``PrefillView.key_maxima``; its own PyTorch
computation of the same maxima stays the definition and the fallback.

``hierarchical_search`` runs HiP's whole search for each row of queries in the same extension:
every round's chunks, representatives, scores (the products below, bit for bit) and choices, as
the PyTorch search over ``key_maxima`` makes them, without a round trip per round.

The kernel fuses the key gather, the products (a register-blocked loop over the head dimension
from 0 for every score: fused multiply-adds over d = 0 .. D-1 in float32, or for bfloat16 keys of
an even D on a CPU with AVX512-BF16, against queries that are bf16 values, bf16 dot products over
channel pairs (float32 query columns finer than bf16 keep the float32 loop), each product exact and
each sum rounded, bf16 subnormals as zero; the same key against the same queries gives
bit-identical scores in every call, whatever the other keys of the call) and the maxima, parallel
over rows. Its sums round in another order than a BLAS product, so its maxima differ from a
PyTorch product's by rounding: each score by at most ``gamma(D) sum_d |q_d k_d|`` from the exact
one (D rounded sums of exact products either way).
"""

from __future__ import annotations

import torch

from longattn.kernels import extension

NAME = "key_maxima"
DTYPES = (torch.float32, torch.bfloat16)


def unavailable(k: torch.Tensor) -> str | None:
    """Why the C++ key-maxima kernel cannot run on keys ``k`` here (None: it can). Builds it once."""
    if k.device.type != "cpu":
        return f"the C++ key-maxima kernel runs on CPU only, not {k.device.type}"
    if k.dtype not in DTYPES:
        return f"the C++ key-maxima kernel runs float32 and bfloat16 keys, not {k.dtype}"
    return extension.unavailable(NAME)


def key_maxima(
    k: torch.Tensor,
    q_t: torch.Tensor,
    q_pos: torch.Tensor,
    rows: torch.Tensor,
    count: torch.Tensor,
    some: torch.Tensor,
    rep_pos: torch.Tensor,
) -> torch.Tensor | None:
    """[N, W] float32: for each row n and each of its first ``count[n]`` key rows ``rows[n, w]``
    (rows of ``k.reshape(-1, D)``), ``max_j q_t[n, :, j] . key``; where ``some[n, w]`` only over
    the queries j with ``q_pos[n, j] >= max(rep_pos[n, w], 0)`` (-inf if none); -inf after
    ``count``. Or None where the kernel cannot run (the reason logged once at debug level): the
    caller computes the maxima itself.

    k [B, Hkv, Tk, D] float32 / bfloat16 (any strides, read in place when its last axis is
    contiguous); q_t [N, D, bs] float32 (each row's queries as columns); q_pos [N, bs],
    rows [N, W], count [N], rep_pos [N, W] int64; some [N, W] bool."""
    reason = unavailable(k)
    if extension.fell_back(reason, "key maxima in PyTorch"):
        return None
    if k.stride(-1) != 1:
        k = k.contiguous()
    args = (q_t, q_pos, rows, count.long(), some, rep_pos)
    return extension.load(NAME).key_maxima(k, *(x.contiguous() for x in args))


def hierarchical_search(
    k: torch.Tensor,
    q: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    n_cand: torch.Tensor,
    k_row: torch.Tensor,
    n_blocks: int,
    scale: float,
) -> torch.Tensor | None:
    """bool [B, H, nq, n_blocks]: HiP's final key blocks (``longattn.methods.hip.search`` over
    this module's ``key_maxima``, the same blocks) for each batch row, head and query block: the
    ``n_cand[i]`` candidate blocks of query block i cut into ``k_row[i]`` chunks, each round
    splitting every chunk in two, scoring each half by its middle key's best ``scale * q . k``
    over the block's queries that may see it, and keeping the ``k_row[i]`` best halves (ties
    towards the earlier), until every chunk is one block. Or None where the kernel cannot run
    (the reason logged once at debug level).

    k [B, Hkv, Tk, D], q [B, H, Tq, D] of one dtype, float32 / bfloat16 (any strides); q_pos
    [Bp, nq, bs] int64 each query block's positions (-1 on padding past Tq); kv_pos [Bp, Tk];
    n_cand, k_row [nq] int64 with 1 <= k_row <= n_cand <= n_blocks."""
    reason = unavailable(k)
    if reason is None and (q.dtype != k.dtype or kv_pos.dim() != 2 or k.shape[2] == 0):
        reason = "the search runs q and k of one dtype, one row of key positions per batch row"
    if extension.fell_back(reason, "HiP's search in PyTorch"):
        return None
    k = k if k.stride(-1) == 1 else k.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    args = (q_pos, kv_pos, n_cand.long(), k_row.long())
    return extension.load(NAME).hierarchical_search(
        k, q, *(x.contiguous() for x in args), n_blocks, scale
    )
