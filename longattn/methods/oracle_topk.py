"""Oracle top-k: the tokens with the most exact softmax mass (the upper reference for recall)."""

from __future__ import annotations

from dataclasses import dataclass

from longattn.method import (
    Method,
    check_budget,
    group_mass,
    register,
    token_budget,
    top_index,
    visible_keys,
)
from longattn.types import DecodeSelection


@register("oracle_topk")
@dataclass(frozen=True)
class OracleTopK(Method):
    """The ``budget`` tokens per KV head with the largest exact attention mass (summed over the
    head's query group and the step's queries). Not a speed-up: it reads every key to score it. It is
    the ceiling of attention-mass recall for a token budget.
    """

    budget: int = 1024
    fraction: float = 0.0

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.fraction)

    def select(self, q, view):
        budget = token_budget(self.budget, self.fraction, view.seq_len)
        if budget >= view.seq_len:
            return None
        n_kv = view.keys.shape[1]
        group = q.shape[1] // n_kv
        keys = view.keys.float().repeat_interleave(group, dim=1)
        scores = (q.float() @ keys.transpose(-1, -2)) * view.scale  # [B, H, Tq, T]
        mass = group_mass(scores, visible_keys(view.q_pos, view.positions), n_kv)
        return DecodeSelection(top_index(mass, budget, view.top_index), 1)
