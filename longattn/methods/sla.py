"""SLA: sparse-linear attention, training-free. Each (query block, key block) pair is critical
(exact softmax), marginal (linear attention) or negligible (skipped), from pooled block scores.

Also the home of the block pooling and the elu + 1 / Taylor feature maps the hybrids share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from longattn.method import Method, check_fraction, check_non_negative, check_positive, register
from longattn.methods.elu_linear import EluLinear
from longattn.methods.latte import Rounding, call_scale, layer_tensor, magnitude_bound
from longattn.methods.sla_expansion import (
    expand_blocks,
    expansion_logits,
    expansion_points,
    expansion_rel,
    row_points,
)
from longattn.methods.taylor import Taylor, taylor_projection
from longattn.types import FeatureView

FEATURES = ("elu", "taylor", "expansion")
COMBINES = ("shared", "mass")
CRITICAL, MARGINAL = 2, 1  # block classes; 0 is negligible (or not causal)

# the Taylor option's map: 16 projected dimensions as BASED, 1 + 16 + 256 features
_TAYLOR = Taylor(window=0)


def features(x: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """phi(x) [..., T, F] of x [..., T, D]: ``"elu"`` elu(x) + 1 on the raw x (Katharopoulos et
    al.), ``"taylor"`` the second-order Taylor map of exp(scale q . k) on a fixed 16-dimensional
    projection (BASED), whose kernel is in the units of the exact weights exp(scale q . k)."""
    view = FeatureView("key", 0, scale)
    if kind == "elu":
        return EluLinear().feature_map(x, view)
    return _TAYLOR.feature_map(x, view)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, h, n * block (+ rest), D] -> [B, h, n, D] float32 means of the complete blocks (a
    fixed summation order, whatever n: a block's mean does not depend on the call's length)."""
    batch, heads, length, dim = x.shape
    n = length // block
    return x[:, :, : n * block].float().view(batch, heads, n, block, dim).sum(3) / block


class SLAState(NamedTuple):
    """What SLA carries between calls: every key and value seen, [B, Hkv, n, D] (the exact part
    may visit any past block, so the state grows with the tokens: prefill is what SLA serves),
    and the queries from the start of the previous query block on (``q`` [B, H, m, D]), whose
    pooled mean classifies the next block."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor


@register("sla")
@dataclass(frozen=True)
class SLA(Method):
    """Sparse-linear attention: per query block and head, its causal key blocks ranked by the
    pooled block scores ``softmax_j(scale mean(q) . mean(k_j))`` are split into the ``critical``
    fraction (exact softmax weights ``exp(scale q . k)``), the next ``marginal`` fraction (linear
    attention weights ``phi(q) . phi(k)``) and the negligible rest (skipped).
    Zhang et al. 2025, arXiv:2509.24006.

    Counts per query block i with n = i + 1 causal blocks: ``max(1, ceil(critical n))`` critical
    and ``ceil((critical + marginal) n)`` critical or marginal; the diagonal block and the first
    ``sink_blocks`` are always critical (counted in the budget, kept beyond it); ties go to the
    earlier block. The block scores are computed in float32 from the inputs (a float64 copy of
    fp32 or bf16 inputs classifies the same blocks).

    Causal: block i is classified from the mean of the queries of block i - 1 (complete before
    any query of block i arrives) against the means of the complete key blocks before it, so
    a query's output never depends on a later token and chained calls equal one pass.

    Deviation from paper: the paper pools block i's own queries (a whole block at once, as its
    non-causal video models see it) and adds the linear output through a learned projection
    after fine-tuning (``O = O_sparse + Proj(O_linear)``). Training-free here, ``feature`` is
    the marginal blocks' estimator:

    - ``"expansion"`` (default) estimates marginal block j for query t of block i by the
      first-order expansion of the block's exact attention around the nearest ``a`` of
      ``points`` expansion points, the k-means centres of block i - 1's queries
      (``sla_expansion.expansion_points``; complete before block i's first query): with ``P_s =
      softmax_s(scale a . k_s)`` over the block's keys, its mass is ``exp(mu_tj)``, ``mu_tj =
      logsumexp_s(scale a . k_s) + scale (q_t - a) . sum_s P_s k_s`` (exact at ``q_t = a``,
      below the exact mass elsewhere by convexity), and its average ``v_hat_j = sum_s P_s v_s``:
      ``out_t = (sum_C exp(s_ts) v_s + sum_j exp(mu_tj) v_hat_j) / (sum_C exp(s_ts) + sum_j
      exp(mu_tj))``, already in the units of ``exp(score)`` (``combine`` does not apply). A
      linear attention over per-block summaries: a marginal block costs ``points b (2 D + Dv)``
      once per query block and ``points (D + Dv)`` per query, against ``b (D + Dv)`` per query
      when exact (b = 64, D = Dv, 8 points: about a third). The library's training-free
      marginal branch, not the paper's: on SmolLM2's q/k/v it halves sparse-only's error where
      the untrained feature maps below barely change it (``docs/runs/issue16/sla_error.md``).
      Called through ``attention`` in float32 or bfloat16 on CPU, the exact and expanded blocks
      run in one C++ pass per query block (``longattn.kernels.expansion``, given in the view);
      the PyTorch form below is the definition, float64's path and the fallback.
    - ``"elu"`` (elu + 1) and ``"taylor"`` (BASED's second-order Taylor map): linear attention
      with untrained features; ``combine`` chooses how the two parts meet over the critical (C)
      and marginal (M) keys of query t. ``"mass"`` (default): ``out_t = (sum_C exp(s_ts) v_s +
      mu_t a_t) / (sum_C exp(s_ts) + mu_t)`` with ``a_t`` the linear attention over M
      normalised alone and ``mu_t = sum_{j in M} block * exp(scale q_t . mean(k_j))`` the
      pooled-key estimate of M's exp mass (the softmax over C and M when ``a_t`` and ``mu_t``
      are exact); ``"shared"``: one normaliser over ``exp(s_ts)`` and ``phi(q_t) . phi(k_s)``,
      as the linear engine's exact-window form (BASED), whose linear weights swamp the exact
      ones on SmolLM2's q/k/v.

    ``marginal=0`` is block-sparse attention on the same critical set.

    The short fine-tune of the linear part (the paper's ``Proj`` on the linear output), as an
    option: ``calibration``, a file of ``longattn calibrate sla`` (``longattn.eval.sla_fit``),
    holds per layer and query head an affine map of the marginal part's values, ``proj_w``
    [Hkv, G, Dv, Dv] and ``proj_b`` [Hkv, G, Dv]: the marginal numerator ``N`` and mass ``m`` of a
    row enter as ``N W^T + m b`` (every form above; the identity and zero leave SLA as it is),
    i.e. the marginal share of the output ``m / den`` times ``W a + b`` (a the marginal average).
    Fitted in closed form to the model's softmax outputs (least squares, ridge towards the
    identity) rather than by gradient steps. A calibrated call runs in PyTorch (the C++ pass does
    not apply the map).
    """

    block_size: int = 64
    critical: float = 0.05
    marginal: float = 0.85
    sink_blocks: int = 1
    feature: str = "expansion"
    combine: str = "mass"
    points: int = 8
    calibration: str | None = None

    def __post_init__(self) -> None:
        check_positive("SLA", block_size=self.block_size, points=self.points)
        if self.calibration is not None and not self.calibration:
            raise ValueError("SLA.calibration must be a path or None, got ''")
        check_non_negative("SLA", sink_blocks=self.sink_blocks)
        check_fraction("SLA", critical=self.critical)
        if isinstance(self.marginal, bool) or not isinstance(self.marginal, (int, float)):
            raise TypeError(f"SLA.marginal must be a float, got {self.marginal!r}")
        if not 0.0 <= self.marginal <= 1.0:
            raise ValueError(f"SLA.marginal must be in [0, 1], got {self.marginal}")
        if self.critical + self.marginal > 1.0 + 1e-9:
            raise ValueError(
                f"SLA.critical + SLA.marginal must be <= 1, got {self.critical} + {self.marginal}"
                f" = {self.critical + self.marginal}"
            )
        if self.feature not in FEATURES:
            raise ValueError(f"SLA.feature must be one of {FEATURES}, got {self.feature!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"SLA.combine must be one of {COMBINES}, got {self.combine!r}")

    @property
    def is_causal(self) -> bool:
        return True

    @property
    def n_points(self) -> int:
        """The expansion points per query block: ``points``, at most one per query of a block."""
        return min(self.points, self.block_size)

    def classify(
        self, q: torch.Tensor, k: torch.Tensor, q_start: int, first: int, last: int, scale: float
    ) -> torch.Tensor:
        """int8 [B, H, last - first + 1, nk]: the class of every key block for query blocks
        ``first..last``; ``q`` holds the queries from position ``q_start`` (a block start, at or
        before block ``first - 1``), ``k`` every key up to the last query's."""
        block, (batch, n_heads, _, dim), n_kv = self.block_size, q.shape, k.shape[1]
        n_blocks = -(-k.shape[2] // block)
        rows = torch.arange(first, last + 1)  # query block indices i
        q_bar = self.pooled_queries(q, q_start, first, last)
        k_bar = block_means(k, block)  # [B, Hkv, nfull, D]
        # elementwise products and an inner sum: the same rounding whatever the call's shape; in
        # runs of query blocks, so that the products held stay near 2**24 floats
        logits = torch.full((batch, n_heads, len(rows), n_blocks), -math.inf)
        q_bar = q_bar.view(batch, n_kv, -1, len(rows), 1, dim)
        step = max(1, 2**24 // max(1, q_bar.shape[:3].numel() * k_bar.shape[2] * dim))
        for lo in range(0, len(rows) if k_bar.shape[2] else 0, step):
            prod = q_bar[:, :, :, lo : lo + step] * k_bar[:, :, None, None]
            sums = prod.sum(-1).view(batch, n_heads, -1, k_bar.shape[2])
            logits[:, :, lo : lo + step, : k_bar.shape[2]] = sums * scale
        cols = torch.arange(n_blocks)
        forced = (cols[None, :] == rows[:, None]) | (  # the diagonal and the sinks before it
            (cols[None, :] < self.sink_blocks) & (cols[None, :] < rows[:, None])
        )
        ranked = logits.masked_fill(cols[None, :] >= rows[:, None], -math.inf)
        ranked = ranked.masked_fill(forced, math.inf)
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, cols.expand_as(order).contiguous())
        n_crit, n_kept = (n[:, None] for n in self.budgets(rows))
        cls = torch.where(rank < n_crit, CRITICAL, torch.where(rank < n_kept, MARGINAL, 0))
        cls = torch.where(forced, CRITICAL, cls)
        return cls.masked_fill(cols[None, :] > rows[:, None], 0).to(torch.int8)

    def budgets(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For query blocks ``rows`` (n = i + 1 causal key blocks each): the critical budget
        ``max(1, ceil(critical n))`` and the critical-or-marginal one ``ceil((critical +
        marginal) n)``, float64 [len(rows)]."""
        n_causal = (rows + 1).double()
        n_crit = torch.ceil(n_causal * self.critical - 1e-9).clamp(min=1)
        return n_crit, torch.ceil(n_causal * (self.critical + self.marginal) - 1e-9)

    def class_shares(self, length: int) -> tuple[float, float]:
        """The fractions of the causal key blocks of a ``length``-token prefill that are critical
        (exact) and marginal: the counts ``classify`` gives every query block, which depend on
        the length alone (the forced diagonal and sinks rank first, so a row keeps
        ``max(critical budget, forced)`` critical blocks)."""
        rows = torch.arange(-(-length // self.block_size))
        n_crit, n_kept = self.budgets(rows)
        forced = 1 + rows.clamp(max=self.sink_blocks).double()
        critical = torch.maximum(n_crit, forced)
        marginal = (n_kept - critical).clamp(min=0)
        total = float((rows + 1).sum())
        return float(critical.sum()) / total, float(marginal.sum()) / total

    def pooled_queries(self, q: torch.Tensor, q_start: int, first: int, last: int) -> torch.Tensor:
        """[B, H, last - first + 1, D] float32: for query block i, the mean of the queries of
        block i - 1 (zeros for block 0, which has no earlier block), ``q`` holding the queries
        from position ``q_start`` on. The pooled query that ranks block i's key blocks."""
        block = self.block_size
        lo = max(first - 1, 0) * block - q_start
        q_bar = block_means(q[:, :, lo : last * block - q_start], block)  # blocks max(i-1,0)..
        if first == 0:
            q_bar = torch.cat([q_bar.new_zeros(*q.shape[:2], 1, q.shape[-1]), q_bar], dim=2)
        return q_bar

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        scale = call_scale(view, q.shape[-1])
        if state is None:
            state = SLAState(k[:, :, :0], v[:, :, :0], q[:, :, :0])
        _check_sla_state(state, q, k, v)
        start = state.k.shape[2]
        k_all, v_all = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        q_ctx = torch.cat([state.q, q], dim=2)
        q_start = start - state.q.shape[2]
        out = self._attend(q_ctx, k_all, v_all, q_start, start, scale, acc, view)
        end, block = k_all.shape[2], self.block_size
        keep = max(end // block - 1, 0) * block  # the previous block's start
        tail = q_ctx[:, :, max(keep - q_start, 0) :]
        return out.to(v.dtype), SLAState(k_all, v_all, tail)

    def _native(self, q_ctx, k, v, classes, points, q_start, start, scale, acc, view):
        """``_attend``'s outputs by the library's C++ kernel (``view.expansion``) for the expansion
        form in float32 accumulation, from the classes and points ``_attend`` computed and each
        row's nearest point; None where it does not run."""
        kernel = getattr(view, "expansion", None)
        if kernel is None or points is None or acc != torch.float32 or _has_map(view):
            return None
        block = self.block_size
        first = start // block
        rows = q_ctx[:, :, start - q_start :]
        owner = row_points(rows, points, start - first * block, block)
        return kernel(rows, k, v, classes, points, owner, start, first, block, scale)

    def _attend(self, q_ctx, k, v, q_start, start, scale, acc, view=None):
        """Outputs [B, H, T - start, Dv] (acc) of the queries at positions start..T - 1: by the
        C++ kernel where the view offers it and it runs (``_native``), else in PyTorch."""
        block, length = self.block_size, k.shape[2]
        batch, n_heads, _, dim = q_ctx.shape
        n_kv, dim_v = k.shape[1], v.shape[-1]
        if length == start:
            return q_ctx.new_zeros(batch, n_heads, 0, dim_v, dtype=acc)
        first, last = start // block, (length - 1) // block
        classes = self.classify(q_ctx, k, q_start, first, last, scale)  # [B, H, nsel, nk]
        points = None
        if self.feature == "expansion":
            points = expansion_points(q_ctx, q_start, first, last, block, self.n_points)
            out = self._native(q_ctx, k, v, classes, points, q_start, start, scale, acc, view)
            if out is not None:
                return out
        ka, va = k.to(acc), v.to(acc)
        proj = projection(view, n_kv, n_heads // n_kv, dim_v, acc)
        if points is not None:
            points, sums = points.to(acc), None
        else:
            phi_k = features(ka, self.feature, scale)  # [B, Hkv, T, F]
            kv_sums, k_sums = _block_states(phi_k, va, block)  # [B, Hkv, nk, F * Dv], [.., F]
            k_bar = _full_block_means(ka, block) if self.combine == "mass" else None
            sums = (kv_sums, k_sums, k_bar)
        outs = []
        for i in range(first, last + 1):
            lo, hi = max(start, i * block), min(length, (i + 1) * block)
            rows = q_ctx[:, :, lo - q_start : hi - q_start].to(acc)
            rows = rows.reshape(batch, n_kv, -1, hi - lo, dim)  # [B, Hkv, G, r, D]
            cls = classes[:, :, i - first].view(batch, n_kv, -1, classes.shape[-1])
            if sums is None:  # the expansion points of block i: [B, Hkv, G, c, D]
                block_sums = points[:, :, i - first].view(batch, n_kv, -1, self.n_points, dim)
            else:
                block_sums = sums
            outs.append(
                self._block_rows(
                    rows, ka[:, :, :hi], va[:, :, :hi], cls, lo, block_sums, scale, proj
                )
            )
        return torch.cat(outs, dim=3).reshape(batch, n_heads, length - start, dim_v)

    def _block_rows(self, rows, k, v, cls, lo, sums, scale, proj=None):
        """One query block's rows [B, Hkv, G, r, D] at positions lo..: exact weights on the
        critical keys, the marginal blocks' summed linear states (``sums``: per block
        ``phi(k)^T v``, ``phi(k)``, and the mean keys for ``combine="mass"``); ``proj``: the
        calibrated map of the marginal part (``projection``) or None."""
        block, hi = self.block_size, k.shape[2]
        k_c, v_c, tok = _critical_keys(k, v, cls, block)  # [B, Hkv, G, n, D], tok [.., n]
        scores = scale * (rows @ k_c.transpose(-1, -2))  # [B, Hkv, G, r, n]
        positions = torch.arange(lo, lo + rows.shape[3])[:, None]  # [r, 1]
        crit = (tok[..., None, :] <= positions) & (tok[..., None, :] < hi)  # causal, real keys
        top = scores.masked_fill(~crit, -math.inf).amax(-1, keepdim=True)  # [.., r, 1]
        marg = (cls == MARGINAL).to(rows.dtype)  # [B, Hkv, G, nk]
        if not bool(marg.any()):
            weights = torch.exp(scores - top).masked_fill(~crit, 0.0)
            return (weights @ v_c) / weights.sum(-1, keepdim=True)
        if self.feature == "expansion":  # sums: the expansion points [B, Hkv, G, c, D]
            n_prev = lo // block  # the complete blocks before this query block
            mu, v_hat = expand_blocks(rows, sums, k, v, block, n_prev, scale)
            off = (marg[..., :n_prev] == 0).repeat(1, 1, 1, self.n_points)  # point-major
            mu = mu.masked_fill(off[..., None, :], -math.inf)  # [.., r, c * n_prev]
            shift = torch.maximum(top, mu.amax(-1, keepdim=True))
            weights = torch.exp(scores - shift).masked_fill(~crit, 0.0)
            lin = torch.exp(mu - shift)
            mass = lin.sum(-1, keepdim=True)
            num = weights @ v_c + mapped(lin @ v_hat, mass, proj)
            return num / (weights.sum(-1, keepdim=True) + mass)
        kv_sums, k_sums, k_bar = sums
        feat, dim_v = k_sums.shape[-1], v.shape[-1]
        phi_q = features(rows, self.feature, scale)  # [B, Hkv, G, r, F]
        lin_num = phi_q @ (marg @ kv_sums).unflatten(-1, (feat, dim_v))  # [B, Hkv, G, r, Dv]
        lin_den = phi_q @ (marg @ k_sums)[..., None]  # [B, Hkv, G, r, 1]
        if self.combine == "shared":  # the linear weights in the units of exp(score)
            shift = top.clamp(min=0.0)
            weights = torch.exp(scores - shift).masked_fill(~crit, 0.0)
            lift = torch.exp(-shift)
            num = weights @ v_c + mapped(lift * lin_num, lift * lin_den, proj)
            return num / (weights.sum(-1, keepdim=True) + lift * lin_den)
        est = scale * (rows @ k_bar[:, :, None].transpose(-1, -2)) + math.log(
            block
        )  # [.., r, nfull]
        est = est.masked_fill(marg[..., None, : est.shape[-1]] == 0, -math.inf)
        lse = torch.logsumexp(est, -1, keepdim=True)  # the marginal mass, log, [.., r, 1]
        shift = torch.maximum(top, lse)
        weights = torch.exp(scores - shift).masked_fill(~crit, 0.0)
        mass = torch.exp(lse - shift)  # 0 for a head without marginal blocks
        average = torch.where(lin_den > 0, lin_num / lin_den, 0.0)
        num = weights @ v_c + mapped(mass * average, mass, proj)
        return num / (weights.sum(-1, keepdim=True) + mass)

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref``, element by element
        (``Rounding``); the classes are shared (float32 scores of the same values).

        An exact weight ``exp(s - m)``: the score, a dot over D scaled, is off by ``E = (gamma(D)
        + 2u) A`` (A the largest ``|scale| sum_d |q_d k_d|``), the subtraction by ``2uA``, the
        exp by eta. The shift m multiplies every weight of a row alike (the linear ones through
        ``exp(-m)``, off by eta), so it cancels in the ratio. A linear weight is summed as
        ``phi(q) . (sum over blocks of sum over keys of phi(k) v)``: each term within
        ``gamma(F + b + nk + 2)`` of its magnitude plus the features' own error (elu + 1:
        non-negative features, each off by eta, so ``2 eta + gamma(F + b + nk + 2)`` relative;
        Taylor: ``_taylor_rel``), then ``exp(-m)``: eta + u. The row's sums over at most T + 2
        terms: ``gamma(T + 2)``. ``combine="mass"``: the linear weights normalised alone (twice
        theirs, plus u) times the mass ``exp(lse - m)``, lse the logsumexp of the pooled-key
        scores (each off by ``(gamma(D) + gamma(b + 1) + 2u) A``: the dot and the block mean),
        off by ``3 (gamma(D) + gamma(b + 1) + 4u) A + 3 eta + gamma(nk + 2) + u (2 log(b nk + 1)
        + 3)`` (the shift by the largest estimate, the sum, the log and the final exp of a
        difference of magnitude at most ``2A + log(b nk)``).
        Numerator and denominator each off by ``rho`` relative per term
        make the ratio off by ``2 rho / (1 - rho) M + u M`` (M the weights' average of |v|):
        ``magnitude_bound`` with that relative error."""
        r = Rounding.of(q.dtype)
        dim, length = q.shape[-1], k.shape[2]
        scale = call_scale(view, dim)
        n_blocks = -(-length // self.block_size)
        a = abs(scale) * float(_grouped(q.double().abs(), k.double().abs()).max()) if length else 0
        rho_exact = (r.gamma(dim) + 4 * r.u) * a + r.eta + r.u
        sums = r.gamma(self.block_size + n_blocks + 2)
        if self.feature == "expansion":
            rho_lin = expansion_rel(q, k, self.block_size, self.n_points, scale, r, a)
            rho_lin += r.gamma(n_blocks + 2)
        elif self.feature == "elu":
            rho_lin = 2 * r.eta + r.gamma(dim) + sums
        else:
            rho_lin = _taylor_rel(q, k, scale, r, sums)
        if (
            self.combine == "mass" and self.feature != "expansion"
        ):  # the weights over the marginal keys normalised alone
            block = self.block_size
            rho_mass = 3 * (r.gamma(dim) + r.gamma(block + 1) + 4 * r.u) * a + 3 * r.eta
            rho_mass += r.gamma(n_blocks + 2) + r.u * (2 * math.log(block * n_blocks + 1) + 3)
            rho_lin = 2 * rho_lin + r.u + rho_mass
        rho = max(rho_exact, rho_lin + r.eta + 2 * r.u) + r.gamma(length + 2)
        if _has_map(view):  # N W^T + m b: Dv + 1 products summed, against |W|, |b|
            rho += r.gamma(v.shape[-1] + 2)
            cal = {name: t.abs() for name, t in view.calibration.items()}
            view = view._replace(calibration=cal)
        rho = 2 * rho / (1 - rho) + r.u if rho < 1 else math.inf
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass: the classes of every block pair, the weights of every pair
        materialised (exact, linear or 0), one normaliser per query."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        scale = call_scale(view, q.shape[-1])
        length, block = k.shape[2], self.block_size
        if length == 0:
            return q.new_zeros(*q.shape[:3], v.shape[-1])
        classes = self.classify(q, k, 0, 0, (length - 1) // block, scale)  # [B, H, nq, nk]
        tok = classes.repeat_interleave(block, -1).repeat_interleave(block, -2)
        tok = tok[..., :length, :length]  # [B, H, T, T]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        crit, marg = (tok == CRITICAL) & causal, (tok == MARGINAL) & causal
        scores = scale * _grouped(q, k)  # [B, H, T, T]
        shift = scores.masked_fill(~crit, -math.inf).amax(-1, keepdim=True).clamp(min=0.0)
        if self.feature == "expansion":
            logits = expansion_logits(q, k, block, self.n_points, scale)
            logits = logits.masked_fill(~marg, -math.inf)
            shift = torch.maximum(shift, logits.amax(-1, keepdim=True))
            linear = torch.exp(logits - shift)
        elif self.combine == "shared":
            kern = _grouped(features(q, self.feature, scale), features(k, self.feature, scale))
            linear = kern * torch.exp(-shift)
        else:  # kern normalised over the marginal keys, times their estimated mass
            kern = _grouped(features(q, self.feature, scale), features(k, self.feature, scale))
            kern = kern.masked_fill(~marg, 0.0)
            kern = kern / kern.sum(-1, keepdim=True).clamp(min=1e-300)
            linear = kern * torch.exp(self._marginal_lse(q, k, tok, scale) - shift)
        weights = torch.where(crit, torch.exp(scores - shift), linear)
        weights = weights.masked_fill(~(crit | marg), 0.0)
        den = weights.sum(-1, keepdim=True)
        proj = projection(view, k.shape[1], q.shape[1] // k.shape[1], v.shape[-1], torch.float64)
        if proj is None:
            return _grouped(weights, v.transpose(-1, -2)) / den  # [B, H, T, Dv]
        exact = weights.masked_fill(~crit, 0.0)
        linear = weights.masked_fill(~marg, 0.0)
        batch, n_kv, length_q = q.shape[0], k.shape[1], q.shape[2]
        lin = _grouped(linear, v.transpose(-1, -2)).view(batch, n_kv, -1, length_q, v.shape[-1])
        mass = linear.sum(-1, keepdim=True).view(batch, n_kv, -1, length_q, 1)
        num = _grouped(exact, v.transpose(-1, -2)) + mapped(lin, mass, proj).flatten(1, 2)
        return num / den

    def _marginal_lse(self, q, k, tok, scale):
        """[B, H, T, 1] float64: ``log sum_j block exp(scale q_t . mean(k_j))`` over query t's
        marginal blocks j (-inf without any): the estimate of their exp mass."""
        length, block = k.shape[2], self.block_size
        k_bar = _full_block_means(k, block)  # [B, Hkv, nfull, D]
        est = scale * _grouped(q, k_bar) + math.log(block)  # [B, H, T, nfull]
        cols = torch.arange(est.shape[-1]) * block
        marg = tok[..., cols] == MARGINAL  # [B, H, T, nfull]: each block by its first key
        marg &= cols <= torch.arange(length)[:, None]
        return torch.logsumexp(est.masked_fill(~marg, -math.inf), -1, keepdim=True)


_TAYLOR_F = 1 + _TAYLOR.features + _TAYLOR.features**2


PROJ_W, PROJ_B = "proj_w", "proj_b"  # the calibrated map of the marginal part


def _has_map(view: Any) -> bool:
    cal = getattr(view, "calibration", None) if view is not None else None
    return bool(cal) and (PROJ_W in cal or PROJ_B in cal)


def projection(view: Any, n_kv: int, group: int, dim_v: int, dtype: torch.dtype):
    """This layer's map of the marginal part from the view's calibration: (W [1, Hkv, G, Dv, Dv],
    b [1, Hkv, G, 1, Dv]) in ``dtype``, or None without one; ValueError on a tensor of the
    wrong shape or on one without its pair."""
    if not _has_map(view):
        return None
    w = layer_tensor(view, PROJ_W, "SLA", (n_kv, group, dim_v, dim_v))
    b = layer_tensor(view, PROJ_B, "SLA", (n_kv, group, dim_v))
    if w is None or b is None:
        raise ValueError(f"SLA calibration needs both {PROJ_W!r} and {PROJ_B!r}")
    return w.to(dtype)[None], b.to(dtype)[None, :, :, None]


def mapped(num: torch.Tensor, mass: torch.Tensor, proj) -> torch.Tensor:
    """The marginal numerator ``num`` [B, Hkv, G, r, Dv] (mass ``mass`` [.., r, 1]) under the
    calibrated map: ``num W^T + mass b``; ``num`` itself without one."""
    if proj is None:
        return num
    w, b = proj
    return num @ w.transpose(-1, -2) + mass * b


def _full_block_means(k: torch.Tensor, block: int) -> torch.Tensor:
    """[B, Hkv, n, D] means of the complete key blocks, in k's dtype."""
    batch, n_kv, length, dim = k.shape
    n = length // block
    return k[:, :, : n * block].view(batch, n_kv, n, block, dim).mean(3)


def _taylor_rel(q, k, scale: float, r: Rounding, sums: float) -> float:
    """The largest relative error of a Taylor linear weight ``1 + s + s^2 / 2`` over the causal
    pairs, float64. The projected ``x' = sqrt(scale) x P`` is off by ``gamma(D + 1) X``, X =
    ``sqrt(scale) |x| |P|``, so ``s = x' . y'`` by ``ds = gamma(D + 1) sum_i (X_i |y'_i| + |x'_i|
    Y_i)`` (first order, in exact arithmetic the rest), the kernel by ``(1 + c + ds / 2) ds`` (c
    = ``sum |x'_i y'_i|``); forming the features (two roundings) and the sums over F, a block and
    the blocks: ``(gamma(F) + sums + 6u)`` of the magnitude ``1 + c + c^2 / 2``."""
    proj = taylor_projection(_TAYLOR.seed, q.shape[-1], _TAYLOR.features)
    root = abs(scale) ** 0.5
    x, y = q.double() * root @ proj, k.double() * root @ proj
    xm, ym = q.double().abs() * root @ proj.abs(), k.double().abs() * root @ proj.abs()
    kern = _grouped(x, y)
    kern = 1 + kern + kern * kern / 2
    c = _grouped(x.abs(), y.abs())
    ds = r.gamma(q.shape[-1] + 1) * (_grouped(xm, y.abs()) + _grouped(x.abs(), ym))
    err = (1 + c + ds / 2) * ds + (r.gamma(_TAYLOR_F) + sums + 6 * r.u) * (1 + c + c * c / 2)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return float((err / kern).masked_fill(~causal, 0.0).max()) if kern.numel() else 0.0


def _grouped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y^T`` per query head: x [B, H, n, F], y [B, Hkv, m, F] -> [B, H, n, m]."""
    batch, n_heads, n, feat = x.shape
    rows = x.reshape(batch, y.shape[1], -1, feat)  # [B, Hkv, G * n, F]
    return (rows @ y.transpose(-1, -2)).view(batch, n_heads, n, -1)


def _critical_keys(k, v, cls, block: int):
    """The keys and values of each query head's critical blocks, gathered: [B, Hkv, G, n, D]
    with n = (critical blocks) x block, and their positions [B, Hkv, G, n] (past the last key
    in a partial block: masked by the caller). Every head of a query block has as many critical
    blocks (the budget's count, or the forced blocks where they exceed it)."""
    batch, n_kv, group, _ = cls.shape
    is_crit = cls == CRITICAL
    counts = is_crit.sum(-1)
    count = int(counts.flatten()[0])
    if not bool((counts == count).all()):  # the classification's invariant, checked
        raise RuntimeError(f"SLA: critical block counts differ across heads: {counts.unique()}")
    ranked = torch.argsort(is_crit.to(torch.int8), dim=-1, descending=True, stable=True)
    blocks = torch.sort(ranked[..., :count], dim=-1).values  # ascending: the diagonal last
    tok = (blocks[..., None] * block + torch.arange(block)).flatten(-2)  # [B, Hkv, G, n]
    index = tok.clamp(max=k.shape[2] - 1).flatten(2)[..., None]  # [B, Hkv, G * n, 1]
    k_c = torch.gather(k, 2, index.expand(-1, -1, -1, k.shape[-1]))
    v_c = torch.gather(v, 2, index.expand(-1, -1, -1, v.shape[-1]))
    shape = (batch, n_kv, group, tok.shape[-1])
    return k_c.view(*shape, -1), v_c.view(*shape, -1), tok


def _block_states(phi_k: torch.Tensor, v: torch.Tensor, block: int):
    """Per key block: ``sum phi(k)^T v`` [B, Hkv, nk, F * Dv] and ``sum phi(k)`` [B, Hkv, nk, F]
    (the last block over the keys it has)."""
    batch, n_kv, length, feat = phi_k.shape
    n = -(-length // block)
    pad = n * block - length
    phi = torch.nn.functional.pad(phi_k, (0, 0, 0, pad)).view(batch, n_kv, n, block, feat)
    vals = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(batch, n_kv, n, block, -1)
    kv = phi.transpose(-1, -2) @ vals  # [B, Hkv, n, F, Dv]
    return kv.flatten(-2), phi.sum(3)


def _check_sla_state(state: Any, q, k, v) -> None:
    """ValueError unless ``state`` is an ``SLAState`` that these tensors continue."""
    if not isinstance(state, SLAState):
        raise ValueError(f"SLA: cannot resume from a {type(state).__name__}, expected SLAState")
    for name, held, new in (("k", state.k, k), ("v", state.v, v), ("q", state.q, q)):
        if held.shape[:2] != new.shape[:2] or held.shape[3] != new.shape[3]:
            raise ValueError(
                f"SLA: state {name} is {tuple(held.shape)}, this call's {name} is "
                f"{tuple(new.shape)} (batch, heads and head dim must match)"
            )
