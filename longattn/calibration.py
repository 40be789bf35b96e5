"""Offline calibration artifacts of methods (Double Sparsity channels, Loki PCA bases, Q-Filters
directions, the retrieval heads of DuoAttention and RazorAttention).

One ``.safetensors`` file per artifact: the tensors (each ``[n_layers, n_kv_heads, ...]``) plus a JSON
header under the metadata key ``"longattn"`` naming the method, its parameters, the model and its shape
and the format version. No pickle. Loading checks the shape against the cache it is used with.
"""

from __future__ import annotations

import functools
import json
import math
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
        rank = self.tensors.get("rank")
        if "rank" in _expected_tensors(method, head_dim) and rank is not None:
            n_heads = self.n_layers * self.n_kv_heads
            if rank.dtype.is_floating_point or not torch.equal(
                rank.flatten().sort().values, torch.arange(n_heads, dtype=rank.dtype)
            ):
                raise ValueError(
                    f"calibration tensor 'rank' must order the {n_heads} heads (each of "
                    f"0..{n_heads - 1} once), got {rank.dtype} {rank.flatten().tolist()[:8]}..."
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
        "duo_attention": {"gates": ((), False), "rank": ((), False)},
        "razor_attention": {"echo": ((), False), "induction": ((), False), "rank": ((), False)},
        "hedgehog": {"q_proj": ((0, head_dim, 0), False), "k_proj": ((head_dim, 0), False)},
        "log_normal": {"q_std": ((0,), False), "k_std": ((), False)},
        "infini_attention": {"gate": ((0,), False)},
        "sla": {"proj_w": ((0, 0, 0), False), "proj_b": ((0, 0), False)},
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


def rank_heads(scores: torch.Tensor) -> torch.Tensor:
    """int64 [L, Hkv]: each head's place when all heads of the model are sorted by decreasing
    ``scores`` [L, Hkv] (ties: earlier layer, then earlier head first); ``rank < n`` selects the
    ``n`` best heads of the model."""
    order = torch.argsort(-scores.flatten().double(), stable=True)
    return _places(order).view(scores.shape)


def _places(order: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def interleave_ranks(first: torch.Tensor, second: torch.Tensor, share: float) -> torch.Tensor:
    """int64 [L, Hkv]: one order of all heads taking the best of ``first`` [L, Hkv] for a ``share``
    of every prefix (rounded up) and the best of ``second`` for the rest, each head once."""
    orders = [torch.argsort(-t.flatten().double(), stable=True).tolist() for t in (first, second)]
    taken: set[int] = set()
    chosen: list[int] = []
    from_first = 0
    while len(chosen) < first.numel():
        pick = 0 if from_first < math.ceil(share * (len(chosen) + 1) - 1e-9) else 1
        head = next(h for h in orders[pick] if h not in taken)  # each order lists every head
        from_first += pick == 0
        taken.add(head)
        chosen.append(head)
    return _places(torch.tensor(chosen)).view(first.shape)


def razor_head_scores(
    q: torch.Tensor, k: torch.Tensor, period: int, first: int = 0, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores [Hkv] of one layer on a sequence repeating every ``period``
    tokens from position ``first`` (RazorAttention's retrieval-head scores).

    q [B, H, T, D], k [B, Hkv, T, D] (post-RoPE, as the model attends). For each query of the
    second and later repeats, the causal softmax weight on the key ``period`` back (the same token:
    echo) and ``period - 1`` back (the token that followed it: induction), averaged over queries
    and rows; a KV head takes the maximum over its query heads."""
    batch, n_heads, seq_len, dim = q.shape
    n_kv = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    start = first + period
    if start >= seq_len:
        raise ValueError(f"sequence of {seq_len} tokens has no repeat after {first} + {period}")
    queries = q[:, :, start:].double().reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*n, D]
    scores = (queries @ k.double().transpose(-1, -2)) * scale  # [B, Hkv, G*n, T]
    scores = scores.view(batch, n_heads, seq_len - start, seq_len)  # [B, H, n, T]
    q_pos = torch.arange(start, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    echo = weights.gather(-1, (q_pos - period).expand(batch, n_heads, -1, 1))
    induction = weights.gather(-1, (q_pos - period + 1).expand(batch, n_heads, -1, 1))
    per_head = [t.mean(dim=(0, 2, 3)).view(n_kv, -1).amax(1) for t in (echo, induction)]
    return per_head[0], per_head[1]


ECHO_SHARE = 1 / 15  # the paper protects 1 % echo heads and 14 % induction heads


def calibrate_razor_attention(
    captured: dict, period: int, first: int, model: str, echo_share: float = ECHO_SHARE
) -> Calibration:
    """RazorAttention's head scores from ``capture_qkv`` on a repeated random-token sequence:
    ``echo``, ``induction`` [L, Hkv] float32 and ``rank`` [L, Hkv] (``interleave_ranks``)."""
    layers = _stack_layers(captured)
    pairs = [razor_head_scores(captured[i][0], captured[i][1], period, first) for i in layers]
    echo = torch.stack([p[0] for p in pairs]).float()
    induction = torch.stack([p[1] for p in pairs]).float()
    k0 = captured[0][1]
    tensors = {
        "echo": echo,
        "induction": induction,
        "rank": interleave_ranks(echo, induction, echo_share),
    }
    params = {
        "period": period,
        "repeats": (k0.shape[2] - first) // period,
        "echo_share": echo_share,
    }
    return Calibration(
        "razor_attention", model, len(layers), k0.shape[1], k0.shape[-1], tensors, params
    )
