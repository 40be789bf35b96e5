"""SEA: exact sparse attention on each query's top-k keys of a linear-attention estimate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longattn.method import Method, check_non_negative, check_positive, register
from longattn.methods.latte import Rounding, call_scale, magnitude_bound
from longattn.methods.scatterbrain import (
    grouped,
    performer_parts,
    query_chunks,
    run_held,
    score_error,
)

ESTIMATORS = ("performer", "elu")


@register("sea")
@dataclass(frozen=True)
class SEA(Method):
    """Sparse attention with an estimated mask: a kernel feature map estimates every causal
    score, each query keeps its ``top_k`` keys of the estimate (or ``ceil(fraction (t + 1))``
    of the t + 1 it sees when ``fraction`` > 0), and exact softmax runs over those keys only.
    Lee et al. 2023, arXiv:2310.01777.

    Estimators: ``"performer"`` (``Performer(features=n_features, seed=seed)``'s draw for the
    layer, an unbiased estimate of ``exp(scale q . k)``) or ``"elu"`` (``elu(x) + 1``, the
    linear transformer's map on the head dimension). The estimate is computed in float64 and
    ties go to the earlier key, so every dtype of a call selects the same keys. A query always
    keeps at least one key; ``top_k`` at or above the keys it sees is dense causal attention.
    Causal; the state is every key and value seen (``HeldState``, O(T) memory): a query's top-k
    ranges over all earlier keys. Evaluated per chunk of queries as a masked product (O(T^2 F)
    time for the estimate).
    Deviation from paper: no trained estimator (SEA distils a CNN that decodes the compressed
    attention matrix from a Performer estimate); the top-k is taken on the raw estimate.
    """

    top_k: int = 64
    fraction: float = 0.0
    estimator: str = "performer"
    n_features: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("SEA", top_k=self.top_k, n_features=self.n_features)
        check_non_negative("SEA", seed=self.seed)
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"SEA.fraction must be in [0, 1], got {self.fraction}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"SEA.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    @property
    def is_causal(self) -> bool:
        return True

    def forward(self, q, k, v, state, view=None):
        scale, layer = call_scale(view, q.shape[-1]), getattr(view, "layer", 0)

        def attend(q_new, k_all, v_all, start, _):
            n_kv = k_all.shape[1]
            out = q_new.new_empty(*grouped(q_new, n_kv).shape[:4], v_all.shape[-1])
            for lo, hi in query_chunks(q_new.shape[2]):
                end = start + hi
                w = self.weights(q_new[:, :, lo:hi], k_all[:, :, :end], start + lo, scale, layer)
                out[:, :, :, lo:hi] = (w @ v_all[:, :, None, :end]) / w.sum(-1, keepdim=True)
            return out.reshape(*q_new.shape[:3], v_all.shape[-1])

        return run_held("SEA", state, q, k, v, False, attend)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: the estimate, the mask and the weights materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        scale, layer = call_scale(view, q.shape[-1]), getattr(view, "layer", 0)
        weights = self.weights(q, k, k.shape[2] - q.shape[2], scale, layer)
        out = (weights @ v.unsqueeze(2)) / weights.sum(-1, keepdim=True)
        return out.reshape(*q.shape[:3], v.shape[-1])

    def estimate(self, q, k, scale, layer) -> torch.Tensor:
        """The estimated scores [B, Hkv, G, Tq, Tk] in float64 (any monotone form: ranks only)."""
        q, k = q.double(), k.double()
        if self.estimator == "elu":
            phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
            return grouped(phi_q, k.shape[1]) @ phi_k.unsqueeze(2).transpose(-1, -2)
        phi_q, phi_k, _ = performer_parts(q, k, self.n_features, self.seed, layer, scale)
        return grouped(phi_q, k.shape[1]) @ phi_k.unsqueeze(2).transpose(-1, -2)

    def keep(self, q, k, start, scale, layer) -> torch.Tensor:
        """The selected keys, bool [B, Hkv, G, Tq, Tk] (causal), of queries at ``start..``."""
        pos = torch.arange(k.shape[2], device=k.device)
        causal = pos[None, :] <= pos[start:, None]  # [Tq, Tk]
        est = self.estimate(q, k, scale, layer).masked_fill(~causal, -torch.inf)
        seen = pos[start:] + 1  # keys each query sees
        if self.fraction > 0:
            budget = torch.ceil(seen.double() * self.fraction).long().clamp(min=1)
        else:
            budget = seen.clamp(max=self.top_k)
        order = torch.sort(est, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order).contiguous())
        return (rank < budget[:, None]) & causal

    def weights(self, q, k, start, scale, layer, drop_one=False):
        """``exp(scale q . k - max)`` on the selected keys, 0 elsewhere. ``drop_one`` drops
        each query's earliest selected key when it has more than one (a wrong variant, for
        tests)."""
        keep = self.keep(q, k, start, scale, layer)
        if drop_one:
            first = keep.long().cumsum(-1) == 1
            keep = keep & ~(first & (keep.sum(-1, keepdim=True) > 1))
        scores = scale * grouped(q, k.shape[1]) @ k.unsqueeze(2).transpose(-1, -2)
        scores = scores.masked_fill(~keep, -torch.inf)
        return torch.exp(scores - scores.amax(-1, keepdim=True))

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). The selection is the same in every dtype (a float64 estimate, ties to the
        earlier key); on it a score less the row max is off by ``2 E_s`` (``score_error``), a
        weight by ``2 E_s + eta``; numerator and normaliser (at most T positive terms) by
        ``gamma(T + 2)`` each, the ratio by u: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        scale = call_scale(view, q.shape[-1])
        weight = 2 * score_error(r, q, k, scale) + r.eta
        rho = 2 * weight + 2 * r.gamma(k.shape[2] + 2) + r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)
