"""Exact block-sparse attention over a ``BlockIndex``, in plain PyTorch on top of the CPU flash kernel.

Per (batch, head) slice of the index and per query block (or run of consecutive query blocks with the
same list), the fully visible key blocks are gathered into a preallocated workspace
(``index_select(..., out=)``, no fresh multi-MB allocation per step) and attended with one SDPA call
that also returns the log-sum-exp. Partial blocks (diagonal, pattern edges, padding) go through a
separate batched pass that evaluates the caller's element mask on those blocks only; a partial block
that is exactly the causal diagonal runs through SDPA's own causal kernel instead. The two results
are merged by log-sum-exp. GQA is passed to SDPA unexpanded (the query group is folded).

FlashAttention's block-sparse variant, Dao et al. 2022, arXiv:2205.14135.
"""

from __future__ import annotations

import math

import torch

from longattn.kernels.merge import merge_partials
from longattn.kernels.sdpa import flash_with_lse
from longattn.kernels.tiled import MaskFn, tile_layout, with_padding
from longattn.types import AttnOutput, BlockIndex, accumulation_dtype

# Bytes of float32 scores one step of the partial-block pass may hold.
PARTIAL_CHUNK_BYTES = 16 << 20
# Longest key list (in keys) whose bf16 scores are materialised per step instead of using flash.
MATERIALISE_MAX_KEYS = 8192


def sparse_attention(
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
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] restricted to ``index``.

    ``mask_fn(b, h, q_pos, kv_pos)`` is evaluated on partial blocks only (None: partial blocks are
    fully visible). Positions [Bp, T] (Bp in {1, B}) default to queries being the last Tq keys; -1 marks
    a padding slot (never attended; a padding query gets zeros and lse = -inf). ``validate=False``
    skips the index checks (once per call) for trusted hot loops.
    Returns ``AttnOutput(out [B, H, Tq, D], lse [B, H, Tq] float32 (float64 for float64 input))``.
    """
    if validate:
        check_sparse_call(q, k, v, index, scale, q_pos, kv_pos, mask_fn)
    batch, n_heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    lse_dtype = accumulation_dtype(q.dtype)
    if kv_pos is None:
        kv_pos = torch.arange(kv_len, device=q.device).view(1, -1)
    if q_pos is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).view(1, -1)
    bs = index.block_size
    n_q, n_kv = index.n_q_blocks, index.n_kv_blocks
    pad_q, pad_kv = n_q * bs - q_len, n_kv * bs - kv_len
    padded = pad_q or pad_kv or bool((q_pos < 0).any()) or bool((kv_pos < 0).any())
    if padded:
        mask_fn = with_padding(mask_fn)
    elif mask_fn is None:
        mask_fn = _all_visible
    q, q_pos = pad_to_blocks(q, q_pos, pad_q)
    k, kv_pos = pad_to_blocks(k, kv_pos, pad_kv)
    v, _ = pad_to_blocks(v, kv_pos, pad_kv)
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # every row is written below
    lse = torch.full(q.shape[:3], -torch.inf, dtype=lse_dtype, device=q.device)
    if out.numel() and kv_len:  # no batch rows, heads or queries: nothing to index
        partial = index.partial
        if padded:  # a key block holding a padding slot always needs the element mask
            kv_pad = (kv_pos.view(-1, n_kv, bs) < 0).any(-1).any(0)
            partial = partial | (kv_pad[index.kv_blocks.clamp(min=0)] & (index.kv_blocks >= 0))
        state = _Slices(q, k, v, index, partial, q_pos, kv_pos, mask_fn, scale)
        for bi in range(index.kv_blocks.shape[0]):
            for hi in range(index.kv_blocks.shape[1]):
                state.run(bi, hi, out, lse)
    else:
        out.zero_()
    out, lse = out[:, :, :q_len], lse[:, :, :q_len]
    if padded:
        pad_rows = (q_pos[:, :q_len] < 0).view(q_pos.shape[0], 1, q_len)
        out = out.masked_fill(pad_rows.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(pad_rows, -torch.inf)
    return AttnOutput(out, lse, None)


def check_sparse_call(q, k, v, index, scale, q_pos=None, kv_pos=None, mask_fn=None) -> None:
    """Validate the arguments of a block-sparse kernel call: ``TypeError`` / ``ValueError`` naming the
    offending argument, before anything is computed (the kernels index with these shapes unchecked).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D] (4-D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    batch, n_heads, q_len, dim = q.shape
    if (k.shape[0], k.shape[3]) != (batch, dim) or dim == 0:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and a head_dim > 0"
        )
    if k.shape[1] == 0 or n_heads % k.shape[1]:
        raise ValueError(
            f"query heads ({n_heads}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if not isinstance(index, BlockIndex):
        raise TypeError(f"index must be a BlockIndex, got {type(index).__name__}")
    index.validate(batch, n_heads, q_len, k.shape[2])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if mask_fn is not None and not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable or None, got {type(mask_fn).__name__}")
    for name, pos, length in (("q_pos", q_pos, q_len), ("kv_pos", kv_pos, k.shape[2])):
        _check_block_positions(name, pos, length, batch)


def _check_block_positions(name: str, pos, length: int, batch: int) -> None:
    """Positions of a kernel call: None, or integer [Bp, length] with Bp in {1, batch}, >= -1."""
    if pos is None:
        return
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {pos.dtype}")
    if pos.dim() != 2 or pos.shape[1] != length or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be [Bp, {length}] with Bp in (1, {batch}), got {tuple(pos.shape)}"
        )
    if pos.numel() and int(pos.min()) < -1:
        raise ValueError(f"{name} must be >= 0 (or -1 for padding), got {int(pos.min())}")


def block_index_from_mask(
    mask_fn: MaskFn,
    bounds_fn,
    n_heads: int,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    block_size: int,
    max_dense_pairs: int = 1 << 24,
) -> BlockIndex:
    """The ``BlockIndex`` of a mask: analytic from the conservative ``bounds_fn`` when it answers,
    otherwise (small problems only) by evaluating ``mask_fn`` on every pair. Blocks that may hold a
    visible pair are visited; those not certainly fully visible are partial. Heads collapse to Hi = 1
    when they all share the layout.
    """
    q_len, kv_len = q_pos.shape[-1], kv_pos.shape[-1]
    layout = tile_layout(bounds_fn, n_heads, q_pos, kv_pos, block_size, block_size)
    if layout is None:
        if q_len * kv_len > max_dense_pairs:
            raise ValueError(
                f"the mask has no block bounds; building its block index would evaluate "
                f"{q_len * kv_len} pairs (limit {max_dense_pairs}); use impl='tiled'"
            )
        layout = _layout_by_evaluation(mask_fn, n_heads, q_pos, kv_pos, block_size)
    any_, all_ = layout  # [H, nq, nk]
    if bool((any_ == any_[:1]).all()) and bool((all_ == all_[:1]).all()):
        any_, all_ = any_[:1], all_[:1]
    return BlockIndex.from_block_mask(
        any_.unsqueeze(0),
        block_size,
        partial=(any_ & ~all_).unsqueeze(0),
        q_len=q_len,
        kv_len=kv_len,
    )


def _layout_by_evaluation(mask_fn, n_heads, q_pos, kv_pos, bs):
    """(any, all) per (head, q block, kv block) from the materialised mask (small problems only)."""
    visible = with_padding(mask_fn)(
        torch.arange(q_pos.shape[0]).view(-1, 1, 1, 1),
        torch.arange(n_heads).view(1, -1, 1, 1),
        q_pos[:, None, :, None],
        kv_pos[:, None, None, :],
    ).expand(q_pos.shape[0], n_heads, q_pos.shape[-1], kv_pos.shape[-1])
    pad_q, pad_k = -q_pos.shape[-1] % bs, -kv_pos.shape[-1] % bs
    padded = torch.nn.functional.pad(visible, (0, pad_k, 0, pad_q))  # padding slots: not visible
    blocks = padded.reshape(*padded.shape[:2], padded.shape[2] // bs, bs, -1, bs)
    any_ = blocks.any(-1).any(-2).any(0)
    real = torch.nn.functional.pad(torch.ones_like(visible[:1, :1]), (0, pad_k, 0, pad_q))
    real = real.reshape(1, 1, *blocks.shape[2:]).all(-1).all(-2)
    all_ = blocks.all(-1).all(-2).all(0) & real[0]
    return any_, all_


def _all_visible(b, h, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
    """The element mask of ``mask_fn=None``: every pair of a partial block is visible."""
    shape = torch.broadcast_shapes(q_pos.shape, kv_pos.shape)
    return torch.ones(shape, dtype=torch.bool, device=q_pos.device)


def pad_to_blocks(
    x: torch.Tensor, pos: torch.Tensor, extra: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``extra`` zero slots along T (position -1) so T is a whole number of blocks."""
    if not extra:
        return x, pos
    zeros = x.new_zeros(*x.shape[:2], extra, x.shape[3])
    return torch.cat([x, zeros], 2), torch.cat([pos, pos.new_full((pos.shape[0], extra), -1)], 1)


def _pack(ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept ids first (in their order) and how many: ([nq, W] ids, [nq] counts)."""
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    return torch.gather(ids, -1, order), keep.sum(-1)


class _Slices:
    """The per-call state of ``sparse_attention``: one ``run`` per (batch, head) slice of the index."""

    def __init__(self, q, k, v, index, partial, q_pos, kv_pos, mask_fn, scale):
        self.q, self.k, self.v, self.index, self.partial = q, k, v, index, partial
        self.q_pos, self.kv_pos, self.mask_fn, self.scale = q_pos, kv_pos, mask_fn, scale
        self.group = q.shape[1] // k.shape[1]
        self.bs = index.block_size
        b_i, h_i = index.kv_blocks.shape[:2]
        n_batch = q.shape[0] if b_i == 1 else 1
        n_kv_heads = k.shape[1] if h_i == 1 else 1
        valid = torch.arange(index.kv_blocks.shape[-1]) < index.counts.unsqueeze(-1)
        n_full = (valid & ~partial).sum(-1)
        width = int(n_full.max()) if n_full.numel() else 0
        # one gather workspace per call, reused by every step (fresh big allocations page-fault)
        numel = n_batch * n_kv_heads * width * self.bs * q.shape[3]
        self.ws_k = torch.empty(numel, dtype=k.dtype, device=k.device)
        self.ws_v = torch.empty(numel, dtype=v.dtype, device=v.device)

    def run(self, bi: int, hi: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        index, bs = self.index, self.bs
        per_batch, per_head = index.kv_blocks.shape[0] > 1, index.kv_blocks.shape[1] > 1
        b_sl = slice(bi, bi + 1) if per_batch else slice(None)
        h_sl = slice(hi, hi + 1) if per_head else slice(None)
        kv_sl = slice(hi // self.group, hi // self.group + 1) if per_head else slice(None)
        ids, count = index.kv_blocks[bi, hi], index.counts[bi, hi]  # [nq, W], [nq]
        valid = torch.arange(ids.shape[-1], device=ids.device) < count.unsqueeze(-1)
        partial = self.partial[bi, hi] & valid
        q_s, k_s, v_s = self.q[b_sl, h_sl], self.k[b_sl, kv_sl], self.v[b_sl, kv_sl]
        out_s, lse_s = out[b_sl, h_sl], lse[b_sl, h_sl]
        k_blocks = k_s.view(
            k_s.shape[0], k_s.shape[1], -1, bs * k_s.shape[3]
        )  # [B', Hkv', nk, bs*D]
        v_blocks = v_s.view(k_blocks.shape)
        self._full(q_s, k_blocks, v_blocks, *_pack(ids, valid & ~partial), out_s, lse_s)
        part_ids, part_n = _pack(ids, partial)
        if bool((part_n > 0).any()):
            b_idx = torch.arange(q_s.shape[0]) if not per_batch else torch.tensor([bi])
            h_idx = torch.arange(q_s.shape[1]) if not per_head else torch.tensor([hi])
            pos_sl = b_sl if self.q_pos.shape[0] > 1 and per_batch else slice(None)
            kv_pos_sl = b_sl if self.kv_pos.shape[0] > 1 and per_batch else slice(None)
            self._partial(
                q_s,
                k_blocks,
                v_blocks,
                part_ids,
                part_n,
                (b_idx, h_idx, self.q_pos[pos_sl], self.kv_pos[kv_pos_sl]),
                out_s,
                lse_s,
            )

    def _full(self, q_s, k_blocks, v_blocks, ids, n_full, out_s, lse_s) -> None:
        """Fully visible blocks: one gather + one SDPA per run of query blocks with the same list."""
        bs, n_q = self.bs, ids.shape[0]
        n_list = n_full.tolist()
        same = ((n_full[1:] == n_full[:-1]) & (ids[1:] == ids[:-1]).all(-1)).tolist()
        b_, h_kv, _, row = k_blocks.shape
        start = 0
        while start < n_q:
            stop = start + 1
            while stop < n_q and same[stop - 1]:
                stop += 1
            n = n_list[start]
            if n:
                block_ids = ids[start, :n]
                shape = (b_, h_kv, n, row)
                wk = self.ws_k[: b_ * h_kv * n * row].view(shape)
                wv = self.ws_v[: b_ * h_kv * n * row].view(shape)
                torch.index_select(k_blocks, 2, block_ids, out=wk)
                torch.index_select(v_blocks, 2, block_ids, out=wv)
                dim = q_s.shape[3]
                rows = slice(start * bs, stop * bs)
                wk, wv = wk.view(b_, h_kv, n * bs, dim), wv.view(b_, h_kv, n * bs, dim)
                if q_s.dtype == torch.bfloat16 and n * bs <= MATERIALISE_MAX_KEYS:
                    o, l = self._materialised(q_s[:, :, rows], wk, wv)
                else:
                    o, l = flash_with_lse(q_s[:, :, rows], wk, wv, False, self.scale)
                out_s[:, :, rows] = o
                lse_s[:, :, rows] = l
            else:
                out_s[:, :, start * bs : stop * bs] = 0
            start = stop

    def _materialised(self, q_rows, wk, wv) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 attention with the scores of one step materialised (they stay in cache): two bf16
        GEMMs run about 2x faster than the CPU flash kernel, whose bf16 is no faster than its fp32.
        Max, exp and the output are bf16 as in the eager reference; the normaliser is summed in fp32.
        """
        b_, h_q, r, dim = q_rows.shape
        h_kv = wk.shape[1]
        # A power-of-two scale is exact on q; any other is applied to the scores, as the eager
        # reference rounds them (folding it into bf16 q would round differently).
        exact = math.frexp(self.scale)[0] == 0.5
        qf = (q_rows * self.scale if exact else q_rows).reshape(b_, h_kv, (h_q // h_kv) * r, dim)
        scores = torch.matmul(qf, wk.transpose(-1, -2))  # [B', Hkv', G*r, n*bs]
        if not exact:
            scores.mul_(self.scale)
        top = scores.amax(-1, keepdim=True)
        probs = scores.sub_(top).exp_()
        total = probs.sum(-1, keepdim=True, dtype=torch.float32)
        o = torch.matmul(probs, wv).float().div_(total)
        lse = (top.float() + total.log()).view(b_, h_q, r)
        return o.view(b_, h_q, r, dim), lse

    def _partial(self, q_s, k_blocks, v_blocks, ids, n_part, where, out_s, lse_s) -> None:
        """Partial blocks, batched over query blocks: masked scores, then merge into the full result."""
        bs, dim = self.bs, q_s.shape[3]
        b_, h_q = q_s.shape[:2]
        width = int(n_part.max())
        rows = torch.nonzero(n_part > 0).flatten()
        per_block = b_ * h_q * bs * width * bs * 4
        chunk = max(1, PARTIAL_CHUNK_BYTES // per_block)
        q_blocks = q_s.view(b_, h_q, -1, bs, dim)
        out_blocks, lse_blocks = out_s.view(b_, h_q, -1, bs, dim), lse_s.view(b_, h_q, -1, bs)
        for c0 in range(0, rows.numel(), chunk):
            qb = rows[c0 : c0 + chunk]  # [C]
            kb = ids[qb, :width].clamp(min=0)  # [C, P]
            slot_ok = torch.arange(width) < n_part[qb].unsqueeze(-1)  # [C, P]
            mask = self._block_mask(where, qb, kb, slot_ok)  # broadcastable [B', H', C, bs, P*bs]
            qc = q_blocks[:, :, qb]  # [B', H', C, bs, D]
            if width == 1 and _is_causal_diagonal(mask):
                o, l = self._diagonal(qc, k_blocks, v_blocks, qb)
            else:
                o, l = self._masked(qc, k_blocks, v_blocks, kb, mask)
            merged, merged_lse = merge_partials(
                [o, out_blocks[:, :, qb].to(o.dtype)], [l.to(lse_s.dtype), lse_blocks[:, :, qb]]
            )
            out_blocks[:, :, qb] = merged.to(out_s.dtype)
            lse_blocks[:, :, qb] = merged_lse

    def _block_mask(self, where, qb, kb, slot_ok) -> torch.Tensor:
        b_idx, h_idx, q_pos, kv_pos = where
        bs, n_c, width = self.bs, qb.numel(), kb.shape[1]
        qp = q_pos.view(q_pos.shape[0], -1, bs)[:, qb]  # [Bp, C, bs]
        kp = kv_pos.view(kv_pos.shape[0], -1, bs)[:, kb.flatten()]  # [Bp, C*P, bs]
        kp = kp.view(kp.shape[0], n_c, width * bs)
        mask = self.mask_fn(
            b_idx.view(-1, 1, 1, 1, 1),
            h_idx.view(1, -1, 1, 1, 1),
            qp[:, None, :, :, None],
            kp[:, None, :, None, :],
        )
        if mask.dim() < 5:
            mask = mask.view((1,) * (5 - mask.dim()) + tuple(mask.shape))
        return mask & slot_ok.repeat_interleave(bs, -1).view(1, 1, n_c, 1, width * bs)

    def _diagonal(self, qc, k_blocks, v_blocks, qb):
        """Causal diagonal blocks through SDPA's causal kernel, one (query block, head) per SDPA head."""
        b_, h_q, n_c, bs, dim = qc.shape
        h_kv = k_blocks.shape[1]
        g = h_q // h_kv
        # SDPA maps query head j to key head j // g: order query heads as (kv head, block, group).
        qh = qc.view(b_, h_kv, g, n_c, bs, dim).transpose(2, 3).reshape(b_, h_kv * n_c * g, bs, dim)
        kh = k_blocks[:, :, qb].reshape(b_, h_kv * n_c, bs, dim)
        vh = v_blocks[:, :, qb].reshape(b_, h_kv * n_c, bs, dim)
        o, l = flash_with_lse(qh, kh, vh, True, self.scale)
        o = o.reshape(b_, h_kv, n_c, g, bs, dim).transpose(2, 3).reshape(qc.shape)
        l = l.reshape(b_, h_kv, n_c, g, bs).transpose(2, 3).reshape(qc.shape[:4])
        return o.float() if o.dtype != torch.float64 else o, l

    def _masked(self, qc, k_blocks, v_blocks, kb, mask):
        """Element-masked attention of each query block over its partial key blocks (float32)."""
        b_, h_q, n_c, bs, dim = qc.shape
        h_kv, width = k_blocks.shape[1], kb.shape[1]
        g = h_q // h_kv
        acc = accumulation_dtype(qc.dtype)
        qg = qc.view(b_, h_kv, g, n_c, bs, dim).transpose(2, 3).to(acc)  # [B', Hkv', C, G, bs, D]
        qg = qg.reshape(b_, h_kv, n_c, g * bs, dim)
        kc = k_blocks[:, :, kb.flatten()].view(b_, h_kv, n_c, width * bs, dim).to(acc)
        vc = v_blocks[:, :, kb.flatten()].view(b_, h_kv, n_c, width * bs, dim).to(acc)
        scores = torch.matmul(qg, kc.transpose(-1, -2)).mul_(
            self.scale
        )  # [B', Hkv', C, G*bs, P*bs]
        view = scores.view(b_, h_kv, n_c, g, bs, width * bs)
        # mask [Bm, Hm, C, bs, P*bs] with Hm in {1, H'} -> [Bm, Hkv' or 1, C, G or 1, bs, P*bs]
        m = mask.reshape(mask.shape[0], -1, g if mask.shape[1] > 1 else 1, *mask.shape[2:])
        m = m.transpose(2, 3)
        view.masked_fill_(~m, -torch.inf)
        l = torch.logsumexp(scores, -1)  # [B', Hkv', C, G*bs]
        safe = torch.where(torch.isneginf(l), 0.0, l)
        probs = scores.sub_(safe.unsqueeze(-1)).exp_()
        o = torch.matmul(probs, vc)  # [B', Hkv', C, G*bs, D]
        o = o.view(b_, h_kv, n_c, g, bs, dim).transpose(2, 3).reshape(b_, h_q, n_c, bs, dim)
        l = l.view(b_, h_kv, n_c, g, bs).transpose(2, 3).reshape(b_, h_q, n_c, bs)
        return o, l


def _is_causal_diagonal(mask: torch.Tensor) -> bool:
    """Whether a chunk's single partial block per query block has exactly the lower-triangular mask,
    which SDPA's top-left causal kernel computes without materialising it."""
    bs = mask.shape[-1]
    if mask.shape[-2] != bs:
        return False
    tril = torch.ones(bs, bs, dtype=torch.bool, device=mask.device).tril()
    return bool((mask == tril).all())
