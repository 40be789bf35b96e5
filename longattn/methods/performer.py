"""Performer (FAVOR+): positive orthogonal random features for the softmax kernel."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from longattn.method import LinearAttention, check_non_negative, check_positive, register
from longattn.types import FeatureView


def _draw_seed(seed: int, layer: int, redraw: int) -> int:
    """A 63-bit generator seed for one draw: the same on every machine and process (``hash`` of a
    str is salted per process, a digest is not)."""
    digest = hashlib.sha256(f"performer:{seed}:{layer}:{redraw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=256)
def orthogonal_features(
    seed: int, layer: int, redraw: int, dim: int, features: int
) -> torch.Tensor:
    """[features, dim] float64 projection rows w_i: blocks of ``dim`` orthogonal directions (QR of
    a Gaussian matrix, signs fixed by R's diagonal so the directions are Haar-distributed), each
    row rescaled by the norm of an independent Gaussian ``dim``-vector (chi with ``dim`` degrees
    of freedom), so every row is marginally N(0, I) as the unbiased estimator needs, while rows
    within a block stay exactly orthogonal. Cached: a draw is a pure function of its arguments."""
    gen = torch.Generator().manual_seed(_draw_seed(seed, layer, redraw))
    blocks = []
    for _ in range(-(-features // dim)):
        gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # rows orthonormal
    directions = torch.cat(blocks)[:features]  # [m, D]
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=-1)
    return directions * norms[:, None]


@register("performer")
@dataclass(frozen=True)
class Performer(LinearAttention):
    """Positive orthogonal random features (FAVOR+): phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(m)
    on x scaled by ``scale ** 0.5``, so that E[phi(q) . phi(k)] = exp(scale q . k) exactly.
    Choromanski et al. 2020, arXiv:2009.14794.

    The rows w_i come in orthogonal blocks of the head dimension with chi-distributed norms,
    generated in float64 from (``seed``, the layer, ``redraw``): deterministic, shared by the
    layer's heads and by its queries and keys. ``redraw`` is the draw index: a caller that wants
    the paper's periodic feature redrawing bumps it (the map stays a pure function of its
    fields; a counter hidden in the method would make two equal calls differ).

    Numerical stabiliser: a query's features are divided by their largest one (the official
    code's per-token max), which cancels against the same query's normaliser. A key's feature i
    is shifted by the data-independent |w_i|^2 / 2, i.e. phi_i(k) = exp(-|k - w_i|^2 / 2) <= 1,
    and the query's feature i by the opposite amount, so the product phi_i(q) phi_i(k) is
    unchanged. Deviation from paper: the official code subtracts the maximum over all keys of the
    call, which depends on future keys and differs between chained calls (a carried state would
    be on another scale); the shift here is causal and the same in every call. A key far from
    every w_i (|x - w_i|^2 / 2 beyond ~87 in float32, after scaling) underflows to zero weight;
    such norms are far outside the range where random features estimate softmax usefully
    (the estimator's variance grows as exp(|q + k|^2)).
    Both stabilisers rely on the normaliser: ``normalize`` must be True and ``window`` 0 (the
    window's exact scores share the normaliser and would not be rescaled with the features).
    """

    features: int = 256
    seed: int = 0
    redraw: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(name, features=self.features)
        check_non_negative(name, seed=self.seed, redraw=self.redraw)
        if not self.normalize:
            raise ValueError(
                f"{name}.normalize must be True, got {self.normalize}: the features are "
                "rescaled per query, which only the normaliser cancels"
            )
        if self.window:
            raise ValueError(
                f"{name}.window must be 0, got {self.window}: the per-query rescaling of the "
                "features does not apply to the window's exact scores"
            )

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        dim = x.shape[-1]
        w = orthogonal_features(self.seed, view.layer, self.redraw, dim, self.features)
        half_w2 = 0.5 * (w * w).sum(-1)  # [m]: |w_i|^2 / 2
        # key: w.x - |x|^2/2 - |w|^2/2 = -|x - w|^2/2 <= 0 (no overflow, no other key involved);
        # query: + |w|^2/2, then its own max is subtracted (cancels in the normaliser); both
        # carry the 1/sqrt(m) as -log(m)/2 inside the exponent
        shift = (-half_w2 if view.role == "key" else half_w2) - 0.5 * math.log(self.features)
        ws = (w * view.scale**0.5).to(device=x.device, dtype=x.dtype)  # x scaled by scale**0.5
        logits = x @ ws.T  # [B, heads, T, m]; in-place updates below avoid three more copies
        logits.sub_((0.5 * view.scale) * (x * x).sum(-1, keepdim=True))
        logits.add_(shift.to(device=x.device, dtype=x.dtype))
        if view.role != "key":
            logits = logits - logits.amax(-1, keepdim=True)  # the largest feature is exactly 0
            logits.sub_(0.5 * math.log(self.features))
        return logits.exp_()
