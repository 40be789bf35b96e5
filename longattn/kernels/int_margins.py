"""SALE's block margins from 8-bit (or 4-bit) integer products in one C++ kernel
(``csrc/int_margins.cpp``): for each causal (query block, key block) pair, the best estimated score
against the query row's anchor, ``max P_ij * c - anchor_i`` over the block's visible pairs, the
integer products ``P`` by the AVX-512 VNNI byte dot product (4x the float32 FMA rate), reduced
over each key block in registers: no product matrix is stored. A plan estimator reaches it through
``PrefillView.int_margins``; ``longattn.methods.sale.SALE.margins`` in PyTorch stays the definition
and the fallback, and the kernel's margins are bit-identical to it (the products are exact
integers; the scaling repeats the definition's float32 roundings).
"""

from __future__ import annotations

import torch

from longattn.kernels import extension

NAME = "int_margins"
MAX_DIM = 1024  # integer sums stay exact in float32 (127^2 * D < 2^24) up to D = 1040


def unavailable(q: torch.Tensor) -> str | None:
    """Why the C++ integer-margin kernel cannot run for queries ``q`` here (None: it can). Builds
    it once."""
    if q.device.type != "cpu":
        return f"the C++ integer-margin kernel runs on CPU only, not {q.device.type}"
    if q.shape[-1] > MAX_DIM:
        return f"the C++ integer-margin kernel takes head dim <= {MAX_DIM}, got {q.shape[-1]}"
    reason = extension.unavailable(NAME)
    if reason is None and not extension.load(NAME).vnni():
        reason = "the C++ integer-margin kernel needs AVX-512 VNNI, which this CPU lacks"
    return reason


def int_margins(
    q_int: torch.Tensor,
    k_int: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    anchor: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    causal: torch.Tensor,
    full: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """[B, H, nq, nk] float32: per causal block pair the best ``P_ij * (q_scale * k_scale) * scale
    - anchor_i`` over its visible pairs (-inf where none is visible or the pair is not causal); or
    None where the kernel cannot run (the reason logged once at debug level): the caller computes
    the margins itself.

    q_int [B, H, nq, bs, D], k_int [B, Hkv, nk, bs, D]: integer values (float32, |x| <= 127, as
    ``longattn.methods.sale.quantise_blocks`` gives them); q_scale [B, H, nq], k_scale [B, Hkv, nk];
    anchor [B, H, nq * bs] float32; q_pos [Bp, nq * bs], kv_pos [Bp, nk * bs] int64 padded with -1;
    causal, full [nq, nk] bool: block pairs with a visible pair, and with every pair visible."""
    reason = unavailable(q_int)
    if extension.fell_back(reason, "SALE margins in PyTorch"):
        return None
    batch, heads, n_q, block, dim = q_int.shape
    pad = (0, -dim % 4)  # whole 4-byte words of the head dim (zeros add nothing)
    q8 = torch.nn.functional.pad(q_int.to(torch.int8), pad).view(batch, heads, n_q * block, -1)
    k8 = torch.nn.functional.pad(k_int.to(torch.int8), pad)
    k8 = k8.view(batch, k_int.shape[1], k_int.shape[2] * block, -1)
    floats = (q_scale, k_scale, anchor)
    return extension.load(NAME).int_margins(
        q8.contiguous(),
        k8.contiguous(),
        *(x.float().contiguous() for x in floats),
        q_pos.contiguous(),
        kv_pos.contiguous(),
        causal.contiguous(),
        full.contiguous(),
        block,
        scale,
    )
