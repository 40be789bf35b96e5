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
from longattn.methods.block_topk import top_count

# Score of a chunk whose representative key no query of the block may see: below every real score,
# above the empty chunks (-inf), so a real chunk always outranks an empty one.
UNSEEN = torch.finfo(torch.float32).min


class Queries(NamedTuple):
    """A plan's query blocks, one row per (batch row, head, query block): N = B * H * nq."""

    t: torch.Tensor  # [N, D, bs] float32, each block's queries transposed for the product
    pos: torch.Tensor  # [N, bs] their positions, -1 on padding
    lowest: torch.Tensor  # [N, 1] the oldest position of the block; -1 when it holds padding
    highest: torch.Tensor  # [N, 1] the newest position of the block
    segment: int  # nq: the rows of one batch row and head


def flat_queries(view) -> Queries:
    """The ``Queries`` of a plan call (widened to float32 once, not in every round)."""
    q, q_pos = query_blocks(view)  # [B, H, nq, bs, D], [Bp, nq, bs]
    pos = flat_positions(q_pos, q.shape[0], q.shape[1])  # [N, bs]
    lowest = torch.where((pos >= 0).all(-1), pos.amin(-1), -1).unsqueeze(-1)
    q_t = q.flatten(0, 2).float().transpose(-1, -2)  # [N, D, bs]
    return Queries(q_t, pos, lowest, pos.amax(-1, True), q.shape[2])


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
    halves = chunk_scores(view, queries, (start, mid, end), fresh)  # [N, C, 2]
    unseen = torch.full_like(halves, -math.inf)
    if scores is not None:
        unseen[..., 0] = torch.where(size == 1, scores, -math.inf)
    halves = torch.where(fresh.unsqueeze(-1), halves, unseen).flatten(-2)  # [N, 2C] block order
    bounds = torch.stack([start, mid], -1).flatten(-2), torch.stack([mid, end], -1).flatten(-2)
    return keep_best(halves, *bounds, k_row, empty)


def pack(todo: torch.Tensor):
    """todo bool [N, C] -> (cols [N, W] int64: each row's set columns first, in order, then C;
    count [N]: how many; slot [N, C]: each set column's place in ``cols``, W elsewhere)."""
    n_rows, width_in = todo.shape
    count = todo.sum(-1)
    width = max(1, int(count.max()))
    slot = torch.where(todo, todo.cumsum(-1) - 1, width)
    cols = torch.full((n_rows, width + 1), width_in, device=todo.device)
    column = torch.arange(width_in, device=todo.device).expand(n_rows, -1)
    return cols.scatter_(-1, slot, column)[:, :width], count, slot


def chunk_scores(view, queries: Queries, bounds, fresh) -> torch.Tensor:
    """[N, C, 2] float32: for each ``fresh`` [N, C] chunk, its two halves [start, mid) and
    [mid, end) (``bounds``, each [N, C]) scored by their middle key ``k_rep``: the best
    ``scale * q . k_rep`` over the query block's queries; UNSEEN where no query of the block may
    see it; -inf for an empty half. The other chunks' entries are undefined. The fresh chunks of
    each row are packed to its front (``pack``) and only they are scored."""
    t_k, bs = view.k.shape[2], view.block_size
    cols, count, slot = pack(fresh)  # [N, W], [N], [N, C]
    n_rows, width = cols.shape
    chunk = cols.clamp(0, fresh.shape[-1] - 1)
    start, mid, end = (x.gather(-1, chunk) for x in bounds)  # [N, W]
    lo = torch.stack([start, mid], -1) * bs  # [N, W, 2]
    hi = (torch.stack([mid, end], -1) * bs).clamp(0, t_k)
    rep = ((lo + hi - 1) >> 1).clamp(0, t_k - 1).view(*view.q.shape[:2], -1)  # [B, H, nq * 2W]
    rows = key_rows(view.k, rep).view(n_rows, -1)  # [N, 2W] rows of the flat keys
    kv_pos = view.kv_pos.view(view.kv_pos.shape[0], 1, -1).expand(*rep.shape[:2], -1)
    rep_pos = torch.gather(kv_pos, -1, rep).view(n_rows, -1)  # [N, 2W]
    nobody = (rep_pos < 0) | (rep_pos > queries.highest)
    filled = torch.arange(2 * width, device=fresh.device) < 2 * count.unsqueeze(-1)
    some = filled & ~nobody & (rep_pos > queries.lowest)  # seen by some queries of the block
    best = block_maxima(view.k, queries, rows, 2 * count, some, rep_pos) * view.scale
    # the scale is positive: scaling the maxima equals the maxima of the scaled scores
    best = torch.where(nobody | (best == -math.inf), UNSEEN, best)
    best = torch.where(hi.view(n_rows, -1) <= lo.view(n_rows, -1), -math.inf, best)
    at = slot.clamp(0, width - 1).unsqueeze(-1).expand(-1, -1, 2)
    return best.view(n_rows, width, 2).gather(1, at)  # [N, C, 2]


def row_chunks(count: torch.Tensor, step: int, segment: int):
    """Runs of at most ``step`` rows that stay inside one ``segment`` of rows (one batch row and
    head: the rows in it need similar widths, a run across two would be padded to the wider):
    (first, size, width) per run, ``width`` the most columns a row of it uses (``count`` [N]),
    and ``run`` [N] int64, each row's run."""
    row = torch.arange(count.numel(), device=count.device)
    per_segment = -(-segment // step)
    run = row // segment * per_segment + row % segment // step
    n_runs = count.numel() // segment * per_segment
    widths = torch.zeros(n_runs, dtype=count.dtype, device=count.device)
    widths = widths.scatter_reduce_(0, run, count, "amax").tolist()
    firsts = [s + j * step for s in range(0, count.numel(), segment) for j in range(per_segment)]
    sizes = [min(step, segment - j * step) for j in range(per_segment)] * (n_runs // per_segment)
    return list(zip(firsts, sizes, widths)), run


def block_maxima(k, queries: Queries, rows, count, some, rep_pos) -> torch.Tensor:
    """[N, W] float32: for each key row of ``rows`` [N, W] (the first ``count`` [N] of a row; -inf
    after them) the best ``q . k`` over the row's query block, over the queries that may see it
    where ``some``.

    In runs of rows, into workspaces: the keys gathered, the product [c, W', bs] and its
    maxima (over the contiguous queries) computed in cache. The few ``some`` keys' product
    columns are copied out in the loop and their masked maxima taken after it."""
    n_rows, width = rows.shape
    dim, bs = queries.t.shape[1:]
    keys = k.reshape(-1, dim)  # [B * Hkv * Tk, D]
    step = max(1, CHUNK_ELEMENTS // (bs * width))
    runs, run = row_chunks(count, step, queries.segment)
    n, c = some.nonzero(as_tuple=True)  # [S] in row order
    first, _, used = (torch.tensor(x, device=n.device) for x in zip(*runs))
    # each picked key's product row in its run's [c * W', bs] products
    local = (n - first[run[n]]) * used[run[n]] + c
    bounds = [0, *torch.bincount(run[n], minlength=len(runs)).cumsum(0).tolist()]
    columns = torch.empty(n.numel(), bs, device=n.device)
    best = torch.full((n_rows, width), -math.inf, device=n.device)
    gathered = keys.new_empty(step * width, dim)
    widened = gathered if keys.dtype == torch.float32 else gathered.float()
    products = torch.empty(step * width * bs, device=n.device)
    for part, (first, size, used) in enumerate(runs):
        index = rows[first : first + size, :used].reshape(-1)
        keys_part = torch.index_select(keys, 0, index, out=gathered[: index.numel()])
        if widened is not gathered:
            keys_part = widened[: index.numel()].copy_(keys_part)  # to float32, in cache
        logits = products[: index.numel() * bs].view(size, used, bs)
        torch.bmm(keys_part.view(size, used, dim), queries.t[first : first + size], out=logits)
        torch.amax(logits, dim=-1, out=best[first : first + size, :used])
        lo, hi = bounds[part], bounds[part + 1]
        if hi > lo:
            torch.index_select(logits.view(-1, bs), 0, local[lo:hi], out=columns[lo:hi])
    pos = queries.pos[n]  # [S, bs]
    seen = (rep_pos[n, c].unsqueeze(-1) <= pos) & (pos >= 0)
    best[n, c] = columns.masked_fill_(~seen, -math.inf).amax(-1)
    return best


def keep_best(scores, start, end, k_row, empty):
    """Per row the ``k_row`` best chunks (ties towards the earlier), compacted into
    ``scores.shape[-1] // 2`` slots in block order with their scores; the unused slots empty
    (start = end = ``empty``, score -inf)."""
    width = scores.shape[-1] // 2
    chosen = top_count(scores, k_row)  # [N, 2C], k_row [N] per row
    slot = torch.where(chosen, chosen.cumsum(-1) - 1, width)  # its place in block order
    shape = (*scores.shape[:-1], width + 1)  # a last column takes the chunks not kept
    empty = empty.unsqueeze(-1).expand(shape).contiguous()
    kept_start = empty.scatter(-1, slot, start)[..., :width]
    kept_end = empty.scatter(-1, slot, end)[..., :width]
    unused = torch.full(shape, -math.inf, device=scores.device)
    return kept_start, kept_end, unused.scatter_(-1, slot, scores)[..., :width]


@register("hip")
@dataclass(frozen=True)
class HiP(SparsePrefill):
    """HiP attention's hierarchical pruning (Lee et al. 2024, arXiv:2406.09827), per query block:
    the key range up to the diagonal is cut into ``k`` chunks (``k`` the ``budget`` fraction of
    the row's causal blocks); each round splits every chunk in two, scores each half by its
    representative (middle) key as the best ``scale * q . k`` over the block's queries, and keeps
    the ``k`` best halves, until every chunk is one key block: ``k`` blocks in ``log2(n / k)``
    rounds, O(T k log T) work instead of O(T^2). Ties go to the earlier chunk. A chunk already one
    block long is not split again: it keeps its score.

    Deviation from paper: the search runs on the key-block grid (its smallest chunk is the index
    block, not a token) and a query block shares one search (the paper's block approximation);
    HiP's mask caching across decode steps is not done (decode is dense here).
    """

    def plan(self, view) -> torch.Tensor:
        queries = flat_queries(view)
        batch, heads = view.q.shape[:2]
        causal = view.causal
        n_q, n_k = causal.shape
        n_cand = causal.long().cumsum(-1).argmax(-1) + 1  # [nq] key blocks up to the diagonal
        k_row = torch.ceil(causal.sum(-1).double() * self.budget).long().clamp(min=1)
        k_row = torch.minimum(k_row, n_cand)
        width = int(k_row.max())
        start, end = initial_chunks(n_cand, k_row, width)
        # one row per (batch row, head, query block), as ``queries``: [N, C]
        start, end = (x.repeat(batch * heads, 1) for x in (start, end))
        k_row, n_cand = k_row.repeat(batch * heads), n_cand.repeat(batch * heads)
        scores = None
        while int((end - start).max()) > 1:
            start, end, scores = search_round(view, queries, start, end, scores, k_row, n_cand)
        found = (end - start == 1) & (start < n_k)
        layout = torch.zeros(start.shape[0], n_k + 1, dtype=torch.bool, device=causal.device)
        layout.scatter_(-1, torch.where(found, start, n_k), True)
        return layout[:, :n_k].view(batch, heads, n_q, n_k) & causal
