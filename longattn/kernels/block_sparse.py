"""Exact block-sparse attention over a ``BlockIndex`` in one C++ kernel (``csrc/block_sparse.cpp``).

FlashAttention's block-sparse variant (Dao et al. 2022, arXiv:2205.14135) on CPU: per (batch, head,
query block) work item and per visited key block, S = Q Kᵀ by oneDNN's brgemm micro-kernel, the
element mask only where the block needs one, a vectorised online softmax, P V by a second GEMM;
the items are balanced over the threads by decreasing block count. float32, bfloat16 (GEMMs in bf16
with fp32 accumulation, 2x the fp32 rate here) and float64 (plain loops, for exact tests). GQA: query
head h reads KV head ``h // (H / Hkv)``; K/V are never expanded.

This is its own implementation (``impl="sparse_cpp"`` in the API), not the engine of ``sparse``: the
plain-PyTorch gather + SDPA path stays runnable and testable by name, and ``auto`` reaches it only
through the dispatch order when the extension cannot be built (the reason is logged).

Element masks cost no Python per block. Once per call the partial blocks are classified:
  * causal by position: when the caller says its mask never shows a later key (``causal``) and the
    conservative ``bounds_fn`` proves, row by row, that every earlier key of the block is visible (the
    diagonal of causal masks), the kernel compares positions itself; nothing is materialised;
  * otherwise the caller's ``mask_fn`` is evaluated once, batched, on the distinct (query block,
    key block) pairs only (broadcast over heads / batch when it does not depend on them) and passed
    as one packed uint8 tensor with a pair id per visited slot.
Blocks holding padding (position -1) always take the byte mask, so padding queries get zeros and
``lse = -inf`` like every fully masked row.

Memory: the output, lse, the masks of the partial pairs, and K transposed per block (bf16: K and V
in VNNI pairs), O(T). That packed copy lives in a workspace kept between calls (a fresh multi-MB
buffer page-faults on every call); ``release_workspace()`` frees it.
"""

from __future__ import annotations

import torch

from longattn.kernels import extension
from longattn.kernels.tiled import BoundsFn, MaskFn, with_padding
from longattn.types import AttnOutput, BlockIndex

NAME = "block_sparse"
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
FULL, CAUSAL = -1, -2  # slot kinds understood by the kernel; >= 0 is a mask pair id
_probes: dict[str, str] = {}


def unavailable(
    dtype: torch.dtype,
    device: torch.device,
    head_dim: int,
    scale: float = 1.0,
    block_size: int = 128,
) -> str | None:
    """Why the native kernel cannot run this call here (None: it can). Builds it once."""
    if not scale > 0:
        return f"the C++ block-sparse kernel needs scale > 0 (applied inside exp), got {scale}"
    if device.type != "cpu":
        return f"the C++ block-sparse kernel runs on CPU only, not {device.type}"
    if dtype not in DTYPES:
        return f"the C++ block-sparse kernel runs float32, bfloat16 and float64, not {dtype}"
    if dtype == torch.bfloat16 and (head_dim % 2 or block_size % 2):
        return (
            f"the C++ bfloat16 kernel needs an even head dim and block size (VNNI pairs), got "
            f"{head_dim} and {block_size}"
        )
    reason = extension.unavailable(NAME)
    if reason or dtype == torch.float64:
        return reason
    key = str(dtype).replace("torch.", "")
    if key not in _probes:
        _probes[key] = extension.load(NAME).probe(key)
    if _probes[key]:
        return f"oneDNN brgemm cannot run {key} on this CPU: {_probes[key][:200]}"
    return None


def release_workspace() -> None:
    """Free the packed K/V workspace the kernel keeps between calls (no-op if never built)."""
    if NAME in extension._modules:
        extension.load(NAME).release()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    kv_pos: torch.Tensor | None = None,
    mask_fn: MaskFn | None = None,
    bounds_fn: BoundsFn | None = None,
    causal: bool = False,
    validate: bool = True,
) -> AttnOutput:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] restricted to ``index``.

    ``mask_fn(b, h, q_pos, kv_pos)`` decides visibility inside partial blocks (None: they are fully
    visible). ``causal=True`` promises that ``mask_fn`` never shows a key at a later position; with
    ``bounds_fn`` (a method's ``block_bounds``) it lets diagonal blocks skip the materialised mask.
    Positions [Bp, T] (Bp in {1, B}) default to queries being the last Tq keys; -1 marks padding.
    ``validate=False`` skips the index checks (once per call) for trusted hot loops.
    Returns ``AttnOutput(out [B, H, Tq, D], lse [B, H, Tq] float32 (float64 for float64 input))``.
    """
    batch, n_heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    reason = unavailable(q.dtype, q.device, dim, scale, index.block_size)
    if reason:
        raise ValueError(reason)
    if validate:
        index.validate(batch, n_heads, q_len, kv_len)
    if kv_pos is None:
        kv_pos = torch.arange(kv_len, device=q.device).view(1, -1)
    if q_pos is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).view(1, -1)
    bs = index.block_size
    q_pos_b, kv_pos_b = _pad_positions(q_pos, bs), _pad_positions(kv_pos, bs)  # [Bp, n*bs]
    q_pad = (q_pos_b[:, :q_len] < 0).view(q_pos.shape[0], -1)
    kv_pad = kv_pos_b[:, :kv_len] < 0
    padded = bool(q_pad.any()) or bool(kv_pad.any())
    kinds, masks, strides = _slot_kinds(
        index, n_heads, batch, q_pos_b, kv_pos_b, q_len, kv_len, mask_fn, bounds_fn, causal, padded
    )
    out, lse = extension.load(NAME).forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        index.kv_blocks.to(torch.int64).contiguous(),
        index.counts.to(torch.int64).contiguous(),
        kinds,
        masks,
        strides[0],
        strides[1],
        q_pos.contiguous(),
        kv_pos.contiguous(),
        bs,
        float(scale),
    )
    return AttnOutput(out, lse, None)


def _pad_positions(pos: torch.Tensor, bs: int) -> torch.Tensor:
    """Positions [Bp, T] extended with -1 to whole blocks."""
    extra = -pos.shape[-1] % bs
    return torch.nn.functional.pad(pos, (0, extra), value=-1) if extra else pos


def _slot_kinds(
    index, n_heads, batch, q_pos_b, kv_pos_b, q_len, kv_len, mask_fn, bounds_fn, causal, padded
):
    """Per visited slot: FULL, CAUSAL or the id of its pair in the packed byte masks.

    Returns (kinds int32 [Bi, Hi, nq, W], masks uint8 [Bm, Hm, P, bs, bs], (batch, head) strides).
    """
    bs = index.block_size
    n_q, n_kv = index.n_q_blocks, index.n_kv_blocks
    ids = index.kv_blocks
    valid = torch.arange(ids.shape[-1], device=ids.device) < index.counts.unsqueeze(-1)
    partial = index.partial & valid
    if padded:  # a block holding a padding slot (query or key) always needs the element mask
        q_block_pad = (q_pos_b[:, :q_len] < 0).any(0)
        q_block_pad = torch.nn.functional.pad(q_block_pad, (0, n_q * bs - q_len))
        kv_block_pad = (kv_pos_b[:, :kv_len] < 0).any(0)
        kv_block_pad = torch.nn.functional.pad(kv_block_pad, (0, n_kv * bs - kv_len))
        q_block_pad, kv_block_pad = (
            q_block_pad.view(n_q, bs).any(-1),
            kv_block_pad.view(n_kv, bs).any(-1),
        )
        pad_slot = (kv_block_pad[ids.clamp(min=0)] | q_block_pad.view(1, 1, -1, 1)) & valid
    else:
        pad_slot = torch.zeros_like(partial)
    # without a mask, partial blocks are fully visible: only padding needs the element mask
    partial = (partial if mask_fn is not None else pad_slot) | pad_slot
    kinds = torch.full(ids.shape, FULL, dtype=torch.int32, device=ids.device)
    if causal and bounds_fn is not None and mask_fn is not None:
        causal_ok = _causal_slots(index, n_heads, q_pos_b, kv_pos_b, bounds_fn, partial & ~pad_slot)
        kinds[causal_ok] = CAUSAL
        partial = partial & ~causal_ok
    if not bool(partial.any()):
        return kinds, _no_masks(ids.device), (0, 0)
    where = partial.nonzero()  # [S, 4]: bi, hi, qb, slot
    pair_key = where[:, 2] * n_kv + ids[partial]
    uniq, inverse = torch.unique(pair_key, return_inverse=True)
    kinds[partial] = inverse.to(torch.int32)
    qb, kb = uniq // n_kv, uniq % n_kv
    masks = _pair_masks(with_padding(mask_fn), batch, n_heads, q_pos_b, kv_pos_b, qb, kb, bs)
    bm, hm = masks.shape[:2]
    n_pairs = uniq.numel()
    strides = (hm * n_pairs * bs * bs if bm > 1 else 0, n_pairs * bs * bs if hm > 1 else 0)
    return kinds, masks, strides


def _no_masks(device) -> torch.Tensor:
    return torch.zeros(1, 1, 1, 1, 1, dtype=torch.uint8, device=device)


def _pair_masks(mask_fn, batch, n_heads, q_pos_b, kv_pos_b, qb, kb, bs) -> torch.Tensor:
    """uint8 [Bm, Hm, P, bs, bs] visibility of the pairs (qb, kb), broadcast dims kept at 1."""
    n_pairs = qb.numel()
    qp = q_pos_b.view(q_pos_b.shape[0], -1, bs)[:, qb]  # [Bp, P, bs]
    kp = kv_pos_b.view(kv_pos_b.shape[0], -1, bs)[:, kb]  # [Bp, P, bs]
    b_idx = torch.arange(batch, device=qp.device).view(-1, 1, 1, 1, 1)
    h_idx = torch.arange(n_heads, device=qp.device).view(1, -1, 1, 1, 1)
    mask = mask_fn(b_idx, h_idx, qp[:, None, :, :, None], kp[:, None, :, None, :])
    while mask.dim() < 5:
        mask = mask.unsqueeze(0)
    bm = batch if mask.shape[0] > 1 else 1
    hm = n_heads if mask.shape[1] > 1 else 1
    return mask.expand(bm, hm, n_pairs, bs, bs).to(torch.uint8).contiguous()


def _causal_slots(index, n_heads, q_pos_b, kv_pos_b, bounds_fn, candidate) -> torch.Tensor:
    """Candidate slots whose mask provably equals "key position <= query position" (the mask is
    causal, and ``bounds_fn`` says every earlier key of the block is visible, for every query row,
    head and batch row the slot serves). bool [Bi, Hi, nq, W]."""
    ok = torch.zeros_like(candidate)
    if not bool(candidate.any()):
        return ok
    bs, n_kv = index.block_size, index.n_kv_blocks
    ids = index.kv_blocks
    where = candidate.nonzero()
    pair_key = where[:, 2] * n_kv + ids[candidate]
    uniq, inverse = torch.unique(pair_key, return_inverse=True)
    qb, kb = uniq // n_kv, uniq % n_kv
    qp = q_pos_b.view(q_pos_b.shape[0], -1, bs)[:, qb]  # [Bp, P, bs] (no padding here)
    kp = kv_pos_b.view(kv_pos_b.shape[0], -1, bs)[:, kb]
    kv_lo = kp[..., :1]  # [Bp, P, 1]
    kv_real_hi = torch.where(kp >= 0, kp, kp.new_full((), -1)).amax(-1, keepdim=True)
    heads = torch.arange(n_heads, device=qp.device).view(-1, 1, 1, 1)
    hi = torch.minimum(kv_real_hi, qp)
    res = bounds_fn(heads, qp[None], qp[None], kv_lo[None], hi[None])
    if res is None:
        return ok
    shape = (n_heads, *qp.shape)
    all_ = torch.broadcast_to(torch.as_tensor(res[1], device=qp.device), shape)
    row_ok = all_ | (qp < kv_lo)[None]  # a row before the block sees nothing of it: causal agrees
    pair_ok = row_ok.all(-1).all(1)  # [H, P]
    if index.kv_blocks.shape[1] == 1:
        slot_ok = pair_ok.all(0)[inverse]
    else:
        slot_ok = pair_ok[where[:, 1], inverse]
    ok[candidate] = slot_ok
    return ok
