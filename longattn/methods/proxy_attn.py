"""ProxyAttn-style prefill: a few pooled proxy heads score key blocks at token level for all
heads; each head keeps as many blocks as its own attention needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, check_positive, register
from longattn.methods.anchor_attention import query_blocks
from longattn.methods.block_topk import top_count

# Sampled-query x key scores computed at once (floats per chunk of query blocks): a few MiB, so
# that each product has enough rows to run near the machine's GEMM rate, and its softmax and
# block sums still read it from cache.
SCORE_CHUNK_ELEMENTS = 1 << 20


def key_block_sum(weights: torch.Tensor, block: int) -> torch.Tensor:
    """[..., Tk] -> [..., ceil(Tk / block)]: the sum over each key block's columns."""
    t_k = weights.shape[-1]
    n_k = -(-t_k // block)
    if n_k * block != t_k:
        weights = torch.nn.functional.pad(weights, (0, n_k * block - t_k))
    return weights.view(*weights.shape[:-1], n_k, block).sum(-1)


def top_count_blocks(scores: torch.Tensor, causal: torch.Tensor, counts: torch.Tensor):
    """bool like ``scores`` [B, H, nq, nk]: per row the ``counts`` [B, H, nq] highest-scoring causal
    key blocks (ties towards the earlier block)."""
    masked = scores.masked_fill(~causal, -math.inf)
    return top_count(masked, counts.clamp(max=scores.shape[-1])) & causal


def mask_unseen_(logits: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> None:
    """-inf into ``logits`` [..., Tk] where the query (``q_pos`` [Bp, ..., 1]) may not see the key
    (``kv_pos`` [Bp, Tk]: before or at the query, both >= 0), in place. The leading keys every
    query sees are left alone: a bool-masked fill is slow on CPU, so it covers only the keys
    from the first that some query does not see (near the diagonal, padding)."""
    if bool((q_pos < 0).any()):
        open_keys = 0
    else:
        oldest = q_pos.reshape(q_pos.shape[0], -1).amin(-1, keepdim=True)  # [Bp, 1]
        fine = (kv_pos >= 0) & (kv_pos <= oldest)  # [Bp, Tk]
        open_keys = int(fine.long().cumprod(-1).sum(-1).min())
    kp = kv_pos[:, open_keys:].view(kv_pos.shape[0], *([1] * (q_pos.dim() - 2)), -1)
    hidden = (kp > q_pos) | (kp < 0) | (q_pos < 0)  # [Bp, ..., Tk - open]
    logits[..., open_keys:].masked_fill_(hidden, -math.inf)


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
        bs, t_k = view.block_size, k_proxy.shape[2]
        q_rows = q_proxy.flatten(2, 3)  # [B, P, nq * n, D]
        scores = torch.zeros(batch, n_proxy, n_q, -(-t_k // bs), device=q_proxy.device)
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * n_proxy * n * t_k))
        for lo in range(0, n_q, step):
            reached = view.causal[lo : lo + step].any(0)  # [nk] key blocks these queries reach
            if not bool(reached.any()):
                continue
            # keys past the last reached block carry no weight: their scores are not computed
            n_keys = min(t_k, (int(reached.nonzero().max()) + 1) * bs)
            rows = q_rows[:, :, lo * n : (lo + step) * n]  # [B, P, c * n, D]
            logits = rows @ k_proxy[:, :, :n_keys].transpose(-1, -2)  # [B, P, c * n, keys]
            logits = logits.unflatten(2, (-1, n)).mul_(view.scale)  # [B, P, c, n, keys]
            mask_unseen_(logits, q_pos[:, None, lo : lo + step, :, None], view.kv_pos[:, :n_keys])
            weights = torch.softmax(logits, dim=-1)
            unseeing = weights[..., 0].isnan()  # a query that sees no key: no weight (not NaN)
            if bool(unseeing.any()):
                weights[unseeing] = 0.0
            blocks = key_block_sum(weights, bs).mean(-2)  # [B, P, c, nk']
            scores[:, :, lo : lo + step, : blocks.shape[-1]] = blocks
        return scores

    def _head_fraction(self, view) -> torch.Tensor:
        """[B, H] each head's kept fraction of causal blocks, from the last query block."""
        last = view.last_weights(view.block_size)  # [B, H, n, Tk]
        mass = key_block_sum(last, view.block_size).mean(-2)  # [B, H, nk]
        ranked = torch.sort(mass, dim=-1, descending=True).values
        before = ranked.cumsum(-1) - ranked
        needed = (before < self.budget * mass.sum(-1, keepdim=True)).sum(-1).clamp(min=1)
        return needed.double() / view.causal[-1].sum().clamp(min=1)
