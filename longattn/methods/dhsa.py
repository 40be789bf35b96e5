"""DHSA-style prefill: variable-length chunks cut where adjacent keys change, length-normalised
chunk similarities upsampled to the block grid, top-k."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, check_positive, register
from longattn.methods.block_topk import top_k_blocks


def chunk_ids(k: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B, Hkv, Tk] int64 chunk of each key: the sequence is cut before the ``n_chunks - 1`` keys
    least similar (cosine) to their predecessor (ties towards the earlier key)."""
    t_k = k.shape[2]
    n_cuts = min(n_chunks, t_k) - 1
    unit = torch.nn.functional.normalize(k.float(), dim=-1)
    cosine = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)  # [B, Hkv, Tk - 1]
    cuts = torch.sort(cosine, dim=-1, stable=True).indices[..., :n_cuts] + 1
    starts = torch.zeros(k.shape[:3], dtype=torch.long, device=k.device)
    starts.scatter_(-1, cuts, 1)
    return starts.cumsum(-1)


def chunk_representations(x: torch.Tensor, ids: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """x [B, h, T, D], ids [B, h, T] -> [B, h, n_chunks, D] float32: each chunk's mean times the
    square root of its length (``sum / sqrt(n)``), so that long and short chunks compare fairly;
    zeros for a chunk without tokens."""
    batch, heads, _, dim = x.shape
    sums = torch.zeros(batch, heads, n_chunks, dim, device=x.device)
    sums.scatter_add_(2, ids.unsqueeze(-1).expand(*ids.shape, dim), x.float())
    counts = torch.zeros(batch, heads, n_chunks, device=x.device)
    counts.scatter_add_(2, ids, torch.ones(ids.shape, device=x.device))
    return sums / counts.clamp(min=1).sqrt().unsqueeze(-1)


def spread(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """scores [..., C] and per-block chunk ranges lo, hi [..., n] (inclusive) -> [..., n]: the
    maximum of the scores over each block's chunks (chunks are contiguous, so a block's are a
    range)."""
    best = torch.gather(scores, -1, lo)
    for step in range(1, int((hi - lo).max()) + 1):
        at = torch.gather(scores, -1, (lo + step).clamp(max=scores.shape[-1] - 1))
        best = torch.where(lo + step <= hi, torch.maximum(best, at), best)
    return best


@register("dhsa")
@dataclass(frozen=True)
class DHSA(SparsePrefill):
    """Dynamic Hierarchical Sparse Attention (Xiong et al. 2025, arXiv:2510.24606): the keys are cut
    into ``ceil(Tk / chunk_size)`` variable-length chunks where adjacent keys are least similar;
    each chunk is represented by its mean times ``sqrt(length)`` (length-normalised aggregation)
    for queries and keys; the chunk-to-chunk similarity ``scale * q_c . k_c`` is upsampled to the
    block grid (a block pair scores the best chunk pair it overlaps) and each query block keeps
    the ``budget`` fraction of its causal key blocks, best first (ties towards the earlier block).
    Queries are the last ``Tq`` keys' positions and share their chunks.

    Deviation from paper: boundaries come from the adjacent-key cosine directly, not from the
    paper's trained boundary predictor (whose labels are similarity shifts between consecutive
    keys); the token-level importance is taken on the block grid (the kernels' unit).
    """

    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("DHSA", chunk_size=self.chunk_size)

    def plan(self, view) -> torch.Tensor:
        batch, heads, t_q, _ = view.q.shape
        n_kv, t_k = view.k.shape[1], view.k.shape[2]
        group = heads // n_kv
        n_chunks = -(-t_k // self.chunk_size)
        ids = chunk_ids(view.k, n_chunks)  # [B, Hkv, Tk]
        q_ids = ids[:, :, t_k - t_q :].repeat_interleave(group, dim=1)  # [B, H, Tq]
        k_rep = chunk_representations(view.k, ids, n_chunks)  # [B, Hkv, C, D]
        q_rep = chunk_representations(view.q, q_ids, n_chunks)  # [B, H, C, D]
        sim = q_rep.view(batch, n_kv, group * n_chunks, -1) @ k_rep.transpose(-1, -2)
        sim = sim.view(batch, heads, n_chunks, n_chunks) * view.scale
        first = torch.full((batch, n_kv, n_chunks), t_k, dtype=torch.long, device=ids.device)
        first.scatter_reduce_(-1, ids, torch.arange(t_k, device=ids.device).expand_as(ids), "amin")
        last = torch.zeros_like(first).scatter_reduce_(
            -1, ids, torch.arange(t_k, device=ids.device).expand_as(ids), "amax"
        )
        future = first.unsqueeze(-2) > last.unsqueeze(-1)  # [B, Hkv, Cq, Ck]
        sim = sim.masked_fill(future.repeat_interleave(group, dim=1), -math.inf)
        bs = view.block_size
        q_first, q_last = self._block_ends(q_ids, bs)  # [B, H, nq]
        k_first, k_last = self._block_ends(ids.repeat_interleave(group, dim=1), bs)  # [B, H, nk]
        rows = spread(
            sim.transpose(-1, -2),
            q_first.unsqueeze(-2).expand(-1, -1, n_chunks, -1),
            q_last.unsqueeze(-2).expand(-1, -1, n_chunks, -1),
        )  # [B, H, Ck, nq]
        scores = spread(
            rows.transpose(-1, -2),
            k_first.unsqueeze(-2).expand(-1, -1, rows.shape[-1], -1),
            k_last.unsqueeze(-2).expand(-1, -1, rows.shape[-1], -1),
        )  # [B, H, nq, nk]
        return top_k_blocks(scores, view.causal, self.budget, view.forced)

    @staticmethod
    def _block_ends(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, h, T] chunk ids -> (first, last) chunk of each block of ``block`` tokens."""
        t = ids.shape[-1]
        starts = torch.arange(0, t, block, device=ids.device)
        ends = (starts + block).clamp(max=t) - 1
        return ids[..., starts], ids[..., ends]
