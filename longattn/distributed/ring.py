"""Ring attention over ``torch.distributed``: each rank holds a shard of the queries, keys and
values; key/value shards travel around the ring while each rank attends to the one it holds.

Liu et al. 2023, Ring Attention with Blockwise Transformers, arXiv:2310.01889; the striped layout is
Brandon et al. 2023, arXiv:2311.09431; zig-zag is the layout of Megatron's context parallelism.

At step s rank r holds the key/value shard of rank ``(r - s) % world``. The transfer of the next
shard is started before the current block is computed (overlap) and waited on after it. Each block
runs the library's exact tiled kernel with the method's mask on *global* positions, so any static
``mask`` method works; partial outputs merge by log-sum-exp (``kernels.merge``). Every rank derives
the same plan from the layout: a block that the mask wholly excludes is not computed, and a shard
stops travelling once no later rank on its way needs it (causal future blocks, windows out of
reach), so a ring can end before ``world`` steps. GQA: keys and values travel with their own
``Hkv`` heads; they are never expanded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from longattn.distributed import comm
from longattn.distributed.layout import LAYOUTS, shard_length, shard_positions
from longattn.kernels.merge import merge_partials
from longattn.kernels.tiled import tile_layout, tiled_attention
from longattn.method import Method
from longattn.methods.dense import Dense
from longattn.types import AttnOutput, accumulation_dtype
from longattn.validation import check_tensors

PLAN_TILE = 128  # tile of the conservative block test (method.block_bounds)
COUNT_ROWS = 256  # query rows per chunk when counting visible pairs


@dataclasses.dataclass
class RingRecord:
    """What one ``ring_attention`` call did on this rank (pass one to have it filled).

    ``compute_s``: time in the block kernel; ``wait_s``: time blocked on transfers after computing
    (the communication that overlap did not hide); ``total_s``: the whole call; ``blocks``: blocks
    computed; ``steps``: ring steps taken; ``bytes_sent``; ``pairs`` (only with ``count_pairs``):
    visible (query head, query, key) pairs in the computed blocks, the FLOP count's unit."""

    count_pairs: bool = False
    compute_s: float = 0.0
    wait_s: float = 0.0
    total_s: float = 0.0
    blocks: int = 0
    steps: int = 0
    bytes_sent: int = 0
    pairs: int = 0


def _meta(q, k, v, method, scale, layout) -> dict:
    check_tensors(q, k, v)
    if not isinstance(method, Method):
        raise TypeError(f"method must be a longattn Method, got {type(method).__name__}")
    if method.hook != "mask":
        raise ValueError(
            f"ring attention runs static mask methods; {method.name!r} states its rule with "
            f"{method.hook!r}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if scale is not None and (isinstance(scale, bool) or not math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"each rank's queries and keys are the same tokens: q has {q.shape[2]}, k {k.shape[2]}"
        )
    return {
        "length": q.shape[2],
        "dtype": str(q.dtype),
        "batch": q.shape[0],
        "query heads": q.shape[1],
        "kv heads": k.shape[1],
        "head_dim": q.shape[3],
        "method": method.describe(),
        "layout": layout,
        "scale": scale,
    }


def check_lengths(lengths: list[int], layout: str) -> int:
    """The global length; ValueError naming the rank whose shard does not fit the layout (against
    the global length that the most ranks fit)."""
    total, world = sum(lengths), len(lengths)

    def misfits(length: int) -> list[tuple[int, int]]:
        want = [shard_length(length, r, world, layout) for r in range(world)]
        return [(r, w) for r, w in enumerate(want) if lengths[r] != w]

    if total >= world and not misfits(total):
        return total
    candidates = range(max(world, total - 2 * world), total + 2 * world + 1)
    # ties (one rank one token long or one short) name the short one
    length = min(candidates, key=lambda t: (len(misfits(t)), abs(t - total), -t))
    rank, want = misfits(length)[0]
    raise ValueError(
        f"rank {rank} holds {lengths[rank]} tokens; the {layout} layout of {length} tokens (the "
        f"closest fit of the lengths by rank {lengths}) over {world} ranks gives it {want}"
    )


def _block_visible(method: Method, n_heads: int, q_pos, kv_pos) -> torch.Tensor:
    """The element mask [H or 1, tq, tk] of one block on global positions."""
    heads = torch.arange(n_heads).view(-1, 1, 1)
    seen = method.mask(torch.zeros((), dtype=torch.long), heads, q_pos[:, None], kv_pos[None, :])
    return torch.as_tensor(seen, dtype=torch.bool)


def block_needed(method: Method, n_heads: int, q_pos, kv_pos) -> bool:
    """Whether any query of ``q_pos`` may see any key of ``kv_pos`` (conservative with
    ``block_bounds``, exact by the element mask otherwise)."""
    bounds = getattr(method, "block_bounds", None)
    if bounds is not None:
        layout = tile_layout(bounds, n_heads, q_pos[None], kv_pos[None], PLAN_TILE, PLAN_TILE)
        if layout is not None:
            return bool(layout[0].any())
    return any(
        bool(_block_visible(method, n_heads, q_pos[i : i + COUNT_ROWS], kv_pos).any())
        for i in range(0, q_pos.numel(), COUNT_ROWS)
    )


def visible_pairs(method: Method, n_heads: int, q_pos, kv_pos) -> int:
    """Visible (query head, query, key) pairs of a block: the work a block costs."""
    total = 0
    for i in range(0, q_pos.numel(), COUNT_ROWS):
        seen = _block_visible(method, n_heads, q_pos[i : i + COUNT_ROWS], kv_pos)
        total += int(seen.expand(n_heads, -1, kv_pos.numel()).sum())
    return total


def ring_plan(method: Method, n_heads: int, positions: list[torch.Tensor]):
    """``needed[r][j]``: rank r computes on rank j's shard; ``hops[j]``: how many steps rank j's
    shard travels (the last step at which a rank on its way needs it; 0: it stays home)."""
    world = len(positions)
    needed = [
        [block_needed(method, n_heads, positions[r], positions[j]) for j in range(world)]
        for r in range(world)
    ]
    hops = [max([t for t in range(world) if needed[(j + t) % world][j]], default=0) for j in
            range(world)]  # fmt: skip
    return needed, hops


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any = None,
    method: Method | None = None,
    scale: float | None = None,
    layout: str = "contiguous",
    timeout: float = comm.DEFAULT_TIMEOUT_S,
    record: RingRecord | None = None,
) -> AttnOutput:
    """Exact attention of this rank's query shard over every rank's keys (see the module doc).

    q [B, H, T_r, D]; k, v [B, Hkv, T_r, D]: this rank's tokens, whose global positions follow from
    ``layout`` (``longattn.distributed.layout``) and every rank's ``T_r``. ``method``: any static
    ``mask`` method (default ``Dense()``, causal). Returns ``AttnOutput(out [B, H, T_r, D] in q's
    dtype, lse [B, H, T_r] (float32; float64 for float64), None)``. Every wait is bounded by
    ``timeout`` seconds; an error on any rank raises on every rank, naming it."""
    start = time.perf_counter()
    method = Dense() if method is None else method
    wait = comm.check_timeout(timeout)
    rank, world = comm.rank_world(group)
    metas = comm.agree(group, world, lambda: _meta(q, k, v, method, scale, layout))
    comm.check_same(metas, ("dtype", "batch", "query heads", "kv heads", "head_dim", "method",
                            "layout", "scale"))  # fmt: skip
    total = check_lengths([m["length"] for m in metas], layout)
    positions = [shard_positions(total, j, world, layout) for j in range(world)]
    needed, hops = ring_plan(method, q.shape[1], positions)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rec = RingRecord() if record is None else record
    outs, lses, error = _ring_loop(
        q, torch.stack([k, v]), method, scale, group, (rank, world), positions, needed, hops,
        wait, rec,
    )  # fmt: skip
    comm.settle(group, world, error)
    out, lse = _merge(q, outs, lses)
    rec.total_s = time.perf_counter() - start
    return AttnOutput(out, lse, None)


def ring_transfers(
    kv: torch.Tensor,
    positions: list[torch.Tensor],
    hops: list[int],
    *,
    group: Any = None,
    timeout: float = comm.DEFAULT_TIMEOUT_S,
) -> RingRecord:
    """The transfers of a ring call alone (no block computed): the communication that overlap
    has to hide. kv [2, B, Hkv, T_r, D]; ``positions`` and ``hops`` as ``ring_plan`` gives them."""
    rank, world = comm.rank_world(group)
    rec = RingRecord()
    start = time.perf_counter()
    never = [[False] * world for _ in range(world)]
    q = kv.new_empty((kv.shape[1], kv.shape[2], 0, kv.shape[4]))
    _ring_loop(q, kv, Dense(), 1.0, group, (rank, world), positions, never, hops,
               comm.check_timeout(timeout), rec)  # fmt: skip
    rec.total_s = time.perf_counter() - start
    return rec


def _ring_loop(q, kv, method, scale, group, where, positions, needed, hops, wait, rec):
    """The ring: start the next transfer, compute on the held shard, wait. An error while
    computing is held (returned) while the rank keeps passing shards, so no peer waits in vain."""
    rank, world = where
    q_acc = q.to(accumulation_dtype(q.dtype))
    bounds = getattr(method, "block_bounds", None)
    outs, lses, error = [], [], None
    held = kv.contiguous()  # [2, B, Hkv, T_j, D]: the shard held at this step
    for step in range(world):
        src = (rank - step) % world
        incoming = (rank - step - 1) % world
        send = held if step + 1 < world and hops[src] > step else None
        recv = None
        if step + 1 < world and hops[incoming] > step:
            recv = held.new_empty((2, *held.shape[1:3], positions[incoming].numel(), held.shape[4]))
        works = comm.start_exchange(group, send, (rank + 1) % world, recv, (rank - 1) % world)
        rec.bytes_sent += 0 if send is None else send.numel() * send.element_size()
        if needed[rank][src] and error is None:
            tick = time.perf_counter()
            try:
                part = tiled_attention(
                    q_acc, held[0], held[1], scale=scale, mask_fn=method.mask, bounds_fn=bounds,
                    **_kernel_positions(method, positions, rank, src),
                )  # fmt: skip
                outs.append(part.out)
                lses.append(part.lse)
                rec.blocks += 1
                if rec.count_pairs:
                    rec.pairs += visible_pairs(method, q.shape[1], positions[rank], positions[src])
            except Exception as exc:  # held, published by comm.settle on every rank
                error = exc
            rec.compute_s += time.perf_counter() - tick
        tick = time.perf_counter()
        comm.wait_all(works, wait)
        rec.wait_s += time.perf_counter() - tick
        if recv is None:
            break
        rec.steps += 1
        held = recv
    return outs, lses, error


def _strided(pos: torch.Tensor, first: int, world: int) -> bool:
    """Whether ``pos`` is ``first, first + world, first + 2 world, ...`` (a striped shard)."""
    return pos.numel() > 0 and int(pos[0]) == first and bool((pos.diff() == world).all())


def _kernel_positions(method, positions, rank, src) -> dict:
    """The positions the block kernel sees. Causal ``Dense`` on a striped layout gets local ones,
    which the tile bounds resolve exactly: rank r's i-th token ``i W + r`` sees rank j's i'-th
    ``i' W + j`` iff ``i' + [j > r] <= i``. Every other call: the global positions."""
    q_pos, kv_pos, world = positions[rank], positions[src], len(positions)
    if (type(method) is Dense and method.causal and world > 1 and _strided(q_pos, rank, world)
            and _strided(kv_pos, src, world)):  # fmt: skip
        q_pos = torch.arange(q_pos.numel())
        kv_pos = torch.arange(kv_pos.numel()) + int(src > rank)
    return {"q_pos": q_pos[None], "kv_pos": kv_pos[None]}


def _merge(q, outs, lses):
    if not outs:  # no key visible to any query of this rank
        acc = accumulation_dtype(q.dtype)
        lse = torch.full(q.shape[:3], -torch.inf, dtype=acc)
        return torch.zeros_like(q), lse
    out, lse = merge_partials(outs, lses)
    return out.to(q.dtype), lse
