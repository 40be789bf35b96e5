"""Second-order Taylor feature map of exp, with a small exact sliding window (BASED)."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from longattn.method import LinearAttention, check_non_negative, register
from longattn.types import FeatureView


@functools.lru_cache(maxsize=64)
def taylor_projection(seed: int, dim: int, features: int) -> torch.Tensor:
    """[dim, features] float64: ``features`` orthonormal columns scaled by sqrt(dim / features),
    so that E[P P^T] = I over the draw and (x P) . (y P) estimates x . y (Johnson-Lindenstrauss
    with orthogonal directions, lower variance than i.i.d. Gaussian ones)."""
    digest = hashlib.sha256(f"taylor:{seed}:{dim}:{features}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed columns
    return q[:, :features] * math.sqrt(dim / features)


@register("taylor")
@dataclass(frozen=True)
class Taylor(LinearAttention):
    """Linear attention with the second-order Taylor feature map of exp,
    phi(x) = [1, x, vec(x x^T) / sqrt(2)] on x scaled by ``scale ** 0.5``, so that
    phi(q) . phi(k) = 1 + s + s^2 / 2 exactly with s = scale q . k, plus an exact softmax
    sliding window over the newest ``window`` keys (BASED). Arora et al. 2024,
    arXiv:2402.18668.

    1 + s + s^2 / 2 > 0 for every s, so the normaliser is positive although single features can
    be negative. ``features`` (d') > 0 first projects x to d' dimensions by a fixed projection
    seeded by ``seed`` (orthonormal directions scaled by sqrt(D / d'), so s is estimated without
    bias); the feature size is then 1 + d' + d'^2 instead of 1 + D + D^2. BASED uses d' = 16 and a
    window of 64, which are the defaults here.
    Deviation from paper: BASED learns the d'-dimensional projection as part of the model's
    query and key projections; a pretrained model has none, so the projection here is a fixed
    random one (``features=0`` keeps the exact map on the full head dimension).
    """

    window: int = 64
    features: int = 16
    seed: int = 0

    # single features may be negative while every phi(q) . phi(k) >= 1/2: the normaliser is safe
    signed_features: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(type(self).__name__, features=self.features, seed=self.seed)

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        dim = x.shape[-1]
        if self.features > dim:
            raise ValueError(
                f"{type(self).__name__}.features={self.features} exceeds the head dimension {dim}"
            )
        x = x * view.scale**0.5
        if self.features:
            x = x @ taylor_projection(self.seed, dim, self.features).to(x.device, x.dtype)
        width = x.shape[-1]
        # one [.., T, 1 + d + d^2] buffer filled in place: a cat would copy the d^2 block again
        out = x.new_empty(*x.shape[:-1], 1 + width + width * width)
        out[..., :1] = 1.0
        out[..., 1 : 1 + width] = x
        square = out[..., 1 + width :].unflatten(-1, (width, width))  # [.., T, d, d] view
        if torch.is_grad_enabled() and x.requires_grad:  # out= is not differentiable
            square.copy_((x * math.sqrt(0.5)).unsqueeze(-1) * x.unsqueeze(-2))
        else:  # no d^2 temporary: half the time of a product and a copy
            torch.mul((x * math.sqrt(0.5)).unsqueeze(-1), x.unsqueeze(-2), out=square)
        return out
