"""Linear attention with the elu + 1 feature map (Transformers are RNNs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import LinearAttention, register
from longattn.types import FeatureView


@register("elu_linear")
@dataclass(frozen=True)
class EluLinear(LinearAttention):
    """Linear attention with phi(x) = elu(x) + 1 (positive, so the normaliser is too).
    Katharopoulos et al. 2020, arXiv:2006.16236.

    The map is applied to the raw queries and keys, as in the paper (it has no softmax
    temperature to split), and computed as x + 1 for x > 0, exp(x) otherwise (the same function,
    without the rounding of exp(x) - 1 + 1).
    """

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        # elu(x) + 1 written as x + 1 / exp(x): (exp(x) - 1) + 1 would round to 0 below x ~ -17
        # in float32, where exp(x) stays positive down to ~ -87
        return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))
