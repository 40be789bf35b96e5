"""Loki: top-k tokens by attention scores approximated in a low-rank PCA basis of the keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import (
    Method,
    check_budget,
    check_positive,
    projected_mass,
    register,
    token_budget,
    top_index,
)
from longattn.types import DecodeSelection


def pca_basis(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """[Hkv, D, rank] leading principal directions of keys [N, Hkv, T, D] (uncentred, as in Loki)."""
    flat = keys.float().transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[-1])  # [Hkv, N*T, D]
    cov = flat.transpose(1, 2) @ flat  # [Hkv, D, D]
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vectors.flip(-1)[..., :rank].contiguous()


@register("loki")
@dataclass(frozen=True)
class Loki(Method):
    """Approximate scores ``(q P_r) · (k P_r)`` in the top-``rank`` PCA directions of the keys pick the
    ``budget`` tokens per KV head. Singhania et al. 2024, arXiv:2406.02542.

    ``calibration``: a safetensors file from ``longattn.calibration.calibrate_loki`` (PCA of real keys,
    per layer and KV head). Without one, the basis is computed from the layer's cached keys at its first
    decode step and kept for the rest of the sequence.
    Deviation from paper: keys are post-RoPE (what the cache holds); one selection per KV head.
    """

    budget: int = 1024
    fraction: float = 0.0
    rank: int = 16
    calibration: str = ""

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.fraction)
        check_positive(type(self).__name__, rank=self.rank)

    def select(self, q, view):
        budget = token_budget(self.budget, self.fraction, view.seq_len)
        if budget >= view.seq_len:
            return None
        if view.calibration is not None:
            basis = view.calibration["basis"][..., : self.rank]
        else:
            key = ("loki", view.layer, self.rank)
            if key not in view.state:
                view.state[key] = pca_basis(view.keys, min(self.rank, view.keys.shape[-1]))
            basis = view.state[key]
        mass = projected_mass(q, view, f"loki{self.rank}", basis.float())
        return DecodeSelection(top_index(mass, budget, view.top_index), 1)
