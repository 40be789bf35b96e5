"""THE oracle: dense softmax attention with a materialised boolean mask, in any dtype.

Clarity over speed: scores are materialised as [B, H, Tq, Tk], K/V are expanded for GQA. Tests run it in
float64 as ground truth and in the test dtype as the "eager" error yardstick of
``longattn.testing.assert_attention_close``.
"""

from __future__ import annotations

import os

import torch

from longattn.types import AttnOutput, accumulation_dtype

MAX_BYTES_ENV = "LONGATTN_REFERENCE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30


def max_score_bytes() -> int:
    """The memory cap of the reference path, from ``$LONGATTN_REFERENCE_MAX_BYTES`` (default 4 GiB)."""
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${MAX_BYTES_ENV} must be an integer byte count, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"${MAX_BYTES_ENV} must be > 0, got {value}")
    return value


def score_bytes(batch: int, heads: int, q_len: int, kv_len: int, dtype: torch.dtype) -> int:
    """Peak bytes the reference materialises: scores, mask and probabilities (about 3 score-sized)."""
    itemsize = max(torch.empty((), dtype=dtype).element_size(), 4)
    return 3 * batch * heads * q_len * kv_len * itemsize


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> AttnOutput:
    """Dense attention. q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]; visible broadcastable to
    [B, H, Tq, Tk] (True = may attend) or None for all keys.

    Computes in the input dtype (float32 accumulation is torch's business for bf16 matmuls); ``lse`` is
    float64 for float64 input, else float32. Fully masked rows give zeros and ``lse = -inf``.
    """
    batch, n_heads, q_len, _ = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)  # [B, H, Tk, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if visible is not None:
        visible = visible.expand(batch, n_heads, q_len, kv_len)
        scores = scores.masked_fill(~visible, -torch.inf)
    lse_dtype = accumulation_dtype(q.dtype)
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1)  # [B, H, Tq]
    empty = torch.isneginf(lse)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(empty.unsqueeze(-1), 0.0)  # softmax of an all -inf row is NaN
    out = torch.matmul(probs, v)  # [B, H, Tq, D]
    return AttnOutput(out, lse, None)
