"""Scatterbrain: exact softmax on an LSH-bucket support, Performer random features elsewhere.

Also the home of what the causal hybrids that keep their keys share: the held state
(``HeldState``, ``run_held``), the query chunks (``query_chunks``), Performer's features
with the query stabiliser made explicit (``performer_parts``) and the rounding of a score
(``score_error``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, check_non_negative, check_positive, register
from longattn.methods.latte import Rounding, abs_scores, call_scale, check_state, magnitude_bound
from longattn.methods.performer import Performer, orthogonal_features
from longattn.types import FeatureView

# Query rows evaluated at once: a [B, Hkv, G, chunk, T] weight block, never the whole T x T.
QUERY_CHUNK = 256
SUPPORTS = ("lsh", "topk_blocks")


class HeldState(NamedTuple):
    """Every token a call has seen (in the accumulation dtype): keys ``k`` and values ``v``
    [B, Hkv, n, D], and the queries ``q`` [B, H, n, D] for a method whose rule reads earlier
    queries (None otherwise). O(n) memory: the state of a method whose support depends on every
    key seen (an LSH bucket, a top-k)."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor | None


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]


def run_held(
    name: str, state: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep_q: bool,
    attend: Attend,
) -> tuple[torch.Tensor, HeldState]:  # fmt: skip
    """A causal call on top of the tokens held in ``state``: ``attend(q_new, k_all, v_all, start,
    q_all)`` (in the accumulation dtype, the new queries at positions ``start..``) and the held
    state extended by this call's tokens."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    qa, ka, va = (t.to(acc) for t in (q, k, v))
    if state is not None:
        batch, n_kv, _, dim = ka.shape
        shapes = dict(k=(batch, n_kv, None, dim), v=(batch, n_kv, None, va.shape[-1]))
        if keep_q:
            if isinstance(state, HeldState) and state.q is None:
                raise ValueError(f"{name}: cannot resume from a HeldState without queries")
            shapes["q"] = (batch, qa.shape[1], None, dim)
        check_state(name, state, HeldState, acc, **shapes)
        ka, va = torch.cat([state.k, ka], dim=2), torch.cat([state.v, va], dim=2)
        if keep_q:
            qa = torch.cat([state.q, qa], dim=2)
    start = ka.shape[2] - k.shape[2]
    q_all = qa if keep_q else None
    out = attend(qa[:, :, start:] if keep_q else qa, ka, va, start, q_all)
    return out.to(v.dtype), HeldState(ka, va, q_all)


def query_chunks(q_len: int) -> Iterator[tuple[int, int]]:
    """Query rows ``lo:hi``, ``QUERY_CHUNK`` at a time."""
    for lo in range(0, q_len, QUERY_CHUNK):
        yield lo, min(lo + QUERY_CHUNK, q_len)


def grouped(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, H, T, X] -> [B, Hkv, G, T, X]: a KV head's query heads side by side."""
    return x.view(x.shape[0], n_kv, x.shape[1] // n_kv, *x.shape[2:])


def performer_parts(
    q: torch.Tensor, k: torch.Tensor, n_features: int, seed: int, layer: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Performer's features of q [B, H, T, F] and k [B, Hkv, T, F] (``Performer.feature_map``,
    draw ``seed`` at ``layer``) and the log of the factor each query's features were divided by,
    ``c`` [B, H, T]: ``exp(c_t) phi(q_t) . phi(k_s)`` estimates ``exp(scale q_t . k_s)``."""
    performer = Performer(features=n_features, seed=seed)
    phi_q = performer.feature_map(q, FeatureView("query", layer, scale))
    phi_k = performer.feature_map(k, FeatureView("key", layer, scale))
    w = orthogonal_features(seed, layer, 0, q.shape[-1], n_features).to(q.dtype)  # [m, D]
    # the map's query logit before its max: w.x - |x|^2 / 2 + |w|^2 / 2 on x = q * scale**0.5
    logits = (scale**0.5) * q @ w.T + 0.5 * (w * w).sum(-1)  # [B, H, T, m]
    c = logits.amax(-1) - (0.5 * scale) * (q * q).sum(-1)
    return phi_q, phi_k, c


def performer_logit_size(x: torch.Tensor, n_features: int, seed: int, layer: int, scale: float):
    """The largest ``sum_d |x'_d w_d| + |x'|^2 / 2 + |w|^2 / 2 + log(m)`` (x' = x scale**0.5)
    over rows x and draws w: a bound on every term of a Performer feature's logit."""
    if x.numel() == 0:
        return 0.0
    w = orthogonal_features(seed, layer, 0, x.shape[-1], n_features)
    x = x.double() * scale**0.5
    half_w2 = float(0.5 * (w * w).sum(-1).max())
    dots = float((x.abs() @ w.abs().T).max())
    return dots + float(0.5 * (x * x).sum(-1).max()) + half_w2 + math.log(n_features)


def score_error(r: Rounding, q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """What a score ``scale q . k`` less a row maximum is off by: ``(gamma(D) + 5u) A``, A the
    largest ``|scale| sum |q_d k_d|`` (the dot, and the subtraction: ``|s - M| <= 2A``)."""
    n_kv = k.shape[1]
    rows = q.double().reshape(q.shape[0], n_kv, -1, q.shape[-1])
    return (r.gamma(q.shape[-1]) + 5 * r.u) * abs_scores(rows, k.double(), scale)


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lsh_buckets(x: torch.Tensor, n_buckets: int, n_rounds: int, seed: int) -> torch.Tensor:
    """[..., T, D] -> [..., T, n_rounds] int64: per round, the bucket ``argmax_j x . r_j`` over
    ``n_buckets`` seeded Gaussian directions (angular LSH; the argmax ignores |x|). Computed in
    float64 so every dtype of a call hashes the same rows to the same buckets."""
    gen = torch.Generator().manual_seed(_seed("scatterbrain-lsh", seed, x.shape[-1]))
    dirs = torch.randn(n_rounds, x.shape[-1], n_buckets, generator=gen, dtype=torch.float64)
    proj = x.double().unsqueeze(-3) @ dirs.to(x.device)  # [..., R, T, n_buckets]
    return proj.argmax(-1).movedim(-2, -1)


def top_blocks(q: torch.Tensor, k: torch.Tensor, start: int, size: int, n_blocks: int):
    """Per query at positions ``start..``: its own block of ``size`` keys and the ``n_blocks``
    earlier (complete) blocks with the highest ``q . mean(k_block)``, in float64 with ties to
    the earlier block; bool [B, Hkv, G, Tq, Tk] (causality not applied)."""
    n_kv, length = k.shape[1], k.shape[2]
    n_full = length // size
    q_block = torch.arange(start, length, device=k.device) // size  # [Tq]
    k_block = torch.arange(length, device=k.device) // size  # [Tk]
    own = q_block[:, None] == k_block[None, :]
    means = k[:, :, : n_full * size].double().unflatten(2, (n_full, size)).mean(3)  # [B,Hkv,nb,D]
    scores = grouped(q.double(), n_kv) @ means.unsqueeze(2).transpose(-1, -2)  # [B,Hkv,G,Tq,nb]
    earlier = torch.arange(n_full, device=k.device)[None, :] < q_block[:, None]  # [Tq, nb]
    scores = scores.masked_fill(~earlier, -torch.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n_full, device=k.device).expand_as(order).contiguous()
    )
    chosen = (rank < n_blocks) & earlier  # [B, Hkv, G, Tq, nb]
    in_full = k_block < n_full
    picked = chosen[..., k_block.clamp(max=max(n_full - 1, 0))] if n_full else own & False
    return own | (picked & in_full)


@register("scatterbrain")
@dataclass(frozen=True)
class Scatterbrain(Method):
    """Sparse + low-rank attention: every causal pair is weighed by Performer's random-feature
    estimate ``phi(q) . phi(k)`` of ``exp(scale q . k)``, except on a sparse support S where the
    residual ``exp(scale q . k) - phi(q) . phi(k)`` is added, i.e. the pair is exact; numerator
    and normaliser alike. Chen et al. 2021, arXiv:2110.15343.

    S (``sparse="lsh"``): the pairs whose query and key fall in the same bucket in at least one
    of ``n_rounds`` rounds of angular LSH over ``n_buckets`` seeded directions (hashed in
    float64, so every dtype chooses the same support); ``n_buckets=1`` puts every pair in S:
    exact softmax. ``sparse="topk_blocks"``: the query's own block of ``block_size`` keys (up to
    itself) and the ``n_blocks`` earlier blocks whose mean key scores highest with the query
    (in float64, ties to the earlier block). The features are
    ``Performer(features=n_features, seed=seed)``'s draw for the layer.
    Causal; the support of a query depends on every earlier key, so the state is every key and
    value seen (``HeldState``, O(T) memory). The output is evaluated directly as the weighted
    sum above per chunk of queries (O(T^2 F) time), not as low-rank total minus support plus
    exact, so no cancellation enters; a bucket-sorted sparse kernel is not done here.
    Deviation from paper: no learned hashing; queries and keys share the hash directions.
    """

    n_features: int = 64
    n_buckets: int = 8
    n_rounds: int = 1
    sparse: str = "lsh"
    block_size: int = 64
    n_blocks: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(
            "Scatterbrain", n_features=self.n_features, n_buckets=self.n_buckets,
            n_rounds=self.n_rounds, block_size=self.block_size,
        )  # fmt: skip
        check_non_negative("Scatterbrain", seed=self.seed, n_blocks=self.n_blocks)
        if self.sparse not in SUPPORTS:
            raise ValueError(f"Scatterbrain.sparse must be one of {SUPPORTS}, got {self.sparse!r}")

    @property
    def is_causal(self) -> bool:
        return True

    def forward(self, q, k, v, state, view=None):
        scale, layer = call_scale(view, q.shape[-1]), getattr(view, "layer", 0)

        def attend(q_new, k_all, v_all, start, _):
            return self._attend(q_new, k_all, v_all, start, scale, layer)

        return run_held("Scatterbrain", state, q, k, v, False, attend)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: the causal weight matrix materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        scale, layer = call_scale(view, q.shape[-1]), getattr(view, "layer", 0)
        weights = self.weights(q, k, k.shape[2] - q.shape[2], scale, layer)  # [B, Hkv, G, Tq, Tk]
        out = (weights @ v.unsqueeze(2)) / weights.sum(-1, keepdim=True)
        return out.reshape(*q.shape[:3], v.shape[-1])

    def support(self, q: torch.Tensor, k: torch.Tensor, start: int = 0) -> torch.Tensor:
        """S as bool [B, Hkv, G, Tq, Tk] for queries at positions ``start..`` (causality not
        applied)."""
        if self.sparse == "topk_blocks":
            return top_blocks(q, k, start, self.block_size, self.n_blocks)
        hq = grouped(lsh_buckets(q, self.n_buckets, self.n_rounds, self.seed), k.shape[1])
        hk = lsh_buckets(k, self.n_buckets, self.n_rounds, self.seed)[:, :, None]
        return (hq.unsqueeze(-2) == hk.unsqueeze(-3)).any(-1)

    def weights(self, q, k, start, scale, layer, low_rank_on_support=False):
        """The causal weights [B, Hkv, G, Tq, Tk] of queries at positions ``start..``, each row
        divided by ``exp(m_t)`` (m_t the larger of the query's feature factor and its largest
        exact score). ``low_rank_on_support`` also adds the features' estimate on S (the
        double count the residual avoids): a wrong variant, for tests."""
        n_kv = k.shape[1]
        phi_q, phi_k, c = performer_parts(q, k, self.n_features, self.seed, layer, scale)
        pos = torch.arange(k.shape[2], device=k.device)
        causal = pos[None, :] <= pos[start:, None]  # [Tq, Tk]
        exact_on = self.support(q, k, start) & causal
        scores = scale * grouped(q, n_kv) @ k.unsqueeze(2).transpose(-1, -2)
        c = grouped(c, n_kv).unsqueeze(-1)  # [B, Hkv, G, Tq, 1]
        top = scores.masked_fill(~exact_on, -torch.inf).amax(-1, keepdim=True)
        top = torch.maximum(top, c)
        low = (grouped(phi_q, n_kv) @ phi_k.unsqueeze(2).transpose(-1, -2)) * torch.exp(c - top)
        exact = torch.exp(scores.masked_fill(~exact_on, -torch.inf) - top)
        if low_rank_on_support:
            return (exact + low).masked_fill(~causal, 0.0)
        return torch.where(exact_on, exact, low.masked_fill(~causal, 0.0))

    def _attend(self, q, k, v, start, scale, layer):
        n_kv = k.shape[1]
        out = q.new_empty(*grouped(q, n_kv).shape[:4], v.shape[-1])  # [B, Hkv, G, Tq, Dv]
        for lo, hi in query_chunks(q.shape[2]):
            end = start + hi  # keys after the chunk's last query never count
            w = self.weights(q[:, :, lo:hi], k[:, :, :end], start + lo, scale, layer)
            out[:, :, :, lo:hi] = (w @ v[:, :, None, :end]) / w.sum(-1, keepdim=True)
        return out.reshape(*q.shape[:3], v.shape[-1])

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). A feature's logit (a dot over D with a float32 copy of the float64
        draw, |x|^2 / 2, |w|^2 / 2, the row max) is off by ``E_f = (gamma(D) + 8u) 2L``, L the
        largest sum of its terms' magnitudes (``performer_logit_size``), and so is the query's
        factor c; a feature by ``E_f + eta`` relative, ``phi(q) . phi(k)`` (F positive terms)
        by ``2(E_f + eta) + gamma(F)``, its rescaling ``exp(c - m)`` by ``E_f + E_s + eta +
        u (L + A)``. An exact pair's score less m is off by ``2 E_s`` (``score_error``), its
        weight by ``2 E_s + eta``. The support is chosen in float64 (the same in every dtype).
        Numerator and normaliser (at most T positive terms each) add ``gamma(T + 2)`` each
        and the ratio ``u``: ``magnitude_bound`` with rho twice the weights' error plus those."""
        r = Rounding.of(q.dtype)
        scale, layer = call_scale(view, q.shape[-1]), getattr(view, "layer", 0)
        size = max(
            performer_logit_size(x, self.n_features, self.seed, layer, scale) for x in (q, k)
        )
        e_f = (r.gamma(q.shape[-1]) + 8 * r.u) * 2 * size
        e_s = score_error(r, q, k, scale)
        a_max = e_s / (r.gamma(q.shape[-1]) + 5 * r.u)
        low = 3 * (e_f + r.eta) + r.gamma(self.n_features) + e_s + r.u * (size + a_max)
        weight = max(low, 2 * e_s + r.eta)
        rho = 2 * weight + 2 * r.gamma(k.shape[2] + 2) + r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)
