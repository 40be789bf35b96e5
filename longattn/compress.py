"""Eviction: the library's half of a score method (``longattn.method.Evict``).

A score method says how important each held key is, per (batch row, KV head); this module does the
rest, the same way for every scorer: it keeps the observation window of queries and the attention
statistics the scorer reads, decides when to compress (``Evict.when``), turns the method's budget
into a token count per layer (``allocation``: uniform or PyramidKV) and per head (uniform or AdaKV),
protects the sinks and the recent window, takes the top-k per head and evicts the rest in the cache,
head by head, shrinking the storage to what is kept (``KVCache.evict(capacity=...)``).

Per-layer bookkeeping lives in ``cache.state`` (an immutable ``Tracked`` per layer, replaced rather
than mutated, so that ``KVCache.rollback`` restores it) and in the cache's per-slot statistics
(``KVCache.stat``), which move with their tokens.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch

from longattn.cache import KVCache
from longattn.cache_channels import gather_query_channels
from longattn.calibration import for_layer
from longattn.call import Call
from longattn.kernels.decode import MAX_DECODE_QUERIES
from longattn.method import Evict
from longattn.types import ScoreView, accumulation_dtype

PYRAMID_BETA = 20  # PyramidKV's ratio between the average and the last layer's budget
ADA_FLOOR = 0.2  # AdaKV's safeguard: each head keeps at least this share of the uniform budget
WEIGHT_CHUNK = 256  # queries per chunk when attention weights are computed (no T x T matrix)


class Tracked(NamedTuple):
    """What the library keeps of one layer between calls for its eviction method."""

    queries: torch.Tensor  # [B, H, w, D] the latest queries (the observation window)
    q_pos: torch.Tensor  # [B, w]
    scale: float
    pending: bool  # a prompt was appended since the last compression
    steps: int  # decode steps since the last compression


def _key(layer: int) -> tuple[str, int]:
    return ("evict", layer)


def due_before(method: Evict, cache: KVCache, layer: int, q_len: int) -> bool:
    """Whether a call of ``q_len`` queries compresses ``layer`` before appending (a decode step
    after a prompt, or the ``every``-th decode step for ``when="decode"``)."""
    tracked = cache.state.get(_key(layer))
    if tracked is None or q_len > MAX_DECODE_QUERIES or method.when == "chunk":
        return False
    return tracked.pending or (method.when == "decode" and tracked.steps + 1 >= method.every)


def due_after(method: Evict, q_len: int) -> bool:
    """Whether a call of ``q_len`` queries compresses its layer after attending (a prefill chunk
    for ``when="chunk"``)."""
    return method.when == "chunk" and q_len > MAX_DECODE_QUERIES


def idle(method: Evict, cache: KVCache, layer: int) -> bool:
    """Whether a decode step over ``layer`` leaves eviction alone: the layer was compressed since
    its last prompt and ``method`` compresses once (not every few decode steps), so ``before``
    compresses nothing and ``after`` records nothing."""
    tracked = cache.state.get(_key(layer))
    return tracked is not None and not tracked.pending and method.when != "decode"


def before(method: Evict, cache: KVCache, layer: int, q_len: int, t_new: int) -> None:
    """Compress ``layer`` ahead of a decode step when it is due (the step's own ``t_new`` tokens
    are not appended yet, so they cannot be evicted; the storage keeps room for them)."""
    if due_before(method, cache, layer, q_len):
        compress(method, cache, layer, room=t_new)
        tracked = cache.state[_key(layer)]
        cache.state[_key(layer)] = tracked._replace(pending=False, steps=0)


def after(method: Evict, call: Call) -> None:
    """Bookkeeping after ``call`` attended over its cache layer: the observation window, the
    accumulated attention (for scorers that need it), the schedule, and a chunk compression."""
    cache, layer = call.cache, call.layer
    assert cache is not None
    q_len = call.q.shape[2]
    prompt = q_len > MAX_DECODE_QUERIES
    old = cache.state.get(_key(layer))
    if not prompt and method.when != "decode" and old is not None and not old.pending:
        return  # compressed already; nothing scores this layer again until the next prompt
    q_pos = call.q_pos.expand(call.q.shape[0], -1)
    if "accumulated" in method.needs:
        _accumulate(cache, layer, call.q, q_pos, call.scale)
    queries, positions = call.q, q_pos
    if old is not None and q_len < method.window and old.queries.shape[2]:
        queries = torch.cat([old.queries, queries], dim=2)
        positions = torch.cat([old.q_pos, positions], dim=1)
    cache.state[_key(layer)] = Tracked(
        queries[:, :, -method.window :].clone(),
        positions[:, -method.window :].clone(),
        call.scale,
        pending=prompt or (old is not None and old.pending),
        steps=0 if prompt or old is None else old.steps + 1,
    )
    if due_after(method, q_len):
        compress(method, cache, layer)
        cache.state[_key(layer)] = cache.state[_key(layer)]._replace(pending=False)


def compress(method: Evict, cache: KVCache, layer: int, calibration=None, room: int = 0) -> None:
    """Score ``layer``'s keys with ``method`` and evict, per head, what its budget does not keep;
    the storage is resized to what is kept plus ``room`` slots (the tokens about to be appended)
    plus ``every`` for ``when="decode"``, in whole pages. ``calibration``: the layer's tensors
    (default: from the method's file, read only when a compression runs)."""
    if calibration is None:
        calibration = for_layer(method, cache, layer)
    tracked = cache.state.get(_key(layer))
    view = score_view(method, cache, layer, tracked, calibration)
    scores = method.score(view)
    positions = view.positions
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(positions.shape):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"{method.name}.score must return [B, Hkv, T] = {tuple(positions.shape)}, got {got}"
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{method.name}.score returned NaN")
    keep = choose(method, scores.float(), positions, cache.n_seen(layer), layer, cache.n_layers)
    kept = int(keep.sum(dim=-1).max())
    headroom = room + (method.every if method.when == "decode" else 0)
    cache.evict(layer, keep, capacity=max(1, kept + headroom), summarize=method.compensate)
    if cache.key_channels(layer) is None:
        prune_channels(method, cache, layer, calibration)


def prune_channels(method: Evict, cache: KVCache, layer: int, calibration=None) -> None:
    """Keep only the key channels ``method.key_channels`` chooses (ThinK) over the keys the token
    eviction kept, and the same channels of the observation window's queries, so that a later
    compression scores pruned keys with pruned queries; nothing when it returns None."""
    tracked = cache.state.get(_key(layer))
    channels = method.key_channels(score_view(method, cache, layer, tracked, calibration))
    if channels is None:
        return
    cache.prune_channels(layer, channels)
    if tracked is not None:
        queries = gather_query_channels(tracked.queries, cache.key_channels(layer))
        cache.state[_key(layer)] = tracked._replace(queries=queries)


def score_view(
    method: Evict, cache: KVCache, layer: int, tracked: Tracked | None, calibration
) -> ScoreView:
    """The read-only view ``method.score`` gets of ``layer``."""
    keys, positions = cache.keys(layer), cache.head_positions(layer)
    batch, n_kv, _, dim = keys.shape
    if tracked is None:  # nothing attended yet through the method: an empty window
        queries = keys.new_zeros(batch, n_kv, 0, dim)
        q_pos, scale = positions.new_zeros(batch, 0), 1.0 / math.sqrt(dim)
    else:
        queries, q_pos, scale = tracked.queries, tracked.q_pos, tracked.scale
    accumulated = last_hit = None
    if "accumulated" in method.needs:
        accumulated = cache.stat(layer, "accumulated")
        last_hit = cache.stat(layer, "last_hit").to(torch.int64) - 1
    return ScoreView(
        keys=keys,
        values=cache.values(layer),
        positions=positions,
        queries=queries,
        q_pos=q_pos,
        scale=scale,
        layer=layer,
        n_layers=cache.n_layers,
        n_seen=cache.n_seen(layer),
        weights=partial(attention_weights, keys=keys, positions=positions, scale=scale),
        accumulated=accumulated,
        last_hit=last_hit,
        calibration=calibration,
    )


def layer_budget(method: Evict, n_seen: int, layer: int, n_layers: int) -> int:
    """Tokens per KV head ``layer`` keeps: ``tokens``, or ``ceil(budget * n_seen)``, shared out over
    the layers by ``allocation`` (PyramidKV, arXiv:2406.02069: an arithmetic sequence from layer 0
    down to ``1 / PYRAMID_BETA`` of the average at the last layer, with the same total)."""
    if method.tokens:
        average = method.tokens
    else:
        average = max(1, math.ceil(method.budget * n_seen - 1e-9))
    if method.allocation != "pyramid" or n_layers == 1:
        return average
    last = average / PYRAMID_BETA
    first = 2 * average - last
    return max(1, round(first - (first - last) * layer / (n_layers - 1)))


def choose(
    method: Evict,
    scores: torch.Tensor,
    positions: torch.Tensor,
    n_seen: int,
    layer: int,
    n_layers: int,
) -> torch.Tensor:
    """bool [B, Hkv, T]: the keys to keep. Sinks and the recent window always; then per head the
    highest scores (ties to the earlier slot) up to the head's budget; +inf always, -inf never."""
    held = positions >= 0
    newest = positions.amax(dim=-1, keepdim=True)  # [B, Hkv, 1]
    protected = held & ((positions < method.sinks) | (positions > newest - method.recent))
    scores = scores.masked_fill(~held, -torch.inf).masked_fill(protected, torch.inf)
    budget = layer_budget(method, n_seen, layer, n_layers)
    forced = torch.isposinf(scores).sum(dim=-1)  # [B, Hkv]
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    if method.allocation == "ada":
        per_head = ada_budgets(order.values, budget)
    else:
        per_head = torch.full_like(forced, budget)
    per_head = torch.maximum(per_head, forced)
    rank_ok = torch.arange(scores.shape[-1], device=scores.device) < per_head.unsqueeze(-1)
    keep_sorted = rank_ok & (order.values > -torch.inf)
    return torch.zeros_like(held).scatter(-1, order.indices, keep_sorted)


def ada_budgets(ranked: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, Hkv] per-head budgets summing to ``budget * Hkv`` per row (AdaKV, arXiv:2407.11550):
    each head gets ``ADA_FLOOR`` of the uniform budget, the rest goes to the highest scores of the
    layer across heads (scores of one scorer are comparable across heads: attention mass).
    ``ranked``: [B, Hkv, T] each head's scores sorted in decreasing order."""
    batch, n_kv, length = ranked.shape
    floor = min(int(ADA_FLOOR * budget), length)
    total = min(budget * n_kv, length * n_kv)
    rest = ranked[..., floor:].reshape(batch, -1)  # the candidates beyond each head's floor
    extra = min(total - floor * n_kv, rest.shape[-1])
    chosen = torch.zeros_like(rest, dtype=torch.bool)
    if extra > 0:
        top = torch.topk(rest, extra, dim=-1, sorted=False).indices
        chosen.scatter_(-1, top, True)
    return floor + chosen.view(batch, n_kv, -1).sum(dim=-1)


def attention_weights(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    keys: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """[B, H, n, T] softmax probabilities of q [B, H, n, D] at q_pos [B, n] over keys [B, Hkv, T, D]
    with positions [B, Hkv, T] (-1 empty), causal by position; a query that sees no key gets zeros.
    float32 (float64 for float64 keys)."""
    batch, n_heads, n, dim = q.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    dtype = accumulation_dtype(keys.dtype)
    if length == 0:
        return q.new_zeros((batch, n_heads, n, 0), dtype=dtype)
    rows = q.to(dtype).reshape(batch, n_kv, group * n, dim)  # [B, Hkv, G*n, D], row = g * n + t
    scores = torch.matmul(rows, keys.to(dtype).transpose(-1, -2)).mul_(scale)  # [B, Hkv, G*n, T]
    qp = q_pos.repeat(1, group).view(batch, 1, group * n, 1)
    # an empty slot (-1) is moved past every query, so one comparison masks it and the future
    kp = positions.masked_fill(positions < 0, torch.iinfo(positions.dtype).max).unsqueeze(2)
    probs = torch.softmax(scores.masked_fill_(kp > qp, -torch.inf), dim=-1)
    first = kp.amin(dim=-1, keepdim=True)  # [B, Hkv, 1, 1] the earliest held position
    if not bool(((qp >= 0) & (qp >= first)).all()):
        probs.nan_to_num_(0.0)  # rows that see no key
    return probs.view(batch, n_heads, n, length)


def _accumulate(
    cache: KVCache, layer: int, q: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> None:
    """Add this call's attention to each held key's accumulated attention (summed over the query
    heads of its KV head) and record the latest query under which it drew at least the mean
    weight (1 / the number of keys it gave a nonzero weight); computed WEIGHT_CHUNK queries at a
    time, each chunk over the slots up to the last one it can see (a prompt's chunk skips the
    causal future)."""
    keys, positions = cache.keys(layer), cache.head_positions(layer)
    batch, n_kv = keys.shape[:2]
    total = cache.stat(layer, "accumulated").clone()
    last = cache.stat(layer, "last_hit").clone()  # position + 1 (0: never)
    held = positions >= 0
    for start in range(0, q.shape[2], WEIGHT_CHUNK):
        qc, pc = q[:, :, start : start + WEIGHT_CHUNK], q_pos[:, start : start + WEIGHT_CHUNK]
        # a decode step sees what is held: only a prompt's chunk has a causal future to skip
        prompt = pc.shape[1] > MAX_DECODE_QUERIES
        cut = _visible_extent(held & (positions <= pc.max())) if prompt else keys.shape[2]
        if cut == 0:
            continue
        probs = attention_weights(
            qc, pc, keys=keys[:, :, :cut], positions=positions[:, :, :cut], scale=scale
        )
        grouped = probs.view(batch, n_kv, -1, cut)  # [B, Hkv, G*c, cut]
        total[..., :cut] += grouped.sum(dim=2)
        # weights are >= 0, so their signs sum to the number of keys given a nonzero weight
        seen = torch.sign(grouped).sum(dim=-1, keepdim=True).clamp_(min=1)
        hit = grouped * seen >= 1  # implies a nonzero weight
        group = grouped.shape[2] // pc.shape[1]
        qp = pc.repeat(1, group).view(batch, 1, -1, 1).float() + 1
        latest = torch.where(hit, qp, 0.0).amax(dim=2)
        last[..., :cut] = torch.maximum(last[..., :cut], latest)
    cache.set_stat(layer, "accumulated", total)
    cache.set_stat(layer, "last_hit", last)


def _visible_extent(visible: torch.Tensor) -> int:
    """One past the last slot that ``visible`` [B, Hkv, T] marks in any row or head (0: none)."""
    columns = visible.flatten(0, -2).any(dim=0).nonzero()
    return int(columns[-1]) + 1 if columns.numel() else 0
