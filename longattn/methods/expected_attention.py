"""Expected attention: score keys by the attention of future queries modelled as a Gaussian."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longattn.method import Evict, register
from longattn.methods.snapkv import score_dtype


@register("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(Evict):
    """Future queries of each query head are modelled as Gaussian, ``q ~ N(mu, S)`` with the mean
    and (population) covariance of the observation window's queries. A key's expected unnormalised
    attention is ``E[exp(s q.k)] = exp(s mu.k + s^2/2 k^T S k)`` (``s`` the softmax scale); it is
    normalised over the head's held keys (a softmax, in the log domain), averaged over the query
    heads of the KV head and, with ``vnorm``, multiplied by ``||v||`` (a key's contribution to the
    output). ``covariance=false`` keeps the mean term only. Devoto et al. 2025, arXiv:2510.00636.

    Deviation from paper: the statistics are those of the window's post-RoPE queries; the paper
    takes pre-RoPE statistics of the whole prompt and rotates them by the average RoPE rotation of
    the next positions (a Llama-specific step that needs the model's projection weights).
    """

    vnorm: bool = True
    covariance: bool = True

    def score(self, view: Any) -> torch.Tensor:
        dtype = score_dtype(view.keys)
        queries = view.queries.to(dtype)  # [B, H, w, D]
        batch, n_heads, w, dim = queries.shape
        if w == 0:
            raise ValueError(
                "ExpectedAttention needs the observation window's queries, but the view holds none "
                "(w=0)"
            )
        n_kv = view.keys.shape[1]
        keys = view.keys.to(dtype)[:, :, None]  # [B, Hkv, 1, T, D]
        mean = queries.mean(dim=2).view(batch, n_kv, -1, 1, dim)  # [B, Hkv, G, 1, D]
        logits = view.scale * (keys @ mean.transpose(-1, -2)).squeeze(-1)  # [B, Hkv, G, T]
        if self.covariance and w > 1:
            # k^T S k = mean over the window of ((q_i - mu) . k)^2: w x T per head, no D x D
            centred = (queries - mean.view(batch, n_heads, 1, dim)).view(batch, n_kv, -1, w, dim)
            spread = (centred @ keys.transpose(-1, -2)).square().mean(dim=-2)  # [B, Hkv, G, T]
            logits = logits + view.scale**2 / 2 * spread
        empty = (view.positions < 0)[:, :, None]  # [B, Hkv, 1, T]
        probs = torch.softmax(logits.masked_fill(empty, -torch.inf), dim=-1).nan_to_num(0.0)
        score = probs.mean(dim=2)  # [B, Hkv, T]
        if self.vnorm:
            score = score * torch.linalg.vector_norm(view.values, dim=-1, dtype=dtype)
        return score
