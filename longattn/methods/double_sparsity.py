"""Double Sparsity: top-k tokens by scores approximated on a few calibrated heavy channels."""

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


def heavy_channels(q: torch.Tensor | None, k: torch.Tensor, channels: int) -> torch.Tensor:
    """[Hkv, channels] channel indices with the largest mean |q_c|·|k_c| (|k_c| alone without q).

    q [N, H, T, D] or None; k [N, Hkv, T, D]."""
    n_kv, dim = k.shape[1], k.shape[-1]
    k_mag = k.float().abs().mean(dim=(0, 2))  # [Hkv, D]
    if q is not None:
        q_mag = q.float().abs().mean(dim=(0, 2)).view(n_kv, -1, dim).mean(1)
        k_mag = k_mag * q_mag
    return torch.sort(torch.topk(k_mag, min(channels, dim), dim=-1).indices, dim=-1).values


def channel_matrix(channels: torch.Tensor, dim: int) -> torch.Tensor:
    """[Hkv, D, r] one-hot selector of ``channels`` [Hkv, r]."""
    eye = torch.eye(dim)
    return eye[:, channels].permute(1, 0, 2).contiguous()


@register("double_sparsity")
@dataclass(frozen=True)
class DoubleSparsity(Method):
    """Approximate scores ``q[ch] · k[ch]`` on ``channels`` heavy channels per KV head pick the
    ``budget`` tokens; exact attention runs on them. Yang et al. 2024, arXiv:2408.07092.

    ``calibration``: a safetensors file from ``longattn.calibration.calibrate_double_sparsity`` (channels
    ranked offline by mean |q_c|·|k_c| on real activations). Without one, channels are ranked by mean
    |k_c| of the layer's cached keys at its first decode step and kept.
    Deviation from paper: one selection per KV head; the label cache holds post-RoPE key channels.
    """

    budget: int = 1024
    fraction: float = 0.0
    channels: int = 16
    calibration: str = ""

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.fraction)
        check_positive(type(self).__name__, channels=self.channels)

    def select(self, q, view):
        budget = token_budget(self.budget, self.fraction, view.seq_len)
        if budget >= view.seq_len:
            return None
        dim = view.keys.shape[-1]
        if view.calibration is not None:
            chosen = view.calibration["channels"][:, : self.channels].long()
        else:
            key = ("double_sparsity", view.layer, self.channels)
            if key not in view.state:
                view.state[key] = heavy_channels(None, view.keys, self.channels)
            chosen = view.state[key]
        matrix = channel_matrix(chosen.sort(dim=-1).values, dim)
        mass = projected_mass(q, view, f"ds{self.channels}", matrix)
        return DecodeSelection(top_index(mass, budget, view.top_index), 1)
