"""A validated attention call (``Call``) and its construction: every check of ``attention()``'s
arguments happens here, once, before a cache is appended to (what can still refuse a call after
the append, the choice of implementation or a kernel, is undone by ``KVCache.rollback``).

``make_call`` validates a call without a cache; ``make_cache_call`` validates a decode / chunked call
completely, then appends the new keys to the cache and describes the attention over what it holds;
``apply_retention`` evicts what the method's retention rule says no later query can see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.cache import KVCache
from longattn.cache_channels import gather_query_channels
from longattn.kernels.decode import MAX_DECODE_QUERIES
from longattn.method import Method, from_string
from longattn.methods.dense import Dense
from longattn.prefill import calibration_path, dense_reason
from longattn.types import DecodeSelection
from longattn.validation import (
    check_finite,
    check_finite_all,
    check_increasing,
    check_positions,
    check_tensors,
)

log = logging.getLogger("longattn")


@dataclass(frozen=True)
class Call:
    """A validated attention call. Positions are [Bp, T] int64 with Bp in {1, B}; over a cache whose
    KV heads hold different tokens (``KVCache.is_uniform``) ``kv_pos`` is [B, Hkv, T] (see
    ``fold_kv_heads``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    method: Method
    scale: float
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    default_positions: bool
    has_padding: bool = False
    cache: KVCache | None = None  # set when k, v are a cache layer's views (decode)
    layer: int = 0
    selection: DecodeSelection | None = None  # a precomputed selection (tests share it)
    # what is derived from this call once and read again (the block index: by auto's check, then by
    # the kernel); ``replace`` starts a new call with an empty one
    derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(B, H, Hkv, Tq, Tk, D)."""
        b, h, tq, d = self.q.shape
        return b, h, self.k.shape[1], tq, self.k.shape[2], d


def make_cache_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | str | None,
    scale: float | None,
    q_positions: torch.Tensor | None,
    kv_positions: torch.Tensor | None,
    cache: KVCache,
    layer: int,
) -> Call:
    """Validate a cache call completely, then append ``k, v`` and describe the attention over the cache."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if q_positions is None and kv_positions is None and cache.is_dense(layer):
        return _dense_cache_call(q, k, v, method, scale, cache, layer)
    check_tensors(q, k, v)
    step = _step_position(q, k, kv_positions, cache, layer) if q_positions is kv_positions else None
    if step is not None:
        return _step_call(q, k, v, method, scale, kv_positions, step, cache, layer)
    new_pos = cache.check_append(layer, k, v, kv_positions)  # [B, T_new]
    q_len, t_new = q.shape[2], k.shape[2]
    if q_positions is None or (q_positions is kv_positions and q_len == t_new):
        # the queries are the last appended tokens (given as the same tensor: checked once above)
        if q_len > t_new:
            raise ValueError(
                f"q has {q_len} queries but only {t_new} tokens are appended; pass q_positions"
            )
        q_pos = new_pos[:, t_new - q_len :]
    else:
        q_pos = check_positions(q_positions, q_len, q.shape[0], "q_positions", q.device)
    check_finite("q", q)  # k, v: by check_append; the positions: checked above
    method, scale = _method_and_scale(method, scale, q.shape[-1])
    _check_method_fits_cache(method, cache, k)  # the method as asked, also where prefill is dense
    _check_limit(method, q_pos, new_pos)
    cache.append_checked(layer, k, v, new_pos)  # validated above, nothing changed yet
    kv_pos = cache.positions(layer) if cache.is_uniform(layer) else cache.head_positions(layer)
    padded = int(q_pos.min()) < 0 or int(kv_pos.min()) < 0  # both hold at least one position
    default = not padded and _is_default_layout(q_pos, kv_pos)
    method = phase_method(method, q_len, kv_pos.shape[-1])
    q = project_queries(cache, layer, q)  # scale stays 1/sqrt(D) of the full dimension
    return Call(q, cache.keys(layer), cache.values(layer), method, scale, q_pos, kv_pos, default,
                padded, cache=cache, layer=layer)  # fmt: skip


def _step_position(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None, cache: KVCache, layer: int
) -> int | None:
    """The position of a decode step that ``_step_call`` may take, or None (the general path,
    which also says what is wrong with a call it refuses): one query and one new token of one
    row, at a real position after what the layer holds (``positions`` None: the row's next
    position), the layer holding tokens (its KV heads alike or not), on the positions' device.
    q, k are checked tensors (``check_tensors``)."""
    if q.shape[0] != 1 or q.shape[2] != 1 or k.shape[2] != 1:
        return None
    nexts = cache.next_positions(layer)  # None while it holds nothing
    if nexts is None or nexts.shape[0] != 1:  # the general path names a batch mismatch
        return None
    following = int(nexts.view(()))  # the row's last real position + 1
    if positions is None:
        return following
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
        return None
    if positions.shape not in ((1,), (1, 1)) or positions.device != cache.device(layer):
        return None
    step = int(positions.view(()))
    return step if step >= following else None  # after what the row holds; no padding


def _step_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | str | None,
    scale: float | None,
    positions: torch.Tensor | None,
    step: int,
    cache: KVCache,
    layer: int,
) -> Call:
    """``make_cache_call`` for a decode step ``_step_position`` accepted (position ``step``): the
    same checks with what the cache guarantees read from it (its positions are increasing, its
    row's next position is known), q, k and v checked finite by one reduction."""
    cache.check_kv(layer, k, v, finite=False)
    check_finite_all(("k", k), ("v", v), ("q", q))  # in the general path's order
    method, scale = _method_and_scale(method, scale, q.shape[-1])
    _check_method_fits_cache(method, cache, k)
    _check_last(method, "q", step)
    # the row's next position (replaced, never written, by the append) or the caller's
    given = cache.next_positions(layer).to(k.device) if positions is None else positions
    new_pos = given.view(1, 1)
    cache.append_checked(layer, k, v, new_pos)
    if cache.is_uniform(layer):
        kv_pos = cache.positions(layer)  # [1, Tk]
        padded = int(kv_pos.min()) < 0
        # increasing real positions in Tk slots ending at Tk - 1 are exactly 0..Tk-1
        default = not padded and step == kv_pos.shape[-1] - 1
    else:  # [1, Hkv, Tk]: taken as padded (a shorter head ends in empty slots) without a read
        kv_pos, padded, default = cache.head_positions(layer), True, False
    kv_len = kv_pos.shape[-1]
    return Call(project_queries(cache, layer, q), cache.keys(layer), cache.values(layer),
                phase_method(method, 1, kv_len), scale, new_pos, kv_pos, default, padded,
                cache=cache, layer=layer)  # fmt: skip


def _check_last(method: Method, name: str, last: int) -> None:
    """Refuse a ``name`` position ``last`` at or past the method's ``max_positions``."""
    limit = method.max_positions
    if limit is not None and last >= limit:
        raise ValueError(
            f"{name} position {last} is outside method {method.name!r} (positions must be < {limit})"
        )


def _check_limit(method: Method, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> None:
    """Refuse positions at or past the method's ``max_positions`` (padding, -1, is always inside)."""
    if method.max_positions is None:
        return
    for name, pos in (("q", q_pos), ("kv", kv_pos)):
        if pos.numel():
            _check_last(method, name, int(pos.max()))


def _dense_cache_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | str | None,
    scale: float | None,
    cache: KVCache,
    layer: int,
) -> Call:
    """``make_cache_call`` for a layer holding positions ``0..n-1`` in every row, appended to with
    default positions: the same checks, without per-call position tensors to validate (the new tokens
    take positions ``n..``, the queries are the last of them, nothing is padded)."""
    check_tensors(q, k, v)
    q_len, t_new = q.shape[2], k.shape[2]
    if q_len == t_new == 1:  # a decode step: q, k and v checked finite by one reduction
        cache.check_kv(layer, k, v, finite=False)
        check_finite_all(("q", q), ("k", k), ("v", v))
    else:
        check_finite("q", q)
        cache.check_kv(layer, k, v)
    if q_len > t_new:
        raise ValueError(
            f"q has {q_len} queries but only {t_new} tokens are appended; pass q_positions"
        )
    method, scale = _method_and_scale(method, scale, q.shape[-1])
    _check_method_fits_cache(method, cache, k)
    end = cache.seq_len(layer) + t_new
    method = phase_method(method, q_len, end)
    _check_last(method, "q", end - 1)
    cache.append_checked(layer, k, v, None)
    kv_pos = cache.positions(layer)[:1]  # [1, Tk]: every row holds the same positions
    return Call(
        project_queries(cache, layer, q),  # scale stays 1/sqrt(D) of the full dimension
        cache.keys(layer),
        cache.values(layer),
        method,
        scale,
        kv_pos[:, end - q_len :],
        kv_pos,
        default_positions=True,
        has_padding=False,
        cache=cache,
        layer=layer,
    )


def project_queries(cache: KVCache, layer: int, q: torch.Tensor) -> torch.Tensor:
    """q [B, H, Tq, D] reduced to the key channels ``layer`` stores, [B, H, Tq, Dk'] (ThinK:
    ``KVCache.prune_channels``), or q itself while the layer stores every channel."""
    channels = cache.key_channels(layer)
    return q if channels is None else gather_query_channels(q, channels)


# The implementations that take keys with fewer channels than the values (Dk != Dv, a
# channel-pruned cache layer); the others need one head dim (the fused SDPA and block kernels).
UNEQUAL_DIM_IMPLS = ("decode_cpp", "decode", "tiled", "reference")


def head_dims_reason(impl: str, call: Call) -> str | None:
    """Why ``impl`` cannot run ``call`` for its head dims (None: it can)."""
    dk, dv = call.k.shape[-1], call.v.shape[-1]
    if dk == dv or impl in UNEQUAL_DIM_IMPLS:
        return None
    return (
        f"keys hold {dk} channels and values {dv} (a channel-pruned cache layer); {impl} needs "
        f"one head dim (unequal dims run on {', '.join(UNEQUAL_DIM_IMPLS)})"
    )


def _is_default_layout(q_pos: torch.Tensor, kv_pos: torch.Tensor) -> bool:
    """Whether unpadded positions are exactly ``0..Tk-1`` with the queries as the last ``Tq`` keys, so
    that kernels which ignore positions (SDPA) compute the same attention."""
    q_len, kv_len = q_pos.shape[-1], kv_pos.shape[-1]
    if kv_len == 0 or q_len > kv_len or kv_pos.dim() != 2:
        return False
    # real positions strictly increase, so first == 0 and last == Tk - 1 means exactly 0..Tk-1
    if bool((kv_pos[:, 0] != 0).any()) or bool((kv_pos[:, -1] != kv_len - 1).any()):
        return False
    return torch.equal(q_pos.expand(kv_pos.shape[0], -1), kv_pos[:, kv_len - q_len :])


def _check_method_fits_cache(method: Method, cache: KVCache, k: torch.Tensor) -> None:
    """Refuse, before anything is appended, a method whose pages or calibration do not fit the cache."""
    page = getattr(method, "page_size", None)
    if page is not None and page != cache.page_size:
        raise ValueError(
            f"{method.name} page_size={page} differs from the cache's page size {cache.page_size}"
        )
    block = getattr(method, "block_size", None)
    if method.hook == "select" and block is not None and block % cache.page_size:
        raise ValueError(
            f"{method.name} block_size={block} is not a multiple of the cache's page size "
            f"{cache.page_size}"
        )
    if getattr(method, "calibration", ""):
        from longattn.calibration import load

        # a plan method may name its file by model name (a shipped calibration)
        path = calibration_path(method) if method.hook == "plan" else method.calibration
        load(path).check(method.name, cache.n_layers, k.shape[1], k.shape[3])


def apply_retention(call: Call) -> None:
    """Evict what the method's retention rule says no later query can see, once a (row, KV head)
    holds a page of such dead keys: compacting a layer costs a copy of what it holds, so a one-token
    step does it once per page of steps, and the method's mask hides the dead keys until then (a
    bounded layer holds less than a page more)."""
    assert call.cache is not None
    if type(call.method).retain is Method.retain:  # keeps everything
        return
    q_pos = call.q_pos
    newest = q_pos if q_pos.shape[1] == 1 else q_pos.amax(dim=1, keepdim=True)  # [Bp, 1]
    if call.kv_pos.dim() == 3:  # each KV head its own positions: [B, Hkv, Tk]
        newest = newest.unsqueeze(1)
    keep = call.method.retain(call.kv_pos, newest)
    if keep is None:
        return
    kv_pos = call.kv_pos.expand(call.q.shape[0], *call.kv_pos.shape[1:])  # [B, (Hkv,) Tk]
    if not kv_pos.numel():
        return
    if not call.has_padding and keep.shape == kv_pos.shape:  # every slot real
        dead = kv_pos.shape[-1] - int(keep.sum(dim=-1).min())  # Tk minus the fewest kept
    else:
        dead = int(((kv_pos >= 0) > keep).sum(dim=-1).max())  # real and not kept
    if dead >= call.cache.page_size:
        call.cache.evict(call.layer, keep.expand_as(kv_pos) & (kv_pos >= 0))


def make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | str | None = None,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> Call:
    """Validate an attention call (every check happens here, once) and normalise its positions."""
    check_tensors(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    method, scale = _method_and_scale(method, scale, q.shape[-1])
    batch, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    default = q_positions is None and kv_positions is None
    if default and q_len > kv_len:
        raise ValueError(
            f"q has more positions than k ({q_len} > {kv_len}); pass q_positions and kv_positions"
        )
    device = q.device
    if kv_positions is None:
        kv_pos = torch.arange(kv_len, device=device).view(1, -1)
    else:
        kv_pos = check_positions(kv_positions, kv_len, batch, "kv_positions", device)
        check_increasing(kv_pos)
    if q_positions is None:
        q_pos = kv_pos[:, kv_len - q_len :] if kv_len >= q_len else None
        if q_pos is None:
            raise ValueError(f"q_positions are needed when Tq={q_len} > Tk={kv_len}")
    else:
        q_pos = check_positions(q_positions, q_len, batch, "q_positions", device)
    _check_limit(method, q_pos, kv_pos)
    padded = bool((q_pos < 0).any()) or bool((kv_pos < 0).any())
    method = phase_method(method, q_len, kv_len)
    return Call(q, k, v, method, scale, q_pos, kv_pos, default, padded)


def phase_method(method: Method, q_len: int, kv_len: int) -> Method:
    """The rule a call runs: a select method acts at decode time only; with more than
    ``MAX_DECODE_QUERIES`` queries (prefill) it is dense causal attention by definition, and the call
    is a dense call that every dense implementation may run. A score (eviction) method acts on the
    cache, not on the attention: its attention is dense causal over what the cache holds. A plan
    method acts in prefill: with few queries, or where ``longattn.prefill.dense_reason`` says so
    (short calls), it is dense causal attention (logged at debug level)."""
    if method.hook == "score" or (method.hook == "select" and q_len > MAX_DECODE_QUERIES):
        return Dense()
    if method.hook == "plan":
        reason = "decode" if q_len <= MAX_DECODE_QUERIES else dense_reason(method, q_len, kv_len)
        if reason is not None:
            log.debug("%s runs dense causal attention: %s", method.name, reason)
            return Dense()
    return method


def _method_and_scale(
    method: Method | str | None, scale: float | None, dim: int
) -> tuple[Method, float]:
    """The call's method (default ``Dense()``, strings parsed) and softmax scale (default 1/sqrt(D))."""
    if method is None:
        method = Dense()
    elif isinstance(method, str):
        method = from_string(method)
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a Method or a method string, got {type(method).__name__}")
    method.hook  # noqa: B018 -- raises TypeError for a class overriding zero or several hooks
    if scale is None:
        return method, 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    return method, float(scale)


@dataclass(frozen=True)
class _FoldedHeads(Method):
    """``inner``'s mask on a folded call (``fold_kv_heads``): batch row ``b`` of the fold is KV head
    ``b % n_kv_heads`` of row ``b // n_kv_heads``, and its head ``h`` is query head
    ``(b % n_kv_heads) * group + h`` of the original call."""

    inner: Method = field(default_factory=Dense)
    n_kv_heads: int = 1
    group: int = 1

    @property
    def is_causal(self) -> bool:
        return self.inner.is_causal

    def mask(self, b, h, q_pos, kv_pos):
        return self.inner.mask(
            b // self.n_kv_heads, (b % self.n_kv_heads) * self.group + h, q_pos, kv_pos
        )


def fold_kv_heads(call: Call) -> Call:
    """A call over a cache whose KV heads hold different tokens (``kv_pos`` [B, Hkv, T]) as the same
    attention with each (row, KV head) a batch row of its own: q [B*Hkv, G, Tq, D] (the KV head's
    query heads), k, v [B*Hkv, 1, T, D] (views of the cache), kv_pos [B*Hkv, T]. Every kernel that
    reads per-row positions runs it; its output [B*Hkv, G, Tq, ...] is the original's [B, H, Tq, ...]
    (``AttnOutput`` reshaped by the caller)."""
    batch, n_heads, n_kv, q_len, kv_len, dim = call.shape
    group = n_heads // n_kv
    method = call.method
    if not isinstance(method, Dense):  # Dense's mask reads neither row nor head
        method = _FoldedHeads(method, n_kv, group)
    return Call(
        call.q.reshape(batch * n_kv, group, q_len, dim),
        call.k.reshape(batch * n_kv, 1, kv_len, dim),
        call.v.reshape(batch * n_kv, 1, kv_len, call.v.shape[-1]),
        method,
        call.scale,
        call.q_pos.expand(batch, -1).repeat_interleave(n_kv, dim=0),
        call.kv_pos.reshape(batch * n_kv, kv_len),
        default_positions=False,
        has_padding=call.has_padding,
    )
