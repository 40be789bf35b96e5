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

    The integer products are exact: on a CPU with AVX-512 VNNI they are 8-bit dot products in the
    library's kernel (``PrefillView.int_margins``), reduced per key block in registers; elsewhere a
    float GEMM on the integer values (exact in float32: ``|sum| <= 127^2 * D < 2^24`` for
    D <= 1040), chunked over query blocks; both over the causal key blocks only (O(Tq x Tk) work,
    never O(Tq x Tk) memory), with bit-identical margins.
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
        """[B, H, nq, nk] the best estimated ``s - anchor`` over each block's visible pairs (-inf
        where none is visible).

        The scales are positive, so within a block pair the best ``c P_ij - anchor_i`` (``c`` the
        two blocks' scales times the softmax scale, ``P`` the integer products) is reached at each
        row's best ``P_ij``: the products are reduced over each key block's keys first, unmasked
        where every pair of the block is visible (``view.causal_full``), masked by position only for
        the other causal blocks (the diagonal, padding), never computed past a query block's last
        causal key block."""
        bs = view.block_size
        t_q, t_k = view.q.shape[2], view.k.shape[2]
        anchor = anchor_logits(view)  # [B, H, nq * bs]
        q_int, q_scale = quantise_blocks(view.q, bs, self.bits)  # [B, H, nq, bs, D], [B, H, nq]
        k_int, k_scale = quantise_blocks(view.k, bs, self.bits)  # [B, Hkv, nk, bs, D]
        n_q, n_k = q_int.shape[2], k_int.shape[2]
        kv_pos = torch.nn.functional.pad(view.kv_pos, (0, n_k * bs - t_k), value=-1)
        q_pos = torch.nn.functional.pad(view.q_pos, (0, n_q * bs - t_q), value=-1)
        quantised = (q_int, k_int, q_scale, k_scale, anchor, q_pos, kv_pos)
        if view.int_margins is not None:  # the library's kernel, where it runs
            margins = view.int_margins(*quantised, view.causal, view.causal_full, view.scale)
            if margins is not None:
                return margins
        return int_margins_torch(*quantised, view.causal, view.causal_full, view.scale)


def int_margins_torch(q_int, k_int, q_scale, k_scale, anchor, q_pos, kv_pos, causal, full, scale):
    """``PrefillView.int_margins`` in PyTorch (the definition): the integer products as a float
    GEMM over chunks of query blocks (exact: the sums stay below 2^24), each chunk over its causal
    key blocks only."""
    batch, heads, n_q, bs, dim = q_int.shape
    n_kv, n_k = k_int.shape[1], k_int.shape[2]
    group = heads // n_kv
    anchor = anchor.view(batch, heads, n_q, bs)
    k_int = k_int.view(batch, n_kv, n_k * bs, dim)
    kv_pos, q_pos = kv_pos.view(-1, n_k, bs), q_pos.view(-1, n_q, bs)  # [Bp, nk | nq, bs]
    # one past each query block's last causal key block: no later key block is computed
    reach = torch.where(causal.any(-1), causal.long().cumsum(-1).argmax(-1) + 1, 0)
    k_scale = k_scale.repeat_interleave(group, 1)  # [B, H, nk], each query head's
    margins = torch.full((batch, heads, n_q, n_k), -math.inf, device=q_int.device)
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * heads * bs * n_k * bs))
    for lo in range(0, n_q, step):
        hi = min(n_q, lo + step)
        width = int(reach[lo:hi].max())  # key blocks this chunk computes
        if width == 0:
            continue
        c = hi - lo
        folded = q_int[:, :, lo:hi].reshape(batch, n_kv, group * c * bs, dim)
        prod = folded @ k_int[:, :, : width * bs].transpose(-1, -2)  # [B, Hkv, G c bs, w bs]
        prod = prod.view(batch, heads, c, bs, width, bs)
        best = prod.amax(-1)  # [B, H, c, bs, w] each row's best product per key block
        edge = (causal[lo:hi, :width] & ~full[lo:hi, :width]).nonzero()  # [E, 2]
        if edge.numel():  # the blocks with hidden pairs: their maxima over the visible ones
            qb, kb = edge[:, 0], edge[:, 1]
            qp = q_pos[:, lo + qb].unsqueeze(-1)  # [Bp, E, bs, 1]
            kp = kv_pos[:, kb].unsqueeze(-2)  # [Bp, E, 1, bs]
            seen = (kp <= qp) & (kp >= 0) & (qp >= 0)  # [Bp, E, bs, bs]
            pairs = prod[:, :, qb, :, kb]  # [E, B, H, bs, bs]
            pairs = pairs.permute(1, 2, 0, 3, 4).masked_fill(~seen.unsqueeze(1), -math.inf)
            best[:, :, qb, :, kb] = pairs.amax(-1).permute(2, 0, 1, 3)  # [E, B, H, bs]
        pair_scale = q_scale[:, :, lo:hi, None] * k_scale[:, :, None, :width]  # [B, H, c, w]
        rel = best * (pair_scale * scale).unsqueeze(-2) - anchor[:, :, lo:hi].unsqueeze(-1)
        # a row that sees none of a block, and a padding row (the tail of the last query
        # block, whose block may count as fully visible), adds nothing
        hidden = torch.isneginf(best) | (q_pos[:, None, lo:hi, :, None] < 0)
        rel = rel.masked_fill_(hidden, -math.inf).amax(-2)  # [B, H, c, w]
        margins[:, :, lo:hi, :width] = rel.masked_fill(~causal[lo:hi, :width], -math.inf)
    return margins
