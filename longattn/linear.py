"""Linear attention, the library side: what ``attention()`` does for a ``feature_map`` method
(``LinearAttention``) or a ``forward`` method, with or without a cache.

A feature-map call maps queries and keys (``FeatureView``: role, layer, scale, calibration), takes
the method's data-dependent gates and its fixed decay, and runs the engine
(``longattn.kernels.linear``): ``linear`` (chunkwise) or ``recurrent`` (token by token). A ``forward``
method computes its own output and state (impl ``forward``). With a cache the layer holds a
``LinearRecord``: the recurrent state and the number of tokens seen (O(1) memory per step); a
windowed method (``window`` > 0) also holds its last ``window`` raw keys and values, and its
``sinks`` first ones, in the cache's storage, and folds each other key that leaves the window into
the state.

Calls are causal over consecutive tokens: the queries are the keys' own tokens (``Tq == Tk``),
continuing what the cache has seen; padded rows and other alignments are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from longattn import calibration
from longattn.call import make_call
from longattn.kernels.expansion import expansion_attention
from longattn.kernels.linear import LinearState, linear_attention, linear_recurrent
from longattn.method import LinearAttention, Method
from longattn.types import AttnOutput, FeatureView, accumulation_dtype
from longattn.validation import needs_grad

HOOKS = ("feature_map", "forward")
IMPLS = ("linear", "recurrent", "forward")
STATE_PREFIX = "linear/"


@dataclass(frozen=True)
class LinearRecord:
    """What a cache layer holds for a linear method: its state after ``n_seen`` tokens, and the
    method that made it (another method on the same layer is refused: the states differ)."""

    state: Any
    n_seen: int
    method: str


def is_linear(method: Any) -> bool:
    return isinstance(method, Method) and method.hook in HOOKS


def state_name(method: Method) -> str:
    """The method as its state depends on it (the chunk size does not change the state)."""
    if isinstance(method, LinearAttention):
        method = dataclasses.replace(method, chunk_size=LinearAttention.chunk_size)
    return method.describe()


def record(cache: Any, layer: int) -> LinearRecord | None:
    """The linear record of ``layer`` of ``cache`` (None before its first call)."""
    return cache.state.get(f"{STATE_PREFIX}{layer}")


def can_run(method: Method, impl: str) -> str | None:
    """Why ``impl`` cannot run ``method`` (None: it can)."""
    if impl not in IMPLS:
        return f"impl {impl!r} does not run linear attention; its implementations are {IMPLS}"
    if (impl == "forward") != (method.hook == "forward"):
        return (
            f"method {method.name!r} states its rule with {method.hook!r}; impl {impl!r} runs "
            + ("'forward' methods" if impl == "forward" else "'feature_map' methods")
        )
    return None


def choose(method: Method, impl: str) -> str:
    if impl == "auto":
        return "forward" if method.hook == "forward" else "linear"
    reason = can_run(method, impl)
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run this call: {reason}")
    return impl


def fixed_log_decay(method: LinearAttention, n_kv_heads: int) -> torch.Tensor | None:
    """The per-KV-head log decay [Hkv] of ``method.decay`` (float64; None for ``"none"``)."""
    if method.decay == "none":
        return None
    if method.decay == "retnet":
        return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_kv_heads, dtype=torch.float64)))
    return torch.full((n_kv_heads,), math.log(method.decay), dtype=torch.float64)


def feature_inputs(
    method: LinearAttention, q: torch.Tensor, k: torch.Tensor, layer: int, scale: float, cal
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(phi(q), phi(k), log_decay, beta)`` of a call: features and gates in the accumulation dtype
    (float32 for fp32/bf16 inputs, float64 for float64), each checked finite and shaped."""
    acc = accumulation_dtype(q.dtype)
    qa, ka = q.to(acc), k.to(acc)
    phi_q = method.feature_map(qa, FeatureView("query", layer, scale, cal))
    phi_k = method.feature_map(ka, FeatureView("key", layer, scale, cal))
    for role, x, phi in (("query", qa, phi_q), ("key", ka, phi_k)):
        check_features(method, role, layer, x, phi)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(
            f"{method.name}: query features {phi_q.shape[-1]} != key features {phi_k.shape[-1]}"
        )
    log_decay, beta = method.gates(ka, FeatureView("key", layer, scale, cal))
    fixed = fixed_log_decay(method, k.shape[1])
    if fixed is not None:  # the fixed per-head decay, alone or on top of the gates
        fixed = fixed.to(acc)
        if log_decay is not None:
            fixed = log_decay + fixed.view(1, -1, *(1,) * (log_decay.dim() - 2))
        log_decay = fixed
    if method.window and (beta is not None or (log_decay is not None and log_decay.dim() > 1)):
        raise ValueError(
            f"{method.name}: window={method.window} takes no data-dependent gate (the window's keys "
            "would need the gates of the tokens between); use window=0"
        )
    return phi_q, phi_k, log_decay, beta


def check_features(method: Method, role: str, layer: int, x: torch.Tensor, phi: Any) -> None:
    """A clear error naming the method, layer and role for a feature map that is not a tensor of
    [B, H, T, F] with F > 0, or that is not finite where its input is."""
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"{method.name}.feature_map returned {type(phi).__name__}, not a tensor")
    if phi.dim() != 4 or phi.shape[:3] != x.shape[:3] or phi.shape[-1] <= 0:
        raise ValueError(
            f"{method.name}.feature_map({role}) at layer {layer}: expected [B, H, T, F>0] over "
            f"input {tuple(x.shape)}, got {tuple(phi.shape)}"
        )
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(
            f"{method.name}.feature_map({role}) at layer {layer} is not finite (input max |x| = "
            f"{x.abs().max().item():.3g}); lower its temperature or the input scale"
        )
    signed = getattr(method, "signed_features", False)  # a kernel positive by construction
    if getattr(method, "normalize", False) and not signed and bool((phi < 0).any()):
        raise ValueError(
            f"{method.name}.feature_map({role}) at layer {layer} has negative features with "
            "normalize=True (the normaliser could vanish); use normalize=False"
        )


def run_features(
    method: LinearAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str,
    layer: int,
    scale: float,
    cal: dict | None,
    state: LinearState | None = None,
    raw: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LinearState | None]:
    """One engine call of a feature-map method on aligned queries/keys (``raw``: the raw queries and
    keys of a windowed call, default ``(q, k)``)."""
    phi_q, phi_k, log_decay, beta = feature_inputs(method, q, k, layer, scale, cal)
    engine = linear_attention if impl == "linear" else linear_recurrent
    kwargs: dict[str, Any] = {}
    if impl == "linear":
        kwargs["chunk_size"] = method.chunk_size
    if method.window:
        q_raw, k_raw = raw if raw is not None else (q, k)
        kwargs.update(window=method.window, q_raw=q_raw, k_raw=k_raw, scale=scale,
                      sinks=method.sinks)  # fmt: skip
    # the engine runs in the features' dtype (float32 for fp32/bf16 calls); the output is v's
    out, state = engine(
        phi_q, phi_k, v.to(phi_q.dtype), causal=method.causal, log_decay=log_decay, beta=beta,
        normalize=method.normalize, state=state, **kwargs,
    )  # fmt: skip
    return out.to(v.dtype), state


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method,
    *,
    cache: Any = None,
    layer: int = 0,
    impl: str = "auto",
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> AttnOutput:
    """``longattn.attention`` for a linear method (see the module docstring); ``lse`` is None and
    ``state`` the layer's new recurrent state."""
    call = make_call(q, k, v, method, scale, q_positions, kv_positions)
    chosen = choose(method, impl)
    if cache is not None and not method.is_causal:
        raise ValueError(f"{method.name} with causal=False takes no cache (it keeps no state)")
    start = 0 if cache is None else _seen(cache, layer, method)
    _check_aligned(call, method, start)
    if cache is None:  # the queries are the last Tq keys' tokens
        cal = calibration_for(method, k, layer)
        out, state = _run(method, chosen, call.q, call.k, call.v, layer, call.scale, cal, None)
        return AttnOutput(out, None, state)
    return _cached(call, method, chosen, cache, layer, start)


def _run(method, impl, q, k, v, layer, scale, cal, state):
    if impl == "forward":  # a forward method sees one query per key: the first ones are zeros
        lead = k.shape[2] - q.shape[2] if method.is_causal else 0
        if lead:
            q = torch.cat([q.new_zeros(*q.shape[:2], lead, q.shape[3]), q], dim=2)
        kernel = None if needs_grad(q, k, v) else expansion_attention  # it has no backward
        view = FeatureView("query", layer, scale, cal, kernel)
        out, state = method.forward(q, k, v, state, view)
        return out[:, :, lead:], state
    return run_features(method, q, k, v, impl=impl, layer=layer, scale=scale, cal=cal, state=state)


def calibration_for(method: Method, k: torch.Tensor, layer: int) -> dict | None:
    """The calibration tensors of ``method`` for ``layer`` (None without a calibration file)."""
    path = getattr(method, "calibration", "")
    if not path:
        return None
    cal = calibration.load(path)
    cal.check(method.name, max(cal.n_layers, layer + 1), k.shape[1], k.shape[3])
    return cal.layer(layer)


def _seen(cache: Any, layer: int, method: Method) -> int:
    """Tokens the layer has seen under ``method`` (0 for a fresh layer); refuses a layer that holds
    softmax keys or another linear method's state."""
    held = record(cache, layer)
    if held is None:
        if cache.n_seen(layer):
            raise ValueError(
                f"layer {layer} of the cache holds softmax keys; {method.name} keeps a recurrent "
                "state (use a fresh cache)"
            )
        return 0
    if held.method != state_name(method):
        raise ValueError(
            f"layer {layer} of the cache holds the state of {held.method!r}, not "
            f"{state_name(method)!r} (use a fresh cache)"
        )
    return held.n_seen


def _check_aligned(call, method: Method, start: int) -> None:
    """Causal linear attention reads queries at their keys' own tokens, continuing from ``start``."""
    q_len, kv_len = call.q.shape[2], call.k.shape[2]
    if not method.is_causal:
        return
    if q_len != kv_len and (start or not call.default_positions):
        raise ValueError(
            f"{method.name}: causal linear attention through a cache needs one query per new key "
            f"(Tq == Tk), got Tq={q_len}, Tk={kv_len}"
        )
    if call.default_positions:  # the new tokens continue the layer
        return
    expected = torch.arange(start, start + kv_len, device=call.kv_pos.device)
    for name, pos in (("q_positions", call.q_pos), ("kv_positions", call.kv_pos)):
        if not bool((pos == expected).all()):
            raise ValueError(
                f"{method.name}: {name} must be the consecutive positions {start}..."
                f"{start + kv_len - 1} in every row (padded rows and gaps are not supported by "
                f"linear attention), got {pos.tolist()[:2]}"
            )


def _cached(call, method: Method, impl: str, cache: Any, layer: int, start: int) -> AttnOutput:
    """A call through the cache: the state carried from the layer's record, the new one stored
    (a refused call leaves the record as it was: it is replaced only at the end)."""
    held = record(cache, layer)
    state = None if held is None else held.state
    cal = calibration_for(method, call.k, layer)
    window = getattr(method, "window", 0)
    if window:  # appends to and evicts from the layer: undone if anything fails
        point = cache.checkpoint(layer, call.k.shape[2], refresh=False, whole=True)
        try:
            out, state = _windowed(call, method, impl, cache, layer, start, state, cal)
        except BaseException:
            cache.rollback(point)
            raise
    else:
        out, state = _run(method, impl, call.q, call.k, call.v, layer, call.scale, cal, state)
    n_seen = start + call.k.shape[2]
    cache.state[f"{STATE_PREFIX}{layer}"] = LinearRecord(state, n_seen, state_name(method))
    return AttnOutput(out, None, state)


def _windowed(call, method, impl, cache, layer, start, state, cal):
    """A windowed call over the layer's held raw keys (the sinks, then the last ``window``
    tokens before the new ones) and the new ones; the engine's state leaves out the sinks and the
    call's last ``window`` keys, which the cache then holds (the others are freed)."""
    k, v = call.k, call.v
    k_all = torch.cat([cache.keys(layer), k], dim=2) if start else k
    v_all = torch.cat([cache.values(layer), v], dim=2) if start else v
    out, state = run_features(
        method, call.q, k_all, v_all, impl=impl, layer=layer, scale=call.scale, cal=cal,
        state=state, raw=(call.q, k_all),
    )  # fmt: skip
    cache.append(layer, k, v, torch.arange(start, start + k.shape[2], device=k.device))
    newest = start + k.shape[2] - 1
    if newest - method.window >= method.sinks:  # free what left the window (sinks stay)
        held = cache.positions(layer)
        cache.evict(layer, (held > newest - method.window) | (held < method.sinks))
    return out, state
