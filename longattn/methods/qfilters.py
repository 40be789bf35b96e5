"""Q-Filters: project each key on a per-head filter direction calibrated offline from queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import score_dtype


def filter_direction(queries: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[Hkv, D] unit filters from real queries [N, H, T, D]: the leading right singular vector of
    the (uncentred) queries of each KV head's group, signed so that the mean query projects
    *negatively* on it (then ``-<k, f>`` grows with the expected ``q . k``)."""
    n, n_heads, t, dim = queries.shape
    rows = queries.double().view(n, n_kv_heads, n_heads // n_kv_heads, t, dim)
    rows = rows.transpose(0, 1).reshape(n_kv_heads, -1, dim)  # [Hkv, N*G*T, D]
    _, vectors = torch.linalg.eigh(rows.transpose(1, 2) @ rows)  # ascending eigenvalues
    lead = vectors[..., -1]  # [Hkv, D]
    mean_projection = (rows @ lead[..., None]).mean(dim=(1, 2))  # [Hkv]
    return torch.where(mean_projection[:, None] > 0, -lead, lead).float()


@register("qfilters")
@dataclass(frozen=True)
class QFilters(Evict):
    """Score = ``-<k, f_h>`` with one filter direction ``f_h`` per KV head, calibrated offline: the
    principal direction of real queries (leading right singular vector of the group's queries),
    signed against the mean query, so the keys with the largest expected ``q . k`` along that
    direction are kept. No attention weights are needed. Godey et al. 2025, arXiv:2503.02812.

    ``calibration``: a safetensors file from ``longattn.calibration.calibrate_qfilters`` (required;
    scoring without one is refused). The sign convention, ``-<k, filter>``, is that of kvpress's
    ``QFilterPress``, which loads the authors' published filters. Checked on SmolLM2-135M (filters
    from 1,024 tokens of pydoc text, scoring 1,024 others, every third layer): the top quarter of
    the keys by this score holds 0.81 of the attention mass of the last 64 queries, 0.03 with the
    sign flipped, 0.24 for random keys.
    Deviation from paper: with GQA one filter per KV head from the queries of its whole group; keys
    and queries are post-RoPE (what the model's attention receives).
    """

    calibration: str = ""

    needs: ClassVar[frozenset[str]] = frozenset()

    def score(self, view: Any) -> torch.Tensor:
        if view.calibration is None or "filter" not in view.calibration:
            raise ValueError(
                "QFilters needs its filter directions: pass calibration=<file> made by "
                f"longattn.calibration.calibrate_qfilters (calibration={self.calibration!r})"
            )
        dtype = score_dtype(view.keys)
        filters = view.calibration["filter"].to(device=view.keys.device, dtype=dtype)  # [Hkv, D]
        want = (view.keys.shape[1], view.keys.shape[3])
        if tuple(filters.shape) != want:
            raise ValueError(
                f"QFilters filter must be [n_kv_heads, head_dim] = {list(want)}, "
                f"got {list(filters.shape)}"
            )
        return -(view.keys.to(dtype) @ filters[:, :, None]).squeeze(-1)  # [B, Hkv, T]
