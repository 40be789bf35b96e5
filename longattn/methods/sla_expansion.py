"""SLA's ``feature="expansion"``: each marginal key block estimated by the first-order expansion of
its exact attention around a few expansion points, the k-means centres of the previous query
block's queries; the forward form (``expansion_points``, ``expand_blocks``), the float64 form of
the reference (``expansion_logits``) and the rounding of a weight (``expansion_rel``)."""

from __future__ import annotations

import math

import torch

from longattn.methods.latte import Rounding, abs_scores

KMEANS_STEPS = 4  # Lloyd steps from evenly spaced queries


def nearest(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """int64 [..., r]: for rows x [..., r, D], the index of the nearest of points [..., c, D]
    (ties to the lower index), by ``|p|^2 - 2 x . p`` in float64 on the float32-rounded values:
    every product is exact and a sum's rounding (~1e-14 relative) cannot reorder points unless
    they are that close, so every call shape and dtype choose alike."""
    return _nearest64(x.float().double(), points.float().double())


def _nearest64(rows: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``nearest`` on float64 tensors that hold float32 values (no conversion); ``2 * (x . p)``
    equals ``(2 x) . p`` exactly, without a doubled copy of the rows."""
    return ((pts * pts).sum(-1)[..., None, :] - 2 * (rows @ pts.transpose(-1, -2))).argmin(-1)


def expansion_points(
    q: torch.Tensor, q_start: int, first: int, last: int, block: int, n_points: int
) -> torch.Tensor:
    """[B, H, last - first + 1, n_points, D] float32: for query block i, the k-means centres of
    the queries of block i - 1 (``KMEANS_STEPS`` Lloyd steps from its evenly spaced queries; a
    centre that loses every query stays where it is); zeros for block 0, which has no earlier
    block. ``q`` holds the queries from position ``q_start`` (a block start at or before block
    ``max(first - 1, 0)``). From the float32-rounded inputs, the sums in float64 (exact but
    for extreme spreads of magnitude), rounded to float32: every call shape, dtype and the
    float64 reference find the same centres."""
    lo = max(first - 1, 0) * block - q_start
    x = q[:, :, lo : last * block - q_start].float().double().unflatten(2, (-1, block))
    start = torch.linspace(0, block - 1, n_points).round().long()
    points = x[:, :, :, start]  # [B, H, n, c, D]
    for _ in range(KMEANS_STEPS):
        owner = _nearest64(x, points)  # [B, H, n, b]
        member = (owner[..., None] == torch.arange(n_points)).double()  # [B, H, n, b, c]
        count = member.sum(3)[..., None]  # [B, H, n, c, 1]
        total = member.transpose(-1, -2) @ x  # [B, H, n, c, D]
        points = torch.where(count > 0, (total / count.clamp(min=1.0)).float().double(), points)
    points = points.float()
    if first == 0:
        points = torch.cat([points.new_zeros(*points.shape[:2], 1, *points.shape[3:]), points], 2)
    return points


def row_points(rows: torch.Tensor, points: torch.Tensor, lead: int, block: int) -> torch.Tensor:
    """int64 [B, H, T]: for rows [B, H, T, D] whose first is row ``lead`` of the first of the
    query blocks of ``points`` [B, H, n, c, D], each row's nearest point of its block (``nearest``,
    the choice ``expand_blocks`` makes)."""
    batch, n_heads, length, dim = rows.shape
    n = points.shape[2]
    x = torch.nn.functional.pad(rows.float(), (0, 0, lead, n * block - lead - length))
    owner = nearest(x.view(batch, n_heads, n, block, dim), points).flatten(2)
    return owner[..., lead : lead + length]


def expand_blocks(rows, points, k, v, block: int, n: int, scale: float):
    """The first-order expansion of the complete key blocks 0..n-1 for query rows [B, Hkv, G, r,
    D], each row around its nearest of ``points`` [B, Hkv, G, c, D]: around point a, with ``P_s =
    softmax_s(scale a . k_s)`` over block j's keys, the log mass ``mu = logsumexp_s(scale a . k_s)
    + scale (q_t - a) . sum_s P_s k_s`` (exact at q_t = a, its gradient there, and below the
    exact log mass elsewhere by convexity) and the average ``v_hat = sum_s P_s v_s``.

    Returns the log masses [B, Hkv, G, r, c * n] (-inf for the points a row is not nearest to)
    and the averages [B, Hkv, G, c * n, Dv], ordered point-major."""
    batch, n_kv, _, dim = k.shape
    keys = k[:, :, : n * block].reshape(batch, n_kv, n, block, dim)
    vals = v[:, :, : n * block].reshape(batch, n_kv, n, block, v.shape[-1])
    logits = scale * torch.einsum("bhgcd,bhnjd->bhgcnj", points, keys)  # [B, Hkv, G, c, n, b]
    top = logits.amax(-1, keepdim=True)
    w = torch.exp(logits - top)
    z = w.sum(-1)  # [B, Hkv, G, c, n]
    k_hat = torch.einsum("bhgcnj,bhnjd->bhgcnd", w, keys) / z[..., None]
    v_hat = torch.einsum("bhgcnj,bhnjd->bhgcnd", w, vals) / z[..., None]
    # scale (q_t - a) . k_hat = scale q_t . k_hat - scale a . k_hat: one product per row
    base = torch.log(z) + top[..., 0] - scale * (points[..., None, :] * k_hat).sum(-1)
    mu = scale * (rows @ k_hat.flatten(3, 4).transpose(-1, -2)) + base.flatten(-2)[..., None, :]
    mine = nearest(rows, points)[..., None] == torch.arange(points.shape[3])  # [B,Hkv,G,r,c]
    off = ~mine.repeat_interleave(n, -1)  # point-major, as mu's columns
    return mu.masked_fill(off, -math.inf), v_hat.flatten(3, 4)


def assigned_points(q: torch.Tensor, block: int, n_points: int):
    """Float64: the expansion points of every query block [B, H, nq, c, D] and each query's
    nearest one [B, H, T, D] (the choice ``expand_blocks`` makes)."""
    length = q.shape[2]
    points = expansion_points(q, 0, 0, (length - 1) // block, block, n_points)
    per_query = points[:, :, torch.arange(length) // block]  # [B, H, T, c, D]
    index = nearest(q[..., None, :], per_query)  # [B, H, T, 1]
    anchor = torch.gather(per_query, 3, index[..., None].expand(*index.shape, q.shape[-1]))
    return points.double(), anchor[:, :, :, 0].double()


def expansion_logits(q, k, block: int, n_points: int, scale: float) -> torch.Tensor:
    """[B, H, T, T] float64: the log of the expansion's weight on key s for query t, ``scale a .
    k_s + scale (q_t - a) . k_hat_j`` (a: t's nearest expansion point; k_hat_j: the mean key of
    s's block j weighted by ``softmax_s(scale a . k_s)``), i.e. the block's log mass plus ``log
    P_s``. Meaningful on the complete blocks before t's block (the only ones that can be
    marginal); -inf on the keys of a last, partial block."""
    length = k.shape[2]
    n_full, group = length // block, q.shape[1] // k.shape[1]
    _, anchor = assigned_points(q, block, n_points)  # [B, H, T, D]
    keys = k.repeat_interleave(group, 1)  # [B, H, T, D]
    out = scale * anchor @ keys.transpose(-1, -2)  # [B, H, T, T]
    probs = torch.softmax(out[..., : n_full * block].unflatten(-1, (n_full, block)), -1)
    k_hat = torch.einsum("bhtnj,bhnjd->bhtnd", probs, keys[:, :, : n_full * block].unflatten(
        2, (n_full, block)))  # fmt: skip
    corr = scale * torch.einsum("bhtd,bhtnd->bhtn", q - anchor, k_hat)
    out[..., : n_full * block] += corr.repeat_interleave(block, -1)
    out[..., n_full * block :] = -math.inf
    return out


def expansion_rel(q, k, block: int, n_points: int, scale: float, r: Rounding, a: float) -> float:
    """The relative error of an expansion weight ``exp(mu - m) P_s`` (``expand_blocks``). With
    A' the largest ``|scale| sum_d |a_d k_d|`` over the expansion points a and B the largest
    ``|scale| sum_d |(q_t - a)_d k_d|`` (a the query's point): a logit ``scale a . k`` is off by
    ``E = (gamma(D) + 2u) A'``; ``exp(logit - max)`` by ``w = 2E + 2uA' + eta``; a block's sums
    of ``w k`` and ``w v`` divided by ``z = sum w`` by ``p = 2w + 2 gamma(b) + u`` of ``sum P |k|``
    (``|v|``); ``scale (q - a) . k_hat``, formed as ``scale q . k_hat - scale a . k_hat``, by ``(p
    + gamma(D) + 2u) (a + A')`` (``a`` the largest ``|scale| sum_d |q_d k_d|``; ``|k_hat_d| <=
    sum P |k_d|``); ``log z`` by ``w + gamma(b) + u log b`` (first order), the max by E, their
    three additions by ``3u (log b + A' + B + a)``, the subtraction of the row's shift (at most
    the largest score or mu) by ``u (log b + 2 A' + B + a)``, the exp by eta. The average
    ``v_hat`` adds p."""
    dim = q.shape[-1]
    length, n_kv = k.shape[2], k.shape[1]
    if length == 0:
        return 0.0
    points, anchor = assigned_points(q, block, n_points)
    rows = lambda x: x.reshape(x.shape[0], n_kv, -1, dim)  # noqa: E731
    a_point = abs_scores(rows(points.flatten(2, 3)), k.double(), scale)
    b_delta = abs_scores(rows(q.double() - anchor), k.double(), scale)
    e_logit = (r.gamma(dim) + 2 * r.u) * a_point
    w = 2 * e_logit + 2 * r.u * a_point + r.eta
    p = 2 * w + 2 * r.gamma(block) + r.u
    e_mu = e_logit + (p + r.gamma(dim) + 2 * r.u) * (a + a_point) + w + r.gamma(block)
    e_mu += r.u * (4 * math.log(block) + 5 * a_point + 4 * (b_delta + a))
    return e_mu + r.eta + p
