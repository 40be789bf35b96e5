"""The plan estimators that work in cache-sized chunks (block_topk's pooling and top-k, hip,
dhsa, proxy_attn, anchor_attention, sale) choose exactly the blocks of a straightforward reference of
the same arithmetic: every score matrix materialised, masks filled, a stable descending sort.
Small inputs, odd lengths, GQA, fewer queries than keys, padding, bf16; the chunk sizes are also
shrunk so that every chunked loop runs many times, with ragged ends. HiP runs with the library's
C++ key maxima and with its own PyTorch ones, SALE with the library's integer-margin kernel (where
the CPU has AVX-512 VNNI) and with its PyTorch margins."""

import math

import pytest
import torch

from longattn import from_string, prefill
from longattn.call import make_call
from longattn.kernels import int_margins, key_maxima
from longattn.methods import anchor_attention, dhsa, hip, proxy_attn, sale
from longattn.methods.block_topk import top_count, top_k_blocks
from longattn.prefill import _pool, make_view
from longattn.testing import make_qkv

BS = 16

# (batch, heads, kv heads, queries, keys, dim, dtype, left padding of batch row 1)
CASES = [
    (1, 4, 4, 256, 256, 16, torch.float32, 0),
    (2, 4, 2, 200, 200, 16, torch.float32, 0),
    (2, 6, 2, 130, 250, 8, torch.float32, 21),
    (1, 4, 2, 190, 190, 16, torch.bfloat16, 0),
]
SPECS = [
    "block_topk:block_size=16,budget=0.3",
    "hip:block_size=16,budget=0.25",
    "hip:block_size=16,budget=0.5,sink_blocks=0",
    "dhsa:block_size=16,chunk_size=8,budget=0.3",
    "dhsa:block_size=16,chunk_size=32,budget=0.5",
    "proxy_attn:block_size=16,budget=0.7,samples=4",
    "proxy_attn:block_size=16,budget=0.9,proxy_heads=2",
    "anchor_attention:block_size=16,theta=1",
    "anchor_attention:block_size=16,theta=3,budget=0.5",
    "sale:block_size=16,threshold=0.05",
    "sale:block_size=16,bits=4,threshold=0.2,budget=0.5",
]


def _view(case, method):
    batch, heads, n_kv, t_q, t_k, dim, dtype, pad = case
    q, k, v = make_qkv(batch, heads, n_kv, t_q, t_k, dim, dtype=dtype, seed=7)
    kv_pos = torch.arange(t_k).repeat(batch, 1)
    if pad:  # batch row 1 is left-padded: its first slots hold no token
        kv_pos[1] = torch.cat([torch.full((pad,), -1), torch.arange(t_k - pad)])
    call = make_call(q, k, v, method, q_positions=kv_pos[:, t_k - t_q :], kv_positions=kv_pos)
    return make_view(call)


# ---- the reference: the same arithmetic, materialised ----


def ref_top_count(scores, counts):
    """The first ``counts`` of a stable descending sort."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank_kept = torch.arange(scores.shape[-1]) < counts.unsqueeze(-1)
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    return chosen.scatter_(-1, order, rank_kept.expand_as(order))


def ref_top_k(scores, causal, fraction, forced=None):
    per_row = torch.ceil(causal.sum(-1).double() * fraction).long().clamp(min=1)
    scores = scores.masked_fill(~causal, -math.inf)
    if forced is not None:
        scores = scores.masked_fill(forced & causal, math.inf)
    return ref_top_count(scores, per_row.expand(scores.shape[:-1])) & causal


def ref_pool(x, block):
    t = x.shape[2]
    n = -(-t // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
    sums = padded.view(*x.shape[:2], n, block, x.shape[-1]).sum(dim=3)
    counts = torch.full((n,), float(block))
    counts[-1] = t - (n - 1) * block
    return sums / counts.view(1, 1, n, 1)


def ref_query_blocks(view):
    t_q, bs = view.q.shape[2], view.block_size
    n_q = -(-t_q // bs)
    q = torch.nn.functional.pad(view.q.float(), (0, 0, 0, n_q * bs - t_q))
    q_pos = torch.nn.functional.pad(view.q_pos, (0, n_q * bs - t_q), value=-1)
    return q.view(*q.shape[:2], n_q, bs, -1), q_pos.view(-1, n_q, bs)


def ref_gather_keys(k, idx):
    batch, n_kv, t_k, dim = k.shape
    heads = idx.shape[1]
    kv_head = torch.arange(heads) // (heads // n_kv)
    base = (torch.arange(batch).view(-1, 1) * n_kv + kv_head.view(1, -1)) * t_k
    flat = idx + base.view(batch, heads, *([1] * (idx.dim() - 2)))
    return k.reshape(-1, dim)[flat.reshape(-1)].float().view(*idx.shape, dim)


def ref_block_pool(x, block, fill, reduce):
    t_k = x.shape[-1]
    n_k = -(-t_k // block)
    padded = torch.nn.functional.pad(x, (0, n_k * block - t_k), value=fill)
    return reduce(padded.view(*x.shape[:-1], n_k, block), -1)


def ref_block_topk(view, method):
    qp = ref_pool(view.q, view.block_size)
    kp = ref_pool(view.k, view.block_size)
    kp = kp.repeat_interleave(view.q.shape[1] // kp.shape[1], dim=1)
    logits = (qp @ kp.transpose(-1, -2)) * view.scale
    logits = logits.masked_fill(~view.causal, -math.inf)
    return ref_top_k(logits, view.causal, method.budget, view.forced)


def ref_anchor_logits(view):
    bs, t_k = view.block_size, view.k.shape[2]
    q, q_pos = ref_query_blocks(view)
    diagonal = view.causal.long().cumsum(-1).argmax(-1)
    starts = torch.stack([torch.zeros_like(diagonal), diagonal - 1, diagonal], -1).clamp(min=0)
    idx = (starts.unsqueeze(-1) * bs + torch.arange(bs)).flatten(-2).clamp(max=t_k - 1)
    keys = ref_gather_keys(view.k, idx.expand(*q.shape[:2], *idx.shape))
    logits = (q @ keys.transpose(-1, -2)) * view.scale
    kp = view.kv_pos[:, idx]
    visible = (kp.unsqueeze(-2) <= q_pos.unsqueeze(-1)) & (kp.unsqueeze(-2) >= 0)
    visible = visible & (q_pos.unsqueeze(-1) >= 0)
    return logits.masked_fill(~visible.unsqueeze(1), -math.inf).amax(-1).flatten(2)


def ref_anchor(view, method):
    batch, heads, _, dim = view.q.shape
    anchor = ref_anchor_logits(view)
    q, q_pos = ref_query_blocks(view)
    valid = torch.isfinite(anchor).view(q.shape[:-1])
    n_valid = valid.sum(-1).clamp(min=1)
    block_anchor = anchor.view(valid.shape).masked_fill(~valid, 0.0).sum(-1) / n_valid
    pooled = (q * valid.unsqueeze(-1)).sum(-2) / n_valid.unsqueeze(-1)
    folded = pooled.view(batch, view.k.shape[1], -1, dim)
    stripes = (folded @ view.k.float().transpose(-1, -2)) * view.scale
    stripes = stripes.view(batch, heads, pooled.shape[2], -1)
    last = q_pos.amax(-1)
    seen = (view.kv_pos.unsqueeze(1) <= last.unsqueeze(-1)) & (view.kv_pos.unsqueeze(1) >= 0)
    stripes = stripes.masked_fill(~seen.unsqueeze(1), -math.inf)
    margin = ref_block_pool(stripes, view.block_size, -math.inf, torch.amax)
    margin = margin - block_anchor.unsqueeze(-1)
    return (margin >= -method.theta) & ref_top_k(margin, view.causal, method.budget)


def ref_hip_scores(view, q, q_pos, start, end):
    t_k = view.k.shape[2]
    lo, hi = start * view.block_size, (end * view.block_size).clamp(max=t_k)
    rep = ((lo + hi - 1) // 2).clamp(0, t_k - 1)
    logits = (q @ ref_gather_keys(view.k, rep).transpose(-1, -2)) * view.scale
    kv_pos = view.kv_pos.view(view.kv_pos.shape[0], 1, 1, -1).expand(*rep.shape[:3], -1)
    rep_pos = torch.gather(kv_pos, -1, rep).unsqueeze(-2)
    qp = q_pos.view(q_pos.shape[0], 1, *q_pos.shape[1:], 1)
    visible = (rep_pos <= qp) & (rep_pos >= 0) & (qp >= 0)
    best = logits.masked_fill(~visible, hip.UNSEEN).amax(-2)
    return best.masked_fill(end <= start, -math.inf)


def ref_hip_keep(scores, start, end, k_row, empty):
    width = scores.shape[-1] // 2
    chosen = ref_top_count(scores, k_row.view(1, 1, -1).expand(scores.shape[:-1]))
    slots = torch.sort((~chosen).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    used = torch.arange(width) < k_row.view(1, 1, -1, 1)
    empty = empty.view(1, 1, -1, 1)
    return (
        torch.where(used, torch.gather(start, -1, slots), empty),
        torch.where(used, torch.gather(end, -1, slots), empty),
    )


def ref_hip(view, method):
    q, q_pos = ref_query_blocks(view)
    batch, heads, n_q = q.shape[:3]
    causal = view.causal
    n_cand = causal.long().cumsum(-1).argmax(-1) + 1
    k_row = torch.ceil(causal.sum(-1).double() * method.budget).long().clamp(min=1)
    k_row = torch.minimum(k_row, n_cand)
    width = int(k_row.max())
    start, end = hip.initial_chunks(n_cand, k_row, width)
    start, end = start.expand(batch, heads, n_q, width), end.expand(batch, heads, n_q, width)
    while int((end - start).max()) > 1:
        mid = start + (end - start + 1) // 2
        start = torch.stack([start, mid], -1).flatten(-2)
        end = torch.stack([mid, end], -1).flatten(-2)
        scores = ref_hip_scores(view, q, q_pos, start, end)
        start, end = ref_hip_keep(scores, start, end, k_row, n_cand)
    n_k = causal.shape[1]
    found = (end - start == 1) & (start < n_k)
    layout = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.bool)
    layout.scatter_(-1, torch.where(found, start, n_k), True)
    return layout[..., :n_k] & causal


def ref_chunk_ids(k, n_chunks):
    n_cuts = min(n_chunks, k.shape[2]) - 1
    unit = torch.nn.functional.normalize(k.float(), dim=-1)
    cosine = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)
    cuts = torch.sort(cosine, dim=-1, stable=True).indices[..., :n_cuts] + 1
    starts = torch.zeros(k.shape[:3], dtype=torch.long)
    return starts.scatter_(-1, cuts, 1).cumsum(-1)


def ref_chunk_reps(x, ids, n_chunks):
    batch, heads, _, dim = x.shape
    sums = torch.zeros(batch, heads, n_chunks, dim)
    sums.scatter_add_(2, ids.unsqueeze(-1).expand(*ids.shape, dim), x.float())
    counts = torch.zeros(batch, heads, n_chunks).scatter_add_(2, ids, torch.ones(ids.shape))
    return sums / counts.clamp(min=1).sqrt().unsqueeze(-1)


def ref_spread(scores, lo, hi):
    """Step by step over each block's chunks."""
    best = torch.gather(scores, -1, lo)
    for step in range(1, int((hi - lo).max()) + 1):
        at = torch.gather(scores, -1, (lo + step).clamp(max=scores.shape[-1] - 1))
        best = torch.where(lo + step <= hi, torch.maximum(best, at), best)
    return best


def ref_dhsa(view, method):
    batch, heads, t_q, _ = view.q.shape
    n_kv, t_k = view.k.shape[1], view.k.shape[2]
    group, n = heads // n_kv, -(-t_k // method.chunk_size)
    ids = ref_chunk_ids(view.k, n)
    q_ids = ids[:, :, t_k - t_q :].repeat_interleave(group, dim=1)
    k_rep, q_rep = ref_chunk_reps(view.k, ids, n), ref_chunk_reps(view.q, q_ids, n)
    sim = q_rep.view(batch, n_kv, group * n, -1) @ k_rep.transpose(-1, -2)
    sim = sim.view(batch, heads, n, n) * view.scale
    tokens = torch.arange(t_k).expand_as(ids)
    first = torch.full((batch, n_kv, n), t_k).scatter_reduce_(-1, ids, tokens, "amin")
    last = torch.zeros_like(first).scatter_reduce_(-1, ids, tokens, "amax")
    future = (first.unsqueeze(-2) > last.unsqueeze(-1)).repeat_interleave(group, dim=1)
    sim = sim.masked_fill(future, -math.inf)
    q_first, q_last = method._block_ends(q_ids, view.block_size)
    k_first, k_last = method._block_ends(ids.repeat_interleave(group, dim=1), view.block_size)
    rows = ref_spread(sim.transpose(-1, -2), *(x.unsqueeze(-2).expand(-1, -1, n, -1)
                                               for x in (q_first, q_last)))  # fmt: skip
    n_q = rows.shape[-1]
    scores = ref_spread(rows.transpose(-1, -2), *(x.unsqueeze(-2).expand(-1, -1, n_q, -1)
                                                  for x in (k_first, k_last)))  # fmt: skip
    return ref_top_k(scores, view.causal, method.budget, view.forced)


def ref_proxy(view, method):
    q, q_pos = ref_query_blocks(view)
    n = min(method.samples, view.block_size)
    q_proxy, k_proxy = proxy_attn.proxy_heads(q[..., -n:, :], view.k, method.proxy_heads)
    logits = q_proxy @ k_proxy.unsqueeze(2).transpose(-1, -2)
    qp = q_pos[..., -n:][:, None, :, :, None]
    kp = view.kv_pos[:, None, None, None, :]
    visible = (kp <= qp) & (kp >= 0) & (qp >= 0)
    logits = (logits * view.scale).masked_fill(~visible, -math.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    scores = ref_block_pool(weights, view.block_size, 0.0, torch.sum).mean(-2)
    heads = view.q.shape[1]
    scores = scores.repeat_interleave(heads // method.proxy_heads, dim=1)
    fraction = method._head_fraction(view)
    per_row = view.causal.sum(-1).double()
    counts = torch.ceil(fraction.unsqueeze(-1) * per_row).long().clamp(min=1)
    return ref_top_count(scores.masked_fill(~view.causal, -math.inf), counts) & view.causal


def ref_sale(view, method):
    """Every pair's score from the quantised operands, ``((P k_scale) q_scale) scale - anchor``,
    masked by position and pooled to its block maximum."""
    bs, heads, t_q, t_k = view.block_size, view.q.shape[1], view.q.shape[2], view.k.shape[2]
    q_int, q_scale = sale.quantise_blocks(view.q, bs, method.bits)  # [B, H, nq, bs, D]
    k_int, k_scale = sale.quantise_blocks(view.k, bs, method.bits)  # [B, Hkv, nk, bs, D]
    group = heads // view.k.shape[1]
    q_deq = q_int.flatten(2, 3)[:, :, :t_q]
    k_ints = k_int.flatten(2, 3)[:, :, :t_k].repeat_interleave(group, 1)
    prod = q_deq @ k_ints.transpose(-1, -2)  # [B, H, Tq, Tk] exact integer products
    k_s = k_scale.repeat_interleave(bs, -1)[..., :t_k].repeat_interleave(group, 1)
    q_s = q_scale.repeat_interleave(bs, -1)[..., :t_q]
    anchor = ref_anchor_logits(view)[..., :t_q]
    rel = (prod * k_s.unsqueeze(-2)) * q_s.unsqueeze(-1) * view.scale - anchor.unsqueeze(-1)
    qp, kp = view.q_pos[:, None, :, None], view.kv_pos[:, None, None, :]
    rel = rel.masked_fill(~((kp <= qp) & (kp >= 0) & (qp >= 0)), -math.inf)
    margin = ref_block_pool(ref_block_pool(rel, bs, -math.inf, torch.amax).transpose(-1, -2), bs,
                            -math.inf, torch.amax).transpose(-1, -2)  # fmt: skip
    torch.testing.assert_close(method.margins(view), margin)
    return (margin >= math.log(method.threshold)) & ref_top_k(margin, view.causal, method.budget)


REFERENCES = {
    "block_topk": ref_block_topk,
    "hip": ref_hip,
    "dhsa": ref_dhsa,
    "proxy_attn": ref_proxy,
    "anchor_attention": ref_anchor,
    "sale": ref_sale,
}


@pytest.fixture(params=["default", "tiny"])
def chunks(request, monkeypatch):
    """The library's chunk sizes, or tiny ones: many chunks, the last one ragged."""
    if request.param == "tiny":
        monkeypatch.setattr(anchor_attention, "CHUNK_ELEMENTS", 700)
        monkeypatch.setattr(hip, "CHUNK_ELEMENTS", 700)
        monkeypatch.setattr(hip, "GROUP_ELEMENTS", 64)  # a group per query block or two
        monkeypatch.setattr(hip, "RUN_ROWS", 3)
        monkeypatch.setattr(proxy_attn, "SCORE_CHUNK_ELEMENTS", 700)
        monkeypatch.setattr(sale, "SCORE_CHUNK_ELEMENTS", 700)
        monkeypatch.setattr(dhsa, "COSINE_ROWS", 7)
    return request.param


@pytest.fixture(params=["native", "torch"])
def maxima(request, monkeypatch):
    """HiP's key maxima by the library's C++ kernel (which must run), or by its PyTorch path."""
    if request.param == "native":
        assert key_maxima.unavailable(torch.zeros(1, 1, 1, 4)) is None
    else:
        monkeypatch.setattr(key_maxima, "unavailable", lambda k: "disabled (test)")
    return request.param


CASE_IDS = lambda c: f"{c[0]}x{c[1]}/{c[2]}x{c[3]}/{c[4]}-{c[6]}"  # noqa: E731


@pytest.fixture(params=["native", "torch"])
def margins(request, monkeypatch):
    """SALE's margins by the library's C++ kernel (skipped on a CPU without AVX-512 VNNI), or by
    its PyTorch path."""
    if request.param == "native":
        reason = int_margins.unavailable(torch.zeros(1, 1, 1, 4))
        if reason is not None:
            pytest.skip(reason)
    else:
        monkeypatch.setattr(int_margins, "unavailable", lambda q: "disabled (test)")
    return request.param


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith(("hip", "sale"))])
def test_plan_equals_the_materialised_reference(spec, case, chunks):
    _check_plan(spec, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith("sale")])
def test_sale_plan_equals_the_materialised_reference(spec, case, chunks, margins):
    _check_plan(spec, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith("hip")])
def test_hip_plan_equals_the_materialised_reference(spec, case, chunks, maxima):
    _check_plan(spec, case)


def _check_plan(spec, case):
    method = from_string(spec)
    view = _view(case, method)
    chosen = method.plan(view)
    expected = REFERENCES[method.name](view, method)
    assert chosen.any() and not chosen.all()
    assert torch.equal(chosen, expected)


def test_hip_ranking_keys_order_as_a_stable_descending_sort():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randint(-2, 3, (4, 30), generator=gen).float()  # many ties
    scores[0, :4] = torch.tensor([0.0, -0.0, hip.UNSEEN, -math.inf])
    scores[1, 3:9] = -0.0
    start = torch.randperm(30, generator=gen).expand(4, -1)  # the chunks in any slot order
    order = torch.argsort(hip.ranking_keys(scores, start), dim=-1, descending=True)
    by_start = torch.argsort(start, dim=-1)  # the chunks in block order
    ranked = torch.sort(scores.gather(-1, by_start), dim=-1, descending=True, stable=True)
    assert torch.equal(order, by_start.gather(-1, ranked.indices))


def test_hip_keep_best_is_the_stable_top_count():
    gen = torch.Generator().manual_seed(8)
    scores = torch.randint(0, 4, (6, 12), generator=gen).float()  # many ties
    start = torch.arange(12).expand(6, -1) * 2  # block order
    k_row = torch.tensor([1, 2, 3, 4, 5, 6])
    kept = hip.keep_best(scores, start, start + 1, k_row, torch.full((6,), 99))
    chosen = ref_top_count(scores, k_row)
    for row in range(6):
        real = kept[0][row] != 99  # the slots in any order, the unused ones empty
        assert sorted(kept[0][row][real].tolist()) == start[row][chosen[row]].tolist()
        assert torch.equal(kept[1][row][real], kept[0][row][real] + 1)
        assert torch.equal(kept[2][row][real], scores[row, kept[0][row][real] // 2])
        assert (kept[1][row][~real] == 99).all() and (kept[2][row][~real] == -math.inf).all()


def test_top_count_is_the_head_of_a_stable_sort():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (3, 5, 40), generator=gen).float()  # many ties
    scores[0, 0, :10] = -math.inf
    scores[1, 1, 5:9] = math.inf
    counts = torch.randint(1, 41, (3, 5), generator=gen)
    chosen = top_count(scores, counts)
    assert torch.equal(chosen.sum(-1), counts)
    assert torch.equal(chosen, ref_top_count(scores, counts))


def test_top_k_blocks_equals_the_stable_sort_with_forced_blocks():
    gen = torch.Generator().manual_seed(4)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    forced = torch.eye(12, dtype=torch.bool) | (torch.arange(12) == 0)
    scores = torch.randint(0, 3, (2, 3, 12, 12), generator=gen).float()
    for fraction in (0.05, 0.3, 0.5, 1.0):
        expected = ref_top_k(scores, causal, fraction, forced)
        assert torch.equal(top_k_blocks(scores, causal, fraction, forced), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [128, 130, 15])
@pytest.mark.parametrize("chunk", [1 << 18, 300])
def test_pool_equals_the_padded_mean(length, dtype, chunk, monkeypatch):
    monkeypatch.setattr(prefill, "POOL_CHUNK", chunk)  # 300: one block widened at a time
    x = torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    torch.testing.assert_close(_pool(x, 16), ref_pool(x, 16), rtol=0, atol=1e-6)
    full = length // 16
    assert torch.equal(_pool(x, 16)[:, :, :full], ref_pool(x, 16)[:, :, :full])
