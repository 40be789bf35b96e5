"""The decode step of ``longattn.attention`` in one C++ call, where nothing but the attention acts.

A one-token step whose attention is dense causal attention over what its cache layer holds (``Dense``;
an eviction method between compressions; a plan method, dense at decode) and whose token continues
its row is the same call whatever the method: validate, append, attend. ``KVCache.decode_step`` does
the three in one C++ call instead of the general path's ~40 tensor operations and ~200 Python calls,
the fixed cost that dominated a step over a compressed (small) cache. A method that declares its
mask and retention as sinks plus a window (``Method.sink_window``: StreamingLLM, a causal sliding
window) runs the same way, its mask inside the call, its retention applied as the general path
applies it (``call.apply_retention``: a page of dead keys evicted at once). Every other call, and
every call this path declines (nothing changed), takes the general path with its checks and errors.
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


DENSE = (0, 0)  # a step's rule: dense causal over what the layer holds


def step_rule(method: Method, cache: KVCache, layer: int) -> tuple[int, int] | None:
    """How a one-query call of ``method`` over ``layer`` attends, where the one-call step can run
    it: ``DENSE`` for ``Dense`` (causal), an eviction method with nothing due
    (``compress.idle``) and a plan method (dense at decode); ``(sinks, window)`` for a method
    that declares ``sink_window``; else None (a position limit, another retention rule, any other
    mask or hook)."""
    if method.max_positions is not None:
        return None
    if type(method).retain is not Method.retain:
        return method.sink_window if method.is_causal else None
    if isinstance(method, Dense):
        return DENSE if method.causal else None
    if isinstance(method, Evict):
        return DENSE if compress.idle(method, cache, layer) else None
    return DENSE if method.hook == "plan" else None


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
    rule = step_rule(method, cache, layer) if isinstance(method, Method) else None
    if rule is None:
        return None
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])  # as the general path
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return None
    done = cache.decode_step(
        layer, q, k, v, float(scale), position, None if rule == DENSE else rule
    )
    if done is None:
        return None
    log.debug("impl=auto chose %r (the decode step in one call)", "decode_cpp")
    out, dead = done
    if dead >= cache.page_size:  # the retention, as ``call.apply_retention`` applies it
        held = cache.positions(layer) if cache.is_uniform(layer) else cache.head_positions(layer)
        newest = cache.next_positions(layer) - 1  # the step's position
        newest = newest.view(1, 1) if held.dim() == 2 else newest.view(1, 1, 1)
        cache.evict(layer, method.retain(held, newest).expand_as(held) & (held >= 0))
    return out
