"""Offline calibration artifacts of methods (Double Sparsity channels, Loki PCA bases, Q-Filters).

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
        for key in ("method", "model"):
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"calibration {key} must be a str, got {getattr(self, key)!r}")
        for key in ("n_layers", "n_kv_heads", "head_dim", "version"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration {key} must be an int > 0, got {value!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"calibration params must be a dict, got {self.params!r}")
        if not isinstance(self.tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in self.tensors.values()
        ):
            raise TypeError("calibration tensors must be a dict of name -> torch.Tensor")
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
        from safetensors import SafetensorError, safe_open

        path = _check_path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(META_KEY)
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(
                f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from None
        meta = _parse_header(path, raw)
        try:
            return cls(tensors=tensors, **meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def check(self, method: str, n_layers: int, n_kv_heads: int, head_dim: int) -> None:
        """Refuse an artifact made for another method or another model shape, or one whose tensors
        are not what ``method`` reads (checked here, before a cache call appends anything)."""
        if method != self.method:
            raise ValueError(f"calibration is for method {self.method!r}, not {method!r}")
        have = (self.n_layers, self.n_kv_heads, self.head_dim)
        want = (n_layers, n_kv_heads, head_dim)
        if have != want:
            raise ValueError(
                f"calibration for model {self.model!r} has shape (layers, kv heads, head dim) = "
                f"{have}, but the cache holds {want}"
            )
        for name, (trailing, integer) in _expected_tensors(method, head_dim).items():
            t = self.tensors.get(name)
            if t is None:
                raise ValueError(
                    f"calibration for {method!r} needs a tensor {name!r}, has {sorted(self.tensors)}"
                )
            shape = tuple(t.shape[2:])
            if len(shape) != len(trailing) or any(w and s != w for s, w in zip(shape, trailing)):
                raise ValueError(
                    f"calibration tensor {name!r} must be [n_layers, n_kv_heads, "
                    f"{', '.join(str(w or 'r') for w in trailing)}], got {tuple(t.shape)}"
                )
            if integer and (
                t.dtype.is_floating_point or int(t.min()) < 0 or int(t.max()) >= head_dim
            ):
                raise ValueError(
                    f"calibration tensor {name!r} must hold channel indices in [0, {head_dim}), "
                    f"got {t.dtype} in [{t.min().item()}, {t.max().item()}]"
                )

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


def _expected_tensors(method: str, head_dim: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """What a method reads from its calibration: name -> (shape after [L, Hkv] with 0 = any size,
    whether it holds channel indices)."""
    return {
        "loki": {"basis": ((head_dim, 0), False)},
        "double_sparsity": {"channels": ((0,), True)},
        "qfilters": {"filter": ((head_dim,), False)},
    }.get(method, {})


def _check_path(path: str | os.PathLike) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"calibration path must be a str or os.PathLike, got {path!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist (or is not a file)")
    return path


def _parse_header(path: pathlib.Path, raw: str | None) -> dict[str, Any]:
    """The JSON header of a calibration file, checked for the fields ``Calibration`` takes."""
    if raw is None:
        raise ValueError(f"{path} is not a longattn calibration file (no {META_KEY!r} header)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the {META_KEY!r} header is not valid JSON ({exc})") from None
    fields = {"method", "model", "n_layers", "n_kv_heads", "head_dim", "params", "version"}
    if not isinstance(meta, dict) or set(meta) != fields:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: the {META_KEY!r} header must hold {sorted(fields)}, got {got}")
    if meta["version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: calibration format version {meta['version']!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return meta


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float) -> Calibration:
    return Calibration.load(path)


def load(path: str | os.PathLike) -> Calibration:
    """Load (and memoise, keyed by path and modification time) a calibration file."""
    path = _check_path(path).resolve()
    return _load_cached(str(path), os.path.getmtime(path))


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


def calibrate_qfilters(captured: dict, model: str) -> Calibration:
    """Q-Filters directions from real queries: ``filter`` [L, Hkv, D], unit vectors (the leading
    right singular vector of each KV head's group of queries, signed against the mean query).

    ``captured``: ``{layer: (q, k, v)}`` from ``longattn.integrations.hf.capture_qkv``."""
    from longattn.methods.qfilters import filter_direction

    layers = _stack_layers(captured)
    k0 = captured[0][1]
    filters = torch.stack(
        [filter_direction(captured[i][0], captured[i][1].shape[1]) for i in layers]
    )
    return Calibration(
        "qfilters", model, len(layers), k0.shape[1], k0.shape[-1], {"filter": filters}
    )
