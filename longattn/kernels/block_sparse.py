"""Exact block-sparse attention over a ``BlockIndex`` in one C++ kernel (``csrc/block_sparse.cpp``).

FlashAttention's block-sparse variant (Dao et al. 2022, arXiv:2205.14135) on CPU: per (batch, head,
query block) work item and per visited key block, S = Q Kᵀ by oneDNN's brgemm micro-kernel, the
element mask only where the block needs one, a vectorised online softmax, P V by a second GEMM;
the items are balanced over the threads by decreasing block count. float32, bfloat16 and float64
(plain loops, for exact tests). GQA: query head h reads KV head ``h // (H / Hkv)``; K/V are never
expanded.

bfloat16 takes one of two paths, chosen once per process for the CPU found (``bf16_path()``):
  * "brgemm": GEMMs in bf16 with fp32 accumulation on VNNI-packed K and V, where oneDNN's bf16
    micro-kernel runs (AVX512-BF16 / AMX);
  * "float32": elsewhere (e.g. AVX2 only): K and V are widened to float32 once per call into the
    packed workspace, each Q tile when its work item starts, and the float32 micro-kernel runs;
    the output is rounded to bfloat16. On such CPUs bf16 SDPA runs at its fp32 rate too (measured
    on an AVX2 AMD Zen 3), so the float32 kernel is the fair match; results are at least as
    accurate as the bf16 path (products of bf16 values are exact in float32).

``skip_below=λ`` (off by default) is SpargeAttn's online-softmax-aware filter (Zhang et al. 2025,
arXiv:2502.18137): in a visited key block, the P·V product of a query row is dropped when the
block's row maximum of the scaled scores is below the row's running maximum minus λ, so each of
its weights is below exp(-λ) of the largest weight seen (and of the final one); the block's
GEMM is skipped when every row of the tile drops it. The dropped weights stay in the softmax
denominator, so ``lse`` is unchanged (bitwise) and the output only loses their share:
``|out - exact| <= n_dropped · exp(-λ) · max|v|`` per row and coordinate, n_dropped being the
number of keys of the row's dropped blocks (at most its visible keys), up to rounding.
Deviation from paper: SpargeAttn's threshold acts per GPU warp of rows; here per row (the GEMM is
skipped per tile of ``block_size`` rows), and the weights it drops stay in the denominator.

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

Memory: the output, lse, the masks of the partial pairs, and K transposed per block (bf16 brgemm: K
and V in VNNI pairs; bf16 float32 path: K transposed and V, widened), O(T). That packed copy lives in a workspace kept between calls (a fresh multi-MB
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
    """Why the C++ block-sparse kernel cannot run this call here (None: it can). Builds it once."""
    if not scale > 0:
        return f"the C++ block-sparse kernel needs scale > 0 (applied inside exp), got {scale}"
    if device.type != "cpu":
        return f"the C++ block-sparse kernel runs on CPU only, not {device.type}"
    if dtype not in DTYPES:
        return f"the C++ block-sparse kernel runs float32, bfloat16 and float64, not {dtype}"
    reason = extension.unavailable(NAME)
    if reason or dtype == torch.float64:
        return reason
    dtype_name = str(dtype).replace("torch.", "")
    if dtype == torch.bfloat16:
        if bf16_path() == "brgemm" and (head_dim % 2 or block_size % 2):
            return (
                f"the C++ bfloat16 kernel (bf16 brgemm on this CPU) needs an even head dim and "
                f"block size (VNNI pairs), got {head_dim} and {block_size}"
            )
        return None
    refusal = _brgemm_refusal(dtype_name)
    if refusal:
        return (
            f"the C++ block-sparse kernel cannot run {dtype_name} on this CPU ({_cpu_name()}): "
            f"oneDNN's brgemm refuses it ({refusal[:200]}); use float32, or impl='sparse'"
        )
    return None


def bf16_supported() -> bool:
    """Whether the kernel runs bfloat16 here: wherever the extension builds (``bf16_path()``)."""
    return extension.unavailable(NAME) is None


def bf16_path() -> str:
    """How bfloat16 runs on this CPU: "brgemm" (oneDNN's bf16 micro-kernel on VNNI-packed tiles)
    or "float32" (tiles widened once, the float32 micro-kernel; where oneDNN refuses bf16, e.g. on
    AVX2 only: its refusal names AMX). The probe runs brgemm itself rather than reading CPU flags,
    so it follows torch's own rule. Raises RuntimeError when the extension cannot be built."""
    return "float32" if _brgemm_refusal("bfloat16") else "brgemm"


def _brgemm_refusal(dtype_name: str) -> str:
    """oneDNN brgemm's error text for ``dtype_name`` on this CPU ("" when it runs); probed once."""
    if dtype_name not in _probes:
        _probes[dtype_name] = extension.load(NAME).probe(dtype_name)
    return _probes[dtype_name]


def _cpu_name() -> str:
    first = extension.cpu_id().splitlines()[0]
    return first.split(":", 1)[-1].strip() or "unknown CPU"


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
    skip_below: float | None = None,
) -> AttnOutput:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] restricted to ``index``.

    ``mask_fn(b, h, q_pos, kv_pos)`` decides visibility inside partial blocks (None: they are fully
    visible). ``causal=True`` promises that ``mask_fn`` never shows a key at a later position; with
    ``bounds_fn`` (a method's ``block_bounds``) it lets diagonal blocks skip the materialised mask.
    Positions ``q_pos`` [Tq] or [Bp, Tq] and ``kv_pos`` [Tk] or [Bp, Tk] (integer, Bp in {1, B})
    default to queries being the last Tq keys; -1 marks padding.
    Shapes, dtypes and positions are always checked (``TypeError`` / ``ValueError`` naming it);
    ``validate=False`` skips only the index contents check (block ids in range and increasing, one
    pass over the index) for trusted hot loops.
    ``skip_below=λ`` (float32 / bfloat16, λ >= 0; None: off) drops the P·V products whose weights
    are all below exp(-λ) of the running maximum (module docstring: rule and error bound).
    Returns ``AttnOutput(out [B, H, Tq, D], lse [B, H, Tq] float32 (float64 for float64 input))``.
    """
    _check_qkv(q, k, v, index)
    batch, n_heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    reason = unavailable(q.dtype, q.device, dim, scale, index.block_size)
    if reason:
        raise ValueError(reason)
    skip = _skip_threshold(skip_below, q.dtype)
    _check_index_shape(index, batch, n_heads, q_len, kv_len)
    if validate:
        index.validate(batch, n_heads, q_len, kv_len)
    if kv_pos is None:
        kv_pos = torch.arange(kv_len, device=q.device).view(1, -1)
    if q_pos is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).view(1, -1)
    q_pos = _positions("q_pos", q_pos, batch, q_len, q.device)
    kv_pos = _positions("kv_pos", kv_pos, batch, kv_len, q.device)
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
        q_pos,
        kv_pos,
        bs,
        float(scale),
        skip,
        q.dtype == torch.bfloat16 and bf16_path() == "float32",
    )
    return AttnOutput(out, lse, None)


def _skip_threshold(skip_below, dtype: torch.dtype) -> float:
    """λ as the kernel reads it (inf: off), after checking it."""
    if skip_below is None:
        return float("inf")
    if isinstance(skip_below, bool) or not isinstance(skip_below, (int, float)):
        raise TypeError(f"skip_below must be a number or None, got {type(skip_below).__name__}")
    if not skip_below >= 0:
        raise ValueError(f"skip_below must be >= 0 (a log-weight margin), got {skip_below}")
    if dtype == torch.float64:
        raise ValueError("skip_below runs in float32 / bfloat16; float64 is the exact path")
    return float(skip_below)


def _check_qkv(q, k, v, index) -> None:
    """q [B, H, Tq, D], k and v [B, Hkv, Tk, D] of one dtype and device, H a multiple of Hkv."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, T, D], got shape {tuple(t.shape)}")
    if not isinstance(index, BlockIndex):
        raise TypeError(f"index must be a BlockIndex, got {type(index).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch, n_heads, _, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k/v [B, Hkv, Tk, D] = {tuple(k.shape)} do not match q [B, H, Tq, D] = "
            f"{tuple(q.shape)}"
        )
    if dim == 0:
        raise ValueError(f"head dim must be >= 1, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or n_heads % k.shape[1]:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of KV heads ({k.shape[1]})")


def _check_index_shape(index: BlockIndex, batch: int, n_heads: int, q_len: int, kv_len: int):
    """The index's lengths and tensor shapes fit the call (the kernel indexes by them)."""
    if (index.q_len, index.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"index is for q_len={index.q_len}, kv_len={index.kv_len}; q and k have "
            f"q_len={q_len}, kv_len={kv_len}"
        )
    kv, counts, partial = index.kv_blocks, index.counts, index.partial
    fits = (
        kv.dim() == 4
        and kv.shape[0] in (1, batch)
        and kv.shape[1] in (1, n_heads)
        and kv.shape[2] == index.n_q_blocks
        and counts.shape == kv.shape[:3]
        and partial.shape == kv.shape
    )
    if not fits:
        raise ValueError(
            f"index kv_blocks {tuple(kv.shape)}, counts {tuple(counts.shape)}, partial "
            f"{tuple(partial.shape)} do not fit [Bi in (1, {batch}), Hi in (1, {n_heads}), "
            f"{index.n_q_blocks} query blocks, width] / [Bi, Hi, nq]"
        )


def _positions(name: str, pos, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``pos`` [T] or [Bp, T] (Bp in {1, B}, integer) as contiguous int64 [Bp, T]."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {pos.dtype}")
    if pos.dim() == 1:
        pos = pos.view(1, -1)
    if pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != length:
        raise ValueError(
            f"{name} must have shape [{length}] or [1 or {batch}, {length}], got {tuple(pos.shape)}"
        )
    return pos.to(device=device, dtype=torch.int64).contiguous()


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
