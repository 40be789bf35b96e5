"""Dense and causal attention through PyTorch's fused SDPA kernels, with log-sum-exp.

Causal attention with fewer queries than keys is aligned bottom-right (queries are the last Tq
positions): the keys before the queries are attended without a mask, the last Tq keys with a square
causal mask, and the two parts are merged by log-sum-exp. GQA is passed to the kernel unexpanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longattn.kernels.merge import merge_partials
from longattn.types import AttnOutput, accumulation_dtype


def flash_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA (top-left causal when ``causal``) returning (out [B, H, Tq, D], lse [B, H, Tq]).

    ``attn_mask``: optional additive bias in q's dtype, broadcastable to [B, H, Tq, Tk] (-inf hides).
    """
    # The fused kernels read rows as contiguous vectors: a strided last axis (q[..., ::2], keys
    # stored [B, H, D, T] and viewed transposed) silently gives wrong results without this copy.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.device.type == "cpu":
        # The CPU flash kernel returns the log-sum-exp and accepts Hkv < H without expanding K/V.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
        )
        return out, lse
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=group > 1
    )
    # The public entry point returns no lse on other devices; it is recomputed in query chunks.
    lse = _lse_by_chunks(q, k, causal, scale, attn_mask)
    return out, lse


def _lse_by_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Log-sum-exp of the scaled scores, chunked over queries so memory stays O(chunk * Tk)."""
    group = q.shape[1] // k.shape[1]
    k_exp = k.repeat_interleave(group, dim=1).float()
    parts = []
    for q0 in range(0, q.shape[2], chunk):
        s = torch.matmul(q[:, :, q0 : q0 + chunk].float(), k_exp.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(q0, q0 + s.shape[2], device=q.device).view(-1, 1)
            s = s.masked_fill(torch.arange(k.shape[2], device=q.device) > rows, -torch.inf)
        if attn_mask is not None:
            bias = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., q0 : q0 + chunk, :]
            s = s + bias.float()
        parts.append(torch.logsumexp(s, dim=-1))
    return torch.cat(parts, dim=-1)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> AttnOutput:
    """Dense attention of the last Tq positions over Tk >= Tq keys. q [B, H, Tq, D]; k, v [B, Hkv, Tk, D]."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == 0 or kv_len == 0:
        lse = torch.full(
            q.shape[:3], -torch.inf, dtype=accumulation_dtype(q.dtype), device=q.device
        )
        return AttnOutput(torch.zeros_like(q), lse, None)
    if not causal or q_len == 1:
        return AttnOutput(*flash_with_lse(q, k, v, False, scale), None)
    prefix = kv_len - q_len
    if prefix == 0:
        return AttnOutput(*flash_with_lse(q, k, v, True, scale), None)
    head = flash_with_lse(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    tail = flash_with_lse(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    out, lse = merge_partials([head[0], tail[0]], [head[1], tail[1]])
    return AttnOutput(out, lse, None)
