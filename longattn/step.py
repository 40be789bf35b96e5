"""The decode step of ``longattn.attention`` in one C++ call, where nothing but the attention acts.

A one-token step whose attention is dense causal attention over what its cache layer holds (``Dense``;
an eviction method between compressions; a plan method, dense at decode) and whose token continues
its row is the same call whatever the method: validate, append, attend. ``KVCache.decode_step`` does
the three in one C++ call instead of the general path's ~40 tensor operations and ~200 Python calls,
the fixed cost that dominated a step over a compressed (small) cache. Every other call, and every
call this path declines (nothing changed), takes the general path with its checks and errors.
"""

from __future__ import annotations

import logging
import math

import torch

from longattn import compress
from longattn.cache import KVCache
from longattn.method import Evict, Method
from longattn.methods.dense import Dense
from longattn.types import AttnOutput

log = logging.getLogger("longattn")


def dense_at_decode(method: Method, cache: KVCache, layer: int) -> bool:
    """Whether a one-query call of ``method`` over ``layer`` is dense causal attention over what it
    holds and changes nothing else: ``Dense`` (causal), an eviction method with nothing due
    (``compress.idle``), a plan method (dense at decode); none with a retention rule or a position
    limit."""
    if type(method).retain is not Method.retain or method.max_positions is not None:
        return False
    if isinstance(method, Dense):
        return method.causal
    if isinstance(method, Evict):
        return compress.idle(method, cache, layer)
    return method.hook == "plan"


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | None,
    scale: float | None,
    q_positions: torch.Tensor | None,
    kv_positions: torch.Tensor | None,
    cache: KVCache,
    layer: int,
    impl: str = "auto",
) -> AttnOutput | None:
    """``attention(q, k, v, method=method, cache=cache, layer=layer, scale=scale, ...)`` for a
    decode step this path takes (see the module docstring), or None with nothing changed. Only
    for ``impl="auto"`` (a named implementation runs the general path)."""
    if impl != "auto" or q_positions is not kv_positions:  # the queries: the new token
        return None
    position = kv_positions
    if position is not None and not (  # [1] or [1, 1] (the general path checks the rest)
        isinstance(position, torch.Tensor)
        and position.dtype == torch.int64
        and tuple(position.shape) in ((1,), (1, 1))
        and position.device.type == "cpu"
    ):
        return None
    method = Dense() if method is None else method
    if not isinstance(method, Method) or not dense_at_decode(method, cache, layer):
        return None
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])  # as the general path
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return None
    out = cache.decode_step(layer, q, k, v, float(scale), position)
    if out is not None:  # the C++ decode kernel's one-call step
        log.debug("impl=auto chose %r (the decode step in one call)", "decode_cpp")
    return out
