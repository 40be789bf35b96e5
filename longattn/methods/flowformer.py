"""Flowformer: linear attention normalised by flow conservation (causal form)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, register
from longattn.methods.latte import Rounding, check_state, magnitude_bound
from longattn.methods.sse import causal_linear

CLAMP = 10.0  # the conserved outgoing flow is clamped to [-CLAMP, CLAMP] before its exp


class FlowState(NamedTuple):
    """Running sums over every key seen, per (batch row, query head) unless marked: ``seen``
    (how many), ``keys`` [B, Hkv, 1, D] the sum of phi(k), ``queries`` [B, Hkv, G, D] the sum of
    phi(q), ``keys_out`` [B, Hkv, G, D] of phi(k) times its outgoing flow, ``queries_in``
    [B, Hkv, G, D] of phi(q) times its incoming flow, ``competition`` [B, Hkv, G] of the exp of the
    conserved outgoing flows, and ``kv`` [B, Hkv, G, D, Dv] the state of the causal product."""

    seen: int
    keys: torch.Tensor
    queries: torch.Tensor
    keys_out: torch.Tensor
    queries_in: torch.Tensor
    competition: torch.Tensor
    kv: torch.Tensor


class Flows(NamedTuple):
    """Per query head and position: ``incoming`` [B, Hkv, G, T] (the sink's normaliser over the
    position count), ``competition`` [B, Hkv, G, T] (the source's weight), ``allocation``
    [B, Hkv, G, T], and the conserved flows ``sink`` and ``source`` before sigmoid / exp."""

    incoming: torch.Tensor
    competition: torch.Tensor
    allocation: torch.Tensor
    sink: torch.Tensor
    source: torch.Tensor


@register("flowformer")
@dataclass(frozen=True)
class Flowformer(Method):
    """Flow-conservation attention: linear attention with sigmoid features whose sinks (queries)
    and sources (keys) are normalised by their incoming and outgoing flows, sources compete for
    the values (an exp normalised over the sources so far) and sinks are gated by their conserved
    incoming flow (a sigmoid). Wu et al. 2022, arXiv:2202.06258 (the paper's causal version).

    With phi = sigmoid, position t counted from 1 over every key seen (``n_t``), ``<x, y>`` the
    dot product of x + eps and y + eps, and sums over s <= t:
    ``I_t = <phi(q_t), sum phi(k_s)> / n_t``, ``O_t = <phi(k_t), sum phi(q_s)> / n_t``,
    ``sink_t = <phi(q_t), sum phi(k_s) / O_s> / n_t``,
    ``source_t = clamp(<phi(k_t), sum phi(q_s) / I_s> / n_t, +-10)``,
    ``c_s = n_s exp(source_s) / sum_{r <= s} exp(source_r)`` and
    ``out_t = sigmoid(sink_t) phi(q_t) . sum_s phi(k_s) c_s v_s^T / (n_t I_t)``.
    With GQA a query head's flows are its own (its KV head's keys are read, not copied); the
    competition makes the values per query head. The state (``FlowState``) is O(D Dv) per head.
    Deviation from paper: none in the form; the learned projections belong to the model.
    """

    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"Flowformer.eps must be in [0, 1), got {self.eps}")
        if self.chunk_size <= 0:
            raise ValueError(f"Flowformer.chunk_size must be > 0, got {self.chunk_size}")

    @property
    def is_causal(self) -> bool:
        return True

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        fq = torch.sigmoid(q.to(acc)).view(batch, n_kv, -1, length, dim)  # [B, Hkv, G, T, D]
        fk = torch.sigmoid(k.to(acc)).unsqueeze(2)  # [B, Hkv, 1, T, D]
        vv = v.to(acc).unsqueeze(2)
        if state is None:
            state = _empty_state(fq, vv.shape[-1])
        else:
            per_head = (batch, n_kv, n_heads // n_kv, dim)
            check_state(
                "Flowformer",
                state,
                FlowState,
                acc,
                keys=(batch, n_kv, 1, dim),
                queries=per_head,
                keys_out=per_head,
                queries_in=per_head,
                competition=per_head[:3],
                kv=(*per_head, vv.shape[-1]),
            )
        n = state.seen + torch.arange(1, length + 1, dtype=acc)  # [T]
        eps = self.eps
        keys = state.keys.unsqueeze(3) + fk.cumsum(3)  # [B, Hkv, 1, T, D]
        queries = state.queries.unsqueeze(3) + fq.cumsum(3)  # [B, Hkv, G, T, D]
        incoming = _dot(fq + eps, keys + eps) / n  # I_t
        outgoing = _dot(fk + eps, queries + eps) / n  # O_t, [B, Hkv, G, T]
        keys_out = state.keys_out.unsqueeze(3) + (fk / outgoing[..., None]).cumsum(3)
        queries_in = state.queries_in.unsqueeze(3) + (fq / incoming[..., None]).cumsum(3)
        sink = _dot(fq + eps, keys_out + eps) / n
        source = (_dot(fk + eps, queries_in + eps) / n).clamp(-CLAMP, CLAMP)
        exp_source = torch.exp(source)
        competition = state.competition.unsqueeze(3) + exp_source.cumsum(3)
        weight = exp_source / competition * n  # c_s
        out, kv = causal_linear(
            fq / (n * incoming)[..., None], fk, vv * weight[..., None], state.kv, self.chunk_size
        )
        out = out * torch.sigmoid(sink)[..., None]
        if length:
            state = FlowState(
                state.seen + length,
                keys[..., -1, :],
                queries[..., -1, :],
                keys_out[..., -1, :],
                queries_in[..., -1, :],
                competition[..., -1],
                kv,
            )
        return out.reshape(batch, n_heads, length, -1).to(v.dtype), state

    def flows(self, q: torch.Tensor, k: torch.Tensor) -> Flows:
        """The flows of one pass from position 1, every prefix sum a product with the T x T lower
        triangle (float64 in the reference; the definition the forward pass streams)."""
        batch, n_heads, length, dim = q.shape
        n_kv, eps = k.shape[1], self.eps
        fq = torch.sigmoid(q).view(batch, n_kv, -1, length, dim)
        fk = torch.sigmoid(k).unsqueeze(2)
        tri = torch.ones(length, length, dtype=q.dtype).tril()  # [t, s]: s <= t
        n = torch.arange(1, length + 1, dtype=q.dtype)
        incoming = _dot(fq + eps, tri @ fk + eps) / n
        outgoing = _dot(fk + eps, tri @ fq + eps) / n
        sink = _dot(fq + eps, tri @ (fk / outgoing[..., None]) + eps) / n
        source = _dot(fk + eps, tri @ (fq / incoming[..., None]) + eps) / n
        source = source.clamp(-CLAMP, CLAMP)
        competition = torch.exp(source) / (torch.exp(source) @ tri.T) * n
        return Flows(incoming, competition, torch.sigmoid(sink), sink, source)

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). Every factor but v is positive, built in stages whose relative errors
        add: phi = sigmoid (``e1 = eta + 2u``); prefix sums of phi (``e1 + g``, g = gamma(n + D +
        4) covering any one sum or dot, a carried state included); the flows I, O (a dot of two
        such and a division: ``r1 = 2e1 + 2g + 3u``); the conserved flows (``r2 = 4e1 + 4g +
        7u``); the allocation sigmoid(sink) (``r2 max|sink| + e1``); exp(source), the source
        clamped to +-10 (``expm1(r2 max|source|) + eta``); the competition, a ratio with its
        prefix sum (``2 rho_exp + g + u``); the output (phi(q), 1 / I, the state's sums, the
        dot, the allocation: ``2e1 + r1 + rho_comp + 2g + rho_alloc + 3u``)."""
        r = Rounding.of(q.dtype)
        flows = self.flows(q.double(), k.double())
        g = r.gamma(k.shape[2] + calls + q.shape[-1] + 4)
        e1 = r.eta + 2 * r.u
        r1 = 2 * e1 + 2 * g + 3 * r.u
        r2 = 4 * e1 + 4 * g + 7 * r.u
        largest = lambda t: float(t.abs().max()) if t.numel() else 0.0  # noqa: E731
        rho_alloc = r2 * largest(flows.sink) + e1
        rho_exp = math.expm1(r2 * min(largest(flows.source), CLAMP)) + r.eta
        rho_comp = 2 * rho_exp + g + r.u
        rho = 2 * e1 + r1 + rho_comp + 2 * g + rho_alloc + 3 * r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: the T x T flow weights materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        flows = self.flows(q, k)
        fq = torch.sigmoid(q).view(batch, n_kv, -1, length, dim)
        fk = torch.sigmoid(k).unsqueeze(2)
        n = torch.arange(1, length + 1, dtype=q.dtype)
        weights = (fq @ fk.transpose(-1, -2)).tril()  # [B, Hkv, G, t, s]
        weights = weights * (flows.allocation / (n * flows.incoming))[..., None]
        weights = weights * flows.competition[..., None, :]
        out = weights @ v.unsqueeze(2)
        return out.reshape(batch, n_heads, length, -1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last dim, broadcasting the group dim."""
    return (a * b).sum(-1)


def _empty_state(fq: torch.Tensor, dim_v: int) -> FlowState:
    batch, n_kv, group, _, dim = fq.shape
    per_head = fq.new_zeros(batch, n_kv, group, dim)
    return FlowState(
        0,
        fq.new_zeros(batch, n_kv, 1, dim),
        per_head,
        per_head,
        per_head,
        fq.new_zeros(batch, n_kv, group),
        fq.new_zeros(batch, n_kv, group, dim, dim_v),
    )
