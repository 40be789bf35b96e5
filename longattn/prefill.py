"""Dynamic sparse prefill: the library side of the ``plan`` hook (``SparsePrefill`` methods).

A plan method estimates, from the call's own queries and keys, which key blocks each query block
needs, and returns that choice as a block layout. The library owns everything else, so that every
estimator gets the same guarantees and the same kernels:

- the estimators a plan reads (``PrefillView``): mean-pooled block logits, the attention of the last
  queries, the exact block attention mass (the oracle), computed here in float32 without
  materialising ``T x T`` for long prompts;
- the rules that make a choice safe: only blocks holding a causal pair, always the first
  ``sink_blocks`` key blocks and each query block's ``local_blocks`` nearest causal blocks (so
  every query sees itself), every causal block of the call's ``last_blocks`` query blocks, the element mask (causal, padding) on every block that is not fully
  visible;
- the ``BlockIndex`` the block-sparse kernels run (``sparse_cpp``, ``sparse``, ``flex``) and the
  reference reads (``BlockIndex.to_dense``), built once per call and returned in
  ``AttnOutput.state``;
- the phase: a plan acts in prefill; with few queries (decode) or below the method's
  ``dense_below`` keys the call is dense causal attention (logged at debug level with the reason).
"""

from __future__ import annotations

import logging
import math
import pathlib

import torch

from longattn import calibration
from longattn.kernels import int_margins, key_maxima, vertical
from longattn.kernels.tiled import tile_layout
from longattn.method import SparsePrefill
from longattn.methods.dense import Dense
from longattn.types import AttnOutput, BlockIndex, PrefillPlan, PrefillView

log = logging.getLogger("longattn")

# Elements of a narrower dtype widened to float32 at once by ``_pool`` (a cache-sized copy).
POOL_CHUNK = 1 << 18

# Queries whose exact attention ``block_mass`` computes at once (rows x keys floats per chunk).
MASS_CHUNK_ELEMENTS = 1 << 24


def dense_reason(method: SparsePrefill, q_len: int, kv_len: int) -> str | None:
    """Why a plan method's call on ``q_len`` queries over ``kv_len`` keys is dense attention, or
    None when it plans."""
    if kv_len < method.dense_below:
        return f"{kv_len} keys < dense_below={method.dense_below}"
    if q_len < method.block_size or kv_len < 2 * method.block_size:
        return (
            f"{q_len} queries over {kv_len} keys: under one query block or two key blocks of "
            f"{method.block_size}"
        )
    return None


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, h, T, D] -> [B, h, ceil(T / block), D] float32 means over each block's rows (the last
    block over the rows it has). Summed in float32 from views of ``x``: no padded copy, and a
    narrower dtype is widened a few blocks at a time (a cache-sized copy), not as a whole."""
    batch, heads, t, dim = x.shape
    full = t // block
    n = -(-t // block)
    sums = torch.empty(batch, heads, n, dim, dtype=torch.float32, device=x.device)
    step = full if x.dtype == torch.float32 else max(1, POOL_CHUNK // (batch * heads * block * dim))
    for lo in range(0, full, max(1, step)):
        hi = min(lo + step, full)
        rows = x[:, :, lo * block : hi * block].unflatten(2, (hi - lo, block))
        torch.sum(rows.float(), dim=3, out=sums[:, :, lo:hi])  # [B, h, c, D]
    if n > full:
        sums[:, :, full] = x[:, :, full * block :].float().sum(dim=2)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = t - (n - 1) * block
    return sums / counts.view(1, 1, n, 1)


def causal_layout(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) bool [nq, nk]: blocks holding a causal pair, and blocks whose every pair is a
    visible causal pair (real positions, no padding)."""
    found = tile_layout(Dense().block_bounds, 1, q_pos, kv_pos, block, block)
    assert found is not None  # Dense answers its bounds
    return found[0][0], found[1][0]


class _Estimators:
    """The estimators of one call, each computed once on first use."""

    def __init__(self, q, k, q_pos, kv_pos, scale, block, causal_any):
        self.q, self.k, self.q_pos, self.kv_pos = q, k, q_pos, kv_pos
        self.scale, self.block, self.causal_any = scale, block, causal_any
        self.cache: dict[str, torch.Tensor] = {}

    def _grouped_k(self, k: torch.Tensor) -> torch.Tensor:
        return k.repeat_interleave(self.q.shape[1] // k.shape[1], dim=1)  # [B, H, n, D]

    def _logits(self, q: torch.Tensor) -> torch.Tensor:
        """[B, H, n, Tk] float32 ``scale * q . k`` for queries q [B, H, n, D], each KV head's
        query heads folded into one product (the keys are not expanded over the group)."""
        if "k32" not in self.cache:
            self.cache["k32"] = self.k.float()  # once per call (a no-op for float32 keys)
        k = self.cache["k32"]  # [B, Hkv, Tk, D]
        batch, heads, n, dim = q.shape
        rows = q.float().reshape(batch, k.shape[1], -1, dim)  # [B, Hkv, G * n, D]
        return (rows @ k.transpose(-1, -2)).view(batch, heads, n, -1).mul_(self.scale)

    def pooled_logits(self) -> torch.Tensor:
        """[B, H, nq, nk] float32 ``scale * mean(q) . mean(k)`` per block pair; -inf where the
        pair holds no causal pair."""
        if "pooled" not in self.cache:
            qp = _pool(self.q, self.block)  # [B, H, nq, D]
            kp = self._grouped_k(_pool(self.k, self.block))  # [B, H, nk, D]
            logits = (qp @ kp.transpose(-1, -2)) * self.scale
            self.cache["pooled"] = logits.masked_fill(~self.causal_any, -math.inf)
        return self.cache["pooled"]

    def last_weights(self, n: int) -> torch.Tensor:
        """[B, H, n, Tk] float32 softmax weights of the last ``n`` queries over the keys (causal by
        position, padding excluded; a query that sees nothing gets zeros)."""
        n = min(n, self.q.shape[2])
        logits = self._logits(self.q[:, :, -n:])
        qp = self.q_pos[:, -n:][:, None, :, None]
        kp = self.kv_pos[:, None, None, :]
        visible = (kp >= 0) & (qp >= 0) & (kp <= qp)
        return torch.softmax(logits.masked_fill_(~visible, -math.inf), dim=-1).nan_to_num_(0.0)

    def block_mass(self) -> torch.Tensor:
        """[B, H, nq, nk] float32 exact attention mass: each query's softmax weights summed over
        each key block, averaged over the block's queries (the oracle every estimator is compared
        with). Queries in chunks of at most ``MASS_CHUNK_ELEMENTS`` scores."""
        if "mass" in self.cache:
            return self.cache["mass"]
        batch, heads, t_q, _ = self.q.shape
        t_k, block = self.k.shape[2], self.block
        n_k = -(-t_k // block)
        kp = self.kv_pos[:, None, None, :]
        rows = max(block, (MASS_CHUNK_ELEMENTS // max(1, batch * heads * t_k)) // block * block)
        parts = []
        for lo in range(0, t_q, rows):
            logits = self._logits(self.q[:, :, lo : lo + rows])
            qp = self.q_pos[:, lo : lo + rows][:, None, :, None]
            visible = (kp >= 0) & (qp >= 0) & (kp <= qp)
            w = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)
            w = torch.nn.functional.pad(w, (0, n_k * block - t_k))
            per_key_block = w.view(batch, heads, w.shape[2], n_k, block).sum(-1)
            parts.append(_pool(per_key_block, block))  # [B, H, rows / block, nk]
        self.cache["mass"] = torch.cat(parts, dim=2)
        return self.cache["mass"]


def make_view(call) -> PrefillView:
    """The ``PrefillView`` of a plan call (``longattn.call.Call``)."""
    method = call.method
    block = method.block_size
    causal_any, causal_all = causal_layout(call.q_pos, call.kv_pos, block)
    est = _Estimators(call.q, call.k, call.q_pos, call.kv_pos, call.scale, block, causal_any)
    forced = forced_blocks(causal_any, method.sink_blocks, method.local_blocks, method.last_blocks)
    return PrefillView(
        q=call.q,
        k=call.k,
        q_pos=call.q_pos,
        kv_pos=call.kv_pos,
        scale=call.scale,
        block_size=block,
        causal=causal_any,
        causal_full=causal_all,
        forced=forced,
        layer=call.layer,
        pooled_logits=est.pooled_logits,
        last_weights=est.last_weights,
        block_mass=est.block_mass,
        calibration=plan_calibration(method, call.k.shape[1], call.k.shape[3], call.layer),
        key_maxima=key_maxima.key_maxima,
        key_search=key_maxima.hierarchical_search,
        int_margins=int_margins.int_margins,
    )


# Calibrations shipped with the package, by (method, model name): ``calibration="smollm2-135m"``.
SHIPPED_PLANS = {
    ("minference", "smollm2-135m"): "eval/data/minference_smollm2.safetensors",
}


def calibration_path(method: SparsePrefill) -> pathlib.Path | None:
    """The file a plan method's ``calibration`` field names (a path, or a model name with a
    shipped file), or None when it names none."""
    name = getattr(method, "calibration", "")
    if not name:
        return None
    shipped = SHIPPED_PLANS.get((method.name, name))
    if shipped is not None:
        return pathlib.Path(__file__).parent / shipped
    return pathlib.Path(name)


def plan_calibration(
    method: SparsePrefill, n_kv_heads: int, head_dim: int, layer: int
) -> dict[str, torch.Tensor] | None:
    """The method's calibration tensors for ``layer``, checked against the call's shape (another
    method, model shape or too few layers: ValueError), or None without a calibration."""
    path = calibration_path(method)
    if path is None:
        return None
    cal = calibration.load(path)
    if cal.method != method.name:
        raise ValueError(f"calibration {path} is for method {cal.method!r}, not {method.name!r}")
    if (cal.n_kv_heads, cal.head_dim) != (n_kv_heads, head_dim) or layer >= cal.n_layers:
        raise ValueError(
            f"calibration {path} for model {cal.model!r} has (layers, kv heads, head dim) = "
            f"{(cal.n_layers, cal.n_kv_heads, cal.head_dim)}, but the call is layer {layer} with "
            f"{n_kv_heads} kv heads of dim {head_dim}"
        )
    return cal.layer(layer)


def forced_blocks(
    causal: torch.Tensor, sink_blocks: int, local_blocks: int, last_blocks: int = 0
) -> torch.Tensor:
    """bool [nq, nk]: the first ``sink_blocks`` key blocks, each query block's ``local_blocks``
    nearest causal key blocks (its diagonal first) and every key block of the last
    ``last_blocks`` query blocks, within the ``causal`` blocks [nq, nk]."""
    n_q, n_k = causal.shape
    sinks = torch.arange(n_k, device=causal.device) < sink_blocks
    # rank causal blocks from the newest: the diagonal block is rank 0
    from_newest = causal.flip(-1).cumsum(-1).flip(-1)  # [nq, nk] causal blocks at or after
    local = causal & (from_newest <= local_blocks)
    last = torch.arange(n_q, device=causal.device) >= n_q - last_blocks
    return causal & (sinks.view(1, -1) | local | last.view(-1, 1))


def check_layout(method: SparsePrefill, layout, view: PrefillView) -> torch.Tensor:
    """The plan hook's result as bool [Bi, Hi, nq, nk], or a clear error naming what is wrong."""
    name = type(method).__name__
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(
            f"{name}.plan must return a bool tensor [B, H, nq, nk], got "
            f"{getattr(layout, 'dtype', type(layout).__name__)}"
        )
    batch, heads = view.q.shape[:2]
    shape = tuple(view.causal.shape)
    if (
        layout.dim() != 4
        or tuple(layout.shape[2:]) != shape
        or layout.shape[0] not in (1, batch)
        or layout.shape[1] not in (1, heads)
    ):
        raise ValueError(
            f"{name}.plan must return [1 or {batch}, 1 or {heads}, {shape[0]}, {shape[1]}], got "
            f"{list(layout.shape)}"
        )
    return layout


def check_columns(method: SparsePrefill, columns, view: PrefillView) -> torch.Tensor:
    """A ``PrefillPlan``'s columns as int64 [Bi, Hi, nq, n], or an error naming what is wrong."""
    name = type(method).__name__
    if not isinstance(columns, torch.Tensor) or columns.dtype != torch.int64:
        raise TypeError(
            f"{name}.plan's PrefillPlan.columns must be an int64 tensor [B, H, nq, n], got "
            f"{getattr(columns, 'dtype', type(columns).__name__)}"
        )
    batch, heads = view.q.shape[:2]
    n_q, kv_len = view.causal.shape[0], view.k.shape[2]
    if (
        columns.dim() != 4
        or columns.shape[0] not in (1, batch)
        or columns.shape[1] not in (1, heads)
        or columns.shape[2] != n_q
    ):
        raise ValueError(
            f"{name}.plan's PrefillPlan.columns must be [1 or {batch}, 1 or {heads}, {n_q}, n], "
            f"got {list(columns.shape)}"
        )
    rows = columns[:, :, :1] if columns.stride(2) == 0 else columns  # broadcast: one list each
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= kv_len):
        raise ValueError(
            f"{name}.plan's PrefillPlan.columns must be key slots in [0, {kv_len}) or -1, got "
            f"{int(rows.min())}..{int(rows.max())}"
        )
    return columns


def tidy_columns(
    columns: torch.Tensor, visited: torch.Tensor, block: int, causal: torch.Tensor
) -> torch.Tensor | None:
    """int64 [Bo, Ho, nq, n'] the columns that no visited block covers and that some query of
    their query block can see, each once, ascending, -1 after the used slots, trimmed to the
    widest row; None when none is left. ``visited`` bool [Bv, Hv, nq, nk] the final block
    layout; ``causal`` bool [nq, nk] the blocks holding a causal pair.

    Each row is sorted and its repeats dropped once (once per head for columns broadcast over the
    query blocks, as vertical-slash plans give them), so that its columns fall into one run per
    key block; a query block's row is then the runs of the key blocks it may read, copied in
    order (one gather and one scatter over the output), without sorting the output."""
    unused = torch.iinfo(torch.int64).max
    # one list for every query block (vertical-slash plans): sorted once per head
    shared = columns.shape[2] > 1 and (
        columns.stride(2) == 0 or bool((columns == columns[:, :, :1]).all())
    )
    rows = columns[:, :, :1] if shared else columns  # [Bc, Hc, R, n]
    rows = torch.where(rows < 0, unused, rows).sort(dim=-1).values
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[..., 1:] = rows[..., 1:] == rows[..., :-1]
    rows = rows.masked_fill(repeat, unused).sort(dim=-1).values  # unique, ascending, then unused
    n_q, n_k = visited.shape[2:]
    key_block = torch.where(rows == unused, n_k, rows // block)
    count = torch.zeros(*rows.shape[:3], n_k + 1, dtype=torch.int64, device=rows.device)
    count = count.scatter_add_(-1, key_block, torch.ones_like(key_block))[..., :n_k]
    source = count.cumsum(-1) - count  # where each key block's run starts in its row
    shape = (*torch.broadcast_shapes(rows.shape[:2], visited.shape[:2]), n_q, n_k)
    kept = (count * (causal & ~visited)).expand(shape)  # [Bo, Ho, nq, nk] columns per run
    dest = kept.cumsum(-1) - kept  # where each run starts in its output row
    width = int(kept.sum(-1).max()) if kept.numel() else 0
    if width == 0:
        return None
    base = torch.arange(math.prod(rows.shape[:3]), device=rows.device).view(*rows.shape[:3], 1)
    source = source + base * rows.shape[-1]  # into rows.flatten()
    runs = kept.flatten().nonzero().squeeze(-1)
    length = kept.flatten()[runs]
    run = torch.repeat_interleave(torch.arange(runs.numel(), device=rows.device), length)
    within = torch.arange(run.numel(), device=rows.device) - (length.cumsum(0) - length)[run]
    src = source.expand(shape).flatten()[runs][run] + within
    dst = ((runs // n_k) * width + dest.flatten()[runs])[run] + within
    out = torch.full((math.prod(shape[:3]) * width,), -1, dtype=torch.int64, device=rows.device)
    out[dst] = rows.flatten()[src]
    return out.view(*shape[:3], width)


def plan_index(call) -> BlockIndex:
    """The ``BlockIndex`` of a plan call: the method's choice restricted to causal blocks, with the
    forced sink and local blocks, every block not fully visible marked for the element mask. A
    ``PrefillPlan``'s columns, less those a visited block covers, go to
    ``call.derived["plan_columns"]`` (None without columns). A plan is a discrete choice: it is
    computed with autograd off, whatever the inputs."""
    with torch.no_grad():
        return _plan_index(call)


def _plan_index(call) -> BlockIndex:
    method = call.method
    view = make_view(call)
    result = method.plan(view)
    columns = None
    if isinstance(result, PrefillPlan):
        result, columns = result.blocks, check_columns(method, result.columns, view)
    chosen = check_layout(method, result, view)
    chosen = (chosen | view.forced) & view.causal
    partial = chosen & ~view.causal_full
    call.derived["plan_view"] = view
    if columns is not None:
        columns = tidy_columns(columns, chosen, method.block_size, view.causal)
    call.derived["plan_columns"] = columns
    return BlockIndex.from_block_mask(
        chosen, method.block_size, partial=partial, q_len=call.q.shape[2], kv_len=call.k.shape[2]
    )


def column_keys(columns: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [Bi, Hi, n_rows, kv_len]: the keys each row of ``columns`` [Bi, Hi, n_rows, n] names
    (-1 unused; before the causal mask)."""
    keys = torch.zeros(*columns.shape[:3], kv_len + 1, dtype=torch.bool, device=columns.device)
    keys.scatter_(-1, torch.where(columns < 0, kv_len, columns), True)
    return keys[..., :kv_len]


def columns_dense(columns: torch.Tensor, block: int, q_len: int, kv_len: int) -> torch.Tensor:
    """bool [Bi, Hi, q_len, kv_len]: the keys ``columns`` [Bi, Hi, nq, n] name for each query
    (before the causal mask; for the reference)."""
    return column_keys(columns, kv_len).repeat_interleave(block, dim=2)[:, :, :q_len]


def plan_visible(call, index: BlockIndex) -> torch.Tensor:
    """bool [Bi, Hi, Tq, Tk]: the plan's blocks and token columns (before the causal mask)."""
    visible = index.to_dense()
    columns = call.derived.get("plan_columns")
    if columns is not None:
        visible = visible | columns_dense(columns, index.block_size, index.q_len, index.kv_len)
    return visible


def with_columns(call, index: BlockIndex, blocks: AttnOutput) -> AttnOutput:
    """A block pass's result ``blocks``, merged with the plan's token columns where it has some
    (``longattn.kernels.vertical``)."""
    columns = call.derived.get("plan_columns") if call.method.hook == "plan" else None
    if columns is None:
        return blocks
    args = (call.q, call.k, call.v, columns, index.block_size, call.scale, call.q_pos, call.kv_pos)
    return vertical.with_columns(blocks, *args)


def columns_need_lse(call, index: BlockIndex) -> str | None:
    """Why a block kernel without a log-sum-exp cannot run this plan call (its token columns must
    be merged by it), or None. ``index``: the call's, built first so the columns are known."""
    if call.derived.get("plan_columns") is None:
        return None
    return "the plan has token columns, merged by log-sum-exp, which this kernel does not return"


def plan_state(call, index: BlockIndex) -> BlockIndex | PrefillPlan:
    """What a plan call ran, for ``AttnOutput.state``: its ``BlockIndex``, with its columns where
    it has some (``PrefillPlan``)."""
    columns = call.derived.get("plan_columns")
    return index if columns is None else PrefillPlan(index, columns)


def density(index: BlockIndex, causal_any: torch.Tensor) -> float:
    """Visited blocks over the blocks holding a causal pair (averaged over rows and heads)."""
    per_row = index.counts.float().sum(-1)  # [Bi, Hi]
    return float((per_row / causal_any.sum().clamp(min=1)).mean())


def visible_rows(
    index: BlockIndex, rows: torch.Tensor, q_pos, kv_pos, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [Bi, Hi, len(rows), Tk]: what the query ``rows`` (indices into the call's queries) see
    under a plan's ``index`` and token ``columns`` (``call.derived["plan_columns"]``, None
    without): its blocks and columns, causal within them (padding excluded). For gates on sampled
    rows without ``T x T``."""
    q_blocks = rows // index.block_size
    visited = index.layout()[0][:, :, q_blocks]  # [Bi, Hi, R, nk]
    visible = visited.repeat_interleave(index.block_size, dim=-1)[..., : index.kv_len]
    if columns is not None:
        visible = visible | column_keys(columns[:, :, q_blocks], index.kv_len)
    qp = q_pos[:, rows][:, None, :, None]
    kp = kv_pos[:, None, None, :]
    return visible & (kp >= 0) & (qp >= 0) & (kp <= qp)
