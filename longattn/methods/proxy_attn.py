"""ProxyAttn-style prefill: a few pooled proxy heads score key blocks at token level for all
heads; each head keeps as many blocks as its own attention needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, check_positive, register
from longattn.methods.anchor_attention import query_blocks

# Sampled-query x key scores computed at once (floats per chunk of query blocks).
SCORE_CHUNK_ELEMENTS = 1 << 24


def key_block_sum(weights: torch.Tensor, block: int) -> torch.Tensor:
    """[..., Tk] -> [..., ceil(Tk / block)]: the sum over each key block's columns."""
    t_k = weights.shape[-1]
    n_k = -(-t_k // block)
    padded = torch.nn.functional.pad(weights, (0, n_k * block - t_k))
    return padded.view(*weights.shape[:-1], n_k, block).sum(-1)


def top_count_blocks(scores: torch.Tensor, causal: torch.Tensor, counts: torch.Tensor):
    """bool like ``scores`` [B, H, nq, nk]: per row the ``counts`` [B, H, nq] highest-scoring causal
    key blocks (ties towards the earlier block)."""
    masked = scores.masked_fill(~causal, -math.inf)
    order = torch.sort(masked, dim=-1, descending=True, stable=True)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < counts.unsqueeze(-1)
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, order.indices, rank_kept.expand_as(order.indices))
    return chosen & causal


def proxy_heads(q: torch.Tensor, k: torch.Tensor, n_proxy: int):
    """(q [B, P, ...], k [B, P, Tk, D]) float32: the query heads averaged in ``P`` consecutive
    groups, each group's keys the mean of its query heads' key heads (GQA, ``h // (H / Hkv)``)."""
    heads, n_kv = q.shape[1], k.shape[1]
    size = heads // n_proxy
    q_proxy = q.float().view(q.shape[0], n_proxy, size, *q.shape[2:]).mean(2)
    owner = torch.arange(heads, device=k.device) // size  # proxy of each query head
    kv_head = torch.arange(heads, device=k.device) // (heads // n_kv)
    weight = torch.zeros(n_proxy, n_kv, device=k.device)
    weight.index_put_((owner, kv_head), torch.full((heads,), 1.0 / size), accumulate=True)
    return q_proxy, torch.einsum("pk,bktd->bptd", weight, k.float())


@register("proxy_attn")
@dataclass(frozen=True)
class ProxyAttn(SparsePrefill):
    """ProxyAttn (arXiv:2509.24745, 2025): heads attend to largely the same tokens and
    differ mostly in how sparse they are. So ``proxy_heads`` pooled heads (the query heads averaged
    in consecutive groups, with their key heads) score every key block at token level: the softmax
    weights of ``samples`` queries per query block (its last ones) summed per key block. Each head
    gets its own budget: on the last query block its exact attention is summed per key block and
    the fewest blocks holding ``budget`` (gamma) of it give the head's fraction of causal blocks,
    which every row of that head keeps, ranked by its proxy's scores.

    Deviation from paper: queries are sampled as the last ``samples`` of each block, and the
    per-head budget is read from the last query block only; the paper's kernels are not reproduced.
    """

    budget: float = 0.9
    proxy_heads: int = 1
    samples: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("ProxyAttn", proxy_heads=self.proxy_heads, samples=self.samples)

    def plan(self, view) -> torch.Tensor:
        heads = view.q.shape[1]
        if heads % self.proxy_heads:
            raise ValueError(
                f"ProxyAttn.proxy_heads={self.proxy_heads} must divide the {heads} query heads"
            )
        scores = self._proxy_scores(view)  # [B, P, nq, nk]
        scores = scores.repeat_interleave(heads // self.proxy_heads, dim=1)  # [B, H, nq, nk]
        fraction = self._head_fraction(view)  # [B, H]
        per_row = view.causal.sum(-1).double()  # [nq]
        counts = torch.ceil(fraction.unsqueeze(-1) * per_row).long().clamp(min=1)
        return top_count_blocks(scores, view.causal, counts)

    def _proxy_scores(self, view) -> torch.Tensor:
        q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
        n = min(self.samples, view.block_size)
        q, q_pos = q[..., -n:, :], q_pos[..., -n:]  # the last queries of each block
        q_proxy, k_proxy = proxy_heads(q, view.k, self.proxy_heads)  # [B, P, nq, n, D]
        batch, n_proxy, n_q = q_proxy.shape[:3]
        t_k = k_proxy.shape[2]
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * n_proxy * n * t_k))
        parts = []
        for lo in range(0, n_q, step):
            logits = q_proxy[:, :, lo : lo + step] @ k_proxy.unsqueeze(2).transpose(-1, -2)
            qp = q_pos[:, None, lo : lo + step, :, None]  # [Bp, 1, c, n, 1]
            kp = view.kv_pos[:, None, None, None, :]
            visible = (kp <= qp) & (kp >= 0) & (qp >= 0)
            logits = (logits * view.scale).masked_fill(~visible, -math.inf)
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [B, P, c, n, Tk]
            parts.append(key_block_sum(weights, view.block_size).mean(-2))
        return torch.cat(parts, dim=2)

    def _head_fraction(self, view) -> torch.Tensor:
        """[B, H] each head's kept fraction of causal blocks, from the last query block."""
        last = view.last_weights(view.block_size)  # [B, H, n, Tk]
        mass = key_block_sum(last, view.block_size).mean(-2)  # [B, H, nk]
        ranked = torch.sort(mass, dim=-1, descending=True).values
        before = ranked.cumsum(-1) - ranked
        needed = (before < self.budget * mass.sum(-1, keepdim=True)).sum(-1).clamp(min=1)
        return needed.double() / view.causal[-1].sum().clamp(min=1)
