"""ThinK: store fewer key channels, chosen by the observation window's queries; optionally evict
tokens with another scorer as well."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from longattn.method import Evict, check_fraction, from_string, register
from longattn.methods.snapkv import score_dtype


@functools.lru_cache(maxsize=64)  # read at every call of the layer (``needs``): parse once
def token_scorer(spec: str) -> Evict:
    """ThinK's ``scorer`` string as a method, checked: an eviction method without calibration,
    whose own budget and schedule fields are the defaults (ThinK's apply)."""
    inner = from_string(spec.replace(";", ","))
    if not isinstance(inner, Evict) or isinstance(inner, ThinK):
        raise ValueError(f"ThinK.scorer must name an eviction method, got {spec!r}")
    if hasattr(inner, "calibration"):
        raise ValueError(f"ThinK.scorer cannot be a calibrated method, got {spec!r}")
    base = type(inner)()
    for field in dataclasses.fields(Evict):
        if getattr(inner, field.name) != getattr(base, field.name):
            raise ValueError(
                f"ThinK.scorer sets {field.name}: set budgets and schedule on think itself, "
                f"got {spec!r}"
            )
    return inner


@register("think")
@dataclass(frozen=True)
class ThinK(Evict):
    """Query-driven key-channel pruning, per KV head. Xu et al. 2024, arXiv:2407.21018.

    At the layer's first compression (``when``, as the eviction methods), channel ``c`` of a KV head
    scores ``||Q_obs[:, c]||_2 * ||K[:, c]||_2``, the Frobenius norm of its term ``Q_obs[:, c]
    K[:, c]^T`` in the observation window's attention logits (``Q_obs``: the last ``window``
    queries of the head's query heads; ``K``: its held keys, after any token eviction). The
    ``floor(keep * D)`` best channels (at least one; ties to the lower channel) are kept: the cache
    then stores keys ``[B, Hkv, T, Dk']`` and the channel index, queries are reduced to the same
    channels at every later call, and the softmax scale stays ``1/sqrt(D)``. Values keep every
    channel. ``keep=1`` prunes nothing.

    Tokens: alone (``scorer=""``, default ``budget=1``) ThinK keeps every token. With
    ``scorer=<an eviction method>`` (``think:keep=0.6,budget=0.25,scorer=snapkv``; the scorer's
    own fields after ``:`` separated by ``;``, e.g. ``scorer=snapkv:kernel=5;pooling=avg``) that
    method scores the tokens and ThinK's budget, allocation, sinks, recent window, observation
    window and schedule apply; channels are then chosen over the keys it kept.

    Deviation from paper: one channel set per KV head (the cache is per KV head), its query norm
    taken over the window's queries of all the head's query heads; every key appended after the
    pruning is stored with the same channels (the paper keeps a small window of the most recent
    keys at full width); the channels are chosen once per layer, later compressions evict tokens
    only.
    """

    keep: float = 0.6
    scorer: str = ""
    budget: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("ThinK", keep=self.keep)
        if not isinstance(self.scorer, str):
            raise TypeError(f"ThinK.scorer must be a method string, got {self.scorer!r}")
        if self.scorer:
            self._token_scorer()  # raises for a scorer ThinK cannot use
        elif self.budget < 1.0 or self.tokens:
            raise ValueError(
                f"ThinK without a scorer keeps every token: budget={self.budget}, "
                f"tokens={self.tokens} need scorer=<an eviction method>"
            )

    def _token_scorer(self) -> Evict:
        return token_scorer(self.scorer)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return self._token_scorer().needs if self.scorer else frozenset({"queries"})

    def score(self, view: Any) -> torch.Tensor:
        if self.scorer:
            return self._token_scorer().score(view)
        return torch.zeros(view.positions.shape, dtype=score_dtype(view.keys))  # every token kept

    def key_channels(self, view: Any) -> torch.Tensor | None:
        batch, n_kv, _, dim = view.keys.shape
        n_keep = max(1, math.floor(self.keep * dim + 1e-9))
        if n_keep >= dim:
            return None
        queries = view.queries  # [B, H, w, D]
        if queries.shape[2] < self.window:
            raise ValueError(
                f"ThinK chooses key channels with the last window={self.window} queries, but "
                f"layer {view.layer} saw {queries.shape[2]}: the prompt is shorter than the window"
            )
        dtype = score_dtype(view.keys)
        real = (view.q_pos >= 0)[:, None, :, None]  # [B, 1, w, 1]: padding queries count nothing
        q = queries.to(dtype).masked_fill(~real, 0.0).reshape(batch, n_kv, -1, dim)
        held = (view.positions >= 0).unsqueeze(-1)  # [B, Hkv, T, 1]
        k = view.keys.to(dtype).masked_fill(~held, 0.0)
        scores = torch.linalg.vector_norm(q, dim=2) * torch.linalg.vector_norm(k, dim=2)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, Hkv, D]
        return order[..., :n_keep].sort(dim=-1).values
