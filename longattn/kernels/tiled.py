"""Exact attention by online softmax over key tiles (FlashAttention's recurrence in plain PyTorch).

Extra memory is O(Tq_tile * Tk_tile) per step plus the O(Tq * D) accumulator: the T x T score matrix is
never built. Tiles that the mask excludes are skipped; tiles that it fully allows skip the element mask.
Dao et al. 2022, arXiv:2205.14135; Rabe & Staats 2021, arXiv:2112.05682.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from longattn.types import AttnOutput, accumulation_dtype

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BoundsFn = Callable[..., "tuple[torch.Tensor, torch.Tensor] | None"]


def tile_ranges(
    positions: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile of ``tile`` consecutive slots: min and max valid position over the tile and the batch,
    and whether the tile holds a padding slot (position -1).

    positions: [Bp, T] integer. Returns (lo, hi, has_padding), each [ceil(T / tile)]; a tile of padding
    only has ``hi = -1 < lo``.
    """
    length = positions.shape[-1]
    n_tiles = -(-length // tile)
    extra = n_tiles * tile - length
    if extra:
        # Repeat the last slot, which leaves every tile's min, max and padding flag unchanged.
        positions = torch.cat([positions, positions[:, -1:].expand(-1, extra)], dim=-1)
    tiles = positions.reshape(-1, n_tiles, tile)
    padding = tiles < 0
    big = torch.iinfo(tiles.dtype).max
    lo = torch.where(padding, big, tiles).amin(dim=(0, 2))
    return lo, tiles.amax(dim=(0, 2)), padding.any(dim=2).any(dim=0)


def tile_layout(
    bounds_fn: BoundsFn,
    n_heads: int,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    tile_q: int,
    tile_k: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(any, all) per (query head, q tile, kv tile) from a conservative bounds function, or None.

    Returns two bool tensors of shape [H, n_q_tiles, n_kv_tiles].
    """
    q_lo, q_hi, q_pad = tile_ranges(q_pos, tile_q)
    kv_lo, kv_hi, kv_pad = tile_ranges(kv_pos, tile_k)
    heads = torch.arange(n_heads, device=q_pos.device).view(-1, 1, 1)
    res = bounds_fn(
        heads, q_lo.view(1, -1, 1), q_hi.view(1, -1, 1), kv_lo.view(1, 1, -1), kv_hi.view(1, 1, -1)
    )
    if res is None:
        return None
    shape = (n_heads, q_lo.numel(), kv_lo.numel())
    any_, all_ = (torch.broadcast_to(torch.as_tensor(x, device=q_pos.device), shape) for x in res)
    real = (q_hi >= 0).view(-1, 1) & (kv_hi >= 0).view(1, -1)  # tiles that hold a real pair
    unpadded = ~q_pad.view(-1, 1) & ~kv_pad.view(1, -1)
    return any_ & real, all_ & any_ & real & unpadded


@functools.lru_cache(maxsize=64)
def mask_indices(batch: int, heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and head indices a mask receives, [B, 1, 1, 1] and [1, H, 1, 1], built once per
    shape (a decode step asks for the same ones in every layer; masks are pure, never write them)."""
    rows = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    return rows, torch.arange(heads, device=device).view(1, -1, 1, 1)


def with_padding(mask_fn: MaskFn | None) -> MaskFn:
    """``mask_fn`` restricted to real slots: position -1 (padding) is never visible nor visiting."""

    def masked(b, h, q_pos, kv_pos):
        valid = (q_pos >= 0) & (kv_pos >= 0)
        return valid if mask_fn is None else valid & mask_fn(b, h, q_pos, kv_pos)

    return masked


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    mask_fn: MaskFn | None,
    bounds_fn: BoundsFn | None = None,
    tile_q: int = 512,
    tile_k: int = 512,
) -> AttnOutput:
    """Exact attention. q [B, H, Tq, D]; k [B, Hkv, Tk, D]; v [B, Hkv, Tk, Dv]; q_pos [Bp, Tq],
    kv_pos [Bp, Tk] with Bp in {1, B}. ``mask_fn(b, h, q_pos, kv_pos)`` gives visibility (None: all
    visible); a position of -1 marks a padding slot, which is never attended (a padding query gets
    zeros and lse = -inf).

    Accumulates in float32 (float64 for float64 input). GQA is handled by folding the query group into
    the tile's rows; K/V are never expanded.
    """
    batch, n_heads, q_len, dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    acc_dtype = accumulation_dtype(q.dtype)
    v_dim = v.shape[-1]  # may differ from D: a channel-pruned cache layer's keys
    out = torch.zeros((batch, n_heads, q_len, v_dim), dtype=q.dtype, device=q.device)
    lse = torch.full((batch, n_heads, q_len), -torch.inf, dtype=acc_dtype, device=q.device)
    if q_len == 0 or kv_len == 0:
        return AttnOutput(out, lse, None)

    if bool((q_pos < 0).any()) or bool((kv_pos < 0).any()):
        mask_fn = with_padding(mask_fn)
    layout = None
    if mask_fn is not None and bounds_fn is not None:
        layout = tile_layout(bounds_fn, n_heads, q_pos, kv_pos, tile_q, tile_k)
    if layout is not None:
        tile_any, tile_all = layout[0].any(0), layout[1].all(0)  # [n_q_tiles, n_kv_tiles]
    b_idx = torch.arange(batch, device=q.device).view(-1, 1, 1, 1, 1)
    h_idx = torch.arange(n_heads, device=q.device).view(1, n_kv_heads, group, 1, 1)
    q5 = q.view(batch, n_kv_heads, group, q_len, dim)  # [B, Hkv, G, Tq, D]

    for qi, q0 in enumerate(range(0, q_len, tile_q)):
        q1 = min(q0 + tile_q, q_len)
        rows = group * (q1 - q0)
        q_tile = q5[:, :, :, q0:q1].to(acc_dtype).reshape(batch, n_kv_heads, rows, dim)
        run_max = torch.full(
            (batch, n_kv_heads, rows), -torch.inf, dtype=acc_dtype, device=q.device
        )
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros((batch, n_kv_heads, rows, v_dim), dtype=acc_dtype, device=q.device)
        for ki, k0 in enumerate(range(0, kv_len, tile_k)):
            if layout is not None and not tile_any[qi, ki]:
                continue
            k1 = min(k0 + tile_k, kv_len)
            tile_mask = None
            if mask_fn is not None and (layout is None or not tile_all[qi, ki]):
                tile_mask = mask_fn(
                    b_idx,
                    h_idx,
                    q_pos[:, None, None, q0:q1, None],
                    kv_pos[:, None, None, None, k0:k1],
                )  # broadcastable to [B, Hkv, G, tq, tk]
                if not bool(tile_mask.any()):
                    continue
            k_tile = k[:, :, k0:k1].to(acc_dtype)
            scores = torch.matmul(q_tile, k_tile.transpose(-1, -2)).mul_(
                scale
            )  # [B, Hkv, G*tq, tk]
            if tile_mask is not None:
                view = scores.view(batch, n_kv_heads, group, q1 - q0, k1 - k0)
                view.masked_fill_(~tile_mask, -torch.inf)
            new_max = torch.maximum(run_max, scores.amax(-1))
            safe_max = torch.where(torch.isneginf(new_max), 0.0, new_max)
            probs = scores.sub_(safe_max.unsqueeze(-1)).exp_()
            alpha = torch.exp(run_max - safe_max)
            run_sum = run_sum * alpha + probs.sum(-1)
            acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(probs, v[:, :, k0:k1].to(acc_dtype)))
            run_max = new_max
        seen = run_sum > 0
        tile_out = acc / torch.where(seen, run_sum, 1.0).unsqueeze(-1)
        tile_lse = torch.where(seen, run_max + torch.log(run_sum), -torch.inf)
        out[:, :, q0:q1] = tile_out.view(batch, n_heads, q1 - q0, v_dim).to(q.dtype)
        lse[:, :, q0:q1] = tile_lse.view(batch, n_heads, q1 - q0)
    return AttnOutput(out, lse, None)
