"""SOFT: softmax-free attention, a Gaussian kernel made low-rank through Nystrom landmarks and a
Newton-Schulz pseudo-inverse; non-causal (encoders)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.agent_attention import pool_tokens, refuse_state
from longattn.methods.latte import Rounding, call_scale


def gaussian(x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``exp(-scale |x_i - y_j|^2 / 2)`` for x [..., n, D], y [..., m, D] (broadcast heads): the
    squared distance expanded as ``|x|^2 + |y|^2 - 2 x.y`` (one matrix product), clamped at 0."""
    sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)
    return torch.exp(-0.5 * scale * sq.clamp(min=0.0))


def newton_schulz_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` steps of ``Z <- 2Z - Z A Z`` from ``Z_0 = A^T / (|A|_1 |A|_inf)``, which
    converge to the Moore-Penrose pseudo-inverse of A [..., m, m] (Ben-Israel and Cohen)."""
    norm_1 = a.abs().sum(-2).amax(-1)  # max column sum
    norm_inf = a.abs().sum(-1).amax(-1)  # max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        z = 2 * z - z @ a @ z
    return z


class Landmarks(NamedTuple):
    """The landmarks of a call and the inverse of their kernel, float64 (``SOFT.landmarks``):
    ``points`` [B, Hkv, m, D] (the keys average-pooled) and ``inverse`` [B, Hkv, m, m]."""

    points: torch.Tensor
    inverse: torch.Tensor


@register("soft")
@dataclass(frozen=True)
class SOFT(Method):
    """Softmax-free attention: the Gaussian kernel ``S_ij = exp(-scale |q_i - k_j|^2 / 2)``
    (``exp(-|q - k|^2 / (2 sqrt d))`` at the default scale) in the Nystrom form
    ``S ~ P Z B`` with ``m = n_landmarks`` landmarks L (the keys average-pooled),
    ``P = S(Q, L)``, ``B = S(L, K)`` and ``Z`` the Newton-Schulz pseudo-inverse of ``S(L, L)``
    after ``iterations`` steps; ``out = P (Z (B V))``, O(T m) instead of O(T^2), rows not
    normalised (the paper's softmax-free form). Lu et al. 2021, arXiv:2110.11945.

    Non-causal only: the landmarks pool every key of the call, so a query's output depends on
    later tokens; a call with a carried state raises ``ValueError``. The m x m inverse is computed
    in float64 whatever the inputs (it is tiny; the iteration amplifies rounding by the
    landmark kernel's condition number).
    Deviation from paper: SOFT ties queries and keys (Q = K, one projection); here they are the
    call's own, with landmarks from the keys, so ``S(L, L)`` stays symmetric positive
    semi-definite; landmarks by average pooling, not a strided convolution.
    """

    n_landmarks: int = 32
    iterations: int = 20

    def __post_init__(self) -> None:
        check_positive("SOFT", n_landmarks=self.n_landmarks, iterations=self.iterations)

    @property
    def is_causal(self) -> bool:
        return False

    def landmarks(self, k: torch.Tensor, scale: float) -> Landmarks:
        """Float64 landmarks of keys [B, Hkv, T, D] and their kernel's pseudo-inverse."""
        points = pool_tokens(k.to(torch.float64), self.n_landmarks)
        return Landmarks(
            points, newton_schulz_pinv(gaussian(points, points, scale), self.iterations)
        )

    def forward(self, q, k, v, state, view=None):
        refuse_state("SOFT", state)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        out = self._attend(q.to(acc), k.to(acc), v.to(acc), call_scale(view, q.shape[-1]))
        return out.to(v.dtype), None

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``): ``out = P (Z (B V))`` with Z computed in float64 from the same landmarks
        as the reference and rounded once (u). A kernel entry's squared distance ``|x|^2 +
        |y|^2 - 2 x . y`` is off by ``e = (gamma(D + 2) + 2u)(|x|^2 + |y|^2 + 2 sum |x_d y_d|)``
        (the landmark's rounding to the accumulation dtype included), the entry by
        ``expm1(|scale| e / 2 + u + eta)`` relative. The three products sum m, m and T terms.
        Z is signed: the magnitude is ``|P| |Z| |B| |V|``."""
        r = Rounding.of(q.dtype)
        batch, n_heads, length, dim = q.shape
        if k.shape[2] == 0:
            return torch.zeros_like(ref)
        scale = call_scale(view, dim)
        k64 = k.double()
        points, inverse = self.landmarks(k64, scale)
        rows = q.double().reshape(batch, k.shape[1], -1, dim)  # [B, Hkv, G*T, D]

        def entry_error(x, y):  # the largest relative error of an entry of gaussian(x, y)
            sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(-2)
            e = (r.gamma(dim + 2) + 2 * r.u) * (sq + 2 * x.abs() @ y.abs().transpose(-1, -2))
            return math.expm1(abs(scale) * float(e.max()) / 2 + r.u + r.eta)

        p, b = gaussian(rows, points, scale), gaussian(points, k64, scale)
        mag = (p @ (inverse.abs() @ (b @ v.double().abs()))).view(batch, n_heads, length, -1)
        rho = entry_error(rows, points) + entry_error(points, k64) + r.u
        rho += r.gamma(k.shape[2]) + 2 * r.gamma(points.shape[2]) + 3 * r.u
        return math.expm1(rho) * (1 + r.u_out) * mag + r.u_out * ref.abs()

    def reference(self, q, k, v, view=None):
        """Float64, one pass: the T x T low-rank kernel ``P Z B`` materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        if k.shape[2] == 0:
            return q.new_zeros(batch, n_heads, length, v.shape[-1])
        scale = call_scale(view, dim)
        points, inverse = self.landmarks(k, scale)
        rows = q.reshape(batch, k.shape[1], -1, dim)  # [B, Hkv, G*T, D]
        kernel = gaussian(rows, points, scale) @ inverse @ gaussian(points, k, scale)
        return (kernel @ v).view(batch, n_heads, length, -1)

    def _attend(self, q, k, v, scale):
        batch, n_heads, length, dim = q.shape
        if k.shape[2] == 0:
            return q.new_zeros(batch, n_heads, length, v.shape[-1])
        points, inverse = (t.to(q.dtype) for t in self.landmarks(k, scale))
        rows = q.reshape(batch, k.shape[1], -1, dim)  # [B, Hkv, G*T, D]
        summary = inverse @ (gaussian(points, k, scale) @ v)  # [B, Hkv, m, Dv]
        return (gaussian(rows, points, scale) @ summary).view(batch, n_heads, length, -1)
