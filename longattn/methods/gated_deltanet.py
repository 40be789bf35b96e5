"""Gated DeltaNet: the gated delta rule, with Kimi Delta Attention's channel-wise gate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longattn.method import LinearAttention, register
from longattn.types import FeatureView


@register("gated_deltanet")
@dataclass(frozen=True)
class GatedDeltaNet(LinearAttention):
    """The gated delta rule S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t,
    on queries and keys mapped by SiLU then L2 normalisation (the query also times ``scale``),
    without a normaliser. Yang et al. 2024, Gated Delta Networks, arXiv:2412.06464;
    ``channelwise=True`` gives each key channel its own decay a_t (Kimi Delta Attention, Kimi
    Team 2025, arXiv:2510.26692).

    Gates (``gates``), per KV head and token, from the layer's calibration when it has them:
        ``a_proj`` [Hkv, D] ([Hkv, D, D] channel-wise), ``a_bias`` [Hkv] ([Hkv, D]), ``A_log``
        [Hkv]: log a_t = -exp(A_log) softplus(k a_proj + a_bias) (Mamba2's parameterisation);
        ``b_proj`` [Hkv, D], ``b_bias`` [Hkv]: b_t = sigmoid(k b_proj + b_bias);
    (k the raw key; missing biases and ``A_log`` are 0; ``calibration`` names the file, loaded by
    the library). Without them, a parameter-free rule: the library's fixed per-head decay
    ``decay`` alone (RetNet's gamma_h = 1 - 2^(-5-h) by default; ``channelwise`` then has no
    channel to tell apart) and b_t = n / (1 + n) with n = scale |silu(k_t)|^2, so a weak key
    writes little and a strong one nearly replaces what its direction held. A fixed ``decay``
    other than ``"none"`` multiplies a calibrated gate too (a floor on forgetting): set
    ``decay="none"`` for the calibrated gate alone.
    Deviation from paper: the gates are projections of the layer's input x in the paper; the
    attention call sees only q, k, v, so they are computed from the key here. The paper's short
    convolution before the SiLU belongs to the model, not to attention.
    """

    normalize: bool = False
    decay: str | float = "retnet"
    channelwise: bool = False
    calibration: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.normalize:
            raise ValueError(f"{name}.normalize must be False: the delta rule has no normaliser")
        if self.calibration is not None and not self.calibration:
            raise ValueError(f"{name}.calibration must be a path or None, got ''")

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        phi = F.normalize(F.silu(x), dim=-1)  # a zero vector stays zero
        return phi * view.scale if view.role == "query" else phi

    def gates(
        self, k: torch.Tensor, view: FeatureView
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(log_decay [B, Hkv, T] or [B, Hkv, T, D] channel-wise, or None without a calibrated
        gate; beta [B, Hkv, T]) for the raw keys ``k`` [B, Hkv, T, D]."""
        tensors = view.calibration or {}
        return self._log_decay(k, view, tensors), self._beta(k, view, tensors)

    def _log_decay(self, k: torch.Tensor, view: FeatureView, tensors: dict) -> torch.Tensor | None:
        n_kv, dim = k.shape[1], k.shape[-1]
        if "a_proj" not in tensors:
            return None  # the library applies the fixed ``decay``
        out = (n_kv, dim, dim) if self.channelwise else (n_kv, dim)
        proj = _tensor(tensors, "a_proj", out, view, k)
        bias = _tensor(tensors, "a_bias", out[:1] + out[2:], view, k)
        a_log = _tensor(tensors, "A_log", (n_kv,), view, k)
        if self.channelwise:
            logits = k @ proj.unsqueeze(0) + bias[:, None, :]  # [B, Hkv, T, D]
            return -a_log.exp()[:, None, None] * F.softplus(logits)
        logits = (k * proj[:, None, :]).sum(-1) + bias[:, None]  # [B, Hkv, T]
        return -a_log.exp()[:, None] * F.softplus(logits)

    def _beta(self, k: torch.Tensor, view: FeatureView, tensors: dict) -> torch.Tensor:
        n_kv, dim = k.shape[1], k.shape[-1]
        if "b_proj" not in tensors:
            strength = view.scale * F.silu(k).square().sum(-1)  # [B, Hkv, T]
            return strength / (1.0 + strength)
        proj = _tensor(tensors, "b_proj", (n_kv, dim), view, k)
        bias = _tensor(tensors, "b_bias", (n_kv,), view, k)
        return torch.sigmoid((k * proj[:, None, :]).sum(-1) + bias[:, None])


def _tensor(
    tensors: dict, name: str, shape: tuple, view: FeatureView, like: torch.Tensor
) -> torch.Tensor:
    """The calibration tensor ``name`` of ``shape`` (zeros when absent) in ``like``'s dtype;
    ValueError naming the layer on a tensor of another shape."""
    if name not in tensors:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"GatedDeltaNet calibration {name!r} of layer {view.layer} has shape "
            f"{tuple(value.shape)}, expected {list(shape)}"
        )
    return value.to(device=like.device, dtype=like.dtype)
