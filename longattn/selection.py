"""A select method's decode-time selection: its ``select`` hook run over the cache a call reads.

The selection is a discrete choice (which pages or tokens a query reads): it carries no gradient
and is computed without autograd recording it.
"""

from __future__ import annotations

import torch

from longattn.cache import KVCache
from longattn.call import Call
from longattn.kernels.decode import MAX_DECODE_QUERIES
from longattn.types import DecodeSelection


def selection_cache(call: Call) -> tuple[KVCache, int]:
    """The cache a select method reads: the call's own, or a one-layer cache built from k, v."""
    if call.cache is not None:
        return call.cache, call.layer
    page_size = getattr(call.method, "page_size", 16)
    tmp = KVCache(1, page_size=page_size)
    kv_pos = call.kv_pos.expand(call.k.shape[0], -1)
    tmp.append(0, call.k, call.v, positions=kv_pos)
    return tmp, 0


def compute_selection(call: Call, cache: KVCache | None = None) -> DecodeSelection | None:
    """Run the method's ``select`` hook for this call (None: attend to every visible key), with
    autograd off."""
    if call.q.shape[2] > MAX_DECODE_QUERIES:
        return None
    from longattn.calibration import for_layer

    with torch.no_grad():
        layer = call.layer
        if cache is None:
            cache, layer = selection_cache(call)
        calibration = for_layer(call.method, cache, layer)
        view = cache.select_view(layer, call.q_pos, call.scale, calibration)
        selection = call.method.select(call.q, view)
    if selection is not None and not isinstance(selection, DecodeSelection):
        raise TypeError(
            f"{call.method.name}.select must return a DecodeSelection or None, "
            f"got {type(selection).__name__}"
        )
    return selection
