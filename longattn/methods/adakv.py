"""AdaKV: SnapKV's scores with head-wise budgets under each layer's budget."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import register
from longattn.methods.snapkv import SnapKV


@register("adakv")
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV's pooled window votes with the ``ada`` budget policy as its default: a layer's budget
    is shared among its KV heads by the scores themselves (the layer's top keys over all heads), same
    layer total (the policy is the library's, ``longattn.compress``, and composes with any scorer).
    Feng et al. 2024, arXiv:2407.11550 (Ada-SnapKV).

    Deviation from paper: the scores are SnapKV's as implemented here (one per KV head, max pooling
    by default); the head-wise allocation itself (the paper also guarantees each head a minimum
    share) is the library's ``ada`` policy, described there.
    """

    allocation: str = "ada"
