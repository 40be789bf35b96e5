"""Mega: a multi-dimensional damped EMA over the keys and values, then gated softmax attention
inside fixed chunks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.latte import (
    Rounding,
    abs_scores,
    call_scale,
    check_state,
    layer_tensor,
    seeded_normal,
)


class EMAParams(NamedTuple):
    """Per KV head, channel and EMA dimension j ([Hkv, C, h]): ``alpha``, ``delta`` in (0, 1),
    the expansion ``beta`` and projection ``eta``; the recurrence is
    ``h_t = alpha beta x_t + (1 - alpha delta) h_{t-1}``, ``y_t = sum_j eta h_t``."""

    alpha: torch.Tensor
    delta: torch.Tensor
    beta: torch.Tensor
    eta: torch.Tensor


class MegaState(NamedTuple):
    """``seen`` tokens so far; the EMA states ``h_k`` [B, Hkv, D, h] and ``h_v`` [B, Hkv, Dv, h];
    the smoothed keys ``k_tail`` [B, Hkv, r, D] and values ``v_tail`` [B, Hkv, r, Dv] of the
    current, unfinished chunk (r = seen mod chunk_size): O(chunk) memory."""

    seen: int
    h_k: torch.Tensor
    h_v: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor


@register("mega")
@dataclass(frozen=True)
class Mega(Method):
    """Moving-average equipped gated attention: a multi-dimensional damped EMA smooths the keys
    and values (``n_dims`` EMA dimensions per channel), then each query attends by softmax to the
    smoothed keys and values of its own chunk (``chunk_size``, by absolute position) up to
    itself, gated against the smoothed value: ``out_t = g_t attn_t + (1 - g_t) v~_t`` with
    ``g_t = sigmoid(scale q_t . w_g)``. Ma et al. 2022, arXiv:2209.10655 (Mega-chunk).

    The EMA carries information across chunks, so memory is O(chunk) per head (``MegaState``).
    Parameters: a layer's calibration tensors ``alpha``, ``delta``, ``beta``, ``eta`` (keys:
    [Hkv, D, h]; values use the same names with a ``v_`` prefix, [Hkv, Dv, h]) and ``gate``
    [H, D]; else seeded: alpha, delta = sigmoid(normal), beta = 1, eta = delta / h (a unit DC
    gain, so the smoothed keys keep the keys' scale) and a standard normal gate vector.
    Deviation from paper: the EMA acts on the call's keys and values instead of the layer input,
    the attention runs per head instead of one shared head, and the paper's learned projections
    (shared representation Z, reset gate, output projection) belong to a trained model; the
    update gate is the query's, mixing attention with the smoothed value rather than the input.
    """

    chunk_size: int = 64
    n_dims: int = 16
    gated: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("Mega", chunk_size=self.chunk_size, n_dims=self.n_dims)

    @property
    def is_causal(self) -> bool:
        return True

    def ema_params(self, view: Any, n_kv: int, channels: int, prefix: str) -> EMAParams:
        """Float64 EMA parameters [Hkv, channels, h], or [1, channels, h] when seeded (shared by
        the heads); ``prefix`` "" for keys, "v_" for values."""
        shape = (n_kv, channels, self.n_dims)
        found = [layer_tensor(view, prefix + n, "Mega", shape) for n in EMAParams._fields]
        if all(t is not None for t in found):
            return EMAParams(*(t.to(torch.float64) for t in found))
        seed = self.seed + (1 if prefix else 0)
        raw = seeded_normal((2, channels, self.n_dims), seed, torch.float64)
        alpha, delta = torch.sigmoid(raw)[:, None].unbind(0)  # shared by the heads: [1, C, h]
        return EMAParams(alpha, delta, torch.ones_like(alpha), delta / self.n_dims)

    def gate_vector(self, view: Any, n_heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        found = layer_tensor(view, "gate", "Mega", (n_heads, dim))
        if found is not None:
            return found.to(dtype)
        return seeded_normal((dim,), self.seed + 2, dtype).expand(n_heads, dim)

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        q, k, vv = (t.to(acc) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv, dim_v = k.shape[1], vv.shape[-1]
        n = min(self.chunk_size, length)
        pk = ema_tables(self.ema_params(view, n_kv, dim, ""), n, acc)
        pv = ema_tables(self.ema_params(view, n_kv, dim_v, "v_"), n, acc)
        state = self._start(state, batch, k.shape[1], dim, dim_v, acc)
        outs, pos = [], 0
        while pos < length:  # one piece per chunk touched, so a chunk's keys are all present
            end = min(length, pos + self.chunk_size - state.seen % self.chunk_size)
            k_sm, h_k = _ema_segment(k[:, :, pos:end], state.h_k, pk)
            v_sm, h_v = _ema_segment(vv[:, :, pos:end], state.h_v, pv)
            keys, values = torch.cat([state.k_tail, k_sm], 2), torch.cat([state.v_tail, v_sm], 2)
            outs.append(self._attend(q[:, :, pos:end], keys, values, view))
            seen = state.seen + end - pos
            full = seen % self.chunk_size == 0
            state = MegaState(
                seen,
                h_k,
                h_v,
                keys[:, :, :0] if full else keys,
                values[:, :, :0] if full else values,
            )
            pos = end
        out = torch.cat(outs, 2) if outs else q.new_zeros(batch, n_heads, 0, dim_v)
        return out.to(v.dtype), state

    def _start(self, state, batch, n_kv, dim, dim_v, acc):
        """The state to resume from, checked, or a fresh one."""
        if state is None:
            empty = torch.zeros(batch, n_kv, 0, dtype=acc)
            return MegaState(
                0,
                torch.zeros(batch, n_kv, dim, self.n_dims, dtype=acc),
                torch.zeros(batch, n_kv, dim_v, self.n_dims, dtype=acc),
                empty[..., None].expand(-1, -1, -1, dim),
                empty[..., None].expand(-1, -1, -1, dim_v),
            )
        check_state("Mega", state, MegaState, acc)  # the type first: it has .seen
        tail = (batch, n_kv, state.seen % self.chunk_size)
        check_state(
            "Mega",
            state,
            MegaState,
            acc,
            h_k=(batch, n_kv, dim, self.n_dims),
            h_v=(batch, n_kv, dim_v, self.n_dims),
            k_tail=(*tail, dim),
            v_tail=(*tail, dim_v),
        )
        return state

    def _attend(self, q, keys, values, view):
        """Queries [B, H, n, D], the newest n of the chunk's keys/values [B, Hkv, r + n, *]."""
        batch, n_heads, n, dim = q.shape
        n_kv, r = keys.shape[1], keys.shape[2] - n
        scale = call_scale(view, dim)
        rows = q.reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*n, D]
        scores = (scale * rows @ keys.transpose(-1, -2)).view(batch, n_kv, -1, n, r + n)
        causal = torch.ones(n, r + n, dtype=torch.bool).tril(r)
        probs = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)
        out = probs @ values.unsqueeze(2)  # [B, Hkv, G, n, Dv]
        if self.gated:
            gate = torch.sigmoid(
                scale * q @ self.gate_vector(view, n_heads, dim, q.dtype)[..., None]
            )
            gate = gate.view(batch, n_kv, -1, n, 1)
            out = gate * out + (1 - gate) * values[:, :, None, r:]
        return out.reshape(batch, n_heads, n, -1)

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). The EMA's coefficients are computed in float64 and rounded once (u); a
        piece of at most C = chunk_size tokens sums <= C + h + 1 non-negative-coefficient terms
        (``gamma(C + h + 2)``), and the state carried over the pieces (at most T // C + 2 per
        call) is decayed by a rounded power and added once per piece (3u each, on the old terms
        only): the smoothed x is within ``rho_ema EMA(|x|)``, ``rho_ema = gamma(C + h + 2) + u +
        3u (T // C + 2 calls + 1)``. A score ``scale q . k~`` is then off by ``E = (rho_ema +
        gamma(D) + 3u) A``, A the largest ``|scale| sum |q_d| EMA(|k|)_d``; a chunk softmax
        weight by ``expm1(2E + 4eta + 3gamma(C) + 2u)`` relative; a value by rho_ema of
        EMA(|v|). The gate's logit is off by ``E_g = (gamma(D) + u) A_g``, the gate by
        ``E_g / 4 + eta + 2u`` absolute; it mixes the attention and the smoothed value, each
        within their magnitudes M_attn (the ungated reference of |v|) and M_self = EMA(|v|)_t."""
        r = Rounding.of(q.dtype)
        q64, k64, v64 = (t.double() for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv, size, scale = k.shape[1], self.chunk_size, call_scale(view, dim)
        pieces = length // size + 2 * calls + 1
        rho_ema = r.gamma(size + self.n_dims + 2) + r.u + 3 * r.u * pieces
        k_mag = damped_ema(k64.abs(), self.ema_params(view, n_kv, dim, ""))
        rows = q64.reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*T, D]
        e_w = (rho_ema + r.gamma(dim) + 3 * r.u) * abs_scores(rows, k_mag, scale)
        rho = math.expm1(2 * e_w + 4 * r.eta + 3 * r.gamma(size) + 2 * r.u) + 2 * rho_ema + r.u
        ungated = dataclasses.replace(self, gated=False)
        mag = ungated.reference(q64, k64, v64.abs(), view)  # M_attn
        if self.gated:
            gate = self.gate_vector(view, n_heads, dim, torch.float64)  # [H, D]
            e_g = (
                (r.gamma(dim) + r.u) * abs(scale) * float((q64.abs() @ gate.abs()[..., None]).max())
            )
            v_mag = damped_ema(v64.abs(), self.ema_params(view, n_kv, v.shape[-1], "v_"))
            mag = mag + v_mag.repeat_interleave(n_heads // n_kv, 1)  # + M_self
            rho += e_g / 4 + r.eta + 4 * r.u
        return rho * (1 + r.u_out) * mag + r.u_out * ref.abs()

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: the EMA token by token, then the chunk-masked
        softmax matrix materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        k_sm = damped_ema(k, self.ema_params(view, n_kv, dim, ""))
        v_sm = damped_ema(v, self.ema_params(view, n_kv, v.shape[-1], "v_"))
        group = n_heads // n_kv
        keys, values = k_sm.repeat_interleave(group, 1), v_sm.repeat_interleave(group, 1)
        scale = call_scale(view, dim)
        pos = torch.arange(length)
        same_chunk = (pos[:, None] // self.chunk_size) == (pos[None, :] // self.chunk_size)
        visible = same_chunk & (pos[None, :] <= pos[:, None])
        scores = (scale * q @ keys.transpose(-1, -2)).masked_fill(~visible, -torch.inf)
        out = torch.softmax(scores, dim=-1) @ values
        if self.gated:
            gate = torch.sigmoid(
                scale * q @ self.gate_vector(view, n_heads, dim, q.dtype)[..., None]
            )
            out = gate * out + (1 - gate) * values
        return out


class EMATables(NamedTuple):
    """The EMA over a piece of up to n tokens ([Hkv, C, ...], cast to the call's dtype): the
    Toeplitz kernel [Hkv, C, n, n] (``K[t - s] = sum_j eta alpha beta decay^(t - s)``), the
    state's contribution ``eta decay^(t + 1)`` [Hkv, C, h, n], the write into the state
    ``alpha beta decay^(n - 1 - s)`` [Hkv, C, h, n] and the powers ``decay^m``
    [Hkv, C, h, n + 1]."""

    toeplitz: torch.Tensor
    carry: torch.Tensor
    write: torch.Tensor
    powers: torch.Tensor


def ema_tables(params: EMAParams, n: int, dtype: torch.dtype) -> EMATables:
    """The coefficients once per call, in float64 (tiny tensors) and rounded once to ``dtype``."""
    alpha, delta, beta, eta = params  # [Hkv, C, h]
    powers = (1 - alpha * delta).unsqueeze(-1) ** torch.arange(n + 1, dtype=torch.float64)
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # t - s
    kernel = ((eta * alpha * beta).unsqueeze(-1) * powers[..., :n]).sum(2)  # [Hkv, C, n]: K[tau]
    toeplitz = kernel[..., lag.clamp(min=0)] * (lag >= 0)  # [Hkv, C, t, s]
    carry = eta.unsqueeze(-1) * powers[..., 1:]  # [Hkv, C, h, t]
    write = (alpha * beta).unsqueeze(-1) * powers[..., :n].flip(-1)  # [Hkv, C, h, s]
    return EMATables(*(t.to(dtype) for t in (toeplitz, carry, write, powers)))


def _ema_segment(x, h0, tables: EMATables):
    """The EMA of a piece x [B, Hkv, n, C] (n <= the tables' length) from the state h0
    [B, Hkv, C, h]. Returns the smoothed x and the state after its last token."""
    n = x.shape[2]
    toeplitz = tables.toeplitz[..., :n, :n]  # depends on t - s only: the top-left block
    carry, write = tables.carry[..., :n], tables.write[..., -n:]  # decay^(n - 1 - s)
    y = torch.einsum("kcts,bksc->bktc", toeplitz, x) + torch.einsum("kcjt,bkcj->bktc", carry, h0)
    h = torch.einsum("kcjs,bksc->bkcj", write, x) + tables.powers[..., n] * h0
    return y, h


def damped_ema(x, params: EMAParams):
    """The damped EMA of x [B, Hkv, T, C] token by token (the definition)."""
    alpha, delta, beta, eta = params
    h = x.new_zeros(*x.shape[:2], x.shape[-1], alpha.shape[-1])  # [B, Hkv, C, h]
    out = []
    for t in range(x.shape[2]):
        h = alpha * beta * x[:, :, t, :, None] + (1 - alpha * delta) * h
        out.append((eta * h).sum(-1))
    return torch.stack(out, dim=2) if out else x.clone()
