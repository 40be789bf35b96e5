"""DHSA-style prefill: variable-length chunks cut where adjacent keys change, length-normalised
chunk similarities upsampled to the block grid, top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, check_positive, register
from longattn.methods.anchor_attention import hidden_bias
from longattn.methods.block_topk import top_count, top_k_blocks

# Keys whose adjacent cosines (or float32 copy) are computed at once (rows): they stay in cache.
COSINE_ROWS = 1 << 12


def chunk_ids(k: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B, Hkv, Tk] int64 chunk of each key: the sequence is cut before the ``n_chunks - 1`` keys
    least similar (cosine) to their predecessor (ties towards the earlier key)."""
    t_k = k.shape[2]
    n_cuts = min(n_chunks, t_k) - 1
    cosine = torch.empty(*k.shape[:2], t_k - 1, device=k.device)  # [B, Hkv, Tk - 1]
    for lo in range(0, t_k - 1, COSINE_ROWS):
        hi = min(lo + COSINE_ROWS, t_k - 1)
        unit = torch.nn.functional.normalize(k[:, :, lo : hi + 1].float(), dim=-1)
        cosine[..., lo:hi] = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)
    starts = torch.zeros(k.shape[:3], dtype=torch.long, device=k.device)
    if n_cuts > 0:  # the least similar first, ties towards the earlier key
        starts[..., 1:] = top_count(-cosine, torch.tensor(n_cuts, device=k.device))
    return starts.cumsum(-1)


def chunk_representations(x: torch.Tensor, ids: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """x [B, h, T, D], ids [B, h, T] -> [B, h, n_chunks, D] float32: each chunk's mean times the
    square root of its length (``sum / sqrt(n)``), so that long and short chunks compare fairly;
    zeros for a chunk without tokens. Summed row by row in token order (``index_add_`` over the
    flattened rows: no index expanded over D)."""
    batch, heads, _, dim = x.shape
    offset = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * n_chunks
    rows = (ids + offset).flatten()  # [B * h * T] each token's (row, head, chunk)
    sums = torch.zeros(batch * heads * n_chunks, dim, device=x.device)
    flat = x.reshape(-1, dim)  # a narrower dtype widened a few rows at a time, in token order
    for lo in range(0, flat.shape[0], COSINE_ROWS):
        sums.index_add_(0, rows[lo : lo + COSINE_ROWS], flat[lo : lo + COSINE_ROWS].float())
    counts = torch.zeros(batch * heads * n_chunks, device=x.device)
    counts.index_add_(0, rows, torch.ones(rows.shape, device=x.device))
    sums, counts = sums.view(batch, heads, n_chunks, dim), counts.view(batch, heads, n_chunks)
    return sums / counts.clamp(min=1).sqrt().unsqueeze(-1)


def spread(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """scores [..., R, C] and per-block chunk ranges lo, hi [..., 1, n] (inclusive, shared by the
    R rows) -> [..., R, n]: the maximum of the scores over each block's chunks (chunks are
    contiguous, so a block's are a range). A sparse table: level j holds the maxima of 2^j
    consecutive scores, and a range is the maximum of two overlapping power-of-two windows
    (exact: max is order-free)."""
    length = hi - lo + 1
    levels = [scores]
    while (2 << (len(levels) - 1)) <= int(length.max()):
        prev, half = levels[-1], 1 << (len(levels) - 1)
        level = prev.clone()
        torch.maximum(prev[..., :-half], prev[..., half:], out=level[..., :-half])
        levels.append(level)
    level = torch.zeros_like(lo)  # floor(log2(length))
    for j in range(1, len(levels)):
        level += length >= (1 << j)
    table = torch.cat(levels, -1)  # [..., R, L * C]
    width = scores.shape[-1]
    shape = (*scores.shape[:-1], lo.shape[-1])
    left = torch.gather(table, -1, (level * width + lo).expand(shape))
    right = level * width + hi - torch.pow(2, level) + 1
    return torch.maximum(left, torch.gather(table, -1, right.expand(shape)))


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
        # -inf on future chunk pairs, as a bias added over each KV head's query heads
        hidden = hidden_bias(~future)
        sim = sim.view(batch, n_kv, group, n_chunks, n_chunks).add_(hidden.unsqueeze(2))
        sim = sim.view(batch, heads, n_chunks, n_chunks)
        bs = view.block_size
        q_first, q_last = self._block_ends(q_ids, bs)  # [B, H, nq]
        k_first, k_last = self._block_ends(ids.repeat_interleave(group, dim=1), bs)  # [B, H, nk]
        rows = spread(sim.transpose(-1, -2), q_first.unsqueeze(-2), q_last.unsqueeze(-2))
        scores = spread(rows.transpose(-1, -2), k_first.unsqueeze(-2), k_last.unsqueeze(-2))
        return top_k_blocks(scores, view.causal, self.budget, view.forced)

    @staticmethod
    def _block_ends(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, h, T] chunk ids -> (first, last) chunk of each block of ``block`` tokens."""
        t = ids.shape[-1]
        starts = torch.arange(0, t, block, device=ids.device)
        ends = (starts + block).clamp(max=t) - 1
        return ids[..., starts], ids[..., ends]
