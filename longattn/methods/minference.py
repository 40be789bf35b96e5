"""MInference 1.0: per-head A-shape, vertical-slash or block-sparse prefill. Jiang et al. 2024,
arXiv:2407.02490.

Also the home of the vertical-slash choice (``vertical_slash``) that FlexPrefill shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.method import SparsePrefill, register
from longattn.methods.block_topk import top_k_blocks
from longattn.types import PrefillPlan

PATTERNS = ("ashape", "vs", "block")  # a calibration's ``pattern`` tensor holds these indices
KEYS = ("pattern", "budget", "vertical")  # what a calibration holds per layer and head
SINK_TOKENS = 4  # key columns every vertical-slash head keeps (the attention sinks)


def top_count(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """int64 [..., max(counts)]: per row of ``scores`` [..., n], the indices of its ``counts``
    [...] highest scores (ties towards the lower index), -1 past each row's count."""
    width = max(1, min(scores.shape[-1], int(counts.max())))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :width]
    used = torch.arange(width, device=scores.device) < counts.unsqueeze(-1)
    return torch.where(used, order, -1)


def slash_blocks(view, offsets: torch.Tensor) -> torch.Tensor:
    """bool [B, H, nq, nk]: the key blocks the diagonals ``offsets`` [B, H, n] (q_pos - kv_pos, -1
    unused) cross in each query block: block (i, j) holds offsets from min q_pos(i) - max
    kv_pos(j) to max q_pos(i) - min kv_pos(j)."""
    block = view.block_size

    def bounds(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [Bp, T] -> [Bp, n]
        n = -(-pos.shape[1] // block)
        padded = torch.nn.functional.pad(pos, (0, n * block - pos.shape[1]), value=-1)
        padded = padded.view(pos.shape[0], n, block)
        real = padded >= 0
        big = torch.iinfo(torch.int64).max // 4
        low = torch.where(real, padded, big).amin(-1)
        return low, torch.where(real, padded, -big).amax(-1)

    q_lo, q_hi = bounds(view.q_pos)
    k_lo, k_hi = bounds(view.kv_pos)
    size = int(max(int(view.q_pos.max()), 0)) + 1
    hit = torch.zeros(*offsets.shape[:2], size + 1, dtype=torch.int64, device=offsets.device)
    hit.scatter_(-1, torch.where(offsets < 0, size, offsets), 1)
    cum = torch.nn.functional.pad(hit[..., :size].cumsum(-1), (1, 0))  # [B, H, size + 1]
    lo = (q_lo[:, :, None] - k_hi[:, None, :]).clamp(0, size)  # [Bp, nq, nk]
    hi = (q_hi[:, :, None] - k_lo[:, None, :] + 1).clamp(0, size)
    flat = lambda x: x.flatten(1).unsqueeze(1).expand(cum.shape[0], cum.shape[1], -1)  # noqa: E731
    found = torch.gather(cum, -1, flat(hi)) - torch.gather(cum, -1, flat(lo))
    return (found > 0).view(*cum.shape[:2], *lo.shape[1:]) & view.causal


def line_scores(view, last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of the last ``last_q`` queries summed per key column [B, H, Tk] and per
    diagonal [B, H, max q_pos + 1] (offset q_pos - kv_pos)."""
    weights = view.last_weights(last_q)  # [B, H, n, Tk]
    batch, heads, n, kv_len = weights.shape
    q_pos = view.q_pos[:, -n:]  # [Bp, n]
    offset = q_pos[:, :, None] - view.kv_pos[:, None, :]  # [Bp, n, Tk]
    size = int(max(int(view.q_pos.max()), 0)) + 1
    valid = (offset >= 0) & (view.kv_pos[:, None, :] >= 0)
    index = offset.clamp(0, size - 1).expand(batch, n, kv_len).flatten(1)
    index = index.unsqueeze(1).expand(batch, heads, -1)
    diagonals = torch.zeros(batch, heads, size, device=weights.device)
    diagonals.scatter_add_(-1, index, (weights * valid.unsqueeze(1)).flatten(2))
    return weights.sum(2), diagonals


def vs_choice(
    view, columns: torch.Tensor, diagonals: torch.Tensor, n_cols: torch.Tensor, n_diag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks bool [B, H, nq, nk] the chosen diagonals cross, columns int64 [B, H, nq, n]): per
    head the ``n_cols`` [B, H] best ``columns`` (the first ``SINK_TOKENS`` always among them) and
    the ``n_diag`` [B, H] best ``diagonals`` (the main diagonal always among them)."""
    columns, diagonals = columns.clone(), diagonals.clone()
    columns[..., :SINK_TOKENS] = math.inf
    diagonals[..., 0] = math.inf
    n_cols = n_cols.clamp(min(SINK_TOKENS, columns.shape[-1]), columns.shape[-1])
    cols = top_count(columns, n_cols)  # [B, H, nv]
    offsets = top_count(diagonals, n_diag.clamp(1, diagonals.shape[-1]))
    n_q = view.causal.shape[0]
    return slash_blocks(view, offsets), cols.unsqueeze(2).expand(-1, -1, n_q, -1)


def vertical_slash(
    view, vertical: torch.Tensor, slash: torch.Tensor, last_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical-slash choice from the attention of the last ``last_q`` queries
    (``vs_choice``): per head ``ceil(vertical * Tk)`` key columns and ``ceil(slash * Tk)``
    diagonals; vertical, slash: [H] fractions of the keys."""
    columns, diagonals = line_scores(view, last_q)
    batch, heads, kv_len = columns.shape
    n_cols = torch.ceil(vertical.double() * kv_len).long().expand(batch, heads)
    n_diag = torch.ceil(slash.double() * kv_len).long().expand(batch, heads)
    return vs_choice(view, columns, diagonals, n_cols, n_diag)


def a_shape(view, budget: float) -> torch.Tensor:
    """bool [1, 1, nq, nk]: the first key block and each query block's ``ceil(budget * nk)``
    nearest causal key blocks (StreamingLLM's sink + window, in blocks)."""
    causal = view.causal
    local = math.ceil(budget * causal.shape[1])
    from_newest = causal.flip(-1).cumsum(-1).flip(-1)
    sinks = torch.arange(causal.shape[1], device=causal.device) == 0
    return (causal & (sinks | (from_newest <= local)))[None, None]


@register("minference")
@dataclass(frozen=True)
class MInference(SparsePrefill):
    """MInference's per-head dynamic sparse prefill (Jiang et al. 2024, arXiv:2407.02490): each
    head runs A-shape (sink + local blocks), vertical-slash (key columns and diagonals of most
    attention from the last ``last_q`` queries: the diagonals as the key blocks they cross, the
    columns as token columns merged by log-sum-exp) or block-sparse (top-k blocks by pooled q.k).

    pattern:     the pattern of every head (ashape | vs | block), without a calibration.
    budget:      ashape: window in key blocks, as a fraction of them; vs: diagonals, as a fraction
                 of the keys; block: the fraction of causal key blocks.
    vertical:    vs: key columns, as a fraction of the keys.
    last_q:      queries whose attention estimates the vertical and slash lines.
    calibration: a file from ``longattn calibrate minference`` (or a model name with a shipped
                 one): per layer and head the pattern, budget and vertical fraction, overriding
                 the three fields above.
    Deviation from paper: budgets are fractions of the prompt, not token counts; the slash lines
    run as whole key blocks (a superset of the diagonals), as the paper's kernel does.
    """

    pattern: str = "vs"
    vertical: float = 0.05
    last_q: int = 64
    calibration: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.pattern not in PATTERNS:
            raise ValueError(f"{name}.pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not 0.0 <= self.vertical <= 1.0:
            raise ValueError(f"{name}.vertical must be in [0, 1], got {self.vertical}")
        if self.last_q <= 0:
            raise ValueError(f"{name}.last_q must be > 0, got {self.last_q}")

    def head_config(self, view) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pattern index, budget, vertical) per query head, each [H]."""
        heads = view.q.shape[1]
        if view.calibration is None:

            def full(value, dtype):
                return torch.full((heads,), value, dtype=dtype, device=view.q.device)

            pattern = full(PATTERNS.index(self.pattern), torch.int64)
            return pattern, full(self.budget, torch.float64), full(self.vertical, torch.float64)
        cal = view.calibration
        parts = [cal.get(key) for key in KEYS]
        if any(p is None or p.numel() != heads for p in parts):
            got = {k: None if p is None else tuple(p.shape) for k, p in zip(KEYS, parts)}
            raise ValueError(
                f"MInference calibration needs pattern, budget, vertical [{heads}]: {got}"
            )
        pattern, budget, vertical = (p.flatten().to(view.q.device) for p in parts)
        if int(pattern.min()) < 0 or int(pattern.max()) >= len(PATTERNS):
            raise ValueError(f"MInference calibration patterns must index {PATTERNS}")
        if not bool(((budget > 0) & (budget <= 1)).all()):
            raise ValueError(f"MInference calibration budgets must be in (0, 1], got {budget}")
        return pattern.long(), budget.double(), vertical.double()

    def plan(self, view) -> PrefillPlan:
        pattern, budget, vertical = self.head_config(view)
        batch, heads = view.q.shape[:2]
        device = view.q.device
        blocks = torch.zeros(batch, heads, *view.causal.shape, dtype=torch.bool, device=device)
        columns = torch.full((batch, heads, view.causal.shape[0], 1), -1, device=device)
        vs = pattern == PATTERNS.index("vs")
        if bool(vs.any()):
            vs_blocks, vs_cols = vertical_slash(view, vertical, budget, self.last_q)
            blocks[:, vs] = vs_blocks[:, vs]
            columns = torch.where(vs.view(1, -1, 1, 1), vs_cols, -1)
        for head in range(heads):
            share = float(budget[head])
            if pattern[head] == PATTERNS.index("ashape"):
                blocks[:, head] = a_shape(view, share)[:, 0]
            elif pattern[head] == PATTERNS.index("block"):
                scores = view.pooled_logits()[:, head : head + 1]
                blocks[:, head] = top_k_blocks(scores, view.causal, share, view.forced)[:, 0]
        return PrefillPlan(blocks, columns)
