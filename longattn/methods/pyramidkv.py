"""PyramidKV: SnapKV's scores under layer budgets that decrease with depth."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import register
from longattn.methods.snapkv import SnapKV


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's pooled window votes with the ``pyramid`` budget policy as its default: the layer
    budgets decrease linearly with depth and keep the model's total (the policy is the library's,
    ``longattn.compress``, and composes with any scorer). Cai et al. 2024, arXiv:2406.02069.

    Deviation from paper: the scores are SnapKV's as implemented here (one per KV head, max pooling
    by default); the paper's schedule of layer budgets is the library's ``pyramid`` allocation.
    """

    allocation: str = "pyramid"
