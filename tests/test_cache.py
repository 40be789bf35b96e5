"""KVCache: growth, positions, per-row lengths, eviction, page metadata, bad input, cache-aware attention."""

import pytest
import torch

from longattn import KVCache, attention, methods
from longattn.testing import assert_attention_close, make_qkv


def _kv(batch=2, heads=2, length=40, dim=8, seed=0, dtype=torch.float32):
    _, k, v = make_qkv(batch, heads, heads, 1, length, dim, seed=seed, dtype=dtype)
    return k, v


def _snapshot(cache, layer=0):
    if cache.seq_len(layer) == 0:
        return None
    return (
        cache.keys(layer).clone(),
        cache.values(layer).clone(),
        cache.positions(layer).clone(),
        cache.n_seen(layer),
        cache.capacity(layer),
    )


def _same(a, b):
    if a is None or b is None:
        return a is b
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_append_in_pieces_keeps_every_token_once_in_order():
    k, v = _kv(length=300)
    cache = KVCache(1, page_size=16, initial_capacity=32)
    caps = []
    for lo, hi in [(0, 1), (1, 7), (7, 100), (100, 101), (101, 300)]:
        cache.append(0, k[:, :, lo:hi], v[:, :, lo:hi])
        caps.append(cache.capacity(0))
    assert torch.equal(cache.keys(0), k) and torch.equal(cache.values(0), v)
    assert torch.equal(cache.positions(0), torch.arange(300).expand(2, -1))
    assert cache.n_seen(0) == cache.seq_len(0) == 300
    # amortised doubling: capacities are page multiples and at least double when they grow
    assert all(c % 16 == 0 for c in caps)
    grows = [(a, b) for a, b in zip(caps, caps[1:]) if b != a]
    assert all(b >= 2 * a for a, b in grows)


def test_one_token_steps_reallocate_logarithmically():
    k, v = _kv(length=1000, batch=1)
    cache = KVCache(1, initial_capacity=16)
    seen = set()
    for t in range(1000):
        cache.append(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
        seen.add(cache.capacity(0))
    assert len(seen) <= 8
    assert torch.equal(cache.keys(0), k)


def test_page_metadata_matches_a_recomputation():
    k, v = _kv(length=75, batch=2)
    cache = KVCache(1, page_size=16, initial_capacity=16)
    for lo in range(0, 75, 7):
        cache.append(0, k[:, :, lo : lo + 7], v[:, :, lo : lo + 7])
    view = cache.select_view(0, torch.tensor([[74]]), 1.0)
    pages = torch.nn.functional.pad(k, (0, 0, 0, 5), value=float("nan")).view(2, 2, 5, 16, 8)
    high, low = pages.nan_to_num(-torch.inf).amax(3), pages.nan_to_num(torch.inf).amin(3)
    # bfloat16 bounds rounded outward: they still bound the keys, within one bf16 step
    assert view.page_max.dtype == view.page_min.dtype == torch.bfloat16
    assert bool((view.page_max.float() >= high).all()) and bool(
        (view.page_min.float() <= low).all()
    )
    torch.testing.assert_close(view.page_max.float(), high, rtol=2**-7, atol=0)
    torch.testing.assert_close(view.page_min.float(), low, rtol=2**-7, atol=0)
    torch.testing.assert_close(view.page_sum, pages.nan_to_num(0.0).sum(3))
    assert view.page_count[0].tolist() == [16, 16, 16, 16, 11]


def test_projected_keys_stay_current():
    k, v = _kv(length=50)
    cache = KVCache(1, page_size=16, initial_capacity=16)
    cache.append(0, k[:, :, :20], v[:, :, :20])
    proj = torch.randn(2, 8, 3)
    cache.projected_keys(0, "p", proj)
    cache.append(0, k[:, :, 20:], v[:, :, 20:])
    low = cache.projected_keys(0, "p", proj)
    assert low.dtype == torch.bfloat16  # float32 keys: kept in bf16, rounded once from fp32
    torch.testing.assert_close(low, (k @ proj).bfloat16(), rtol=0, atol=0)
    cache64 = KVCache(1)
    cache64.append(0, k.double(), v.double())
    torch.testing.assert_close(cache64.projected_keys(0, "p", proj), k.double() @ proj.double())


def test_explicit_positions_padding_and_per_row_lengths():
    k, v = _kv(length=6)
    cache = KVCache(1)
    pos = torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    cache.append(0, k, v, pos)
    cache.append(0, k[:, :, :1], v[:, :, :1])  # default: each row continues after its last position
    assert cache.positions(0)[:, -1].tolist() == [4, 6]
    cache.evict(0, torch.tensor([[True] * 7, [True, False, True, False, True, True, True]]))
    assert cache.row_lengths(0).tolist() == [5, 5]  # the padding slots of row 0 are dropped
    assert cache.positions(0).tolist() == [[0, 1, 2, 3, 4], [0, 2, 4, 5, 6]]
    cache.evict(0, torch.tensor([[True, True, True, True, True], [False, False, True, True, True]]))
    assert cache.positions(0).tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, -1, -1]]
    cache.append(0, k[:, :, :1], v[:, :, :1])
    assert cache.positions(0).tolist() == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, -1, -1]]
    assert torch.equal(cache.keys(0)[1, :, 3], k[1, :, 0])


def test_evict_keeps_order_and_values():
    k, v = _kv(length=64)
    cache = KVCache(1)
    cache.append(0, k, v)
    keep = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) > 0.5
    cache.evict(0, keep)
    for b in range(2):
        n = int(keep[b].sum())
        assert torch.equal(cache.positions(0)[b, :n], keep[b].nonzero().flatten())
        assert torch.equal(cache.keys(0)[b, :, :n], k[b][:, keep[b]])
        assert torch.equal(cache.values(0)[b, :, :n], v[b][:, keep[b]])
    assert cache.n_seen(0) == 64


@pytest.mark.parametrize(
    "bad",
    [
        lambda c, k, v: c.append(0, k[:, :1], v[:, :1]),  # heads
        lambda c, k, v: c.append(0, k[..., :4], v[..., :4]),  # head dim
        lambda c, k, v: c.append(0, k.double(), v.double()),  # dtype
        lambda c, k, v: c.append(0, k, v[:, :, :3]),  # k/v mismatch
        lambda c, k, v: c.append(0, k[:, :, :2], v[:, :, :2], torch.tensor([3, 2])),  # decreasing
        lambda c, k, v: c.append(0, k[:, :, :2], v[:, :, :2], torch.tensor([5, 6])),  # reused
        lambda c, k, v: c.append(0, k[:, :, :2], v[:, :, :2], torch.tensor([0.0, 1.0])),
        lambda c, k, v: c.append(3, k, v),  # layer out of range
        lambda c, k, v: c.evict(0, torch.ones(2, 5, dtype=torch.bool)),  # wrong shape
        lambda c, k, v: c.evict(0, torch.ones(2, 10)),  # not bool
        lambda c, k, v: c.drop_positions(0, torch.tensor([3, 99])),  # not in the cache
        lambda c, k, v: attention(  # q/k batch mismatch through the API
            torch.randn(1, 4, 1, 8), k[:, :, :1], v[:, :, :1], cache=c
        ),
        lambda c, k, v: attention(torch.randn(2, 4, 1, 8), k[:, :1, :1], v[:, :1, :1], cache=c),
        lambda c, k, v: attention(  # two queries, one token, no positions
            torch.randn(2, 4, 2, 8), k[:, :, :1], v[:, :, :1], cache=c
        ),
    ],
)
def test_bad_input_leaves_the_cache_unchanged(bad):
    k, v = _kv(length=10)
    cache = KVCache(2)
    cache.append(0, k, v)
    before = _snapshot(cache)
    with pytest.raises((ValueError, TypeError)):
        bad(cache, k, v)
    assert _same(before, _snapshot(cache))
    assert cache.seq_len(1) == 0


def test_drop_positions():
    k, v = _kv(length=10)
    cache = KVCache(1)
    cache.append(0, k, v)
    cache.drop_positions(0, torch.tensor([0, 5]))
    assert cache.positions(0)[0].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_then_decode_equals_one_pass(dtype):
    q, k, v = make_qkv(2, 8, 2, 120, 120, 32, dtype=dtype, seed=4)
    cache = KVCache(1, page_size=16, initial_capacity=16)
    outs = []
    for lo, hi in [(0, 50), (50, 100), (100, 103)] + [(t, t + 1) for t in range(103, 120)]:
        sl = slice(lo, hi)
        outs.append(attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], cache=cache).out)
    assert_attention_close(torch.cat(outs, dim=2), q, k, v)


@pytest.mark.parametrize(
    "method",
    [methods.StreamingLLM(sinks=4, window=16), methods.SlidingWindow(window=20)],
    ids=lambda m: m.describe(),
)
def test_eviction_equals_masking(method):
    q, k, v = make_qkv(1, 4, 2, 90, 90, 16, seed=5, dtype=torch.float64)
    cache = KVCache(1)
    for lo in range(0, 90, 5):
        sl = slice(lo, lo + 5)
        res = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], method=method, cache=cache)
        full = attention(
            q[:, :, sl],
            k[:, :, : lo + 5],
            v[:, :, : lo + 5],
            method=method,
            q_positions=torch.arange(lo, lo + 5),
            kv_positions=torch.arange(lo + 5),
        )
        torch.testing.assert_close(res.out, full.out)
        kept = torch.arange(lo + 5)[
            method.retain(torch.arange(lo + 5), torch.tensor([[lo + 4]]))[0]
        ]
        held = cache.positions(0)[0]
        dead = held[~torch.isin(held, kept)]  # dropped by retain, evicted once they fill a page
        assert torch.isin(kept, held).all() and len(dead) < cache.page_size
        assert held.tolist() == sorted(held.tolist()) and int(held.max()) == lo + 4


def test_retention_evicts_a_page_of_dead_keys_at_once():
    """A one-token stream under StreamingLLM: the layer compacts once every ``page_size`` steps,
    holding what it retains plus fewer than a page of dead keys."""
    q, k, v = make_qkv(1, 2, 2, 80, 80, 8, seed=2)
    for positions in ("original", "cache"):
        method = methods.StreamingLLM(sinks=4, window=16, positions=positions)
        cache = KVCache(1, page_size=16)
        held = []
        for t in range(80):
            attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], method=method,
                      cache=cache)  # fmt: skip
            held.append(cache.seq_len(0))
        # retained after a call: 4 sinks + the 15 keys the next query sees besides its own
        assert max(held) == 4 + 15 + 15
        assert min(held[40:]) == 4 + 15  # right after a compaction


def test_reset():
    k, v = _kv()
    cache = KVCache(2)
    cache.append(1, k, v)
    cache.state["x"] = 1
    cache.reset()
    assert cache.seq_len(1) == 0 and cache.state == {}


def test_nbytes_counts_the_held_keys_and_values():
    cache = KVCache(2)
    k = torch.randn(1, 2, 40, 8)
    cache.append(0, k, k)
    assert cache.nbytes() == 2 * 2 * 40 * 8 * 4
    cache.evict(0, torch.arange(40).view(1, -1) >= 30)
    assert cache.nbytes() == 2 * 2 * 10 * 8 * 4


def test_dense_layer_tracking():
    cache = KVCache(1)
    k = torch.randn(2, 2, 5, 8)
    assert cache.is_dense(0)
    cache.append(0, k, k)
    assert cache.is_dense(0)
    cache.append(0, k[:, :, :2], k[:, :, :2], torch.tensor([5, 6]))  # explicit, but continuing
    assert cache.is_dense(0)
    assert cache.positions(0).tolist() == [list(range(7))] * 2
    cache.append(0, k[:, :, :1], k[:, :, :1], torch.tensor([9]))  # a gap
    assert not cache.is_dense(0)

    padded = KVCache(1)
    padded.append(0, k, k, torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]]))
    assert not padded.is_dense(0)

    evicted = KVCache(1)
    evicted.append(0, k, k)
    evicted.drop_positions(0, torch.tensor([0]))
    assert not evicted.is_dense(0)


def test_dense_fast_path_matches_explicit_positions():
    q, k, v = make_qkv(2, 4, 2, 3, 40, 16, seed=3)
    fast, slow = KVCache(1), KVCache(1)
    fast.append(0, k[:, :, :30], v[:, :, :30])
    slow.append(0, k[:, :, :30], v[:, :, :30], torch.arange(30))
    for t in range(30, 40, 3):
        sl = slice(t, min(t + 3, 40))
        kn, vn, qn = k[:, :, sl], v[:, :, sl], q[:, :, -(sl.stop - t) :]
        pos = torch.arange(t, sl.stop)
        a = attention(qn, kn, vn, cache=fast, layer=0)
        b = attention(qn, kn, vn, cache=slow, layer=0, q_positions=pos, kv_positions=pos)
        torch.testing.assert_close(a.out, b.out)
        torch.testing.assert_close(a.lse, b.lse)
    assert fast.is_dense(0)
    assert torch.equal(fast.positions(0), slow.positions(0))
    assert torch.equal(fast.keys(0), slow.keys(0))


def test_dense_fast_path_refuses_before_appending():
    cache = KVCache(1)
    k = torch.randn(1, 2, 4, 8)
    cache.append(0, k, k)
    with pytest.raises(ValueError, match="only 1 tokens"):
        attention(torch.randn(1, 2, 2, 8), k[:, :, :1], k[:, :, :1], cache=cache, layer=0)
    with pytest.raises(ValueError, match="Hkv"):
        attention(
            torch.randn(1, 2, 1, 8),
            torch.randn(1, 1, 1, 8),
            torch.randn(1, 1, 1, 8),
            cache=cache,
            layer=0,
        )
    assert cache.seq_len(0) == 4 and cache.n_seen(0) == 4 and cache.is_dense(0)


def _streaming_cache(positions_list):
    """A one-row cache layer past its first eviction under StreamingLLM(sinks=2, window=8)."""
    gen = torch.Generator().manual_seed(7)
    cache, method = KVCache(1, page_size=4), methods.StreamingLLM(sinks=2, window=8)
    for p in positions_list:
        q, k, v = (torch.randn(1, h, 1, 16, generator=gen) for h in (4, 2, 2))
        pos = torch.tensor([[p]])
        attention(q, k, v, method=method, cache=cache, q_positions=pos, kv_positions=pos)
    return cache, method


def test_decode_step_equals_the_general_path_and_refuses_alike():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 1, 16, generator=gen) for h in (4, 2, 2))
    fast, method = _streaming_cache(range(20))
    slow, _ = _streaming_cache(range(20))
    assert not fast.is_dense(0) and fast.seq_len(0) < 20  # evicted: not the dense path
    pos = torch.tensor([[20]])
    # the same tensor for both: the one-token step path; two tensors: the general path
    got = attention(q, k, v, method=method, cache=fast, q_positions=pos, kv_positions=pos)
    want = attention(q, k, v, method=method, cache=slow, q_positions=pos.clone(), kv_positions=pos)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    assert torch.equal(fast.positions(0), slow.positions(0))
    assert torch.equal(fast.keys(0), slow.keys(0)) and torch.equal(fast.values(0), slow.values(0))
    assert torch.equal(fast.row_lengths(0), slow.row_lengths(0))
    before = [t.clone() for t in (fast.keys(0), fast.values(0), fast.positions(0))]
    with pytest.raises(ValueError, match="strictly increasing"):  # not after what it holds
        attention(q, k, v, method=method, cache=fast, q_positions=pos, kv_positions=pos)
    bad = v.clone()
    bad[0, 1, 0, 3] = float("nan")
    step = torch.tensor([[21]])
    with pytest.raises(ValueError, match=r"^v holds a non-finite value"):
        attention(q, k, bad, method=method, cache=fast, q_positions=step, kv_positions=step)
    after = (fast.keys(0), fast.values(0), fast.positions(0))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert fast.n_seen(0) == 21


def _head_wise_cache(seed=11):
    """A one-row layer whose KV heads hold different numbers of tokens (a head-wise eviction;
    the slots it frees past the longest row are zeroed, as allocated)."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(1, 2, 12, 16, generator=gen) for _ in range(2))
    cache = KVCache(1, page_size=4)
    cache.append(0, k, v)
    keep = torch.ones(1, 2, 12, dtype=torch.bool)
    keep[0, 0, [1, 4, 5]] = False  # head 0 keeps 9 tokens, head 1 keeps 11
    keep[0, 1, 7] = False
    cache.evict(0, keep)
    return cache


def _layer_state(cache):
    return [t.clone() for t in (cache.keys(0), cache.values(0), cache.head_positions(0))] + [
        cache.head_lengths(0),
        cache.n_seen(0),
    ]


@pytest.mark.parametrize("given", [False, True], ids=["default positions", "one tensor"])
def test_head_wise_decode_step_equals_the_general_path_and_rolls_back(given):
    gen = torch.Generator().manual_seed(5)
    fast, slow = _head_wise_cache(), _head_wise_cache()
    assert not fast.is_uniform(0)
    for step in range(12, 15):
        q, k, v = (torch.randn(1, h, 1, 16, generator=gen) for h in (4, 2, 2))
        pos = torch.tensor([[step]])
        # no positions or one tensor for both: the one-token step path; two tensors: the general
        fast_pos = {"q_positions": pos, "kv_positions": pos} if given else {}
        before = _layer_state(fast)
        with pytest.raises(ValueError, match="unknown impl"):  # refused after the append
            attention(q, k, v, cache=fast, impl="no-such-impl", **fast_pos)
        after = _layer_state(fast)
        assert all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(before, after)
        )
        entry = fast._layers[0]  # past the longest row: as allocated, the refused append undone
        tail = slice(fast.seq_len(0), None)
        assert bool((entry.pos[:, :, tail] == -1).all())
        assert not entry.keys[:, :, tail].any() and not entry.values[:, :, tail].any()
        got = attention(q, k, v, cache=fast, **fast_pos)
        want = attention(q, k, v, cache=slow, q_positions=pos.clone(), kv_positions=pos)
        assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
        for a, b in zip(_layer_state(fast), _layer_state(slow)):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert fast.head_lengths(0).tolist() == [[12, 14]]
