"""A ``BlockIndex`` through compiled FlexAttention (CPU now, CUDA when present).

The index becomes a ``BlockMask`` with ``BlockMask.from_kv_blocks`` (milliseconds; ``create_block_mask``
would evaluate the mask over all T^2 pairs). Partial blocks run the ``mask_mod``, full blocks skip it.
Compilation costs seconds per new shape or mask function on CPU (3-10 s measured), so this kernel is
for callers that reuse shapes; recompile limits are raised so a sweep does not silently fall back to
eager Flex (which materialises the full score matrix). Dong et al. 2024, arXiv:2412.05496.
"""

from __future__ import annotations

import dataclasses

import torch

from longattn.kernels.sparse import pad_to_blocks
from longattn.kernels.tiled import MaskFn
from longattn.types import AttnOutput, BlockIndex, accumulation_dtype

RECOMPILE_LIMIT = 512
_compiled = None


def compiled_flex():
    """``torch.compile(flex_attention)``, built once per process with raised recompile limits."""
    global _compiled
    if _compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_available(device: torch.device) -> str | None:
    """None if compiled Flex can run on ``device``, else the reason."""
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError as exc:  # pragma: no cover - old torch
        return f"FlexAttention is not available: {exc}"
    if device.type not in ("cpu", "cuda"):
        return f"compiled FlexAttention supports cpu and cuda, not {device.type}"
    return None


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
    mask_fn: MaskFn | None = None,
    validate: bool = True,
) -> AttnOutput:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] restricted to ``index``, by compiled
    ``flex_attention``. Same contract as ``sparse_attention`` (positions, padding = -1), except that
    ``lse`` is None on CPU (torch 2.13's compiled CPU Flex does not return it)."""
    batch, n_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if validate:
        index.validate(batch, n_heads, q_len, kv_len)
    if kv_pos is None:
        kv_pos = torch.arange(kv_len, device=q.device).view(1, -1)
    if q_pos is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).view(1, -1)
    lse_dtype = accumulation_dtype(q.dtype)
    if q_len == 0 or kv_len == 0:
        lse = torch.full((batch, n_heads, q_len), -torch.inf, dtype=lse_dtype, device=q.device)
        return AttnOutput(torch.zeros_like(q), lse, None)
    bs = index.block_size
    q, q_pos = pad_to_blocks(q, q_pos, index.n_q_blocks * bs - q_len)
    k, _ = pad_to_blocks(k, kv_pos, index.n_kv_blocks * bs - kv_len)
    v, kv_pos = pad_to_blocks(v, kv_pos, index.n_kv_blocks * bs - kv_len)
    padded = bool((q_pos < 0).any()) or bool((kv_pos < 0).any())
    block_mask = _block_mask(index, q_pos, kv_pos, mask_fn, batch, n_heads, padded, q.device)
    # torch 2.13's compiled CPU Flex cannot return the log-sum-exp: there the result has lse=None.
    with_lse = q.device.type != "cpu"
    result = compiled_flex()(
        q,
        k,
        v,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        return_lse=with_lse,
    )
    out, lse = result if with_lse else (result, None)
    out = out[:, :, :q_len]
    lse = lse[:, :, :q_len].to(lse_dtype) if lse is not None else None
    if padded:  # padding queries: zeros, as every implementation returns
        out = out.masked_fill((q_pos[:, :q_len] < 0).view(q_pos.shape[0], 1, q_len, 1), 0.0)
    return AttnOutput(out, lse, None)


def _block_mask(index, q_pos, kv_pos, mask_fn, batch, n_heads, padded, device):
    """The ``BlockMask`` of ``index`` with a ``mask_mod`` on slot indices (positions looked up)."""
    bs = index.block_size
    q_tab = q_pos.expand(batch, -1).contiguous()
    kv_tab = kv_pos.expand(batch, -1).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        qp, kp = q_tab[b, q_idx], kv_tab[b, kv_idx]
        visible = (qp >= 0) & (kp >= 0)
        return visible & mask_fn(b, h, qp, kp) if mask_fn is not None else visible

    kv_blocks, counts = index.kv_blocks.to(device), index.counts.to(device)
    valid = torch.arange(kv_blocks.shape[-1], device=device) < counts.unsqueeze(-1)
    partial = index.partial.to(device) & valid if mask_fn is not None else torch.zeros_like(valid)
    if padded:  # blocks holding a padding slot always run the mask
        q_pad = (q_tab.view(batch, -1, bs) < 0).any(-1).any(0)  # [nq]
        kv_pad = (kv_tab.view(batch, -1, bs) < 0).any(-1).any(0)  # [nk]
        partial = partial | ((kv_pad[kv_blocks.clamp(min=0)] | q_pad.view(-1, 1)) & valid)
    if device.type == "cpu" and not bool(partial.any()):
        # torch 2.13's CPU template fails to compile a mask with only full blocks when H > 1
        # ("'kv_indices' was not declared"); one partial block per row (its mask_mod is exact) avoids it.
        partial = partial | (valid & (torch.cumsum(valid.int(), -1) == 1))
    padded_index = dataclasses.replace(
        index, partial=partial, q_len=q_tab.shape[-1], kv_len=kv_tab.shape[-1]
    )
    return padded_index.to_block_mask(mask_mod)
