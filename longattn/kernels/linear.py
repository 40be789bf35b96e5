"""Chunked and recurrent linear attention with decay, gates and the delta rule.

Causal chunkwise evaluation as Lightning Attention does (Qin et al. 2024, arXiv:2401.04658): inside a
chunk of C tokens the quadratic form, between chunks a carried state ``S = sum_s w_s k_s v_s^T``.
Transitions: none (Katharopoulos et al. 2020, arXiv:2006.16236), a fixed per-head decay (RetNet,
arXiv:2307.08621), a data-dependent gate per head or per channel (GLA, arXiv:2312.06635; Kimi Delta
Attention, arXiv:2510.26692), and the (gated) delta rule in its chunkwise WY/UT form (DeltaNet,
arXiv:2406.06484; Gated DeltaNet, arXiv:2412.06464). An optional exact softmax window over the last
keys shares the normaliser with the linear part (BASED, arXiv:2402.18668), and the first keys may be
held exact too, as attention sinks (StreamingLLM, arXiv:2309.17453).

Layout: q [B, H, Tq, F], k [B, Hkv, Tk, F], v [B, Hkv, Tk, Dv]; a KV head's G = H / Hkv query heads
are folded into the rows of one product, so k and v are never expanded over the group. Accumulation
is float32 for float32 / bfloat16 inputs and float64 for float64 inputs; the output is in v's dtype.
The normaliser rides along as one extra value column of ones, so numerator and denominator share
every product and the state ``[F, Dv + 1]`` holds ``kv`` and ``k_sum`` together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from longattn.types import accumulation_dtype

Tensor = torch.Tensor

# Sub-chunk length of the per-channel gate's intra-chunk product (see ``_pairwise_channel``).
CHANNEL_SUBCHUNK = 16
# Elements of a [.., c, c, F] per-channel weight block built at once: bounds that path's memory.
CHANNEL_BLOCK_ELEMENTS = 1 << 23
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
NATIVE = "linear"  # csrc/linear.cpp


class LinearState(NamedTuple):
    """The carried state of causal linear attention after the last key a call absorbed.

    kv:    [B, Hkv, F, Dv] sum of decayed ``k_s v_s^T`` (float32; float64 for float64 inputs).
    k_sum: [B, Hkv, F] the normaliser's sum of decayed ``k_s``; None when ``normalize=False``."""

    kv: Tensor
    k_sum: Tensor | None


class _Spec(NamedTuple):
    """A validated call: the accumulation dtype, the gate kind and the shapes."""

    acc: torch.dtype
    gate: str  # "none", "fixed", "head", "channel"
    group: int
    q_len: int
    kv_len: int


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    chunk_size: int = 64,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
    state: LinearState | None = None,
    window: int = 0,
    q_raw: Tensor | None = None,
    k_raw: Tensor | None = None,
    scale: float | None = None,
    sinks: int = 0,
    impl: str = "auto",
) -> tuple[Tensor, LinearState | None]:
    """Linear attention ``out_t = q_t^T S_t`` (``/ q_t . z_t`` when ``normalize``), chunkwise.

    q [B, H, Tq, F] features of the queries, the last Tq positions of the keys; k [B, Hkv, Tk, F];
    v [B, Hkv, Tk, Dv]. Causal: query t sees the keys s <= t of this call and the carried ``state``
    (every earlier token). The weight of key s at query t is ``prod_{s<r<=t} a_r`` with
    ``a = exp(log_decay)``: ``log_decay`` None, [Hkv] (fixed), [B, Hkv, Tk] (per-head gate) or
    [B, Hkv, Tk, F] (per-channel gate), values <= 0. ``beta`` [B, Hkv, Tk] in [0, 1]: the delta
    rule ``S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + b_t k_t v_t^T`` (the decay is applied
    first, as Kimi Delta Attention does; for a per-head gate this is ``a_t (I - b k k^T) S_{t-1}``).
    ``window > 0``: keys with ``t - s < window`` are weighted by ``exp(scale q_raw_t . k_raw_s)``
    instead of ``q_t . k_s`` (the decay weights every key alike), one shared normaliser; the
    returned state then excludes the call's last ``window`` keys, which the caller holds and passes
    again in front of the next call's k / v / k_raw (queries stay the last Tq positions).
    ``sinks > 0`` (with a window and no decay): the call's first ``sinks`` keys are attention sinks,
    weighted like window keys by every later query and never entering the state; the caller passes
    them again in front of each later call (before the held window keys: their positions need not
    be contiguous with the window's, as no decay reads them).
    Non-causal: every query sees every key; no decay, delta rule, window or state.

    ``impl``: "torch" (batched products over all chunks), "native" (the C++ kernel, float32 /
    bfloat16, causal, no gate but a fixed decay, no delta rule or window, Tq = Tk; raises with the
    reason where it cannot run; it has no backward, so not for inputs that require grad) or "auto"
    (native where it can run, else torch).

    Returns (out [B, H, Tq, Dv] in v's dtype, the state after the call's keys; None if not causal).
    Rows whose denominator is exactly 0 give 0."""
    spec = _validate(q, k, v, causal, chunk_size, log_decay, beta, normalize, state, window, sinks)
    if impl not in ("auto", "torch", "native"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'native', got {impl!r}")
    if impl != "torch":
        reason = native_unavailable(q, causal, spec, beta, window)
        if reason is None and torch.is_grad_enabled():
            if any(t is not None and t.requires_grad for t in (q, k, v, log_decay)):
                reason = "it has no backward, and the inputs require grad"
        if reason is None:
            return _native(q, k, v, log_decay, normalize, state, chunk_size, spec)
        if impl == "native":
            raise ValueError(f"impl='native' cannot run this call: {reason}")
    if window:
        q_raw, k_raw, scale = _validate_window(q, k, q_raw, k_raw, scale, spec)
    if not causal:
        return _finish(_noncausal(q, k, v, normalize, spec), v, normalize), None
    values = _augment(v, normalize, spec.acc)
    s_in = _state_in(state, k, values)
    if window:
        out, s_out = _windowed(q, k, values, q_raw, k_raw, scale, log_decay, s_in, window,
                               chunk_size, spec, sinks)  # fmt: skip
    else:
        q_full = _align_queries(q, spec)
        out, s_out = _chunkwise(q_full, k, values, log_decay, beta, s_in, chunk_size, spec)
        out = out[:, :, spec.kv_len - spec.q_len :]
    return _finish(out, v, normalize), _state_out(s_out, normalize)


def native_unavailable(q: Tensor, causal: bool, spec: _Spec, beta, window: int) -> str | None:
    """Why the C++ kernel (``csrc/linear.cpp``) cannot run a validated call (None: it can)."""
    if not causal or beta is not None or window or spec.gate not in ("none", "fixed"):
        return "it runs causal calls with no gate but a fixed decay, no delta rule, no window"
    if q.dtype not in (torch.float32, torch.bfloat16) or q.device.type != "cpu":
        return f"it runs float32 / bfloat16 on CPU, not {q.dtype} on {q.device.type}"
    if spec.q_len != spec.kv_len:
        return f"it needs as many queries as keys (got {spec.q_len} and {spec.kv_len})"
    from longattn.kernels import extension

    return extension.unavailable(NATIVE)


def _native(q, k, v, log_decay, normalize, state, chunk, spec) -> tuple[Tensor, LinearState]:
    """The C++ kernel (float32 accumulation; bfloat16 tiles are widened in cache)."""
    from longattn.kernels import extension

    batch, n_kv, _, feat = k.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    if state is None:
        kv = torch.zeros(batch, n_kv, feat, v.shape[-1])
        k_sum = torch.zeros(batch, n_kv, feat) if normalize else None
    else:
        kv = state.kv.clone(memory_format=torch.contiguous_format)
        k_sum = None if state.k_sum is None else state.k_sum.clone().contiguous()
    log_gamma = torch.empty(0, dtype=torch.float64)
    if log_decay is not None:
        log_gamma = log_decay.to(torch.float64).contiguous()
    chunk = max(1, min(chunk, spec.kv_len))
    empty = torch.empty(0)
    out = extension.load(NATIVE).forward(
        q, k, v, kv, empty if k_sum is None else k_sum, log_gamma, chunk, normalize
    )
    return out, LinearState(kv, k_sum)


def linear_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    chunk_size: int = 64,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    normalize: bool = True,
    state: LinearState | None = None,
    window: int = 0,
    q_raw: Tensor | None = None,
    k_raw: Tensor | None = None,
    scale: float | None = None,
    sinks: int = 0,
) -> tuple[Tensor, LinearState | None]:
    """``linear_attention`` token by token (the decode path, and a second form to check against):
    the state absorbs one key per step and each query reads it. Same arguments and results;
    ``chunk_size`` is accepted and unused; non-causal calls run the chunkwise form."""
    spec = _validate(q, k, v, causal, chunk_size, log_decay, beta, normalize, state, window, sinks)
    if window:
        q_raw, k_raw, scale = _validate_window(q, k, q_raw, k_raw, scale, spec)
    if not causal:
        return _finish(_noncausal(q, k, v, normalize, spec), v, normalize), None
    values = _augment(v, normalize, spec.acc)
    s_in = _state_in(state, k, values)
    logs = _log_gates(log_decay, k, spec)
    b = None if beta is None else beta.to(spec.acc)
    batch, n_kv, kv_len, _ = k.shape
    qg = q.to(spec.acc).view(batch, n_kv, spec.group, spec.q_len, -1)  # [B, Hkv, G, Tq, F]
    kk = _without_sinks(k.to(spec.acc), sinks)  # a sink folded into the state adds nothing
    offset = kv_len - spec.q_len
    outs = []
    s = s_in
    for t in range(kv_len):
        if window:
            u = t - window  # the key that leaves the window before query t
            if u >= 0:
                s = _recurrent_step(s, kk[:, :, u], values[:, :, u], logs, u, None)
        else:
            s = _recurrent_step(s, kk[:, :, t], values[:, :, t], logs, t, b)
        if t < offset:
            continue
        qt = qg[:, :, :, t - offset]  # [B, Hkv, G, F]
        if window:
            outs.append(
                _window_step(qt, s, t, q_raw, k_raw, kk, values, logs, scale, window, spec, sinks)
            )
        else:
            outs.append(qt @ s)  # [B, Hkv, G, Dv']
    out = torch.stack(outs, dim=3) if outs else qg.new_zeros(*qg.shape[:4], values.shape[-1])
    out = out.reshape(batch, n_kv * spec.group, spec.q_len, -1)
    return _finish(out, v, normalize), _state_out(s, normalize)


def _recurrent_step(s: Tensor, kt: Tensor, vt: Tensor, logs, t: int, b: Tensor | None) -> Tensor:
    """One token: ``S = diag(a_t) S``, then the delta correction or the plain ``+ k v^T``.
    s [B, Hkv, F, Dv'], kt [B, Hkv, F], vt [B, Hkv, Dv']."""
    if logs is not None:
        gate = logs[:, :, t].exp()  # [B, Hkv] or [B, Hkv, F]
        s = s * (gate[..., None, None] if gate.dim() == 2 else gate[..., None])
    if b is not None:
        bt = b[:, :, t, None]  # [B, Hkv, 1]
        vt = bt * (vt - (kt[..., None, :] @ s).squeeze(-2))  # [B, Hkv, Dv]: b (v - S^T k)
    # S + k v^T as one batched rank-1 update: [B*Hkv, F, Dv']
    update = torch.baddbmm(s.flatten(0, 1), kt.flatten(0, 1)[..., None], vt.flatten(0, 1)[:, None])
    return update.view(s.shape)


def _window_step(qt, s, t, q_raw, k_raw, kk, values, logs, scale, window, spec, sinks) -> Tensor:
    """Query t of a windowed recurrent call: exact softmax weights on keys t-window < s <= t
    (and the sinks before them), the linear state (the other keys <= t - window) read with the
    decay to t, one shared normaliser."""
    batch, n_kv = kk.shape[:2]
    lo = max(0, t - window + 1)
    offset = spec.kv_len - spec.q_len
    qr = q_raw[:, :, t - offset].to(spec.acc).view(batch, n_kv, spec.group, 1, -1)
    seen = torch.cat([torch.arange(min(sinks, lo)), torch.arange(lo, t + 1)])  # exact keys
    kr = k_raw[:, :, seen].to(spec.acc)  # [B, Hkv, w, Dr]
    scores = (qr @ kr[:, :, None].transpose(-1, -2)).squeeze(-2) * scale  # [B, Hkv, G, w]
    shift = scores.amax(dim=-1, keepdim=True).clamp(min=0.0)  # [B, Hkv, G, 1]
    weights = (scores - shift).exp()
    lin = qt @ s  # [B, Hkv, G, Dv']
    if logs is not None:
        log_gamma = logs[:, :, 0]  # [B, Hkv]: the fixed decay's log
        ages = torch.arange(t - lo, -1, -1, dtype=spec.acc)  # t - s over the window
        weights = weights * (log_gamma[..., None, None] * ages).exp()
        lin = lin * (log_gamma * min(window, t + 1)).exp()[..., None, None]
    exact = weights @ values[:, :, seen]  # [B, Hkv, G, w] @ [B, Hkv, w, Dv']
    return exact + (-shift).exp() * lin


def _check_sinks(sinks, window: int, log_decay) -> None:
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if sinks and (not window or log_decay is not None):
        raise ValueError(f"sinks={sinks} needs a window (window={window}) and no decay (the sinks "
                         "are exact keys of every query, whatever their age)")  # fmt: skip


def _without_sinks(k: Tensor, sinks: int) -> Tensor:
    """The keys' features with the first ``sinks`` zeroed: they add nothing to the linear part."""
    if not sinks:
        return k
    k = k.clone()
    k[:, :, :sinks] = 0
    return k


def _validate(
    q, k, v, causal, chunk_size, log_decay, beta, normalize, state, window, sinks=0
) -> _Spec:
    """Check shapes, dtypes and options; raise ValueError / TypeError naming the bad value."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, T, dim], got shape {tuple(t.shape)}")
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} not supported; use one of {INPUT_DTYPES}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    batch, n_heads, q_len, feat = q.shape
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[1] != v.shape[1]:
        raise ValueError(f"batch/head mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")  # fmt: skip
    n_kv, kv_len = k.shape[1], k.shape[2]
    if v.shape[2] != kv_len:
        raise ValueError(f"k and v lengths differ: {kv_len} vs {v.shape[2]}")
    if feat <= 0 or k.shape[3] != feat:
        raise ValueError(f"feature dims must match and be > 0: q {feat}, k {k.shape[3]}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"query heads {n_heads} not a multiple of kv heads {n_kv}")
    if causal and q_len > kv_len:
        raise ValueError(f"causal: q_len {q_len} > kv_len {kv_len} (queries are the last keys)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    acc = accumulation_dtype(q.dtype)
    gate = _check_gates(log_decay, beta, k, causal, normalize, window)
    if not causal and state is not None:
        raise ValueError("state is only carried by causal calls (causal=False got a state)")
    if state is not None:
        _check_state(state, batch, n_kv, feat, v.shape[3], normalize, acc)
    _check_sinks(sinks, window, log_decay)
    return _Spec(acc, gate, n_heads // n_kv, q_len, kv_len)


def _check_gates(log_decay, beta, k, causal, normalize, window) -> str:
    batch, n_kv, kv_len, feat = k.shape
    gate = "none"
    if log_decay is not None:
        shapes = {
            (n_kv,): "fixed",
            (batch, n_kv, kv_len): "head",
            (batch, n_kv, kv_len, feat): "channel",
        }
        gate = shapes.get(tuple(log_decay.shape))
        if gate is None:
            raise ValueError(
                f"log_decay shape {tuple(log_decay.shape)} is none of [Hkv]={[n_kv]}, "
                f"[B, Hkv, T]={[batch, n_kv, kv_len]}, [B, Hkv, T, F]={[batch, n_kv, kv_len, feat]}"
            )
        if not log_decay.is_floating_point():
            raise TypeError(f"log_decay must be floating point, got {log_decay.dtype}")
        if not bool(torch.isfinite(log_decay).all()) or bool((log_decay > 0).any()):
            raise ValueError("log_decay must be finite and <= 0 (the log of a gate in (0, 1])")
    if beta is not None:
        if tuple(beta.shape) != (batch, n_kv, kv_len):
            raise ValueError(
                f"beta shape {tuple(beta.shape)} != [B, Hkv, T] {[batch, n_kv, kv_len]}"
            )
        if not beta.is_floating_point() or bool(((beta < 0) | (beta > 1) | beta.isnan()).any()):
            raise ValueError("beta must be floating point with values in [0, 1]")
        if normalize:
            raise ValueError("beta (the delta rule) needs normalize=False: its state has no "
                             "sum-of-features normaliser")  # fmt: skip
    if not causal and (gate != "none" or beta is not None or window):
        raise ValueError(f"causal=False takes no log_decay/beta/window (got gate={gate}, "
                         f"beta={'set' if beta is not None else None}, window={window})")  # fmt: skip
    if window and (gate not in ("none", "fixed") or beta is not None or not normalize):
        raise ValueError(f"window={window} needs normalize=True and no gate other than a fixed "
                         f"decay (got log_decay kind {gate}, beta "
                         f"{'set' if beta is not None else None}, normalize={normalize})")  # fmt: skip
    return gate


def _check_state(state, batch, n_kv, feat, dv, normalize, acc) -> None:
    if not isinstance(state, LinearState):
        raise TypeError(f"state must be a LinearState, got {type(state).__name__}")
    if tuple(state.kv.shape) != (batch, n_kv, feat, dv):
        raise ValueError(f"state.kv shape {tuple(state.kv.shape)} != [B, Hkv, F, Dv] "
                         f"{[batch, n_kv, feat, dv]}")  # fmt: skip
    if state.kv.dtype != acc:
        raise TypeError(f"state.kv dtype {state.kv.dtype} != accumulation dtype {acc}")
    if normalize != (state.k_sum is not None):
        raise ValueError(f"state.k_sum must be {'a tensor' if normalize else 'None'} when "
                         f"normalize={normalize}")  # fmt: skip
    if state.k_sum is not None:
        if tuple(state.k_sum.shape) != (batch, n_kv, feat):
            raise ValueError(f"state.k_sum shape {tuple(state.k_sum.shape)} != [B, Hkv, F] "
                             f"{[batch, n_kv, feat]}")  # fmt: skip
        if state.k_sum.dtype != acc:
            raise TypeError(f"state.k_sum dtype {state.k_sum.dtype} != accumulation dtype {acc}")


def _validate_window(q, k, q_raw, k_raw, scale, spec):
    if q_raw is None or k_raw is None:
        raise ValueError("window > 0 needs q_raw and k_raw (the raw queries and keys)")
    if q_raw.shape[:3] != q.shape[:3] or k_raw.shape[:3] != k.shape[:3]:
        raise ValueError(f"q_raw {tuple(q_raw.shape)} / k_raw {tuple(k_raw.shape)} must match "
                         f"q {tuple(q.shape[:3])} / k {tuple(k.shape[:3])} in [B, heads, T]")  # fmt: skip
    if q_raw.shape[3] != k_raw.shape[3]:
        raise ValueError(f"q_raw and k_raw head dims differ: {q_raw.shape[3]} vs {k_raw.shape[3]}")
    if scale is None:
        scale = 1.0 / math.sqrt(q_raw.shape[3])
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return q_raw, k_raw, float(scale)


def _augment(v: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    """v [B, Hkv, T, Dv] in acc, with a column of ones appended when normalising: [.., Dv + 1]."""
    v = v.to(acc)
    return F.pad(v, (0, 1), value=1.0) if normalize else v


def _state_in(state: LinearState | None, k: Tensor, values: Tensor) -> Tensor:
    """The carried state as one [B, Hkv, F, Dv'] tensor (zeros without one)."""
    batch, n_kv, _, feat = k.shape
    if state is None:
        return values.new_zeros(batch, n_kv, feat, values.shape[-1])
    if state.k_sum is None:
        return state.kv.clone()
    return torch.cat([state.kv, state.k_sum[..., None]], dim=-1)


def _state_out(s: Tensor, normalize: bool) -> LinearState:
    if normalize:
        return LinearState(s[..., :-1].contiguous(), s[..., -1].contiguous())
    return LinearState(s, None)


def _finish(out: Tensor, v: Tensor, normalize: bool) -> Tensor:
    """[B, H, Tq, Dv'] accumulated -> the output in v's dtype (divided by the normaliser column)."""
    if normalize:
        num, den = out[..., :-1], out[..., -1:]
        if torch.is_grad_enabled():  # autograd keeps num for the division's gradient
            out = (num / den).masked_fill(den == 0, 0.0)
        else:  # in place: no T x Dv temporaries
            out = num.div_(den).masked_fill_(den == 0, 0.0)
    return out.to(v.dtype).contiguous()


def _align_queries(q: Tensor, spec: _Spec) -> Tensor:
    """Queries padded in front with zero rows so that query i sits at key position i."""
    q = q.to(spec.acc)
    extra = spec.kv_len - spec.q_len
    return F.pad(q, (0, 0, extra, 0)) if extra else q


def _noncausal(q: Tensor, k: Tensor, v: Tensor, normalize: bool, spec: _Spec) -> Tensor:
    batch, n_kv = k.shape[:2]
    values = _augment(v, normalize, spec.acc)
    kv = k.to(spec.acc).transpose(-1, -2) @ values  # [B, Hkv, F, Dv']
    rows = q.to(spec.acc).reshape(batch, n_kv, spec.group * spec.q_len, -1)  # [B, Hkv, G*Tq, F]
    return (rows @ kv).view(batch, n_kv * spec.group, spec.q_len, -1)


def _log_gates(log_decay: Tensor | None, k: Tensor, spec: _Spec) -> Tensor | None:
    """log_decay in acc as [B, Hkv, T] (fixed and per-head) or [B, Hkv, T, F]; None: no decay."""
    if log_decay is None:
        return None
    batch, n_kv, kv_len, _ = k.shape
    if spec.gate == "fixed":
        return log_decay.to(spec.acc).view(1, n_kv, 1).expand(batch, n_kv, kv_len)
    return log_decay.to(spec.acc)


def _chunkwise(q, k, values, log_decay, beta, s_in, chunk, spec) -> tuple[Tensor, Tensor]:
    """Causal chunkwise form over aligned queries. q [B, H, T, F] (acc), k [B, Hkv, T, F],
    values [B, Hkv, T, Dv'] (acc), s_in [B, Hkv, F, Dv']. Returns (out [B, H, T, Dv'], state)."""
    batch, n_kv, length, feat = k.shape
    group, dv = spec.group, values.shape[-1]
    if length == 0:
        return q.new_zeros(batch, n_kv * group, 0, dv), s_in
    chunk = min(chunk, length)
    n = -(-length // chunk)
    pad = n * chunk - length  # zero keys, values, gates and betas at the end change nothing
    logs = _log_gates(log_decay, k, spec)
    kk, q = k.to(spec.acc), q.to(spec.acc)
    if pad:
        q, kk, values = (F.pad(t, (0, 0, 0, pad)) for t in (q, kk, values))
        logs = (
            None if logs is None else F.pad(logs, (0, 0, 0, pad) if logs.dim() == 4 else (0, pad))
        )
        beta = None if beta is None else F.pad(beta, (0, pad))
    q6 = q.view(batch, n_kv, group, n, chunk, feat).transpose(2, 3)  # [B, Hkv, n, G, C, F]
    k5 = kk.view(batch, n_kv, n, chunk, feat)  # [B, Hkv, n, C, F]
    v5 = values.view(batch, n_kv, n, chunk, dv)
    cum = None  # log gates summed from the chunk start, inclusive: [B, Hkv, n, C(, F)]
    if logs is not None:
        cum = logs.reshape(batch, n_kv, n, chunk, *logs.shape[3:]).cumsum(dim=3)
    if beta is None:
        out, s_out = _plain_chunks(q6, k5, v5, cum, s_in)
    else:
        b5 = beta.to(spec.acc).reshape(batch, n_kv, n, chunk)
        out, s_out = _delta_chunks(q6, k5, v5, cum, b5, s_in)
    # out [B, Hkv, n, G, C, Dv'] -> [B, H, T, Dv']
    out = out.transpose(2, 3).reshape(batch, n_kv * group, n * chunk, dv)
    return out[:, :, :length], s_out


def _row_factor(cum: Tensor | None, ref: Tensor | None = None) -> Tensor | None:
    """exp(cum - ref) shaped to scale rows [.., C, F]: scalar gates get a trailing 1."""
    if cum is None:
        return None
    diff = cum if ref is None else cum - ref
    return diff.exp() if diff.dim() == 5 else diff.exp()[..., None]


def _chunk_gate(last: Tensor | None) -> Tensor | None:
    """A chunk's whole decay ``exp(cum_C)`` shaped to scale a state's rows: [B, Hkv, n, 1 or F, 1]
    from ``last`` [B, Hkv, n, 1] (per head) or [B, Hkv, n, 1, F] (per channel)."""
    if last is None:
        return None
    return last.exp()[..., None] if last.dim() == 4 else last.exp().transpose(-1, -2)


def _plain_chunks(q6, k5, v5, cum, s_in) -> tuple[Tensor, Tensor]:
    """Chunkwise linear attention without the delta rule: intra-chunk quadratic form, per-chunk
    state contributions in one batched product, then a scan over chunks."""
    pair = _pairwise(q6, k5, cum, strict=False)  # [B, Hkv, n, G, C, C]
    intra = (pair.flatten(3, 4) @ v5).unflatten(3, pair.shape[3:5])  # [B, Hkv, n, G, C, Dv']
    last = None if cum is None else cum[:, :, :, -1:]  # [B, Hkv, n, 1(, F)]
    k_decayed = k5 if cum is None else k5 * _row_factor(last - cum)  # decay to the chunk end <= 1
    contrib = k_decayed.transpose(-1, -2) @ v5  # [B, Hkv, n, F, Dv']
    gate = _chunk_gate(last)  # [B, Hkv, n, 1 or F, 1]
    before = _scan(contrib, gate, s_in)  # [B, Hkv, n, F, Dv']: the state entering each chunk
    q_rows = q6 if cum is None else q6 * _row_factor(cum)[:, :, :, None]
    inter = (q_rows.flatten(3, 4) @ before).unflatten(3, pair.shape[3:5])
    last_in = before[:, :, -1] if gate is None else before[:, :, -1] * gate[:, :, -1]
    out = intra + inter if torch.is_grad_enabled() else intra.add_(inter)
    return out, last_in + contrib[:, :, -1]


def _scan(contrib: Tensor, gate: Tensor | None, s_in: Tensor) -> Tensor:
    """State entering each chunk: ``S_c = gate_c * S_{c-1} + contrib_c`` from ``S_{-1} = s_in``.
    contrib [B, Hkv, n, F, Dv']; gate [B, Hkv, n, 1 or F, 1] or None (no decay: a cumsum)."""
    n = contrib.shape[2]
    if gate is None:  # exclusive prefix sum, in place: the inclusive sum minus each term
        if torch.is_grad_enabled():
            return contrib.cumsum(dim=2) - contrib + s_in[:, :, None]
        return contrib.cumsum(dim=2).sub_(contrib).add_(s_in[:, :, None])
    before = torch.empty_like(contrib)
    s = s_in
    for c in range(n):
        before[:, :, c] = s
        s = torch.addcmul(contrib[:, :, c], s, gate[:, :, c])
    return before


def _pairwise(x6: Tensor, k5: Tensor, cum: Tensor | None, strict: bool) -> Tensor:
    """``P_ij = sum_f x_if k_jf exp(cum_if - cum_jf)`` for j <= i (j < i if strict) in each chunk.
    x6 [B, Hkv, n, G, C, F], k5 [B, Hkv, n, C, F], cum None / [B, Hkv, n, C] / [.., C, F].
    Returns [B, Hkv, n, G, C, C]."""
    chunk = k5.shape[3]
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril(-1 if strict else 0)
    if cum is not None and cum.dim() == 5:
        return _pairwise_channel(x6, k5, cum, mask)
    scores = (x6.flatten(3, 4) @ k5.transpose(-1, -2)).unflatten(3, x6.shape[3:5])
    if cum is None:
        return scores.masked_fill_(~mask, 0.0)
    # exp of a difference <= 0 on the visible pairs: no overflow, whatever the gates
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~mask, -torch.inf).exp_()
    return scores.mul_(decay[:, :, :, None])


def _pairwise_channel(x6: Tensor, k5: Tensor, cum: Tensor, mask: Tensor) -> Tensor:
    """Per-channel gates: ``exp(cum_i - cum_j)`` differs per channel, so it cannot be split as
    ``exp(cum_i) * exp(-cum_j)`` without overflow (``exp(-cum_j)`` grows without bound with strong
    gates). Sub-chunks of ``CHANNEL_SUBCHUNK`` keys avoid it: a pair inside one sub-chunk gets its
    exact factor ``exp(cum_i - cum_j) <= 1`` elementwise; a pair across sub-chunks (key j in
    sub-chunk r, query i after it) factors through r's last position e,
    ``exp(cum_i - cum_e) * exp(cum_e - cum_j)``, both <= 1 since the cumulative log gates
    decrease, so every factor is in (0, 1] and a product replaces the [C, C, F] tensor."""
    *lead, group, chunk, feat = x6.shape
    out = x6.new_zeros(*lead, group, chunk, chunk)
    sub = CHANNEL_SUBCHUNK
    xc, cumx = x6, cum[:, :, :, None]  # cum broadcast over the query group
    for s0 in range(0, chunk, sub):
        s1 = min(s0 + sub, chunk)
        diff = cumx[..., s0:s1, None, :] - cumx[..., None, s0:s1, :]  # [.., 1, c, c, F]
        diff = diff.masked_fill(~mask[s0:s1, s0:s1, None], -torch.inf)
        block = xc[..., s0:s1, None, :] * k5[:, :, :, None, None, s0:s1, :]  # [.., G, c, c, F]
        out[..., s0:s1, s0:s1] = (block.mul_(diff.exp_())).sum(-1)
        if s1 < chunk:
            edge = cum[:, :, :, s1 - 1 : s1]  # [B, Hkv, n, 1, F]
            rows = xc[..., s1:, :] * (cumx[..., s1:, :] - edge[:, :, :, None]).exp()
            keys = k5[:, :, :, s0:s1] * (edge - cum[:, :, :, s0:s1]).exp()  # [B, Hkv, n, c, F]
            out[..., s1:, s0:s1] = rows @ keys[:, :, :, None].transpose(-1, -2)
    return out


def _delta_chunks(q6, k5, v5, cum, b5, s_in) -> tuple[Tensor, Tensor]:
    """Chunkwise (gated) delta rule in the WY/UT form (arXiv:2406.06484, 2412.06464).

    With the pseudo-values ``u_i = b_i (v_i - (D_i S_{i-1})^T k_i)`` the state is
    ``S_i = G_i S_0 + sum_{j<=i} G_i G_j^-1 k_j u_j^T`` (G_i the gates' product from the chunk
    start), so ``(I + A) U = diag(b) (V - (G K) S_0)`` with ``A_ij = b_i k_i^T G_i G_j^-1 k_j``
    (j < i). One batched triangular solve gives ``W = (I + A)^-1 diag(b) G K`` and
    ``U_v = (I + A)^-1 diag(b) V`` for all chunks; the scan over chunks then needs
    ``U = U_v - W S_0`` and ``S_C = G_C S_0 + (G_C G^-1 K)^T U`` per chunk."""
    batch, n_kv, n, chunk, feat = k5.shape
    k6 = k5[:, :, :, None]  # [B, Hkv, n, 1, C, F]
    a = _pairwise(k6, k5, cum, strict=True)[:, :, :, 0] * b5[..., None]  # [B, Hkv, n, C, C]
    k_start = k5 if cum is None else k5 * _row_factor(cum)  # G_i k_i
    rhs = torch.cat([k_start, v5], dim=-1) * b5[..., None]
    sol = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    w, u_v = sol[..., :feat], sol[..., feat:]
    last = None if cum is None else cum[:, :, :, -1:]
    k_end = k5 if cum is None else k5 * _row_factor(last - cum)  # G_C G_j^-1 k_j
    gate = _chunk_gate(last)  # [B, Hkv, n, 1 or F, 1]
    befores, pseudos = [], []  # stacked after the scan: autograd keeps each chunk's tensors
    s = s_in
    for c in range(n):
        befores.append(s)
        pseudos.append(u_v[:, :, c] - w[:, :, c] @ s)
        decayed = s if gate is None else s * gate[:, :, c]
        s = decayed + k_end[:, :, c].transpose(-1, -2) @ pseudos[-1]
    before, pseudo = torch.stack(befores, dim=2), torch.stack(pseudos, dim=2)
    pair = _pairwise(q6, k5, cum, strict=False)  # [B, Hkv, n, G, C, C]
    q_rows = q6 if cum is None else q6 * _row_factor(cum)[:, :, :, None]
    out = q_rows.flatten(3, 4) @ before + pair.flatten(3, 4) @ pseudo
    return out.unflatten(3, pair.shape[3:5]), s


def _windowed(q, k, values, q_raw, k_raw, scale, log_decay, s_in, window, chunk, spec, sinks):
    """Exact softmax on the last ``window`` keys plus the linear form on the older ones.

    The linear part of query t reads the state over keys <= u = t - window, decayed to t: it is
    the causal linear attention of keys [0, Tk - window) with query t placed at position u, times
    ``gamma^window`` (fixed decay); queries with u < 0 read only the carried state, times
    ``gamma^(t+1)``. Sinks leave the linear part and join the exact one. Both parts are scaled
    by ``exp(-m)``, m = max(0, the row's largest window
    score), so neither overflows. Returns (out [B, H, Tq, Dv'] accumulated, state)."""
    batch, n_kv, kv_len, feat = k.shape
    offset = kv_len - spec.q_len
    n_lin = max(kv_len - window, 0)
    qa = q.to(spec.acc)
    first = max(offset - window, 0)  # the first shifted position a real query lands on
    shifted = qa.new_zeros(batch, qa.shape[1], n_lin, feat)
    shifted[:, :, first:] = qa[:, :, first + window - offset : n_lin + window - offset]
    fixed = None if log_decay is None else log_decay[:n_kv]
    k_lin = _without_sinks(k[:, :, :n_lin], sinks)
    lin, s_out = _chunkwise(shifted, k_lin, values[:, :, :n_lin], fixed, None, s_in, chunk, spec)
    log_gamma = (
        torch.zeros(n_kv, dtype=spec.acc) if fixed is None else fixed.to(spec.acc)
    ).repeat_interleave(spec.group)[None, :, None, None]  # [1, H, 1, 1]
    positions = torch.arange(offset, kv_len)  # each query's key position t
    early = positions < window  # u < 0: the carried state only
    lin_q = qa.new_zeros(batch, qa.shape[1], spec.q_len, values.shape[-1])
    lin_q[:, :, ~early] = lin[:, :, positions[~early] - window] * (log_gamma * window).exp()
    if bool(early.any()):
        rows = qa[:, :, early].reshape(batch, n_kv, -1, feat) @ s_in  # [B, Hkv, G*e, Dv']
        ages = (positions[early] + 1).to(spec.acc)[None, None, :, None]
        lin_q[:, :, early] = (
            rows.view(batch, qa.shape[1], -1, rows.shape[-1]) * (log_gamma * ages).exp()
        )
    exact, shift = _window_exact(q_raw, k_raw, values, scale, log_gamma, window, chunk, spec)
    if sinks:
        exact, shift = _add_sinks(exact, shift, q_raw, k_raw, values, scale, window, sinks, spec)
    return exact + (-shift).exp() * lin_q, s_out


def _add_sinks(exact, shift, q_raw, k_raw, values, scale, window, sinks, spec):
    """The sinks' exact terms for queries they are older than the window for (the band already
    holds the younger ones), under a shift raised to cover their scores."""
    batch, n_kv, kv_len, dim = k_raw.shape
    n = min(sinks, kv_len)
    rows = q_raw.to(spec.acc).reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*Tq, D]
    scores = (rows @ k_raw[:, :, :n].to(spec.acc).transpose(-1, -2)).mul_(scale)
    t = (kv_len - spec.q_len + torch.arange(spec.q_len)).repeat(spec.group)  # each row's position
    scores = scores.masked_fill(t[:, None] - torch.arange(n)[None, :] < window, -torch.inf)
    scores = scores.view(batch, n_kv * spec.group, spec.q_len, n)
    m = torch.maximum(shift, scores.amax(dim=-1, keepdim=True))
    weights = (scores - m).exp().view(batch, n_kv, -1, n)
    terms = (weights @ values[:, :, :n]).view(exact.shape)
    return exact * (shift - m).exp() + terms, m


def _window_exact(q_raw, k_raw, values, scale, log_gamma, window, chunk, spec):
    """Banded exact part: for query t (position offset + i), ``sum_s exp(score_ts - m_t)
    gamma^(t-s) [v_s, 1]`` over t - window < s <= t; returns it [B, H, Tq, Dv'] and m [.., 1].
    Query blocks of ``chunk`` rows read a strided view of ``chunk + window - 1`` keys."""
    batch, n_kv, kv_len, dim = k_raw.shape
    q_len, group, offset = spec.q_len, spec.group, kv_len - spec.q_len
    block = min(chunk, max(q_len, 1))
    nb = -(-q_len // block)
    span = block + window - 1
    qr = F.pad(q_raw.to(spec.acc), (0, 0, 0, nb * block - q_len))
    qr = qr.view(batch, n_kv, group, nb, block, dim).transpose(2, 3).flatten(3, 4)
    tail = nb * block - q_len
    kr = F.pad(k_raw.to(spec.acc), (0, 0, window - 1, tail))[:, :, offset:]
    vv = F.pad(values, (0, 0, window - 1, tail))[:, :, offset:]
    kwin = kr.unfold(2, span, block)  # [B, Hkv, nb, Dr, span]
    vwin = vv.unfold(2, span, block).transpose(-1, -2)  # [B, Hkv, nb, span, Dv']
    scores = (qr @ kwin).mul_(scale).unflatten(3, (group, block))  # [B, Hkv, nb, G, blk, span]
    first = offset + torch.arange(nb)[:, None, None] * block  # each block's first query
    t = first + torch.arange(block)[None, :, None]  # [nb, blk, 1]: the query's position
    s = first + torch.arange(span)[None, None, :] - (window - 1)  # [nb, 1, span]: the key's
    age = t - s  # [nb, blk, span]
    visible = (age >= 0) & (age < window) & (s >= 0) & (t < kv_len)
    scores = scores.masked_fill(~visible[:, None], -torch.inf)
    shift = scores.amax(dim=-1, keepdim=True).clamp(min=0.0)
    weights = (scores - shift).exp()
    if bool((log_gamma != 0).any()):
        log_g = log_gamma.view(n_kv, group)[None, :, None, :, None, None]
        weights = weights * (log_g * age.clamp(min=0).to(spec.acc)[:, None]).exp()
    exact = weights.flatten(3, 4) @ vwin  # [B, Hkv, nb, G*blk, Dv']
    exact = exact.unflatten(3, (group, block)).transpose(2, 3).reshape(batch, n_kv * group, -1,
                                                                       values.shape[-1])  # fmt: skip
    shift = shift.transpose(2, 3).reshape(batch, n_kv * group, -1, 1)
    return exact[:, :, :q_len], shift[:, :, :q_len]
