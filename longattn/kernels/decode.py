"""Few-token (decode) attention over a whole KV cache or over gathered pages / tokens of it.

Attention only: the scorers that choose the pages / tokens (``row_mass``, the top-k) live in
``kernels/selection.py``.

Two implementations. The C++ one (``csrc/decode.cpp``, built on first use) reads the cache in
place: dense over a layer, or over a selection's pages / tokens straight from the cache storage (no
gather copy), each K/V row read once per step for the whole GQA group, split over the key axis across
threads and merged by log-sum-exp. The PyTorch one below runs on the CPU flash op:

The GQA group is folded into the query axis (``q.view(B, Hkv, G * Tq, D)``), so each KV head's keys and
values are read once per step by the CPU flash kernel instead of once per query head: on CPU this is
several times faster than ``scaled_dot_product_attention(enable_gqa=True)``. Position masks and
gathered K/V live in a ``Workspace`` that is reused across steps and layers (fresh multi-MB allocations
page-fault on every call).
"""

from __future__ import annotations

import math

import torch

from longattn.kernels import extension
from longattn.kernels.sdpa import flash_with_lse
from longattn.types import AttnOutput, accumulation_dtype

MAX_DECODE_QUERIES = 16
CPP_DTYPES = (torch.float32, torch.bfloat16)
CPP_MAX_DIM = 256


class Workspace:
    """Named reusable buffers; a request that fits in an existing buffer returns a view of it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:size].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None,
    kv_pos: torch.Tensor | None,
    causal: bool = True,
    hidden: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> AttnOutput:
    """Attention of a few queries over all of ``k, v``, masked by positions.

    q [B, H, Tq, D]; k, v [B, Hkv, T, D] (strided views are fine: the last axis must be contiguous;
    keys may hold fewer channels than values, Dk != Dv, where a cache layer's keys were pruned);
    q_pos [Bp, Tq] and kv_pos [Bp, T] or [B, Hkv, T] int64 with -1 for empty slots, or both None for
    "every key is visible". A key is visible to a query when its position is >= 0 and, if ``causal``,
    <= the query's position; ``hidden`` (bool, broadcastable to the folded [B, Hkv, G*Tq, T], True
    = not visible) hides more keys, e.g. a static pattern's mask.
    Returns ``AttnOutput(out [B, H, Tq, D], lse [B, H, Tq] float32, None)``;
    a query that sees no key gets zeros and ``lse = -inf``.
    """
    batch, n_heads, q_len, dim = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    rows = group * q_len
    if kv_len == 0 or q_len == 0:
        lse_dtype = accumulation_dtype(q.dtype)
        lse = torch.full((batch, n_heads, q_len), -torch.inf, dtype=lse_dtype, device=q.device)
        return AttnOutput(torch.zeros_like(q), lse, None)
    q_fold = q.reshape(batch, n_kv, rows, dim)  # [B, Hkv, G*Tq, D], row = g * Tq + t
    by_position = _hidden_keys(q_pos, kv_pos, group, causal)  # broadcastable to [B, Hkv, G*Tq, T]
    if hidden is None or by_position is None:
        hidden = by_position if hidden is None else hidden
    else:
        hidden = hidden | by_position
    bias = None
    if hidden is not None:
        ws = workspace if workspace is not None else Workspace()
        shape = torch.broadcast_shapes(hidden.shape, (1, 1, rows, kv_len))
        bias = ws.get("bias", shape, q.dtype, q.device).zero_().masked_fill_(hidden, -torch.inf)
    if k.shape[-1] != v.shape[-1]:  # channel-pruned keys: the flash kernel needs one head dim
        out, lse = _unequal_dims(q_fold, k, v, scale, bias)
    else:  # the CPU flash kernel reads each KV head once for its folded group, returns the lse
        out, lse = flash_with_lse(q_fold, k, v, False, scale, attn_mask=bias)
    if hidden is not None:
        empty = hidden.all(dim=-1).expand(batch, n_kv, rows)  # rows that see no key
        if bool(empty.any()):
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(empty, -torch.inf)
    return AttnOutput(
        out.reshape(batch, n_heads, q_len, v.shape[-1]),
        lse.reshape(batch, n_heads, q_len).to(accumulation_dtype(q.dtype)),
        None,
    )


def _unequal_dims(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hkv, R, Dv] in q's dtype, lse [B, Hkv, R]) of folded queries q [B, Hkv, R, Dk] over
    keys k [B, Hkv, T, Dk] and values v [B, Hkv, T, Dv] with Dk != Dv (a channel-pruned cache
    layer), accumulated in float32 (float64 for float64): two GEMMs reading each KV head once for
    its group, with a materialised [B, Hkv, R, T] score (R <= group * 16 decode rows)."""
    acc = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)  # [B, Hkv, R, T]
    if bias is not None:
        scores = scores + bias.to(acc)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, R]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)  # a row seeing nothing: 0
    return torch.matmul(probs, v.to(acc)).to(q.dtype), lse


def _hidden_keys(
    q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None, group: int, causal: bool
) -> torch.Tensor | None:
    """bool mask broadcastable to [B, Hkv, G*Tq, T] of keys a query must not see, or None if none."""
    if kv_pos is None:
        return None
    kp = kv_pos if kv_pos.dim() == 3 else kv_pos.unsqueeze(1)  # [B', Hkv', T]
    q_padded = q_pos is not None and bool((q_pos < 0).any())
    needs = q_padded or bool((kp < 0).any())
    if causal and q_pos is not None:
        needs = needs or int(kp.max()) > int(q_pos.min())
    if not needs:
        return None
    kp = kp.unsqueeze(2)  # [B', Hkv', 1, T]
    hidden = kp < 0
    if q_pos is not None:
        qp = q_pos.repeat(1, group).view(q_pos.shape[0], 1, -1, 1)  # [Bp, 1, G*Tq, 1]
        hidden = hidden | (qp < 0)
        if causal:
            hidden = hidden | (kp > qp)
    return hidden


def gather_selected(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    index: torch.Tensor,
    unit: int,
    workspace: Workspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy the selected pages / tokens of a cache layer into workspace buffers.

    keys, values: the layer's full contiguous storage [B, Hkv, cap, D] (cap a multiple of ``unit``);
    positions [B, cap]; index [B, Hi, n] (Hi = Hkv, or H for one selection per query head) entries
    of ``unit`` consecutive slots, -1 = unused.
    Returns k_sel, v_sel [B, Hi, n * unit, D] and their positions [B, Hi, n * unit] (-1 where unused).
    """
    batch, n_kv, cap, dim = keys.shape
    n_index = index.shape[1]  # Hkv, or H for one selection per query head
    n = index.shape[-1]
    per_row = cap // unit
    kv_head = torch.arange(n_index, device=keys.device) * n_kv // n_index  # [Hi]
    rows = torch.arange(batch, device=keys.device).view(-1, 1) * n_kv + kv_head  # [B, Hi]
    base = rows.view(batch, n_index, 1) * per_row
    flat = (base + index.clamp(min=0)).view(-1)  # [B*Hkv*n] rows of [unit*D]
    out_shape = (batch * n_index * n, unit * dim)
    k_sel = workspace.get("k_sel", out_shape, keys.dtype, keys.device)
    v_sel = workspace.get("v_sel", out_shape, keys.dtype, keys.device)
    torch.index_select(keys.view(-1, unit * dim), 0, flat, out=k_sel)
    torch.index_select(values.view(-1, unit * dim), 0, flat, out=v_sel)
    slots = index.clamp(min=0).unsqueeze(-1) * unit + torch.arange(unit, device=keys.device)
    pos = positions.gather(1, slots.view(batch, -1)).view(batch, n_index, n, unit)
    pos = pos.masked_fill((index < 0).unsqueeze(-1), -1).view(batch, n_index, n * unit)
    shape = (batch, n_index, n * unit, dim)
    return k_sel.view(shape), v_sel.view(shape), pos


def decode_cpp_unavailable(
    q: torch.Tensor, kv_dtype: torch.dtype | None = None, value_dim: int | None = None
) -> str | None:
    """Why the C++ decode kernels cannot take ``q`` (None: they can; builds them on first use);
    ``value_dim``: the values' head dim where it exceeds the keys' (a channel-pruned layer)."""
    if q.device.type != "cpu":
        return f"the C++ decode kernel runs on CPU, not {q.device.type}"
    if q.dtype not in CPP_DTYPES or (kv_dtype is not None and kv_dtype != q.dtype):
        return f"the C++ decode kernel runs float32 and bfloat16, not {q.dtype}"
    dim = max(q.shape[-1], value_dim or 0)
    if dim > CPP_MAX_DIM:
        return f"the C++ decode kernel takes head dim <= {CPP_MAX_DIM}, got {dim}"
    return extension.unavailable("decode")


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_dense_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    causal: bool = True,
) -> AttnOutput:
    """``decode_attention`` by the C++ kernel: q [B, H, Tq, Dk] over k [B, Hkv, T, Dk], v [B,
    Hkv, T, Dv] (Dk <= Dv: a channel-pruned layer's keys; strided views of a cache are read in
    place), q_pos [Bp, Tq], kv_pos [Bp, T] or [B, Hkv, T] (each KV head its own positions) int64
    (-1 = empty slot)."""
    out, lse = extension.load("decode").decode_dense(
        _last_contiguous(q), _last_contiguous(k), _last_contiguous(v), q_pos, kv_pos, scale, causal
    )
    return AttnOutput(out, lse, None)


def decode_selected_cpp(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    index: torch.Tensor,
    unit: int,
    *,
    scale: float,
    q_pos: torch.Tensor,
) -> AttnOutput:
    """Causal attention of q [B, H, Tq, D] over the selected entries of a cache layer, read in place.

    keys, values: the layer's full storage [B, Hkv, cap, D]; positions [B, cap] (-1 = empty);
    index [B, Hkv, n] (shared by each KV head's query heads) or [B, H, n] (one selection per query
    head), entries of ``unit`` consecutive slots, -1 = unused.
    """
    out, lse = extension.load("decode").decode_selected(
        _last_contiguous(q), keys, values, positions, index, unit, q_pos, scale, True
    )
    return AttnOutput(out, lse, None)


def decode_step_cpp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: torch.Tensor,
    row_len: torch.Tensor,
    next_pos: torch.Tensor,
    scale: float,
    channels: torch.Tensor | None = None,
    sink_window: tuple[int, int] | None = None,
) -> tuple[list[torch.Tensor], int, int]:
    """One decode step of a cache layer of one row by the C++ kernel: ``k, v`` [1, Hkv, 1, D]
    written at each KV head's slot ``row_len`` [1, Hkv] of the storage ``keys``, ``values`` [1,
    Hkv, cap, D] and ``pos`` [1, Hkv, cap] (position ``next_pos`` [1]; each slot written must be
    empty), then ``q`` [1, H, 1, D] over slots [0, max(row_len) + 1), causal, every KV head by its
    own positions. ``channels`` [1, Hkv, Dk] int64: a channel-pruned layer's kept key channels (k
    and q reduced to them). ``sink_window`` (sinks, window): only the positions below ``sinks``
    and the last ``window`` ones are seen. Returns ([out, lse, row_len + 1, next_pos + 1], the
    shortest row before the write, the most real keys of a KV head that no later query of
    ``sink_window`` sees (0 without it)); ([], 0, 0) with nothing written when q, k or v holds a
    non-finite value."""
    sinks, window = (0, 0) if sink_window is None else sink_window
    return extension.load("decode").decode_step(
        q, k, v, keys, values, pos, row_len, next_pos, scale, channels, sinks, window
    )
