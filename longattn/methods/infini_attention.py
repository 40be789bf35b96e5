"""Infini-attention: exact causal softmax inside a segment plus a compressive linear memory of the
past segments, mixed by a per-head gate; bounded memory over an unbounded stream."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.methods.elu_linear import EluLinear
from longattn.methods.latte import Rounding, abs_scores, call_scale, layer_tensor, magnitude_bound
from longattn.types import FeatureView

POSITION_POLICIES = ("original", "segment")


def sigma(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, the memory's feature map (positive)."""
    return EluLinear().feature_map(x, FeatureView("key", 0, 1.0))


class InfiniState(NamedTuple):
    """The memory of the completed segments, ``memory`` [B, Hkv, D, Dv] = sum sigma(k)^T v and
    ``norm`` [B, Hkv, D] = sum sigma(k) (accumulation dtype), their count ``segments``, and the
    keys and values of the current, incomplete segment [B, Hkv, n < segment, D]: at most one
    segment of keys whatever the stream's length."""

    memory: torch.Tensor
    norm: torch.Tensor
    segments: int
    k: torch.Tensor
    v: torch.Tensor


@register("infini_attention")
@dataclass(frozen=True)
class InfiniAttention(Method):
    """Infini-attention: the stream is cut into segments of ``segment`` tokens; a query attends by
    causal softmax to the keys of its own segment (A_local) and reads a linear memory of every
    earlier segment, ``A_mem = sigma(q) M / sigma(q) z`` with ``M = sum sigma(k)^T v``, ``z =
    sum sigma(k)``, sigma = elu + 1; ``out = g A_mem + (1 - g) A_local``, ``g = sigmoid(gate)``
    per head (a layer's calibration tensor ``gate`` [Hkv, G] of logits when ``calibration``
    names a file, else the ``gate`` field for every head). Munkhdalai et al. 2024,
    arXiv:2404.07143.

    The first segment has no memory: its output is A_local alone. The state (``InfiniState``)
    is the memory and the current segment's keys and values: O(segment + D Dv) per KV head.
    ``positions`` is the rotary position policy, which a model integration applies (the
    attention above is the same under both): ``"original"`` rotates queries and keys at the
    tokens' original positions, so a model stops at its ``max_position_embeddings``;
    ``"segment"`` rotates each token at its offset inside its segment (position mod
    ``segment``, float64 angles), so positions stay below ``segment`` and the stream is
    unbounded. RoPE scores depend only on position differences, so the local softmax is the
    same under both; the memory then holds keys rotated in their segment's frame.

    Deviation from paper: training-free on a pretrained model, so the gate is a fixed logit
    (default -2: about 12 % memory) instead of a learned per-head scalar, and only the linear
    memory update (no delta rule).
    """

    segment: int = 2048
    gate: float = -2.0
    calibration: str = ""
    positions: str = "original"

    def __post_init__(self) -> None:
        check_positive("InfiniAttention", segment=self.segment)
        if not math.isfinite(self.gate):
            raise ValueError(f"InfiniAttention.gate must be a finite logit, got {self.gate}")
        if self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"InfiniAttention positions must be one of {', '.join(POSITION_POLICIES)}, "
                f"got {self.positions!r}"
            )

    @property
    def is_causal(self) -> bool:
        return True

    def gates(self, view: Any, n_kv: int, group: int, dtype: torch.dtype):
        """(g, 1 - g) [Hkv, G, 1, 1] in ``dtype``, both as sigmoids (no cancellation in 1 - g)."""
        found = layer_tensor(view, "gate", "InfiniAttention", (n_kv, group))
        logit = torch.full((n_kv, group), self.gate) if found is None else found
        logit = logit.to(dtype)[..., None, None]
        return torch.sigmoid(logit), torch.sigmoid(-logit)

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        batch, n_heads, length, dim = q.shape
        n_kv, dim_v, size = k.shape[1], v.shape[-1], self.segment
        if state is None:
            memory = torch.zeros(batch, n_kv, dim, dim_v, dtype=acc)
            state = InfiniState(memory, memory[..., 0].clone(), 0, k[:, :, :0], v[:, :, :0])
        _check_infini_state(state, k, v, acc, size)
        memory, norm, segments = state.memory, state.norm, state.segments
        held = state.k.shape[2]
        k_all, v_all = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        g_mem, g_loc = self.gates(view, n_kv, n_heads // n_kv, acc)
        scale = call_scale(view, dim)
        outs, done = [], 0
        for lo in range(0, k_all.shape[2], size):
            hi = min(lo + size, k_all.shape[2])
            rows = q[:, :, max(lo, held) - held : hi - held].to(acc)
            rows = rows.reshape(batch, n_kv, -1, rows.shape[2], dim)  # [B, Hkv, G, r, D]
            ks, vs = k_all[:, :, lo:hi].to(acc), v_all[:, :, lo:hi].to(acc)
            out = _local(rows, ks, vs, max(lo, held) - lo, scale)
            if segments:
                phi = sigma(rows)
                read = (phi @ memory[:, :, None]) / (phi @ norm[:, :, None, :, None])
                out = g_mem * read + g_loc * out
            outs.append(out)
            if hi - lo == size:  # a complete segment joins the memory
                phi_k = sigma(ks)
                memory = memory + phi_k.transpose(-1, -2) @ vs
                norm, segments, done = norm + phi_k.sum(2), segments + 1, hi
        out = torch.cat(outs, dim=3).reshape(batch, n_heads, length, dim_v)
        new = InfiniState(memory, norm, segments, k_all[:, :, done:], v_all[:, :, done:])
        return out.to(v.dtype), new

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). A local score is off by ``E = (gamma(D) + 2u) A`` (A the largest
        ``|scale| sum |q_d k_d|``), its shift by 2uA; a softmax weight over n <= segment keys by
        ``2E + 4uA + 2 eta + gamma(n) + u``, and by n eta more in a tiled kernel (SDPA's: its
        online softmax rescales a weight at most once per key). A memory weight ``sigma(q) . sigma(k)`` over
        non-negative features (each off by eta), summed over D and over every key folded into
        the memory (at most T, in any split): ``2 eta + gamma(D + T + 2)``, then normalised:
        twice that plus u. The gates are sigmoids (eta + u), the final sum adds gamma(2). All
        weights are non-negative: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        dim, length = q.shape[-1], k.shape[2]
        a = abs_scores(q.double().reshape(q.shape[0], k.shape[1], -1, dim), k.double(),
                       call_scale(view, dim))  # fmt: skip
        n = min(self.segment, length)
        rho_local = 2 * (r.gamma(dim) + 4 * r.u) * a + (n + 2) * r.eta + r.gamma(n) + r.u
        rho_mem = 2 * (2 * r.eta + r.gamma(dim + length + 2)) + r.u
        rho = max(rho_local, rho_mem) + r.eta + r.u + r.gamma(2)
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass: the local softmax and the memory's weights of every pair
        materialised, mixed by the gate."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        seg = torch.arange(length) // self.segment
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        local = causal & (seg[:, None] == seg[None, :])
        past = seg[None, :] < seg[:, None]  # [t, s]: s in an earlier segment
        rows = q.reshape(batch, n_kv, -1, length, dim)  # [B, Hkv, G, T, D]
        scores = call_scale(view, dim) * (rows @ k[:, :, None].transpose(-1, -2))
        a_local = torch.softmax(scores.masked_fill(~local, -math.inf), -1) @ v[:, :, None]
        kern = (sigma(rows) @ sigma(k)[:, :, None].transpose(-1, -2)).masked_fill(~past, 0.0)
        a_mem = (kern @ v[:, :, None]) / kern.sum(-1, keepdim=True).clamp(min=1e-300)
        g_mem, g_loc = self.gates(view, n_kv, n_heads // n_kv, torch.float64)
        out = torch.where((seg > 0)[:, None], g_mem * a_mem + g_loc * a_local, a_local)
        return out.reshape(batch, n_heads, length, -1)


def _local(rows, k, v, first, scale):
    """Causal softmax of rows [B, Hkv, G, r, D] (segment offsets first..) over the segment's
    keys k [B, Hkv, n, D] up to each row's own."""
    batch, n_kv, group, n_rows, dim = rows.shape
    if first == 0 and n_rows == k.shape[2]:  # a whole segment from its start: SDPA's causal kernel
        out = torch.nn.functional.scaled_dot_product_attention(
            rows.reshape(batch, n_kv * group, n_rows, dim), k, v, is_causal=True, scale=scale,
            enable_gqa=group > 1,
        )  # fmt: skip
        return out.view(batch, n_kv, group, n_rows, -1)
    scores = scale * (rows @ k[:, :, None].transpose(-1, -2))  # [B, Hkv, G, r, n]
    offsets = torch.arange(first, first + rows.shape[3])
    causal = torch.arange(k.shape[2]) <= offsets[:, None]  # [r, n]
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ v[:, :, None]


def _check_infini_state(state: Any, k, v, acc, size: int) -> None:
    """ValueError unless ``state`` is an ``InfiniState`` these tensors continue."""
    if not isinstance(state, InfiniState):
        raise ValueError(
            f"InfiniAttention: cannot resume from a {type(state).__name__}, expected InfiniState"
        )
    want = (*k.shape[:2], k.shape[3], v.shape[3])
    if tuple(state.memory.shape) != want or state.memory.dtype != acc:
        raise ValueError(
            f"InfiniAttention: state memory is {tuple(state.memory.shape)} "
            f"{state.memory.dtype}, this call needs {want} {acc}"
        )
    if state.k.shape[2] >= size:
        raise ValueError(
            f"InfiniAttention: the state holds {state.k.shape[2]} keys of an open segment, "
            f"more than segment={size} - 1"
        )
