"""The one entry point: ``attention(q, k, v, method=..., impl=...)``, its validation and dispatch.

Dispatch is explicit: ``IMPLS`` is an ordered list of implementations, each with a ``can_run`` that
returns ``None`` or the reason it cannot run this call. ``impl="auto"`` takes the first that can run and
logs the choice at debug level; a named ``impl`` that cannot run raises ``ValueError`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from longattn import compress, linear, prefill, step
from longattn.cache import KVCache
from longattn.cache_summary import with_summary
from longattn.call import (
    Call,
    apply_retention,
    fold_kv_heads,
    head_dims_reason,
    make_cache_call,
    make_call,
)
from longattn.kernels import block_sparse, reference
from longattn.kernels.decode import (
    MAX_DECODE_QUERIES,
    Workspace,
    decode_attention,
    decode_cpp_unavailable,
    decode_dense_cpp,
    decode_selected_cpp,
    gather_selected,
)
from longattn.kernels.flex import flex_available, flex_block_attention
from longattn.kernels.sdpa import sdpa_attention
from longattn.kernels.sparse import block_index_from_mask, sparse_attention
from longattn.kernels.tiled import mask_indices, tiled_attention, with_padding
from longattn.method import Evict, Method, from_string
from longattn.methods.dense import Dense
from longattn.selection import compute_selection, selection_cache
from longattn.types import AttnOutput, BlockIndex, accumulation_dtype
from longattn.validation import backward_reason, needs_grad

log = logging.getLogger("longattn")


@dataclass(frozen=True)
class Impl:
    """An implementation: ``can_run`` says why it cannot run a call (None: it can); ``auto`` says why
    ``impl="auto"`` should pass it over even though it can run (None: auto may choose it);
    ``backward``: whether autograd differentiates its output (else it cannot run a call whose
    inputs require grad: its output would carry no gradient)."""

    name: str
    can_run: Callable[[Call], str | None]
    run: Callable[[Call], AttnOutput]
    auto: Callable[[Call], str | None] = lambda call: None
    backward: bool = False


def _mask_hook(call: Call) -> str | None:
    if call.method.hook != "mask":
        return f"method {call.method.name!r} states its rule with {call.method.hook!r}, not 'mask'"
    return None


def _block_rule(call: Call) -> str | None:
    """Whether the call's rule is one the block-sparse kernels run: a mask, or a plan's index."""
    if call.method.hook not in ("mask", "plan"):
        return (
            f"method {call.method.name!r} states its rule with {call.method.hook!r}, not 'mask' "
            "or 'plan'"
        )
    return None


def _element_mask(call: Call):
    """The element rule of the index's partial blocks: the mask, or causal for a plan."""
    return Dense().mask if call.method.hook == "plan" else call.method.mask


def _reference_can_run(call: Call) -> str | None:
    if call.method.hook not in ("mask", "select", "plan"):
        return f"method {call.method.name!r} states its rule with {call.method.hook!r}"
    b, h, _, tq, tk, _ = call.shape
    need, cap = reference.score_bytes(b, h, tq, tk, call.q.dtype), reference.max_score_bytes()
    if need > cap:
        return (
            f"the reference would materialise {need / 2**30:.2f} GiB of scores, over the "
            f"{cap / 2**30:.2f} GiB cap (${reference.MAX_BYTES_ENV}); use impl='tiled' (or 'auto')"
        )
    return None


def visible_mask(call: Call) -> torch.Tensor:
    """The method's mask materialised on this call's positions, broadcastable to [B, H, Tq, Tk]."""
    if call.method.hook == "select":
        return _selection_mask(call)
    if call.method.hook == "plan":  # the planned blocks, causal within them
        return prefill.plan_visible(call, block_index(call)) & _causal_mask(call)
    b_idx, h_idx = mask_indices(call.shape[0], call.shape[1], call.q.device)  # [B|H, 1, 1, 1]
    mask_fn = with_padding(call.method.mask) if call.has_padding else call.method.mask
    return mask_fn(b_idx, h_idx, call.q_pos[:, None, :, None], _kv_pos_by_head(call))


_REAL_CAUSAL = with_padding(Dense().mask)  # causal over real slots (built once, not per call)


def _causal_mask(call: Call) -> torch.Tensor:
    """Causal visibility on the call's positions (never padding), broadcastable to [B, H, Tq, Tk]."""
    kv_pos = _kv_pos_by_head(call)
    return _REAL_CAUSAL(None, None, call.q_pos[:, None, :, None], kv_pos)


def _kv_pos_by_head(call: Call) -> torch.Tensor:
    """The call's key positions broadcastable to [B, H, Tq, Tk]: [Bp, 1, 1, Tk], or [B, H, 1, Tk]
    where each KV head holds its own tokens (repeated over its query heads)."""
    if call.kv_pos.dim() == 2:
        return call.kv_pos[:, None, None, :]
    group = call.q.shape[1] // call.kv_pos.shape[1]
    return call.kv_pos.repeat_interleave(group, dim=1)[:, :, None, :]


def _selection_mask(call: Call) -> torch.Tensor:
    """Dense form of a select method: causal attention restricted to the selected slots."""
    b, h, n_kv, _, tk, _ = call.shape
    causal = _REAL_CAUSAL(None, None, call.q_pos[:, None, :, None], call.kv_pos[:, None, None, :])
    selection = call.selection if call.selection is not None else compute_selection(call)
    if selection is None:
        return causal
    chosen = selection.to_mask(tk)  # [B, Hkv or H, Tk]
    chosen = chosen.repeat_interleave(h // chosen.shape[1], dim=1)  # [B, H, Tk]
    return causal & chosen.unsqueeze(2)


def _run_reference(call: Call) -> AttnOutput:
    return reference.reference_attention(call.q, call.k, call.v, visible_mask(call), call.scale)


def _sdpa_can_run(call: Call) -> str | None:
    if not isinstance(call.method, Dense):
        return f"SDPA runs only dense attention, not {call.method.name!r}"
    if not call.default_positions:
        return "SDPA needs the default positions (queries are the last Tq keys, no padding)"
    return None


def _run_sdpa(call: Call) -> AttnOutput:
    assert isinstance(call.method, Dense)
    return sdpa_attention(call.q, call.k, call.v, causal=call.method.causal, scale=call.scale)


def _run_tiled(call: Call) -> AttnOutput:
    return tiled_attention(call.q, call.k, call.v, scale=call.scale, q_pos=call.q_pos,
                           kv_pos=call.kv_pos, mask_fn=call.method.mask,
                           bounds_fn=call.method.block_bounds)  # fmt: skip


def _decode_can_run(call: Call) -> str | None:
    if call.method.hook not in ("mask", "select"):
        return f"the decode kernel runs mask and select methods, not {call.method.hook!r} ones"
    if call.q.shape[2] > MAX_DECODE_QUERIES:
        return (
            f"the decode kernel takes at most {MAX_DECODE_QUERIES} queries, got {call.q.shape[2]}"
        )
    return None


def _decode_cpp_can_run(call: Call) -> str | None:
    plain = call.method.hook == "select" or isinstance(call.method, Dense)
    if not plain and not (call.method.hook == "mask" and _causal_positions(call) is not None):
        return (
            f"the C++ decode kernel runs dense and select methods, and a mask method over a cache "
            f"for one query (or whose every held key up to the queries is visible); not "
            f"{call.method.name!r} here"
        )
    return _decode_can_run(call) or decode_cpp_unavailable(call.q, call.k.dtype, call.v.shape[-1])


def _causal_positions(call: Call) -> torch.Tensor | None:
    """Key positions under which causal attention over the cache is a causal mask method's
    attention on a few-query call, or None: the call's own where the mask shows each query
    exactly the held keys up to it (StreamingLLM's sinks and window after its eviction); for one
    query whose mask is the same for the query heads of each KV head, [B, Hkv, Tk] with every key
    it hides marked empty (-1; e.g. the keys a retention rule drops but has not evicted yet)."""
    if call.cache is None or not call.method.is_causal or call.q.shape[2] > MAX_DECODE_QUERIES:
        return None
    if "causal_positions" not in call.derived:
        visible = visible_mask(call)  # broadcastable to [B, H, Tq, Tk]
        b, h, n_kv, q_len, tk, _ = call.shape
        found, shown = None, None
        if q_len == 1 and visible.shape[1] == 1:  # a decode step of a mask that reads no head
            shown = visible[:, :, 0]  # [Bp, 1, Tk], no comparison against causal needed
        elif bool((visible == _causal_mask(call)).all()):
            found = call.kv_pos
        elif q_len == 1:
            grouped = visible.expand(b, h, 1, tk).reshape(b, n_kv, h // n_kv, tk)
            if bool((grouped == grouped[:, :, :1]).all()):
                shown = grouped[:, :, 0]  # [B, Hkv, Tk]
        if shown is not None:  # the keys the mask hides marked empty, for each KV head
            held = call.kv_pos if call.kv_pos.dim() == 3 else call.kv_pos[:, None]
            found = torch.where(shown, held, -1).expand(b, n_kv, tk)  # [B, Hkv, Tk]
        call.derived["causal_positions"] = found
    return call.derived["causal_positions"]


def _run_decode_cpp(call: Call) -> AttnOutput:
    if call.method.hook == "select":
        return _run_select(call, cpp=True)
    kv_pos = call.kv_pos if isinstance(call.method, Dense) else _causal_positions(call)
    causal = getattr(call.method, "causal", True)  # Dense, or a mask that is causal here
    return decode_dense_cpp(call.q, call.k, call.v, scale=call.scale, q_pos=call.q_pos,
                         kv_pos=kv_pos, causal=causal)  # fmt: skip


def _run_decode(call: Call) -> AttnOutput:
    if call.method.hook == "select":
        return _run_select(call)
    ws = _workspace(call.cache)
    if isinstance(call.method, Dense):
        # one query at the default positions is the newest key: it sees every key, no mask needed
        unmasked = call.default_positions and call.q.shape[2] == 1
        return decode_attention(
            call.q,
            call.k,
            call.v,
            scale=call.scale,
            q_pos=None if unmasked else call.q_pos,
            kv_pos=None if unmasked else call.kv_pos,
            causal=call.method.causal,
            workspace=ws,
        )
    # any other mask: materialised for the few queries only ([B, H, Tq, T]), folded like the queries
    b, h, n_kv, tq, tk, _ = call.shape
    hidden = ~visible_mask(call).expand(b, h, tq, tk).reshape(b, n_kv, (h // n_kv) * tq, tk)
    return decode_attention(call.q, call.k, call.v, scale=call.scale, q_pos=None, kv_pos=None,
                            hidden=hidden, workspace=ws)  # fmt: skip


def _workspace(cache: KVCache | None) -> Workspace:
    if cache is None:
        return Workspace()
    if cache.workspace is None:
        cache.workspace = Workspace()
    return cache.workspace


def _run_select(call: Call, cpp: bool = False) -> AttnOutput:
    """A select method: its selection attended by the C++ kernel in place (``cpp``), or
    gathered into workspaces and attended by the PyTorch decode kernel. (With more than
    ``MAX_DECODE_QUERIES`` queries the call is dense: ``longattn.call.phase_method``.)
    """
    cache, layer = selection_cache(call)
    selection = call.selection if call.selection is not None else compute_selection(call, cache)
    if cpp and selection is None:
        return _run_decode_cpp(replace(call, method=Dense()))
    if cpp:
        keys, values, positions = cache.storage(layer)
        out = decode_selected_cpp(call.q, keys, values, positions, selection.index,
                                     selection.unit, scale=call.scale, q_pos=call.q_pos)  # fmt: skip
        return AttnOutput(out.out, out.lse, selection)
    ws = _workspace(call.cache)
    if selection is None:
        out = decode_attention(call.q, call.k, call.v, scale=call.scale, q_pos=call.q_pos,
                               kv_pos=call.kv_pos, workspace=ws)  # fmt: skip
        return AttnOutput(out.out, out.lse, None)
    keys, values, positions = cache.storage(layer)
    k_sel, v_sel, pos_sel = gather_selected(
        keys, values, positions, selection.index, selection.unit, ws
    )
    out = decode_attention(
        call.q, k_sel, v_sel, scale=call.scale, q_pos=call.q_pos, kv_pos=pos_sel, workspace=ws
    )
    return AttnOutput(out.out, out.lse, selection)


# Block size of the sparse and flex kernels' index, unless the method has a block structure of its own.
SPARSE_BLOCK = 128


def block_size_for(method: Method) -> int:
    """The index block: the method's own ``block_size`` when it is one SDPA handles well, else 128."""
    own = getattr(method, "block_size", None)
    return own if isinstance(own, int) and 32 <= own <= 512 else SPARSE_BLOCK


def block_index(call: Call) -> BlockIndex:
    """The ``BlockIndex`` of a mask method on this call's positions (analytic, from block_bounds);
    built once per call."""
    index = call.derived.get("block_index")
    if index is None and call.method.hook == "plan":
        index = prefill.plan_index(call)
        call.derived["block_index"] = index
    if index is None:
        index = block_index_from_mask(
            call.method.mask,
            call.method.block_bounds,
            call.q.shape[1],
            call.q_pos,
            call.kv_pos,
            block_size_for(call.method),
        )
        call.derived["block_index"] = index
    return index


def _block_can_run(call: Call) -> str | None:
    reason = _block_rule(call)
    if reason:
        return reason
    if call.method.hook == "mask" and type(call.method).block_bounds is Method.block_bounds:
        _, _, _, tq, tk, _ = call.shape
        if tq * tk > 1 << 24:
            return (
                f"method {call.method.name!r} has no block_bounds, and its block index would need "
                f"the mask on all {tq}x{tk} pairs"
            )
    return None


def _sparse_auto(call: Call) -> str | None:
    # Partial blocks cost the sparse kernel a materialised, masked pass each; when most visited
    # blocks are partial (strided columns, 2-D neighbourhoods) the tiled executor is faster
    # (`longattn bench`: strided at 8K, 4.5 s sparse vs 1.2 s tiled). Only a call the tiled
    # executor takes (its rule, `_mask_hook`) goes there: a plan method's index (most of it
    # diagonal blocks at a low density) stays here, where the alternative is the float64 reference.
    if _mask_hook(call) is not None or _empty(call) is not None:
        return None
    index = block_index(call)
    visited = index.visited
    partial = int(index.partial.sum())
    if visited and partial > visited // 2:
        return f"{partial} of {visited} visited blocks need an element mask; tiled is faster"
    return None


def _empty(call: Call) -> AttnOutput | None:
    """The result of a call with no queries or no keys (nothing to index), else None."""
    b, h, _, tq, tk, _ = call.shape
    if tq and tk:
        return None
    lse_dtype = accumulation_dtype(call.q.dtype)
    lse = torch.full((b, h, tq), -torch.inf, dtype=lse_dtype, device=call.q.device)
    return AttnOutput(torch.zeros_like(call.q), lse, None)


def _block_kwargs(call: Call) -> dict:
    """What the block-sparse kernels share: scale, positions, the element mask, and no second
    check of the index (``block_index`` built it for this call)."""
    kv_pos, mask_fn = call.kv_pos, _element_mask(call)
    return dict(scale=call.scale, q_pos=call.q_pos, kv_pos=kv_pos, mask_fn=mask_fn, validate=False)


def _run_sparse(call: Call) -> AttnOutput:
    empty = _empty(call)
    if empty is not None:
        return empty
    out = sparse_attention(call.q, call.k, call.v, block_index(call), **_block_kwargs(call))
    return prefill.with_columns(call, block_index(call), out)


def _sparse_cpp_can_run(call: Call) -> str | None:
    dtype, device, dim, bs = (
        call.q.dtype,
        call.q.device,
        call.q.shape[3],
        block_size_for(call.method),
    )
    return _block_can_run(call) or block_sparse.unavailable(dtype, device, dim, call.scale, bs)


def _checked_causal(call: Call) -> bool:
    """The method's ``is_causal`` declaration, checked on this call's positions before a kernel skips
    later keys because of it: no query may see the next position or the last key's position."""
    method = call.method
    if not method.is_causal:
        return False
    b, h = call.shape[:2]
    b_idx = torch.arange(b, device=call.q.device).view(-1, 1, 1)
    h_idx = torch.arange(h, device=call.q.device).view(1, -1, 1)
    q_pos = call.q_pos[:, None, :]  # [Bp, 1, Tq]
    last = call.kv_pos.amax(dim=1).view(-1, 1, 1)  # probes stay among the call's key positions
    for later in (torch.minimum(q_pos + 1, last), last.expand_as(q_pos)):
        seen = method.mask(b_idx, h_idx, q_pos, later) & (q_pos >= 0) & (later > q_pos)
        if bool(seen.any()):
            where = seen.nonzero()[0].tolist()
            qp = int(q_pos.expand_as(seen)[tuple(where)])
            kp = int(later.expand_as(seen)[tuple(where)])
            raise ValueError(
                f"method {method.describe()!r} declares is_causal, but its mask lets query "
                f"position {qp} see the later position {kp} (head {where[1]})"
            )
    return True


def _run_sparse_cpp(call: Call) -> AttnOutput:
    empty = _empty(call)
    if empty is not None:
        return empty
    args, kw = (call.q, call.k, call.v, block_index(call)), _block_kwargs(call)
    if call.method.hook == "plan":  # causal within the planned blocks
        bounds, causal = Dense().block_bounds, True
    else:
        bounds, causal = call.method.block_bounds, _checked_causal(call)
    out = block_sparse.block_sparse_attention(*args, bounds_fn=bounds, causal=causal, **kw)
    return prefill.with_columns(call, block_index(call), out)


def _flex_can_run(call: Call) -> str | None:
    reason = _block_can_run(call) or flex_available(call.q.device)
    if reason is None and call.method.hook == "plan" and call.q.device.type == "cpu":
        reason = prefill.columns_need_lse(call, block_index(call))  # CPU Flex returns no lse
    return reason


def _flex_auto(call: Call) -> str | None:
    # On CPU compiled Flex costs 3-10 s per new shape or mask and has no backward; the sparse kernel
    # needs no compile step and is as fast (see `longattn bench kernels`), so auto never picks Flex
    # there. On CUDA Flex is the fused kernel and goes first among the block-sparse paths.
    if call.q.device.type == "cpu":
        return "compiles per shape and mask on CPU (seconds each); ask for impl='flex' explicitly"
    return None


def _run_flex(call: Call) -> AttnOutput:
    empty = _empty(call)
    if empty is not None:
        return empty
    out = flex_block_attention(call.q, call.k, call.v, block_index(call), **_block_kwargs(call))
    return prefill.with_columns(call, block_index(call), out)


# The order impl="auto" walks: the C++ decode kernel for few queries (dense or a selection), the
# PyTorch decode path when it cannot be built; dense SDPA for dense attention; compiled Flex (CUDA
# only, see _flex_auto); the C++ block-sparse kernel for any mask with block bounds, then the
# plain PyTorch gather + SDPA one (reached when the extension cannot be built: no compiler, a build
# error); the tiled online softmax for any mask; the materialising reference for small problems.
IMPLS: list[Impl] = [
    Impl("decode_cpp", _decode_cpp_can_run, _run_decode_cpp),
    Impl("decode", _decode_can_run, _run_decode),
    Impl("sdpa", _sdpa_can_run, _run_sdpa, backward=True),
    Impl("flex", _flex_can_run, _run_flex, _flex_auto),
    Impl("sparse_cpp", _sparse_cpp_can_run, _run_sparse_cpp, _sparse_auto),
    Impl("sparse", _block_can_run, _run_sparse, _sparse_auto),
    Impl("tiled", _mask_hook, _run_tiled),
    Impl("reference", _reference_can_run, _run_reference, backward=True),
]


# The implementations that read per-head key positions ([B, Hkv, T], a cache whose KV heads hold
# different tokens) themselves; the others run such a call folded (``longattn.call.fold_kv_heads``).
PER_HEAD_IMPLS = ("decode_cpp", "decode", "reference")


def impl_names() -> list[str]:
    return [i.name for i in IMPLS] + list(linear.IMPLS)


def call_for(call: Call, impl: Impl) -> Call:
    """``call`` as ``impl`` takes it: folded (each (row, KV head) a batch row) when the KV heads hold
    different tokens and ``impl`` reads per-row positions only."""
    if call.kv_pos.dim() != 3 or impl.name in PER_HEAD_IMPLS:
        return call
    if "folded" not in call.derived:
        call.derived["folded"] = fold_kv_heads(call)
    return call.derived["folded"]


def run_call(call: Call, impl: Impl) -> AttnOutput:
    """Run ``call`` on ``impl`` (folded and unfolded where ``call_for`` says so)."""
    inner = call_for(call, impl)
    out = impl.run(inner)
    if inner.method.hook == "plan":  # the index it ran, for the reference and the caller
        out = AttnOutput(out.out, out.lse, prefill.plan_state(inner, block_index(inner)))
    if inner is call:
        return out
    b, h, _, tq, _, _ = call.shape
    return AttnOutput(out.out.reshape(b, h, tq, -1), out.lse.reshape(b, h, tq), out.state)


def _cannot_run(candidate: Impl, call: Call) -> str | None:
    return (
        backward_reason(candidate.backward, call.q, call.k, call.v)
        or head_dims_reason(candidate.name, call)
        or candidate.can_run(call)
    )


def choose_impl(call: Call, impl: str = "auto") -> Impl:
    """The implementation that runs ``call``: the named one, or the first that can run for "auto"."""
    if impl == "auto":
        reasons = []
        for candidate in IMPLS:
            inner = call_for(call, candidate)
            reason = _cannot_run(candidate, inner) or candidate.auto(inner)
            if reason is None:
                log.debug("impl=auto chose %r (skipped: %s)", candidate.name, "; ".join(reasons))
                return candidate
            reasons.append(f"{candidate.name}: {reason}")
        raise ValueError("no implementation can run this call: " + "; ".join(reasons))
    if impl in linear.IMPLS:
        raise ValueError(f"impl={impl!r} runs linear attention methods, not {call.method.name!r}")
    for candidate in IMPLS:
        if candidate.name == impl:
            inner = call_for(call, candidate)
            reason = _cannot_run(candidate, inner)
            if reason is not None:
                raise ValueError(f"impl={impl!r} cannot run this call: {reason}")
            return candidate
    raise ValueError(f"unknown impl {impl!r}; known: 'auto', " + ", ".join(map(repr, impl_names())))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: Method | str | None = None,
    cache: KVCache | None = None,
    layer: int = 0,
    impl: str = "auto",
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> AttnOutput:
    """Attention of ``q`` over ``k, v`` under ``method`` (default ``Dense()``, causal).

    With a ``cache`` (decode, chunked prefill): ``k, v`` are the *new* tokens, appended to ``layer``
    first (``kv_positions`` [T_new] or [B, T_new] their positions, by default each row continues);
    then ``q`` attends over what the layer holds, at ``q_positions`` (default: the last Tq appended
    positions). A method with a retention rule (``retain``) then evicts what no later query can see.
    A call that raises leaves the cache bit for bit as it was (``KVCache.checkpoint`` / ``rollback``).
    A linear method (``feature_map``, ``forward``) keeps a recurrent state instead (``longattn.linear``).

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D] with ``H % Hkv == 0`` (GQA; K/V are not expanded on fast paths).
    Without positions the queries are the last Tq of the Tk key positions (``Tq <= Tk``). With
    ``q_positions`` [Tq] or [B, Tq] and ``kv_positions`` [Tk] or [B, Tk] (original token positions, keys
    strictly increasing) any alignment is possible, e.g. chunked prefill. Position -1 marks a padding
    slot (left-padded batches, unused cache slots): it is never attended.
    Returns ``AttnOutput(out [B, H, Tq, D], lse [B, H, Tq] float32 (float64 inputs: float64; linear
    methods: None), state)``; a query that sees no key gets ``out = 0``, ``lse = -inf``. scale: 1/sqrt(D).
    Inputs that require grad (grad mode on) run only on an implementation with a backward (SDPA,
    the materialising reference; a plan or selection is computed without autograd), else raise
    ``ValueError``; never an output cut from the graph. A cache refuses them for a softmax method
    (its keys are inference state); a linear method's state in a cache keeps its graph.
    """
    method = from_string(method) if isinstance(method, str) else method
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if linear.is_linear(method):  # a recurrent state, not keys: ``longattn.linear``
        return linear.attention(q, k, v, method, cache=cache, layer=layer, impl=impl, scale=scale,
                                q_positions=q_positions, kv_positions=kv_positions)  # fmt: skip
    if cache is None:  # ``layer`` still names a calibrated plan method's layer
        call = make_call(q, k, v, method, scale, q_positions, kv_positions)
        call = replace(call, layer=layer) if layer else call
        return run_call(call, choose_impl(call, impl))
    if needs_grad(q, k, v):
        raise ValueError(
            "a KVCache holds inference state: q, k and v must not require grad with a cache "
            "(call under torch.no_grad(), or without a cache to differentiate)"
        )
    done = step.decode_step(q, k, v, method, scale, q_positions, kv_positions, cache, layer, impl)
    if done is not None:  # a decode step that only attends, in one C++ call (``longattn.step``)
        return done
    evict = method if isinstance(method, Evict) else None
    t_new = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else 0
    q_len = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    whole = evict is not None and (
        compress.due_before(evict, cache, layer, q_len) or compress.due_after(evict, q_len)
    )
    refresh = isinstance(method, Method) and type(method).select is not Method.select  # reads pages
    point = cache.checkpoint(layer, t_new, refresh=refresh, whole=whole)
    try:
        if evict is not None:
            compress.before(evict, cache, layer, q_len, t_new)
        call = make_cache_call(q, k, v, method, scale, q_positions, kv_positions, cache, layer)
        result = run_call(call, choose_impl(call, impl))
        summary = cache.summary(layer)  # the tokens an eviction folded (Evict.compensate)
        if summary is not None:
            result = with_summary(result, call.q, summary, call.scale)
        apply_retention(call)
        if evict is not None:
            compress.after(evict, call)
    except BaseException:
        cache.rollback(point)
        raise
    return result
