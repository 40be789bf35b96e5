"""Page metadata of a ``KVCache`` layer: per-page key min / max / sum / count and low-dimensional key
projections, recomputed for the pages an append or an eviction touched.

Every tensor here is per (batch row, KV head): heads of a layer may hold different tokens (per-head
retention), so a page's empty slots are read from that head's positions.
"""

from __future__ import annotations

from typing import Any

import torch


def metadata_dtype(key_dtype: torch.dtype) -> torch.dtype:
    """dtype of the page key bounds and low-dimensional keys kept for keys of ``key_dtype``:
    bfloat16 (half the bytes a selection reads), float64 for a float64 cache."""
    return torch.float64 if key_dtype == torch.float64 else torch.bfloat16


def round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """``x`` in ``dtype``, rounded toward ``toward`` (-inf: a lower bound; +inf: an upper bound)
    wherever the conversion is inexact, so a rounded page min / max still bounds the page's keys."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong = y.to(x.dtype) > x if toward < 0 else y.to(x.dtype) < x
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, toward)), y)


def refresh_pages(entry: Any, page_size: int, lo: int, hi: int) -> None:
    """Recompute the metadata of the pages of ``entry`` (a cache layer) overlapping slots [lo, hi)."""
    ps = page_size
    p0, p1 = lo // ps, min(-(-hi // ps), entry.capacity // ps)
    if p1 <= p0:
        return
    s0, s1 = p0 * ps, p1 * ps
    if entry.dense and p1 - p0 == 1 and entry.seq_len > s0:  # one decode step's page
        _refresh_dense_page(entry, p0, s0, min(s1, entry.seq_len))
        return
    batch, heads, _, dim = entry.keys.shape
    keys = entry.keys[:, :, s0:s1].reshape(batch, heads, p1 - p0, ps, dim)
    empty = (entry.pos[:, :, s0:s1] < 0).reshape(batch, heads, p1 - p0, ps, 1)
    low = keys.masked_fill(empty, torch.inf).amin(dim=3)
    high = keys.masked_fill(empty, -torch.inf).amax(dim=3)
    _store_bounds(entry, slice(p0, p1), low, high)
    entry.page_sum[:, :, p0:p1] = keys.float().masked_fill(empty, 0.0).sum(dim=3)
    entry.page_count[:, :, p0:p1] = (~empty).view(batch, heads, p1 - p0, ps).sum(dim=3)
    # an empty page holds zeros (not +-inf) so bounds stay finite; selection masks it by count
    none = (entry.page_count[:, :, p0:p1] == 0).unsqueeze(-1)
    entry.page_min[:, :, p0:p1].masked_fill_(none, 0.0)
    entry.page_max[:, :, p0:p1].masked_fill_(none, 0.0)
    for matrix, buf in entry.projections.values():
        refresh_projection(entry, matrix, buf, s0, min(s1, entry.seq_len))


def _refresh_dense_page(entry: Any, page: int, lo: int, hi: int) -> None:
    """``refresh_pages`` for one page of a dense layer: slots [lo, hi) hold tokens in every row and
    head, the rest of the page is empty, so slicing replaces masking."""
    keys = entry.keys[:, :, lo:hi]
    _store_bounds(entry, page, keys.amin(dim=2), keys.amax(dim=2))
    entry.page_sum[:, :, page] = keys.float().sum(dim=2)
    entry.page_count[:, :, page] = hi - lo
    for matrix, buf in entry.projections.values():
        refresh_projection(entry, matrix, buf, lo, hi)


def _store_bounds(entry: Any, pages: int | slice, low: torch.Tensor, high: torch.Tensor) -> None:
    """Store page key min / max, rounded outward to the bounds' dtype."""
    dtype = entry.page_bounds.dtype
    entry.page_min[:, :, pages] = round_outward(low, dtype, -torch.inf)
    entry.page_max[:, :, pages] = round_outward(high, dtype, torch.inf)


def refresh_projection(
    entry: Any, matrix: torch.Tensor, buf: torch.Tensor, lo: int, hi: int
) -> None:
    """``buf[:, :, lo:hi] = keys[:, :, lo:hi] @ matrix`` ([B, Hkv, n, D] @ [Hkv, D, r])."""
    if hi > lo:
        buf[:, :, lo:hi] = torch.matmul(entry.keys[:, :, lo:hi].to(matrix.dtype), matrix)


def projected_keys(entry: Any, name: str, matrix: torch.Tensor) -> torch.Tensor:
    """``KVCache.projected_keys`` on a layer whose page metadata is up to date: [B, Hkv, seq_len, r]
    ``keys @ matrix`` for matrix [Hkv, D, r], computed in float32 (float64 for a float64 cache),
    kept in ``metadata_dtype`` and refreshed at every append; a new matrix under ``name``
    recomputes it."""
    _, h, _, d = entry.keys.shape
    if matrix.dim() != 3 or matrix.shape[:2] != (h, d):
        raise ValueError(
            f"projection {name!r} must be [Hkv={h}, D={d}, r], got {tuple(matrix.shape)}"
        )
    wide = torch.float64 if entry.keys.dtype == torch.float64 else torch.float32
    matrix = matrix.to(device=entry.keys.device, dtype=wide)
    known = entry.projections.get(name)
    if known is None or not torch.equal(known[0], matrix):
        buf = torch.zeros(
            *entry.keys.shape[:3], matrix.shape[2], dtype=metadata_dtype(entry.keys.dtype)
        )
        entry.projections[name] = (matrix, buf)
        refresh_projection(entry, matrix, buf, 0, entry.seq_len)
    return entry.projections[name][1][:, :, : entry.seq_len]
