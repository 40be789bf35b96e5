"""Combiner (fixed, logsparse and axial factorisations): exact attention inside a query's region,
abstractions (local conditional expectations) of the earlier regions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.latte import Rounding, call_scale, magnitude_bound
from longattn.methods.scatterbrain import grouped, query_chunks, run_held

FACTORIZATIONS = ("fixed", "logsparse", "axial")


class Regions(NamedTuple):
    """The abstractions of S spans of complete regions, per (batch, KV head, query head of the
    group): ``base`` [B, Hkv, G, S] = ``lse_j - scale qbar_j . khat_j``, ``khat`` [B, Hkv, G, S,
    D] the softmax-weighted mean key, ``vbar`` [B, Hkv, G, S, Dv] the softmax-weighted mean value;
    ``visible`` [R + 1, S] bool: the spans a query in region b reads (row b); ``column`` [S] or
    None: the one offset within its region of the queries that read span s ("axial"), None where
    every query of a region in ``visible`` reads it."""

    base: torch.Tensor
    khat: torch.Tensor
    vbar: torch.Tensor
    visible: torch.Tensor
    column: torch.Tensor | None = None


def log_spans(n_full: int) -> list[tuple[int, int]]:
    """The logsparse spans ``[lo, hi)`` (in regions) of every query region b <= n_full: going
    back from b, one region, then two, four, ... (clipped at region 0); each b's spans cover
    regions 0 .. b - 1 exactly once."""
    spans = []
    for b in range(1, n_full + 1):
        level = 0
        while b - 2**level >= 0:
            span = (max(0, b - 2 ** (level + 1) + 1), b - 2**level + 1)
            if span not in spans:
                spans.append(span)
            level += 1
    return spans


def summarise(qg, k_r, v_r, scale):
    """Abstractions of spans: qg [B, Hkv, G, S.., n, D] their queries (read at their mean),
    k_r / v_r [B, Hkv, 1, S.., n', D] their keys and values (broadcast against qg over S..) ->
    (base, khat, vbar) as in ``Regions``, over S.."""
    qbar = qg.mean(-2)  # [B, Hkv, G, S.., D]
    logits = scale * (k_r @ qbar.unsqueeze(-1)).squeeze(-1)  # [B, Hkv, G, S.., n']
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.unsqueeze(-1)).unsqueeze(-2)  # [B, Hkv, G, S.., 1, n']
    khat, vbar = (p @ k_r).squeeze(-2), (p @ v_r).squeeze(-2)
    return lse - scale * (qbar * khat).sum(-1), khat, vbar


@register("combiner")
@dataclass(frozen=True)
class Combiner(Method):
    """Combiner: the positions are cut into contiguous regions of ``region`` tokens; a query
    attends exactly to the keys of its own region up to itself and, through one abstraction
    each, to every earlier region (``factorization="fixed"``), to logsparse spans of earlier
    regions (``"logsparse"``: going back from the query's region, one region, then two, four,
    ...: O(log(T / region)) abstractions per query), or (``"axial"``, the paper's Combiner-Axial,
    its row-major form: the sequence as a matrix with rows of ``region`` tokens) to every
    earlier row through that row's abstraction at the query's column. Ren et al. 2021,
    arXiv:2107.05768.

    A span j's (a region's, for "fixed") local conditional expectation is read at its mean
    query qbar_j:
    ``p_j(s) = softmax_{s in j}(scale qbar_j . k_s)``, its log-sum-exp ``lse_j``, mean key
    ``khat_j = sum p_j(s) k_s`` and mean value ``vbar_j = sum p_j(s) v_s``. Query t weighs the
    region by the first-order expansion of the region's log-sum-exp around qbar_j,
    ``lse_j + scale (q_t - qbar_j) . khat_j`` (exact when q_t = qbar_j), and reads ``vbar_j``;
    one softmax over the direct keys and the span logits. With "axial", the query at (row b,
    column c) reads, for each earlier row a, the span "row a at column c": all of row a's keys
    read at the one query q_ac in place of qbar_j (``region`` abstractions per row; each query
    reads T / region of them). ``region`` >= T is dense causal attention, and so is
    ``region=1`` with "fixed" or "axial"; "axial" is exact too when every column's queries are
    equal down the rows.
    Causal: a region is abstracted only once it is complete and before the query's own region.
    The state is every query, key and value seen (``HeldState``; the abstractions need a
    region's queries); a call with fewer queries than keys and no cache reads the library's
    zero padding as the missing queries.
    Deviation from paper: training-free; Combiner learns the abstraction (its p(s | region) is
    a trained attention, the abstraction's key max pooling or learned), here it is read off the
    model's own queries and keys. "axial" is the paper's omega_axial-rowmajor (section 4.3,
    Figure 1(F)); that row a's abstraction for column c is read at the one query q_ac (the full
    row a) is from the authors' code (google-research/combiner, ``axial_rowmajor``; the paper
    says only that it depends on the row and the column). Its axial-vertical and
    axial-horizontal factorisations (Figure 2) and the MLM forms are not implemented.
    """

    region: int = 64
    factorization: str = "fixed"

    def __post_init__(self) -> None:
        check_positive("Combiner", region=self.region)
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(
                f"Combiner.factorization must be one of {FACTORIZATIONS}, "
                f"got {self.factorization!r}"
            )

    @property
    def is_causal(self) -> bool:
        return True

    def forward(self, q, k, v, state, view=None):
        scale = call_scale(view, q.shape[-1])

        def attend(q_new, k_all, v_all, start, q_all):
            regions = self.regions(q_all, k_all, v_all, scale)
            n_kv = k_all.shape[1]
            out = q_new.new_empty(*grouped(q_new, n_kv).shape[:4], v_all.shape[-1])
            for lo, hi in query_chunks(q_new.shape[2]):
                end = start + hi
                w_d, w_r = self.weights(q_new[:, :, lo:hi], k_all[:, :, :end], start + lo,
                                        scale, regions)  # fmt: skip
                out[:, :, :, lo:hi] = self._mix(w_d, w_r, v_all[:, :, :end], regions)
            return out.reshape(*q_new.shape[:3], v_all.shape[-1])

        return run_held("Combiner", state, q, k, v, True, attend)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition (the queries of the call are the last Tq of the keys'
        tokens; the missing first ones are zeros, as the library passes them)."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        start = k.shape[2] - q.shape[2]
        if start:
            q = torch.cat([q.new_zeros(*q.shape[:2], start, q.shape[3]), q], dim=2)
        scale = call_scale(view, q.shape[-1])
        regions = self.regions(q, k, v, scale)
        w_d, w_r = self.weights(q[:, :, start:], k, start, scale, regions)
        out = self._mix(w_d, w_r, v, regions)
        return out.reshape(q.shape[0], q.shape[1], -1, v.shape[-1])

    def regions(self, q, k, v, scale) -> Regions:
        """The abstractions of q [B, H, T, D], k, v [B, Hkv, T, D]: each complete region (fixed),
        each complete region once per offset within it (axial) or each logsparse span of
        complete regions."""
        if self.factorization == "logsparse":
            return self._log_regions(q, k, v, scale)
        n_kv, n_full, size = k.shape[1], k.shape[2] // self.region, self.region
        rows = torch.arange(n_full + 1, device=k.device)[:, None]  # query regions b
        cut = n_full * size
        qg = grouped(q[:, :, :cut], n_kv).unflatten(3, (n_full, size))  # [B,Hkv,G,R,r,D]
        k_r = k[:, :, :cut].unflatten(2, (n_full, size)).unsqueeze(2)  # [B,Hkv,1,R,r,D]
        v_r = v[:, :, :cut].unflatten(2, (n_full, size)).unsqueeze(2)
        visible = torch.arange(n_full, device=k.device)[None, :] < rows  # [R + 1, R]
        if self.factorization == "fixed":
            return Regions(*summarise(qg, k_r, v_r, scale), visible)
        # axial: region a read at each of its queries q_ac alone, span a * r + c
        parts = summarise(qg.unsqueeze(-2), k_r.unsqueeze(4), v_r.unsqueeze(4), scale)
        base, khat, vbar = (x.flatten(3, 4) for x in parts)  # [B, Hkv, G, R r(, D)]
        column = torch.arange(cut, device=k.device) % size
        return Regions(base, khat, vbar, visible.repeat_interleave(size, dim=1), column)

    def _log_regions(self, q, k, v, scale) -> Regions:
        """``regions`` for "logsparse": one abstraction per span of ``log_spans``."""
        n_kv, n_full, size = k.shape[1], k.shape[2] // self.region, self.region
        spans = log_spans(n_full)
        parts = []
        for lo, hi in spans:  # spans differ in length: one at a time
            span = slice(lo * size, hi * size)
            parts.append(summarise(grouped(q[:, :, span], n_kv).unsqueeze(3),
                                   k[:, :, None, None, span], v[:, :, None, None, span], scale))  # fmt: skip
        if parts:
            base, khat, vbar = (torch.cat(x, dim=3) for x in zip(*parts))
        else:  # no complete region: nothing to abstract
            base = q.new_zeros(q.shape[0], n_kv, q.shape[1] // n_kv, 0)
            khat = q.new_zeros(*base.shape, q.shape[-1])
            vbar = q.new_zeros(*base.shape, v.shape[-1])
        visible = torch.zeros(n_full + 1, len(spans), dtype=torch.bool, device=k.device)
        for b in range(1, n_full + 1):
            for j in range(b.bit_length()):
                visible[b, spans.index((max(0, b - 2 ** (j + 1) + 1), b - 2**j + 1))] = True
        return Regions(base, khat, vbar, visible)

    def weights(self, q, k, start, scale, regions):
        """Direct weights [B, Hkv, G, Tq, Tk] and region weights [B, Hkv, G, Tq, R] of queries at
        positions ``start..``, each row relative to its largest logit."""
        n_kv = k.shape[1]
        pos = torch.arange(k.shape[2], device=k.device)
        q_reg, k_reg = pos[start:] // self.region, pos // self.region
        direct = (k_reg[None, :] == q_reg[:, None]) & (pos[None, :] <= pos[start:, None])
        n_full = regions.base.shape[-1]
        earlier = regions.visible[q_reg]  # [Tq, S]
        if regions.column is not None:  # axial: query (b, c) reads region a's abstraction at c
            earlier = earlier & (regions.column[None, :] == pos[start:, None] % self.region)
        qg = grouped(q, n_kv)  # [B, Hkv, G, Tq, D]
        d_logit = (scale * qg @ k.unsqueeze(2).transpose(-1, -2)).masked_fill(~direct, -torch.inf)
        r_logit = regions.base.unsqueeze(-2) + scale * qg @ regions.khat.transpose(-1, -2)
        r_logit = r_logit.masked_fill(~earlier, -torch.inf)
        top = d_logit.amax(-1, keepdim=True)  # finite: a query sees its own key
        if n_full:
            top = torch.maximum(top, r_logit.amax(-1, keepdim=True))
        return torch.exp(d_logit - top), torch.exp(r_logit - top)

    @staticmethod
    def _mix(w_d, w_r, v, regions):
        num = w_d @ v.unsqueeze(2) + w_r @ regions.vbar  # [B, Hkv, G, Tq, Dv]
        return num / (w_d.sum(-1, keepdim=True) + w_r.sum(-1, keepdim=True))

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). With ``Q`` the largest ``|scale| sum_d |q_td| max_s |k_sd|``, every score,
        ``scale qbar . k`` and ``scale q . khat`` is at most Q in magnitude (qbar and khat are
        means of queries and keys), and ``|lse| <= Q + log r``. A direct score less the row max
        is off by ``E = (gamma(D) + 5u) 2Q``. Region j: qbar by ``gamma(r)`` relative, its
        scores by ``E_b = E + gamma(r) Q``, p_j by ``E_p = 2E_b + 2eta + gamma(r) + u``, lse_j by
        ``E_b + eta + gamma(r) + u (Q + log r)``, khat and vbar by ``E_p + gamma(r)`` of their
        magnitude sums, the two dots with khat by ``(gamma(D) + E_p + gamma(r)) Q`` each, the
        three additions and the max by ``5u (2Q + log r)``; the region's weight by the sum plus
        ``eta``, its value by ``E_p + gamma(r)`` more. Numerator and normaliser (at most
        T + T / r positive terms): ``gamma(T + T / r + 2)`` each; ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        # r: the most tokens one abstraction summarises (a logsparse span: fewer than T)
        size = max(k.shape[2], 1) if self.factorization == "logsparse" else self.region
        scale = call_scale(view, q.shape[-1])
        kmax = k.double().abs().amax(dim=(0, 1, 2))  # [D]
        big_q = abs(scale) * float((q.double().abs() @ kmax).max()) if q.numel() else 0.0
        e = (r.gamma(q.shape[-1]) + 5 * r.u) * 2 * big_q
        e_b = e + r.gamma(size) * big_q
        e_p = 2 * e_b + 2 * r.eta + r.gamma(size) + r.u
        e_lse = e_b + r.eta + r.gamma(size) + r.u * (big_q + math.log(size))
        e_dot = (r.gamma(q.shape[-1]) + e_p + r.gamma(size)) * big_q
        e_region = e_lse + 2 * e_dot + 5 * r.u * (2 * big_q + math.log(size)) + r.eta
        weight = max(2 * e + r.eta, e_region + e_p + r.gamma(size))
        n = k.shape[2]
        rho = 2 * weight + 2 * r.gamma(n + n // size + 2) + r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)
