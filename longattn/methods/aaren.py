"""Aaren: attention as a recurrent network, softmax attention's many-to-many outputs by a prefix
scan of an associative (max, sum, weighted sum) combine.

Also the home of that combine (``combine``), the merge of partial softmax results.
"""

from __future__ import annotations

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
    magnitude_bound,
    seeded_normal,
)

QUERIES = ("call", "fixed")


class ScanState(NamedTuple):
    """A partial softmax over a set of keys: the largest score ``m`` [...], the sum of
    ``exp(score - m)`` ``u`` [...], and the sum of ``exp(score - m) v`` ``w`` [..., Dv]."""

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor


def combine(a: ScanState, b: ScanState) -> ScanState:
    """The softmax over the union of two key sets from their partial results (associative and
    commutative; an empty set has ``m = -inf``, ``u = 0``, ``w = 0``)."""
    m = torch.maximum(a.m, b.m)
    safe = torch.where(torch.isneginf(m), 0.0, m)  # both empty: keep the zeros, no NaN
    sa, sb = torch.exp(a.m - safe), torch.exp(b.m - safe)
    return ScanState(m, a.u * sa + b.u * sb, a.w * sa[..., None] + b.w * sb[..., None])


def prefix_scan(leaves: ScanState, dim: int) -> ScanState:
    """Inclusive prefix ``combine`` along ``dim`` (of ``m`` and ``u``; ``w`` has one more trailing
    dim) in log2(T) parallel steps (Hillis-Steele): position t holds the combine of 0..t."""
    m, u, w = leaves
    length, step = m.shape[dim], 1
    while step < length:
        head = ScanState(
            m.narrow(dim, 0, length - step),
            u.narrow(dim, 0, length - step),
            w.narrow(dim, 0, length - step),
        )
        tail = ScanState(
            m.narrow(dim, step, length - step),
            u.narrow(dim, step, length - step),
            w.narrow(dim, step, length - step),
        )
        merged = combine(head, tail)
        m = torch.cat([m.narrow(dim, 0, step), merged.m], dim)
        u = torch.cat([u.narrow(dim, 0, step), merged.u], dim)
        w = torch.cat([w.narrow(dim, 0, step), merged.w], dim)
        step *= 2
    return ScanState(m, u, w)


class CallState(NamedTuple):
    """Aaren with the call's queries: every key and value seen, [B, Hkv, T, D] (not O(1): a new
    query must read every past key; grown by a copy per call, a demonstration of exactness rather
    than a serving path, which is dense attention over the library's cache)."""

    k: torch.Tensor
    v: torch.Tensor


@register("aaren")
@dataclass(frozen=True)
class Aaren(Method):
    """Attention as an RNN: causal softmax attention by a prefix scan of (max, sum, weighted sum).
    Feng et al. 2024, arXiv:2405.13956.

    ``query="call"`` (the drop-in default): each position uses the call's own query, which is
    exact causal softmax attention evaluated with the same combine over the past (``CallState``:
    all past keys and values, as a dense cache holds them; the recurrence is O(1) only for a
    fixed query).
    ``query="fixed"`` (the paper): one query vector per query head (a layer's calibration tensor
    ``query`` [H, D], else seeded standard normal; the call's queries give only the shape), so
    ``out_t = softmax_{s <= t}(scale q . k_s) v`` for every t comes from ONE inclusive prefix scan
    and decoding keeps O(1) state per query head: the ``ScanState`` (m, u, w) of all past keys.
    Deviation from paper: the fixed query is not learned here (a calibration file may supply it).
    ``scan_block``: the fixed query's scan runs over blocks of this many keys, linked by the
    state, so its memory is O(block) per head whatever the length.
    """

    query: str = "call"
    seed: int = 0
    scan_block: int = 4096

    def __post_init__(self) -> None:
        check_positive("Aaren", scan_block=self.scan_block)
        if self.query not in QUERIES:
            raise ValueError(f"Aaren.query must be one of {QUERIES}, got {self.query!r}")

    @property
    def is_causal(self) -> bool:
        return True

    def fixed_query(self, view: Any, n_heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """[H, D]: the query of every position with ``query="fixed"``."""
        found = layer_tensor(view, "query", "Aaren", (n_heads, dim))
        if found is not None:
            return found.to(dtype)
        return seeded_normal((n_heads, dim), self.seed, dtype)

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        q, k, vv = (t.to(acc) for t in (q, k, v))
        if self.query == "call":
            return self._forward_call(q, k, vv, state, view, v.dtype)
        batch, n_heads, _, dim = q.shape
        n_kv, length = k.shape[1], k.shape[2]
        fixed = self.fixed_query(view, n_heads, dim, acc).view(n_kv, -1, dim)  # [Hkv, G, D]
        scores = call_scale(view, dim) * torch.einsum("bktd,kgd->bkgt", k, fixed)  # [B,Hkv,G,T]
        group, dim_v = fixed.shape[1], vv.shape[-1]
        if state is not None:  # [B, H, ...] -> [B, Hkv, G, ...]
            heads = (batch, n_heads)
            check_state("Aaren", state, ScanState, acc, m=heads, u=heads, w=(*heads, dim_v))
            state = ScanState(*(t.reshape(batch, n_kv, group, *t.shape[2:]) for t in state))
        outs = []
        for lo in range(0, length, self.scan_block):  # bounded memory; the state links blocks
            hi = min(lo + self.scan_block, length)
            part = scores[..., lo:hi]
            values = vv[:, :, None, lo:hi].expand(-1, -1, group, -1, -1)  # [B, Hkv, G, n, Dv]
            prefix = prefix_scan(ScanState(part, torch.ones_like(part), values), dim=3)
            if state is not None:
                prefix = combine(
                    ScanState(state.m[..., None], state.u[..., None], state.w[..., None, :]), prefix
                )
            outs.append(prefix.w / prefix.u[..., None])
            state = ScanState(prefix.m[..., -1], prefix.u[..., -1], prefix.w[..., -1, :])
        out = torch.cat(outs, 3) if outs else vv.new_zeros(batch, n_kv, group, 0, vv.shape[-1])
        if state is not None:
            state = ScanState(*(t.reshape(batch, n_heads, *t.shape[3:]) for t in state))
        return out.reshape(batch, n_heads, length, -1).to(v.dtype), state

    def _forward_call(self, q, k, v, state, view, out_dtype, block=256):
        """Each query block combines the partial softmax of every past key block with its own."""
        batch, n_heads, q_len, dim = q.shape
        n_kv = k.shape[1]
        if state is not None:
            kv_shape = (batch, n_kv, None)
            check_state(
                "Aaren", state, CallState, k.dtype, k=(*kv_shape, dim), v=(*kv_shape, v.shape[-1])
            )
            k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
        offset, scale = k.shape[2] - q_len, call_scale(view, dim)
        rows = q.reshape(batch, n_kv, -1, q_len, dim)  # [B, Hkv, G, T, D]
        outs = []
        for lo in range(0, q_len, block):
            hi = min(lo + block, q_len)
            scores = scale * rows[..., lo:hi, :] @ k[:, :, None, : offset + hi].transpose(-1, -2)
            key_pos = torch.arange(offset + hi)
            visible = key_pos <= (offset + torch.arange(lo, hi))[:, None]  # [t, s]
            scores = scores.masked_fill(~visible, -torch.inf)  # [B, Hkv, G, t, s]
            total = ScanState(*_empty(scores.shape[:-1], v.shape[-1], scores.dtype))
            for s_lo in range(0, offset + hi, block):
                part = scores[..., s_lo : s_lo + block]
                m = part.amax(-1)
                e = torch.exp(part - torch.where(torch.isneginf(m), 0.0, m)[..., None])
                vals = v[:, :, None, s_lo : s_lo + block]
                total = combine(total, ScanState(m, e.sum(-1), e @ vals))
            outs.append(total.w / total.u[..., None])
        out = (
            torch.cat(outs, 3)
            if outs
            else q.new_zeros(batch, n_kv, n_heads // n_kv, 0, v.shape[-1])
        )
        return out.reshape(batch, n_heads, q_len, -1).to(out_dtype), CallState(k, v)

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``): causal softmax attention of the fixed or the call's queries. A score is a
        dot over D, off by ``E = (gamma(D) + 3u) A`` (A the largest ``|scale| sum |q_d k_d|``;
        the dot, then the subtraction of a max, ``|s - m| <= 2A``); a normalised weight by
        ``2E + 4eta + 3gamma(n + calls) + 2u``: the combine rescales numerator and normaliser by
        one rounded exp, which cancels up to the products' roundings (at most log2 n per term,
        within gamma(n)). The weights are non-negative: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        batch, n_heads, _, dim = q.shape
        rows = q.double()
        if self.query == "fixed":
            rows = self.fixed_query(view, n_heads, dim, torch.float64)[None, :, None]
        rows = rows.expand_as(q).reshape(batch, k.shape[1], -1, dim)  # [B, Hkv, G*T, D]
        e = (r.gamma(dim) + 3 * r.u) * abs_scores(rows, k.double(), call_scale(view, dim))
        rho = 2 * e + 4 * r.eta + 3 * r.gamma(k.shape[2] + calls) + 2 * r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: causal softmax attention of the queries (the fixed
        query at every position with ``query="fixed"``), the T x T matrix materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, q_len, dim = q.shape
        if self.query == "fixed":
            q = self.fixed_query(view, n_heads, dim, q.dtype)[None, :, None].expand_as(q)
        group = n_heads // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = call_scale(view, dim) * q @ k.transpose(-1, -2)
        causal = torch.ones(q_len, k.shape[2], dtype=torch.bool).tril(k.shape[2] - q_len)
        return torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ v


def _empty(shape, dim_v, dtype):
    m = torch.full(shape, -torch.inf, dtype=dtype)
    return m, torch.zeros(shape, dtype=dtype), torch.zeros(*shape, dim_v, dtype=dtype)
