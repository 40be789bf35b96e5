"""Cosine attention (Cottention): linear attention on L2-normalised queries and keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import LinearAttention, register
from longattn.types import FeatureView


@register("cosine")
@dataclass(frozen=True)
class Cosine(LinearAttention):
    """Cosine-similarity attention: phi(x) = x / |x|, so the weight of key s at query t is the
    cosine of their angle, with no softmax and by default no normaliser (the weights can be
    negative). Mongaras et al. 2024, Cottention, arXiv:2409.18747.

    A zero vector maps to zero features (it has no direction).
    Deviation from paper: Cottention divides each value by (its position + 1) ** sigmoid(m), with
    a learned m per head (initialised to 0, i.e. a square root), to keep the sum's magnitude
    stable. The feature map sees no positions, so this factor is left to the model (with a
    norm after the attention, as ``normalize=False`` implies); ``normalize=True`` divides by the
    sum of cosines instead, which is only safe where they stay positive.
    """

    normalize: bool = False

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        norm = x.norm(dim=-1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))
