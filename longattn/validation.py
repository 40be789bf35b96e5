"""Input validation shared by every entry point: tensors, dtypes, shapes and positions.

Each check raises ``TypeError`` / ``ValueError`` naming the offending value, before anything is computed
or any cache is touched.
"""

from __future__ import annotations

import math
from typing import Any

import torch

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_increasing(kv_pos: torch.Tensor) -> None:
    """Real (non-padding) key positions must be strictly increasing along each row."""
    if kv_pos.shape[-1] < 2:
        return
    earlier = torch.cummax(kv_pos, dim=-1).values[:, :-1]  # largest position before each slot
    real = kv_pos[:, 1:] >= 0
    if not bool((kv_pos[:, 1:] > earlier)[real].all()):
        raise ValueError(
            "kv_positions must be strictly increasing along the sequence (-1 = padding)"
        )


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D] (4-D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if q.device.type == "cpu" and q.dtype not in CPU_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported on CPU (use float32 or bfloat16)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k has {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q has {q.shape[3]}, k has {k.shape[3]}")
    for name, size in (
        ("batch size", q.shape[0]),
        ("query heads", q.shape[1]),
        ("head_dim", q.shape[3]),
    ):
        if size == 0:
            raise ValueError(f"{name} must be >= 1, got 0 (q shape {tuple(q.shape)})")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )


def check_positions(
    pos: torch.Tensor, length: int, batch: int, name: str, device: torch.device
) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {pos.dtype}")
    if pos.dim() == 1:
        pos = pos.view(1, -1)
    if pos.dim() != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be [{length}] or [{batch}, {length}], got shape {tuple(pos.shape)}"
        )
    if pos.numel() and int(pos.min()) < -1:
        raise ValueError(f"{name} must be >= 0 (or -1 for padding), got {int(pos.min())}")
    return pos.to(device=device, dtype=torch.int64)


def needs_grad(*tensors: Any) -> bool:
    """Whether autograd records a call on ``tensors``: grad mode is on and one requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def backward_reason(has_backward: bool, *tensors: Any) -> str | None:
    """Why an implementation without a backward cannot run a call whose ``tensors`` autograd
    records (None: it can). Such an implementation's output would carry no gradient."""
    if has_backward or not needs_grad(*tensors):
        return None
    return (
        "it has no backward, and q, k or v requires grad (for inference, call under "
        "torch.no_grad() or pass detached tensors)"
    )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Queries, keys and values must be finite, padding and masked slots included: a masked slot's
    NaN would otherwise reach real queries through the kernels' P V products (0 * NaN = NaN), and
    the fused kernels return zeros, not NaN, for a NaN query. One pass over the tensor (min and max,
    which propagate NaN), no temporary of its size."""
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return
    where = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
    raise ValueError(
        f"{name} holds a non-finite value ({t[where].item()}) at [b, h, t, d] = {list(where)}; "
        "queries, keys and values must be finite, padding and masked slots included"
    )


def check_finite_all(*named: tuple[str, torch.Tensor]) -> None:
    """``check_finite`` of a few small tensors of one dtype (a decode step's q, k, v) by one
    reduction over their concatenation; when one is not finite, the per-tensor check names it."""
    flat = torch.cat([t.view(-1) if t.is_contiguous() else t.reshape(-1) for _, t in named])
    if flat.numel() == 0:
        return
    # a non-finite entry makes the sum non-finite; a finite sum that overflows only costs the
    # per-tensor checks, which then pass
    if math.isfinite(flat.sum().item()):
        return
    for name, t in named:
        check_finite(name, t)


def check_append_kv(
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    held: tuple[torch.Size, torch.dtype, torch.device] | None,
    finite: bool = True,
) -> None:
    """Validate the keys and values of an append to cache ``layer`` (types, shapes, dtype, device,
    finiteness unless ``finite`` is False: the caller checked it); ``held`` is the layer's (keys
    shape, dtype, device), None while it is empty."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, Hkv, T, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"k and v differ: {tuple(k.shape)} {k.dtype} {k.device} vs "
            f"{tuple(v.shape)} {v.dtype} {v.device}"
        )
    if not k.dtype.is_floating_point:
        raise TypeError(f"k, v must be floating point, got {k.dtype}")
    if finite:
        check_finite("k", k)
        check_finite("v", v)
    if held is not None:
        (b, h, _, d), dtype, device = held
        if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
            raise ValueError(
                f"layer {layer} holds [B={b}, Hkv={h}, D={d}]; cannot append "
                f"[B={k.shape[0]}, Hkv={k.shape[1]}, D={k.shape[3]}]"
            )
        if k.dtype != dtype or k.device != device:
            raise TypeError(
                f"layer {layer} holds {dtype} on {device}; cannot append {k.dtype} on {k.device}"
            )


def check_append_positions(
    positions: torch.Tensor, next_pos: torch.Tensor, batch: int, t_new: int
) -> torch.Tensor:
    """The positions [B, T_new] of an append: ``positions`` [T_new] or [B, T_new] int, -1 for
    padding, strictly increasing along each row and after ``next_pos`` [B] - 1 (what each row
    already holds)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point:
        raise TypeError("positions must be an integer torch.Tensor")
    if positions.dtype == torch.bool:
        raise TypeError("positions must be an integer torch.Tensor, not bool")
    pos = positions.to(device=next_pos.device, dtype=torch.int64)
    if pos.dim() == 1:
        pos = pos.view(1, -1)
    if pos.dim() != 2 or pos.shape[-1] != t_new or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"positions must be [{t_new}] or [{batch}, {t_new}], got {tuple(positions.shape)}"
        )
    pos = pos.expand(batch, t_new)
    if pos.numel() and int(pos.min()) < -1:
        raise ValueError(f"positions must be >= 0 (or -1 for padding), got {int(pos.min())}")
    running = torch.cummax(torch.cat([next_pos.view(-1, 1) - 1, pos], dim=1), dim=1).values
    # padding (-1) is exempt; an or, not a boolean index (which costs a nonzero and a gather)
    if not bool(((pos > running[:, :-1]) | (pos < 0)).all()):
        raise ValueError(
            "positions must be strictly increasing along each row and after the positions "
            f"the cache already holds (next free position per row: {next_pos.tolist()})"
        )
    return pos


def check_keep(
    layer: int, keep: Any, heads_shape: tuple[int, int], seq_len: int, device: torch.device
) -> torch.Tensor:
    """An eviction's ``keep`` as bool [B, Hkv, seq_len] on ``device`` (from [B, seq_len] or
    [B, Hkv, seq_len]) for a cache layer of ``heads_shape`` = (B, Hkv), or a clear error."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError("keep must be a bool torch.Tensor [B, seq_len] or [B, Hkv, seq_len]")
    batch, heads = heads_shape
    if tuple(keep.shape) == (batch, seq_len):
        keep = keep.unsqueeze(1).expand(batch, heads, -1)
    elif tuple(keep.shape) != (batch, heads, seq_len):
        raise ValueError(
            f"keep for layer {layer} must be [B, seq_len] = {[batch, seq_len]} or "
            f"[B, Hkv, seq_len] = {[batch, heads, seq_len]}, got {list(keep.shape)}"
        )
    return keep.to(device)
