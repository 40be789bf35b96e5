"""SALE-style prefill: block choice from low-precision (int8 or 4-bit) query-key products and a
relative attention score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.anchor_attention import anchor_logits, margin_blocks

# Quantised query x key scores computed at once (floats per chunk of query blocks).
SCORE_CHUNK_ELEMENTS = 1 << 24
SALE_BITS = (4, 8)


def quantise_blocks(x: torch.Tensor, block: int, bits: int):
    """Symmetric per-block quantisation of x [B, h, T, D] (zero-padded to whole blocks):
    (integers [B, h, n, block, D] float32 in [-(2^(bits-1) - 1), 2^(bits-1) - 1], scales
    [B, h, n]); ``integers * scale`` is within ``scale / 2`` of x."""
    batch, heads, t, dim = x.shape
    n = -(-t // block)
    top = 2 ** (bits - 1) - 1
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
    padded = padded.view(batch, heads, n, block, dim)
    scale = padded.abs().amax(dim=(-1, -2)).clamp(min=torch.finfo(torch.float32).tiny) / top
    ints = torch.round(padded / scale[..., None, None]).clamp(-top, top)
    return ints, scale


@register("sale")
@dataclass(frozen=True)
class SALE(SparsePrefill):
    """SALE (Ji et al. 2025, arXiv:2505.24179): every query-key score estimated from low-precision
    operands (per-block symmetric ``bits``-bit quantisation of q and k, integer products, then the
    two scales), and judged by a relative attention score: the estimated ``exp(s - anchor)``, the
    anchor a query's highest score over the sinks and its local window (where a row's maximum
    reliably sits). A key block is visited when some pair in it reaches ``threshold``; at most the
    ``budget`` fraction of causal blocks per row is kept, best first (1 is no cap).

    The integer products are exact in float32 (``|sum| <= 127^2 * D < 2^24`` for D <= 1040), so
    they run as a float GEMM on integer values, chunked over query blocks (O(Tq x Tk) work, never
    O(Tq x Tk) memory).
    Deviation from paper: the anchor is computed in full precision with AnchorAttention's rule;
    the paper's offline per-head threshold calibration and its fused CUDA selection kernel are not
    reproduced (one threshold for all heads).
    """

    budget: float = 1.0
    bits: int = 8
    threshold: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in SALE_BITS:
            raise ValueError(f"SALE.bits must be one of {SALE_BITS}, got {self.bits!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"SALE.threshold must be a float, got {self.threshold!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"SALE.threshold must be in (0, 1], got {self.threshold}")

    def plan(self, view) -> torch.Tensor:
        margin = self.margins(view)
        return margin_blocks(margin, view.causal, math.log(self.threshold), self.budget)

    def margins(self, view) -> torch.Tensor:
        """[B, H, nq, nk] the best estimated ``s - anchor`` over each block's visible pairs."""
        bs = view.block_size
        batch, heads, t_q, dim = view.q.shape
        n_kv, t_k = view.k.shape[1], view.k.shape[2]
        group = heads // n_kv
        anchor = anchor_logits(view).view(batch, heads, -1, bs)  # [B, H, nq, bs]
        q_int, q_scale = quantise_blocks(view.q, bs, self.bits)  # [B, H, nq, bs, D], [B, H, nq]
        k_int, k_scale = quantise_blocks(view.k, bs, self.bits)  # [B, Hkv, nk, bs, D]
        n_q, n_k = q_int.shape[2], k_int.shape[2]
        k_int = k_int.view(batch, n_kv, n_k * bs, dim)
        k_scale = k_scale.repeat_interleave(bs, -1).unsqueeze(-2)  # [B, Hkv, 1, nk * bs]
        pad = n_k * bs - t_k
        kv_pos = torch.nn.functional.pad(view.kv_pos, (0, pad), value=-1)  # [Bp, nk * bs]
        q_pos = torch.nn.functional.pad(view.q_pos, (0, n_q * bs - t_q), value=-1)
        q_pos = q_pos.view(-1, n_q, bs)
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * heads * bs * n_k * bs))
        parts = []
        for lo in range(0, n_q, step):
            chunk = q_int[:, :, lo : lo + step]  # [B, H, c, bs, D]
            c = chunk.shape[2]
            folded = chunk.reshape(batch, n_kv, group * c * bs, dim)
            s = (folded @ k_int.transpose(-1, -2)) * k_scale  # [B, Hkv, G c bs, nk bs]
            s = s.view(batch, heads, c, bs, -1) * q_scale[:, :, lo : lo + c, None, None]
            s = s * view.scale - anchor[:, :, lo : lo + c].unsqueeze(-1)
            qp = q_pos[:, None, lo : lo + c, :, None]
            kp = kv_pos[:, None, None, None, :]
            visible = (kp <= qp) & (kp >= 0) & (qp >= 0)
            s = s.masked_fill(~visible, -math.inf).amax(-2)  # [B, H, c, nk bs]
            parts.append(s.view(batch, heads, c, n_k, bs).amax(-1))
        return torch.cat(parts, dim=2)
