"""SSE: linear attention whose state rows are written only for each key's top-k features.

Also the home of the chunkwise causal linear attention the ``forward`` methods share
(``causal_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.latte import Rounding, call_scale, check_state, magnitude_bound


def causal_linear(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_t = qf_t . (kv + sum_{s <= t} kf_s v_s^T)`` chunk by chunk (quadratic inside a chunk,
    the state carried between chunks). qf [B, Hkv, G, T, F]; kf [B, Hkv, Gk, T, F] and v
    [B, Hkv, Gv, T, Dv] with Gk, Gv in {1, G} (a KV head's keys and values are read by its G query
    heads without being copied); kv [B, Hkv, Gs, F, Dv] or None (zeros). Returns out
    [B, Hkv, G, T, Dv] and the state after the last key."""
    length = qf.shape[3]
    if kv is None:
        kv = qf.new_zeros(*qf.shape[:2], 1, qf.shape[-1], v.shape[-1])
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=qf.device).tril()
    outs = []
    for lo in range(0, length, chunk_size):
        hi = min(lo + chunk_size, length)
        q_c, k_c, v_c = qf[..., lo:hi, :], kf[..., lo:hi, :], v[..., lo:hi, :]
        scores = (q_c @ k_c.transpose(-1, -2)).masked_fill(~causal[: hi - lo, : hi - lo], 0.0)
        outs.append(scores @ v_c + q_c @ kv)  # [B, Hkv, G, C, Dv]
        kv = kv + k_c.transpose(-1, -2) @ v_c
    out = torch.cat(outs, dim=3) if outs else qf.new_zeros(*qf.shape[:4], v.shape[-1])
    return out, kv


class SSEState(NamedTuple):
    """The linear-attention state after every key seen (the layout of the engine's
    ``LinearState``): ``kv`` [B, Hkv, D, Dv] the sum of write_s v_s^T and ``k_sum`` [B, Hkv, D]
    the sum of the writes (the normaliser)."""

    kv: torch.Tensor
    k_sum: torch.Tensor


@register("sse")
@dataclass(frozen=True)
class SSE(Method):
    """Row-sparse linear attention: each key writes only the state rows of its ``top_k`` largest
    features. The row-sparse update of Sparse State Expansion, Pan et al. 2025, arXiv:2507.16577.

    A key's write is a hard classification over the D state rows: the softmax of
    ``scale**0.5 k_s`` restricted to its ``top_k`` largest features (the others write nothing);
    a query reads every row with ``softmax(scale**0.5 q_t)``; ``out_t = sum_s w_ts v_s / sum_s
    w_ts`` with ``w_ts = read_t . write_s`` over s <= t (and the carried state). The state per
    KV head is the D x Dv matrix plus the D-row normaliser (``SSEState``). The rows are chosen
    by ``torch.topk`` on the raw keys, so a float32 call and its float64 reference choose the
    same rows (among exactly equal features the choice is torch's).
    Deviation from paper: no state expansion into routed partitions, no decay gate and no
    learned projections (they belong to a trained model); rows are selected from the call's
    keys, and the sparse writes are evaluated as dense products with zeros.
    """

    top_k: int = 8
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_positive("SSE", top_k=self.top_k, chunk_size=self.chunk_size)

    @property
    def is_causal(self) -> bool:
        return True

    def features(self, q, k, view):
        """The read weights [B, H, T, D] and the row-sparse writes [B, Hkv, T, D]."""
        if self.top_k > k.shape[-1]:
            raise ValueError(f"SSE.top_k={self.top_k} exceeds the head dim {k.shape[-1]}")
        root = call_scale(view, q.shape[-1]) ** 0.5
        chosen = torch.topk(k, self.top_k, dim=-1, sorted=False).indices
        keep = torch.zeros_like(k, dtype=torch.bool).scatter_(-1, chosen, True)
        writes = torch.softmax((root * k).masked_fill(~keep, -torch.inf), dim=-1)
        return torch.softmax(root * q, dim=-1), writes

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        q, k, vv = (t.to(acc) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        reads, writes = self.features(q, k, view)
        if state is not None:
            rows_v = (batch, n_kv, dim, vv.shape[-1])
            check_state("SSE", state, SSEState, acc, kv=rows_v, k_sum=rows_v[:3])
        # the normaliser rides along as a last value column of ones: one pass for both
        ones = vv.new_ones(*vv.shape[:-1], 1)
        values = torch.cat([vv, ones], dim=-1).unsqueeze(2)  # [B, Hkv, 1, T, Dv + 1]
        rows = reads.reshape(batch, n_kv, -1, length, dim)  # [B, Hkv, G, T, D]
        kv = (
            None if state is None else torch.cat([state.kv, state.k_sum[..., None]], -1)[:, :, None]
        )
        out, kv = causal_linear(rows, writes.unsqueeze(2), values, kv, self.chunk_size)
        out = out[..., :-1] / out[..., -1:]  # > 0: reads and writes are positive somewhere
        state = SSEState(kv[:, :, 0, :, :-1], kv[:, :, 0, :, -1])
        return out.reshape(batch, n_heads, length, -1).to(v.dtype), state

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). The read softmax over D of ``sqrt(scale) q`` (the scaling and the
        subtraction of the max: ``E_q = 3u sqrt(scale) max|q|``) is off by ``2E_q + 2eta +
        gamma(D) + u`` relative; the write softmax over the top-k likewise with ``gamma(k)``; a
        weight ``read . write`` adds ``gamma(D)``, and the normalised sums (state and chunk: at
        most n + D terms per output) double the weights' error and add ``2gamma(n + D + 2) +
        u``. The rows are chosen on the raw keys, exact in every dtype: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        dim = q.shape[-1]
        root = call_scale(view, dim) ** 0.5
        e_q = 3 * r.u * root * float(q.double().abs().max()) if q.numel() else 0.0
        e_k = 3 * r.u * root * float(k.double().abs().max()) if k.numel() else 0.0
        rel_read = 2 * e_q + 2 * r.eta + r.gamma(dim) + r.u
        rel_write = 2 * e_k + 2 * r.eta + r.gamma(self.top_k) + r.u
        rho = 2 * (rel_read + rel_write + r.gamma(dim)) + 2 * r.gamma(k.shape[2] + dim + 2) + r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: the T x T weights ``read_t . write_s`` materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        group = q.shape[1] // k.shape[1]
        reads, writes = self.features(q, k, view)
        weights = reads @ writes.repeat_interleave(group, 1).transpose(-1, -2)  # [B, H, T, T]
        weights = weights.tril()
        return (weights @ v.repeat_interleave(group, 1)) / weights.sum(-1, keepdim=True)
