"""SOFT: softmax-free attention, a Gaussian kernel made low-rank through Nystrom landmarks and a
Newton-Schulz pseudo-inverse; non-causal (encoders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.agent_attention import pool_tokens, refuse_state
from longattn.methods.latte import call_scale


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
