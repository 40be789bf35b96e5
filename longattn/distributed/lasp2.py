"""LASP-2: sequence-parallel linear attention with one all-gather of fixed-size states.

Sun et al. 2025, LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid,
arXiv:2502.07563. Each rank holds a contiguous shard (``layout.py``'s rule). It computes its shard's
state ``S_r = sum_t w_t phi(k_t) [v_t, 1]^T`` (``w_t``: the decay from token t to the shard's end)
and the shard's total decay ``D_r``; ONE all-gather shares ``(S_r, log D_r)`` — [B, Hkv, F, Dv + 1]
plus [B, Hkv, F], independent of T. Rank r folds the earlier ranks' states in order,
``S_in = D_{r-1} (... (D_1 S_0 + S_1) ...) + S_{r-1}``, and runs the engine
(``kernels.linear.linear_attention``) on its shard with ``state=S_in``: exact against one process.
``causal=False``: every rank's output reads the sum of all states.

Deviation from paper: the delta rule (``beta``, Gated DeltaNet) is refused: its state transition
depends on the state, so chunk states do not combine by a decay and a sum. A softmax ``window`` is
refused too (it would need the previous rank's last keys).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from longattn import linear
from longattn.distributed import comm
from longattn.distributed.ring import check_lengths
from longattn.kernels.linear import LinearState, linear_attention
from longattn.method import LinearAttention
from longattn.types import AttnOutput
from longattn.validation import check_tensors


def _meta(q, k, v, method, scale, impl) -> dict:
    check_tensors(q, k, v)
    if impl not in ("auto", "torch", "native"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'native', got {impl!r}")
    if not isinstance(method, LinearAttention) or method.hook != "feature_map":
        raise TypeError(
            f"method must be a feature-map LinearAttention, got {type(method).__name__}"
        )
    if method.window:
        raise ValueError(f"{method.name}: window={method.window} is not supported by LASP-2")
    if scale is not None and (isinstance(scale, bool) or not math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"each rank's queries and keys are the same tokens: q has {q.shape[2]}, k {k.shape[2]}"
        )
    return {"length": q.shape[2], "dtype": str(q.dtype), "batch": q.shape[0],
            "query heads": q.shape[1], "kv heads": k.shape[1], "head_dim": q.shape[3],
            "value dim": v.shape[3], "method": method.describe(), "scale": scale}  # fmt: skip


def _token_log_gates(log_decay: torch.Tensor | None, phi_k: torch.Tensor):
    """Per-token log gates broadcastable to [B, Hkv, T, F] (None: no decay)."""
    if log_decay is None:
        return None
    if log_decay.dim() == 1:  # fixed per KV head: [Hkv]
        return log_decay.view(1, -1, 1, 1).expand(1, -1, phi_k.shape[2], 1)
    if log_decay.dim() == 3:  # per head and token: [B, Hkv, T]
        return log_decay.unsqueeze(-1)
    return log_decay  # per channel: [B, Hkv, T, F]


def local_state(phi_k, values, log_decay):
    """(S [B, Hkv, F, Dv'], log total decay [B, Hkv, F]) of a shard started from a zero state."""
    batch, n_kv, _, feat = phi_k.shape
    gates = _token_log_gates(log_decay, phi_k)
    if gates is None:
        return phi_k.transpose(-1, -2) @ values, phi_k.new_zeros(batch, n_kv, feat)
    cum = gates.cumsum(dim=2)  # [., Hkv, T, F or 1]
    total = cum[:, :, -1:]
    weighted = phi_k * (total - cum).exp()  # each key decayed to the shard's end
    log_total = total.squeeze(2).expand(batch, n_kv, feat)
    return weighted.transpose(-1, -2) @ values, log_total.contiguous()


def _fold(parts: list[tuple[torch.Tensor, torch.Tensor]], rank: int, causal: bool):
    """The state this rank starts from: earlier ranks' states decayed over the shards between
    (causal), or every rank's state summed (non-causal)."""
    if not causal:
        return sum(s for s, _ in parts)
    state = torch.zeros_like(parts[0][0])
    for s, log_total in parts[:rank]:
        state = state * log_total.exp().unsqueeze(-1) + s  # rows are the key features
    return state


def lasp2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    method: LinearAttention | None = None,
    scale: float | None = None,
    timeout: float = comm.DEFAULT_TIMEOUT_S,
    impl: str = "auto",
) -> AttnOutput:
    """Linear attention of this rank's contiguous shard q [B, H, T_r, D], k, v [B, Hkv, T_r, D]
    over the whole sequence (see the module doc). ``method``: a feature-map ``LinearAttention``
    (default ``elu_linear``). Returns ``AttnOutput(out in v's dtype, None, state)``: ``state`` is
    the ``LinearState`` after this rank's last token (causal; None for ``causal=False``).
    ``impl``: the engine's (``kernels.linear.linear_attention``: "auto", "torch", "native")."""
    from longattn.methods.elu_linear import EluLinear

    method = EluLinear() if method is None else method
    wait = comm.check_timeout(timeout)
    rank, world = comm.rank_world(group)
    metas = comm.agree(group, world, lambda: _meta(q, k, v, method, scale, impl))
    comm.check_same(metas, ("dtype", "batch", "query heads", "kv heads", "head_dim", "value dim",
                            "method", "scale"))  # fmt: skip
    check_lengths([m["length"] for m in metas], "contiguous")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    error, parts, features = None, None, None
    try:
        features = linear.feature_inputs(method, q, k, 0, scale, None)
        if features[3] is not None:
            raise ValueError(f"{method.name}: the delta rule (beta) is not supported by LASP-2")
        values = torch.nn.functional.pad(v.to(features[0].dtype), (0, 1), value=1.0)
        state, log_total = local_state(features[1], values, features[2])
    except Exception as exc:  # held; the flag in the all-gather fails every rank
        error = exc
        state, log_total = _placeholder(metas[0], features, q)
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=state.dtype)
    packed = torch.cat([state.flatten(), log_total.flatten(), flag])
    gathered = comm.all_gather(packed, world, group, wait) if world > 1 else [packed]
    if error is not None or any(g[-1] != 0 for g in gathered):
        comm.settle(group, world, error)
    parts = [(g[: state.numel()].view_as(state), g[state.numel() : -1].view_as(log_total))
             for g in gathered]  # fmt: skip
    return _local_output(method, features, v, _fold(parts, rank, method.causal), impl)


def _placeholder(meta: dict, features, q):
    """Zero state and decay of the agreed shape, so a failed rank still joins the all-gather."""
    feat = features[1].shape[-1] if features is not None else meta["head_dim"]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (meta["batch"], meta["kv heads"], feat)
    return torch.zeros(*shape, meta["value dim"] + 1, dtype=acc), torch.zeros(shape, dtype=acc)


def _local_output(method, features, v, state_in, impl):
    phi_q, phi_k, log_decay, _ = features
    values_dtype = phi_q.dtype
    if method.causal:
        k_sum = state_in[..., -1].contiguous() if method.normalize else None
        out, state = linear_attention(
            phi_q, phi_k, v.to(values_dtype), causal=True, chunk_size=method.chunk_size,
            log_decay=log_decay, normalize=method.normalize,
            state=LinearState(state_in[..., :-1].contiguous(), k_sum), impl=impl,
        )  # fmt: skip
        return AttnOutput(out.to(v.dtype), None, state)
    batch, n_heads, q_len, feat = phi_q.shape
    n_kv = state_in.shape[1]
    rows = phi_q.reshape(batch, n_kv, -1, feat) @ state_in  # [B, Hkv, G*Tq, Dv + 1]
    rows = rows.view(batch, n_heads, q_len, -1)
    if method.normalize:
        den = rows[..., -1:]
        out = (rows[..., :-1] / den).masked_fill(den == 0, 0.0)
    else:
        out = rows[..., :-1]
    return AttnOutput(out.to(v.dtype), None, None)
