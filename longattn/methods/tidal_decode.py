"""TidalDecode: token selection on a few layers, the chosen positions reused by the layers between."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@register("tidal_decode")
@dataclass(frozen=True)
class TidalDecode(Method):
    """Layers before ``select_layers[0]`` are dense; each layer in ``select_layers`` scores every key
    exactly and keeps the ``budget`` tokens with the most attention mass summed over all its heads; the
    following layers attend to the same positions. Yang et al. 2024, arXiv:2410.05076.

    The chosen positions live in the cache's shared ``state`` (never in the method); a layer that finds
    no selection of the current step (e.g. a cache-less call) selects itself.
    Deviation from paper: selection layers score with exact attention over the cache (as the paper's
    full-attention selection layers do) but the selected set is shared by all heads of a row.
    """

    budget: int = 1024
    fraction: float = 0.0
    select_layers: tuple[int, ...] = (2, 13)

    def __post_init__(self) -> None:
        check_budget(type(self).__name__, self.budget, self.fraction)
        if not self.select_layers or any(
            not isinstance(x, int) or x < 0 for x in self.select_layers
        ):
            raise ValueError(f"select_layers must be non-negative ints, got {self.select_layers}")

    def select(self, q, view):
        budget = token_budget(self.budget, self.fraction, view.seq_len)
        if view.n_layers > 1 and view.layer < min(self.select_layers):
            return None
        if budget >= view.seq_len:
            return None
        batch, n_kv = view.keys.shape[:2]
        saved = view.state.get("tidal_decode")
        if view.layer not in self.select_layers and saved is not None:
            slots, positions = saved
            # reusable only while every saved slot exists in this layer and holds the same position
            if slots.shape[-1] <= view.seq_len and int(slots.max()) < view.seq_len:
                here = view.positions.gather(1, slots.clamp(min=0))
                if torch.equal(torch.where(slots < 0, -1, here), positions):
                    return DecodeSelection(slots[:, None].expand(batch, n_kv, -1), 1)
        group = q.shape[1] // n_kv
        keys = view.keys.float().repeat_interleave(group, dim=1)
        scores = (q.float() @ keys.transpose(-1, -2)) * view.scale  # [B, H, Tq, T]
        mass = group_mass(scores, visible_keys(view.q_pos, view.positions), 1)  # [B, 1, T]
        slots = top_index(mass, budget, view.top_index)[:, 0]  # [B, k]
        positions = torch.where(slots < 0, -1, view.positions.gather(1, slots.clamp(min=0)))
        view.state["tidal_decode"] = (slots, positions)
        return DecodeSelection(slots[:, None].expand(batch, n_kv, -1), 1)
