"""HiP-style prefill: a hierarchical top-k search for each query block's key blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.anchor_attention import (
    CHUNK_ELEMENTS,
    flat_positions,
    key_rows,
    query_blocks,
)

# Score of a chunk whose representative key no query of the block may see: below every real score,
# above the empty chunks (-inf), so a real chunk always outranks an empty one.
UNSEEN = torch.finfo(torch.float32).min


# Rows x chunk slots of one group of query blocks searched at once (``query_groups``): its
# bookkeeping tensors and its queries stay in cache through all of the group's rounds.
GROUP_ELEMENTS = 1 << 16

# Rows of one batched product (a run): a run is as wide as its widest row, so longer runs pad more.
RUN_ROWS = 32

# The fewest key rows of a product: narrower products take another kernel whose rounding differs
# (its sums in another order), so every score is computed by the same kernel whatever the run.
MIN_WIDTH = 4


class Queries(NamedTuple):
    """A group's query blocks, one row per (batch row, head, query block): N = B * H * n."""

    t: torch.Tensor  # [B * H, n, D, bs] float32, each block's queries transposed for the product
    pos: torch.Tensor  # [N, bs] their positions, -1 on padding
    lowest: torch.Tensor  # [N, 1] the oldest position of the block; -1 when it holds padding
    highest: torch.Tensor  # [N, 1] the newest position of the block


def group_queries(q: torch.Tensor, q_pos: torch.Tensor, out: torch.Tensor | None = None) -> Queries:
    """The ``Queries`` of query blocks q [B, H, n, bs, D], q_pos [Bp, n, bs] (widened to float32
    once, not in every round). With ``out`` (flat float32, at least B * H * n * D * bs elements)
    the transposed queries are copied into its front, contiguous, as the library's key-maxima
    kernel reads them (transposed and widened in one pass, into memory reused by every group of a
    plan: a fresh multi-MB tensor per group costs its page faults); else a view, as
    ``torch.bmm`` reads them."""
    pos = flat_positions(q_pos, q.shape[0], q.shape[1])  # [N, bs]
    lowest = torch.where((pos >= 0).all(-1), pos.amin(-1), -1).unsqueeze(-1)
    q_t = q.flatten(0, 1).transpose(-1, -2)  # [B * H, n, D, bs]
    q_t = q_t.float() if out is None else out[: q_t.numel()].view(q_t.shape).copy_(q_t)
    return Queries(q_t, pos, lowest, pos.amax(-1, True))


def query_groups(k_row: torch.Tensor, segments: int) -> list[tuple[int, int]]:
    """Ranges [lo, hi) of query blocks, each as many as keep ``segments`` (B * H) x blocks x
    2 ``k_row`` (the widest row's chunk halves) within ``GROUP_ELEMENTS``, at least one."""
    groups, lo, widest = [], 0, 0
    for i, k in enumerate(k_row.tolist()):
        widest = max(widest, k)
        if i > lo and segments * (i + 1 - lo) * 2 * widest > GROUP_ELEMENTS:
            groups.append((lo, i))
            lo, widest = i, k
    return [*groups, (lo, len(k_row))]


def initial_chunks(n_cand: torch.Tensor, k_row: torch.Tensor, width: int):
    """(start, end) [nq, width] int64 key-block ranges: each row's ``n_cand`` candidate blocks cut
    into ``k_row`` near-equal chunks; the slots past ``k_row`` are empty (start = end = n_cand)."""
    slot = torch.arange(width, device=n_cand.device)
    used = slot < k_row.unsqueeze(-1)
    n = n_cand.unsqueeze(-1)
    k = k_row.clamp(min=1).unsqueeze(-1)
    start = torch.where(used, slot * n // k, n)
    end = torch.where(used, (slot + 1) * n // k, n)
    return start, end


def search_round(view, queries: Queries, start, end, scores, k_row, empty):
    """One round of the search over the chunks [start, end) [N, C] (``scores`` theirs, None in
    the first round): each chunk cut in two halves, the halves scored, the ``k_row`` [N] best kept
    (``keep_best``). A chunk one block long is its own first half and keeps its score (the same
    representative and queries); only the halves of longer chunks are scored (in the first round,
    of every non-empty chunk). Returns the kept (start, end, scores) [N, C]."""
    size = end - start
    mid = start + ((size + 1) >> 1)
    fresh = size > (0 if scores is None else 1)  # the chunks whose halves are scored now
    first, second = chunk_scores(view, queries, (start, mid, end), fresh)
    kept = -math.inf if scores is None else torch.where(size == 1, scores, -math.inf)
    second = torch.where(fresh & (mid < end), second, -math.inf)  # an empty half: -inf
    halves = torch.cat([torch.where(fresh, first, kept), second], -1)
    return keep_best(halves, torch.cat([start, mid], -1), torch.cat([mid, end], -1), k_row, empty)


def pack(todo: torch.Tensor):
    """todo bool [N, C] -> (cols [N, W] int64: each row's set columns first, in order, then C;
    count [N]: how many; slot [N, C]: each set column's place in ``cols``, W elsewhere)."""
    n_rows, width_in = todo.shape
    count = todo.sum(-1)
    width = max(MIN_WIDTH // 2, int(count.max()))
    slot = torch.where(todo, todo.cumsum(-1) - 1, width)
    cols = torch.full((n_rows, width + 1), width_in, device=todo.device)
    column = torch.arange(width_in, device=todo.device).expand(n_rows, -1)
    return cols.scatter_(-1, slot, column)[:, :width], count, slot


def chunk_scores(view, queries: Queries, bounds, fresh):
    """(first, second) [N, C] float32: for each ``fresh`` [N, C] chunk, its halves [start, mid)
    and [mid, end) (``bounds``, each [N, C]) scored by their middle key ``k_rep``: the best
    ``scale * q . k_rep`` over the query block's queries; UNSEEN where no query of the block may
    see it. Undefined for the other chunks and for an empty second half (mid = end). The fresh
    chunks of each row are packed to its front (``pack``) and only they are scored."""
    t_k, bs = view.k.shape[2], view.block_size
    cols, count, slot = pack(fresh)  # [N, W], [N], [N, C]
    n_rows, width = cols.shape
    chunk = cols.clamp(0, fresh.shape[-1] - 1)
    edges = torch.stack([x.gather(-1, chunk) for x in bounds], -1) * bs  # [N, W, 3]
    hi = edges[..., 1:].clamp(0, t_k)
    rep = ((edges[..., :2] + hi - 1) >> 1).clamp(0, t_k - 1)  # [N, W, 2] the halves' middles
    rows = key_rows(view.k, rep.view(*view.q.shape[:2], -1)).view(n_rows, -1)  # [N, 2W]
    rep_pos = positions(view.kv_pos, rep.view(*view.q.shape[:2], -1)).view(n_rows, -1)
    nobody = (rep_pos < 0) | (rep_pos > queries.highest)
    filled = torch.arange(2 * width, device=fresh.device) < 2 * count.unsqueeze(-1)
    some = filled & ~nobody & (rep_pos > queries.lowest)  # seen by some queries of the block
    best = key_maxima(view, queries, rows, 2 * count, some, rep_pos) * view.scale
    # the scale is positive: scaling the maxima equals the maxima of the scaled scores
    best = torch.where(nobody | (best == -math.inf), UNSEEN, best)  # [N, 2W]
    at = slot.clamp(0, width - 1) * 2  # [N, C] each fresh chunk's first half in ``best``
    return best.gather(-1, at), best.gather(-1, at + 1)


def positions(kv_pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The positions [B, H, n] of the key slots ``idx`` [B, H, n] (``kv_pos`` [Bp, Tk])."""
    if kv_pos.shape[0] == 1:  # one row of positions for every batch row: a flat lookup
        return kv_pos[0].index_select(0, idx.reshape(-1)).view(idx.shape)
    return torch.gather(kv_pos.unsqueeze(1).expand(*idx.shape[:2], -1), -1, idx)


def search(view, queries: Queries, n_cand, k_row, segments: int):
    """The search of one group of query blocks (``n_cand`` [n] candidate blocks, ``k_row`` [n]
    kept per row): the final (start, end) [N, C] chunks, one block each, in rows of ``queries``
    (``segments`` = B * H rows per query block)."""
    width = int(k_row.max())
    start, end = initial_chunks(n_cand, k_row, width)  # [n, C]
    start, end = (x.repeat(segments, 1) for x in (start, end))  # [N, C]
    k_row, n_cand = k_row.repeat(segments), n_cand.repeat(segments)
    scores = None
    while int((end - start).max()) > 1:
        start, end, scores = search_round(view, queries, start, end, scores, k_row, n_cand)
    return start, end


def row_chunks(count: torch.Tensor, step: int, segment: int):
    """Runs of at most ``step`` rows, of near-equal sizes, each inside one ``segment`` of rows (a
    batch row and head, whose query blocks are one view): (first, size, width) per run, and
    ``run`` [N] int64, each row's run. ``width``: the most columns a row of the run uses
    (``count`` [N]), at least ``MIN_WIDTH`` (0 when none does)."""
    per_segment = -(-segment // step)
    step = -(-segment // per_segment)
    row = torch.arange(count.numel(), device=count.device)
    run = row // segment * per_segment + row % segment // step
    n_runs = count.numel() // segment * per_segment
    widths = torch.zeros(n_runs, dtype=count.dtype, device=count.device)
    widths = widths.scatter_reduce_(0, run, count, "amax")
    widths = torch.where(widths > 0, widths.clamp(min=MIN_WIDTH), 0).tolist()
    firsts = [s + j * step for s in range(0, count.numel(), segment) for j in range(per_segment)]
    sizes = [min(step, segment - j * step) for j in range(per_segment)] * (n_runs // per_segment)
    return list(zip(firsts, sizes, widths)), run


def key_maxima(view, queries: Queries, rows, count, some, rep_pos) -> torch.Tensor:
    """``block_maxima`` by the library's kernel (``view.key_maxima``) where it runs, else here."""
    if view.key_maxima is not None:
        q_t = queries.t.flatten(0, 1)  # [N, D, bs]
        best = view.key_maxima(view.k, q_t, queries.pos, rows, count, some, rep_pos)
        if best is not None:
            return best
    return block_maxima(view.k, queries, rows, count, some, rep_pos)


def block_maxima(k, queries: Queries, rows, count, some, rep_pos) -> torch.Tensor:
    """[N, W] float32: for each key row of ``rows`` [N, W] (W >= ``MIN_WIDTH``; the first
    ``count`` [N] of a row) the best ``q . k`` over the row's query block, over the queries that
    may see it where ``some``; undefined after ``count``.

    In runs of rows, into workspaces: the keys gathered, the product [c, W', bs] and its
    maxima (over the contiguous queries) computed in cache. The few ``some`` keys' product
    columns are copied out in the loop and their masked maxima taken after it."""
    n_rows, width = rows.shape
    dim, bs = queries.t.shape[2:]
    keys = k.reshape(-1, dim)  # [B * Hkv * Tk, D]
    segment = queries.t.shape[1]
    step = max(1, min(RUN_ROWS, CHUNK_ELEMENTS // (bs * width)))
    runs, run = row_chunks(count, step, segment)
    first, size, used = (torch.tensor(x, device=rows.device) for x in zip(*runs))
    inside = torch.arange(width, device=rows.device) < used[run].unsqueeze(-1)  # [N, W]
    index = rows[inside]  # the key rows of every run, in order
    offsets = [0, *(size * used).cumsum(0).tolist()]
    n, c = some.nonzero(as_tuple=True)  # [S] in row order
    local = (n - first[run[n]]) * used[run[n]] + c  # its row of its run's [c * W', bs] products
    bounds = [0, *torch.bincount(run[n], minlength=len(runs)).cumsum(0).tolist()]
    columns = torch.empty(n.numel(), bs, device=rows.device)
    maxima = torch.empty(offsets[-1], device=rows.device)  # [M] the runs' maxima, in order
    gathered = keys.new_empty(step * width, dim)
    widened = gathered if keys.dtype == torch.float32 else gathered.float()
    products = torch.empty(step * width * bs, device=rows.device)
    for part, (first, size, used) in enumerate(runs):
        lo, hi = offsets[part], offsets[part + 1]
        if hi == lo:
            continue
        keys_part = torch.index_select(keys, 0, index[lo:hi], out=gathered[: hi - lo])
        if widened is not gathered:
            keys_part = widened[: hi - lo].copy_(keys_part)  # to float32, in cache
        logits = products[: (hi - lo) * bs].view(size, used, bs)
        q_t = queries.t[first // segment, first % segment : first % segment + size]
        torch.bmm(keys_part.view(size, used, dim), q_t, out=logits)
        torch.amax(logits, dim=-1, out=maxima[lo:hi].view(size, used))
        if bounds[part + 1] > bounds[part]:
            picked = slice(bounds[part], bounds[part + 1])
            torch.index_select(logits.view(-1, bs), 0, local[picked], out=columns[picked])
    best = torch.empty(n_rows, width, device=rows.device).masked_scatter_(inside, maxima)
    pos = queries.pos[n]  # [S, bs]
    seen = (rep_pos[n, c].unsqueeze(-1) <= pos) & (pos >= 0)
    best[n, c] = columns.masked_fill_(~seen, -math.inf).amax(-1)
    return best


def ranking_keys(scores: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """int64 like ``scores`` float32: per chunk a key in the order of its score (-0.0 as 0.0),
    ties towards the earlier chunk (the smaller ``start``). Distinct for the distinct starts of a
    row's non-empty chunks: their top-k by key is the stable top-k by score."""
    bits = (scores + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # a float's order as a signed integer's
    return (ordered.long() << 32) | (0xFFFFFFFE - start)  # below the padding of keep_best


def keep_best(scores, start, end, k_row, empty):
    """Per row of ``scores`` [N, 2C] the ``k_row`` [N] best chunks (ties towards the earlier) in
    C slots, in no particular order, as (start, end, scores); the other slots empty (start = end
    = ``empty`` [N], score -inf). A row has at least ``k_row`` non-empty chunks (each kept chunk
    has a non-empty half), all scored above the empty ones (-inf): no empty chunk is kept.

    One unsorted top-C per row: each row's C - ``k_row`` free slots are taken first by as many
    keys above every real one, so the rest is its ``k_row`` best."""
    width = scores.shape[-1] // 2
    free = torch.arange(width, device=scores.device) < (width - k_row).unsqueeze(-1)  # [N, C]
    top = torch.iinfo(torch.int64)
    padding = torch.where(free, top.max, top.min)
    keys = torch.cat([ranking_keys(scores, start), padding], -1)  # [N, 3C]
    order = torch.topk(keys, width, dim=-1, sorted=False).indices  # [N, C]
    real = order < 2 * width
    order = order.clamp(0, 2 * width - 1)
    empty = empty.unsqueeze(-1)
    return (
        torch.where(real, start.gather(-1, order), empty),
        torch.where(real, end.gather(-1, order), empty),
        torch.where(real, scores.gather(-1, order), -math.inf),
    )


@register("hip")
@dataclass(frozen=True)
class HiP(SparsePrefill):
    """HiP attention's hierarchical pruning (Lee et al. 2024, arXiv:2406.09827), per query block:
    the key range up to the diagonal is cut into ``k`` chunks (``k`` the ``budget`` fraction of
    the row's causal blocks); each round splits every chunk in two, scores each half by its
    representative (middle) key as the best ``scale * q . k`` over the block's queries, and keeps
    the ``k`` best halves, until every chunk is one key block: ``k`` blocks in ``log2(n / k)``
    rounds, O(T k log T) work instead of O(T^2). Ties go to the earlier chunk. A chunk already one
    block long is not split again: it keeps its score. On CPU in float32 / bfloat16 the whole
    search runs in one C++ call (``PrefillView.key_search``, the same blocks as the search by
    rounds over the C++ key maxima); the search by rounds here is the definition, float64's path
    and the fallback.

    Deviation from paper: the search runs on the key-block grid (its smallest chunk is the index
    block, not a token) and a query block shares one search (the paper's block approximation);
    HiP's mask caching across decode steps is not done (decode is dense here).
    """

    def plan(self, view) -> torch.Tensor:
        q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
        batch, heads, n_q = q.shape[:3]
        causal = view.causal
        n_k = causal.shape[1]
        n_cand = causal.long().cumsum(-1).argmax(-1) + 1  # [nq] key blocks up to the diagonal
        k_row = torch.ceil(causal.sum(-1).double() * self.budget).long().clamp(min=1)
        k_row = torch.minimum(k_row, n_cand)
        if view.key_search is not None:  # the whole search in one C++ call
            found = view.key_search(view.k, view.q, q_pos, view.kv_pos, n_cand, k_row, n_k,
                                    view.scale)  # fmt: skip
            if found is not None:
                return found & causal
        layout = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.bool, device=causal.device)
        groups = query_groups(k_row, batch * heads)
        buffer = None  # the key-maxima kernel's contiguous queries, one buffer for every group
        if view.key_maxima is not None:
            most = max(hi - lo for lo, hi in groups)
            buffer = q.new_empty(batch * heads * most * q[0, 0, 0].numel(), dtype=torch.float32)
        for lo, hi in groups:  # the rows are independent
            queries = group_queries(q[:, :, lo:hi], q_pos[:, lo:hi], buffer)
            start, end = search(view, queries, n_cand[lo:hi], k_row[lo:hi], batch * heads)
            found = (end - start == 1) & (start < n_k)
            kept = torch.where(found, start, n_k).view(batch, heads, hi - lo, -1)
            layout[:, :, lo:hi].scatter_(-1, kept, True)
        return layout[..., :n_k] & causal
