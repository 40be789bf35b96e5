"""Attention over classified key blocks in one C++ pass (``csrc/expansion.cpp``): per query block,
exact softmax weights on its critical key blocks, and each marginal key block replaced by its
first-order expansion around the row's expansion point, all under one online softmax.

For query row t (position ``start + t``) of query block i, with its point ``a`` (``owner``) among
the block's ``points`` and ``P_s = softmax_s(scale a . k_s)`` over a marginal block j's keys, the
block contributes one weight ``exp(mu_tj)``, ``mu_tj = logsumexp_s(scale a . k_s) + scale (q_t -
a) . sum_s P_s k_s``, on the value ``sum_s P_s v_s``; a critical block contributes ``exp(scale q_t
. k_s)`` on each key it holds at a position <= the row's. Marginal blocks count only when
complete and before the block of the item's first row. The kernel computes in float32 (bfloat16
inputs are widened once per call); its sums run in another order than PyTorch's products, each
within ``gamma(n)`` of its magnitude for a sum of n terms, as the callers' bounds assume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longattn.kernels import extension

NAME = "expansion"
DTYPES = (torch.float32, torch.bfloat16)
MAX_BLOCK = 64  # block size and points per block the kernel's row buffers hold

_refusal: dict[str, str] = {}  # oneDNN's float32 brgemm probe ("" when it runs)


def unavailable(q: torch.Tensor, block: int, n_points: int) -> str | None:
    """Why the kernel cannot run queries ``q`` with this block size and point count here (None: it
    can). Builds it once."""
    if q.device.type != "cpu":
        return f"the C++ expansion kernel runs on CPU only, not {q.device.type}"
    if q.dtype not in DTYPES:
        return f"the C++ expansion kernel runs float32 and bfloat16, not {q.dtype}"
    if block > MAX_BLOCK or n_points > MAX_BLOCK:
        return f"the C++ expansion kernel takes blocks and points up to {MAX_BLOCK}, got {block}"
    reason = extension.unavailable(NAME)
    if reason is not None:
        return reason
    if NAME not in _refusal:
        _refusal[NAME] = extension.load(NAME).probe("float32")
    if _refusal[NAME]:
        return f"oneDNN's float32 brgemm refuses to run on this CPU ({_refusal[NAME][:200]})"
    return None


def expansion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    classes: torch.Tensor,
    points: torch.Tensor,
    owner: torch.Tensor,
    start: int,
    first: int,
    block: int,
    scale: float,
) -> torch.Tensor | None:
    """[B, H, Tq, Dv] float32 outputs of the queries at positions ``start .. start + Tq - 1``, or
    None where the kernel cannot run (the reason logged once at debug level).

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D / Dv] every key from position 0; classes [B, H, n, nk]
    int8 (2 critical, 1 marginal, 0 skipped) of query blocks ``first .. first + n - 1``, nk =
    ceil(Tk / block); points [B, H, n, c, D] float32, each block's expansion points; owner [B, H,
    Tq] int64, each row's point."""
    reason = unavailable(q, block, points.shape[3])
    if extension.fell_back(reason, "expansion attention left to the caller's PyTorch form"):
        return None
    length = k.shape[2]
    pad = -(-length // block) * block - length
    keys = F.pad(k.float(), (0, 0, 0, pad))
    pairs = torch.cat([keys, F.pad(v.float(), (0, 0, 0, pad))], dim=-1).contiguous()
    keys_t = keys.transpose(-1, -2).contiguous()  # [B, Hkv, D, Tp]
    return extension.load(NAME).attend(
        q.float().contiguous(), keys_t, pairs, classes.to(torch.int8).contiguous(),
        points.float().contiguous(), owner.long().contiguous(), start, length, first, block, scale,
    )  # fmt: skip
