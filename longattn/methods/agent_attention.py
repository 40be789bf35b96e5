"""Agent attention: a few agent tokens (pooled queries) gather from the keys and broadcast to the
queries; non-causal (encoders)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longattn.method import Method, check_positive, register
from longattn.methods.latte import Rounding, abs_scores, call_scale, magnitude_bound


def pool_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, min(n, T), D]: means over contiguous, near-equal spans of the tokens
    (adaptive average pooling: span i covers tokens floor(iT/n) .. ceil((i+1)T/n) - 1)."""
    batch, heads, length, dim = x.shape
    n = min(n, length)
    flat = x.reshape(batch * heads, length, dim).transpose(1, 2)  # [BH, D, T]
    return F.adaptive_avg_pool1d(flat, n).transpose(1, 2).reshape(batch, heads, n, dim)


def refuse_state(cls_name: str, state: object) -> None:
    """A non-causal method sees the whole sequence in one call: it has nothing to carry."""
    if state is not None:
        raise ValueError(
            f"{cls_name} is non-causal (every query sees every key of the call): it has no "
            f"recurrent state to resume from, got {type(state).__name__}; call it once over the "
            f"whole sequence, without a cache"
        )


@register("agent_attention")
@dataclass(frozen=True)
class AgentAttention(Method):
    """Agent attention: ``n_agents`` agent tokens A, the queries average-pooled over the sequence,
    gather ``V_A = softmax(scale A K^T) V`` and broadcast ``out = softmax(scale Q A^T) V_A``
    (O(T n) instead of O(T^2)). Han et al. 2023, arXiv:2312.08874.

    Non-causal only: the agents pool every query of the call and gather every key, so a query's
    output depends on later tokens; a call with a carried state raises ``ValueError``. A causal
    form of the same gather-broadcast through latent vectors fixed ahead of time is ``Latte``.
    With GQA each query head has its own agents over its KV head's keys.
    Deviation from paper: no agent bias and no depthwise convolution on the values (learned
    parameters of a trained model).
    """

    n_agents: int = 49

    def __post_init__(self) -> None:
        check_positive("AgentAttention", n_agents=self.n_agents)

    @property
    def is_causal(self) -> bool:
        return False

    def forward(self, q, k, v, state, view=None):
        refuse_state("AgentAttention", state)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        out = self._attend(q.to(acc), k.to(acc), v.to(acc), call_scale(view, q.shape[-1]))
        return out.to(v.dtype), None

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``). An agent is a mean of at most T queries: off by ``gamma(T)`` of the mean
        of |q|. A gather score ``scale a . k`` is then off by ``E_g = (gamma(T) + gamma(D) + 3u)
        A_g``, A_g the largest ``|scale| sum pool(|q|)_d |k_d|``, its softmax weight over T keys
        by ``2E_g + 4eta + 3gamma(T) + 2u``; a broadcast score ``scale q . a`` likewise over the
        n agents. The two non-negative weights multiply: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        q64, k64 = q.double(), k.double()
        length, dim, n_kv = k.shape[2], q.shape[-1], k.shape[1]
        scale = call_scale(view, dim)
        pooled = pool_tokens(q64.abs(), self.n_agents)  # [B, H, n, D]
        e = r.gamma(length) + r.gamma(dim) + 3 * r.u
        e_g = e * abs_scores(pooled.reshape(q.shape[0], n_kv, -1, dim), k64, scale)
        e_b = e * abs_scores(q64, pooled, scale)
        n = pooled.shape[2]
        rho = 2 * e_g + 2 * e_b + 8 * r.eta + 3 * r.gamma(length) + 3 * r.gamma(n) + 4 * r.u
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass: both softmax matrices materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        return self._attend(q, k, v, call_scale(view, q.shape[-1]))

    def _attend(self, q, k, v, scale):
        batch, n_heads, length, dim = q.shape
        n_kv = k.shape[1]
        if k.shape[2] == 0:
            return q.new_zeros(batch, n_heads, length, v.shape[-1])
        agents = pool_tokens(q, self.n_agents)  # [B, H, n, D]
        rows = agents.reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*n, D]
        gather = torch.softmax(scale * rows @ k.transpose(-1, -2), dim=-1)  # [B, Hkv, G*n, T]
        agent_values = (gather @ v).view(batch, n_heads, agents.shape[2], -1)  # [B, H, n, Dv]
        broadcast = torch.softmax(scale * q @ agents.transpose(-1, -2), dim=-1)  # [B, H, T, n]
        return broadcast @ agent_values
