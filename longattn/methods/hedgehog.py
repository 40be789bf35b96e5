"""Hedgehog: a learnable softmax-mimicking feature map per layer and head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import LinearAttention, check_non_negative, register
from longattn.types import FeatureView

# the calibration tensor of each role: [heads of that role, D, F]
PROJECTIONS = {"query": "q_proj", "key": "k_proj"}


@register("hedgehog")
@dataclass(frozen=True)
class Hedgehog(LinearAttention):
    """Learnable feature map phi(x) = [softmax(x W), softmax(-x W)] (each softmax over the F
    features, so 2F features, all positive), with x scaled by ``scale ** 0.5`` and one W [D, F]
    per layer, head and role, trained to mimic softmax attention. Zhang et al. 2024,
    arXiv:2402.04347 (the per-head form of LoLCATs, arXiv:2410.10254).

    Weights come from the method's calibration file (``calibration``: a path, loaded by the
    library; each layer's view carries its tensors, which start with the KV head axis):
        ``q_proj`` [Hkv, G, D, F]  the query heads' maps (query head h = KV head h // G's
                                   member h % G);
        ``k_proj`` [Hkv, D, F]     the key heads' maps (a KV head's map serves its whole group);
    both or neither.
    Without a calibration, W is the rectangular identity ``eye(D, F)`` (F = ``features``, or D
    when ``features`` is 0): the paper's identity initialisation, which runs out of the box and is
    where attention transfer starts. With a calibration, F is the tensors' last dimension and a
    non-zero ``features`` must equal it.
    Deviation from paper: the paper writes the map as [exp(x W + b), exp(-x W - b)]; this is
    the softmax form of the LoLCATs code, without a bias: the features stay in (0, 1], a
    query's normalisation cancels in the normaliser and a key's is part of the learned map.
    """

    features: int = 0
    calibration: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(type(self).__name__, features=self.features)
        if self.calibration is not None and not self.calibration:
            raise ValueError(f"{type(self).__name__}.calibration must be a path or None, got ''")

    def projection(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        """W [heads, D, F] for ``x`` [B, heads, T, D]: this layer's calibrated tensor for the
        role, else the identity initialisation; ValueError on a tensor of the wrong shape."""
        _, heads, _, dim = x.shape
        name = PROJECTIONS[view.role]
        tensors = view.calibration or {}
        given = [n for n in PROJECTIONS.values() if n in tensors]
        if len(given) == 1:
            raise ValueError(
                f"Hedgehog calibration of layer {view.layer} has {given[0]!r} without its pair"
            )
        if not given:
            width = self.features or dim
            return torch.eye(dim, width, dtype=x.dtype, device=x.device).expand(heads, dim, width)
        w = tensors[name]
        k_heads = tensors[PROJECTIONS["key"]].shape[0]
        # the file's tensors start with [n_layers, n_kv_heads]: query maps are [Hkv, G, D, F]
        want = (k_heads, heads // k_heads, dim) if view.role == "query" else (heads, dim)
        if tuple(w.shape[:-1]) != want or heads % k_heads:
            raise ValueError(
                f"Hedgehog calibration {name!r} of layer {view.layer} has shape "
                f"{tuple(w.shape)}, expected [{', '.join(map(str, want))}, F] for {heads} "
                f"{view.role} heads of {dim} dims"
            )
        w = w.reshape(heads, dim, w.shape[-1])  # query head h = kv head h // G, member h % G
        if self.features and w.shape[-1] != self.features:
            raise ValueError(
                f"Hedgehog.features={self.features} but calibration {name!r} of layer "
                f"{view.layer} has {w.shape[-1]} features"
            )
        return w.to(device=x.device, dtype=x.dtype)

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        w = self.projection(x, view)  # [heads, D, F]
        z = (x * view.scale**0.5) @ w.unsqueeze(0)  # [B, heads, T, F]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
