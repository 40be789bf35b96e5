"""Offline calibration artifacts of selection methods (Double Sparsity channels, Loki PCA bases).

One ``.safetensors`` file per artifact: the tensors (each ``[n_layers, n_kv_heads, ...]``) plus a JSON
header under the metadata key ``"longattn"`` naming the method, its parameters, the model and its shape
and the format version. No pickle. Loading checks the shape against the cache it is used with.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
META_KEY = "longattn"


@dataclass(frozen=True)
class Calibration:
    """Per-layer, per-KV-head tensors a method computed offline from real activations."""

    method: str
    model: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, t in self.tensors.items():
            if t.dim() < 2 or tuple(t.shape[:2]) != (self.n_layers, self.n_kv_heads):
                raise ValueError(
                    f"calibration tensor {name!r} must start with [n_layers={self.n_layers}, "
                    f"n_kv_heads={self.n_kv_heads}], got {tuple(t.shape)}"
                )

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "n_layers": self.n_layers,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "params": self.params,
            "version": self.version,
        }

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        from safetensors import safe_open

        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            if raw is None:
                raise ValueError(
                    f"{path} is not a longattn calibration file (no {META_KEY!r} header)"
                )
            meta = json.loads(raw)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: calibration format version {meta.get('version')} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        return cls(tensors=tensors, **meta)

    def check(self, method: str, n_layers: int, n_kv_heads: int, head_dim: int) -> None:
        """Refuse an artifact made for another method or another model shape."""
        if method != self.method:
            raise ValueError(f"calibration is for method {self.method!r}, not {method!r}")
        have = (self.n_layers, self.n_kv_heads, self.head_dim)
        want = (n_layers, n_kv_heads, head_dim)
        if have != want:
            raise ValueError(
                f"calibration for model {self.model!r} has shape (layers, kv heads, head dim) = "
                f"{have}, but the cache holds {want}"
            )

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float) -> Calibration:
    return Calibration.load(path)


def load(path: str | os.PathLike) -> Calibration:
    """Load (and memoise, keyed by path and modification time) a calibration file."""
    path = str(pathlib.Path(path).resolve())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path} does not exist")
    return _load_cached(path, os.path.getmtime(path))


def for_layer(method: Any, cache: Any, layer: int) -> dict[str, torch.Tensor] | None:
    """The calibration tensors of ``method`` for ``layer`` of ``cache``, or None if it names no file."""
    path = getattr(method, "calibration", "")
    if not path:
        return None
    cal = load(path)
    keys = cache.keys(layer)
    cal.check(method.name, cache.n_layers, keys.shape[1], keys.shape[3])
    return cal.layer(layer)


def _stack_layers(captured: dict[int, tuple[torch.Tensor, ...]]) -> list[int]:
    layers = sorted(captured)
    if layers != list(range(len(layers))):
        raise ValueError(f"calibration needs every layer 0..L-1 captured, got {layers}")
    return layers


def calibrate_loki(captured: dict, rank: int, model: str) -> Calibration:
    """PCA bases of real keys: ``basis`` [L, Hkv, D, D] (columns by decreasing variance).

    ``captured``: ``{layer: (q, k, v)}`` from ``longattn.integrations.hf.capture_qkv``."""
    from longattn.methods.loki import pca_basis

    layers = _stack_layers(captured)
    k0 = captured[0][1]
    basis = torch.stack([pca_basis(captured[i][1], k0.shape[-1]) for i in layers])
    return Calibration(
        "loki", model, len(layers), k0.shape[1], k0.shape[-1], {"basis": basis}, {"rank": rank}
    )


def calibrate_double_sparsity(captured: dict, channels: int, model: str) -> Calibration:
    """Heavy channels ranked by mean |q_c|·|k_c| on real activations: ``channels`` [L, Hkv, D]."""

    layers = _stack_layers(captured)
    k0 = captured[0][1]
    dim = k0.shape[-1]
    ranked = []
    for i in layers:
        q, k, _ = captured[i]
        n_kv = k.shape[1]
        k_mag = k.float().abs().mean(dim=(0, 2))
        q_mag = q.float().abs().mean(dim=(0, 2)).view(n_kv, -1, dim).mean(1)
        ranked.append(torch.argsort(k_mag * q_mag, dim=-1, descending=True, stable=True))
    return Calibration(
        "double_sparsity",
        model,
        len(layers),
        k0.shape[1],
        dim,
        {"channels": torch.stack(ranked)},
        {"channels": channels},
    )
