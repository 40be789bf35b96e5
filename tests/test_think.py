"""ThinK: key-channel pruning of a cache layer. The channel rule against an independent float64
computation of the paper's criterion; attention through a pruned layer against the float64 oracle
of q[..., kept] . k[..., kept] (scale 1/sqrt(D)) with every value channel; the bytes held; bad
input refused before anything changes; decode token by token equals one pass."""

import copy

import pytest
import torch

from longattn import KVCache, attention
from longattn.method import from_string
from longattn.methods import SnapKV, ThinK
from longattn.testing import check_against_reference, kept_channel_queries, make_qkv, score_view

DTYPES = [torch.float32, torch.bfloat16]
PRUNED_IMPLS = ["auto", "decode_cpp", "decode", "tiled", "reference"]  # the ones that take Dk != Dv


def _causal(q_pos, kv_len, batch, heads):
    return (torch.arange(kv_len).view(1, -1) <= q_pos.view(-1, 1)).expand(batch, heads, -1, -1)


def _pruned_cache(dtype, t=96, dim=32, n_kv=2, heads=6, batch=2, n_keep=12, seed=0):
    """A cache holding a prompt of ``t`` tokens whose keys are pruned to ``n_keep`` random
    ascending channels per (row, KV head); returns (cache, q, k, v, channels) with 8 more tokens."""
    q, k, v = make_qkv(batch, heads, n_kv, t + 8, head_dim=dim, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(batch, n_kv, dim, generator=g)
    channels = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
    cache = KVCache(1, page_size=16)
    cache.append(0, k[:, :, :t], v[:, :, :t])
    cache.prune_channels(0, channels)
    return cache, q, k, v, channels


def test_channel_scores_are_the_papers_criterion():
    """key_channels keeps, per KV head, the channels of largest ||Q_obs[:, c]|| * ||K[:, c]||
    (query norm over the window and the head's query heads; empty key slots count nothing)."""
    batch, heads, n_kv, t, w, dim = 2, 4, 2, 40, 6, 16
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(batch, n_kv, t, dim, generator=g, dtype=torch.float64)
    keys[..., 3] *= 10  # a loud channel
    positions = torch.arange(t).expand(batch, n_kv, t).clone()
    positions[0, 1, 30:] = -1  # empty slots: their (huge) keys must not count
    keys[0, 1, :30, 5] = 0.0  # a silent channel among the held keys ...
    keys[0, 1, 30:, 5] = 1e6  # ... loud only in the empty slots
    queries = torch.randn(batch, heads, w, dim, generator=g, dtype=torch.float64)
    view = score_view(keys, keys, positions, queries, torch.arange(t - w, t), dim**-0.5)
    got = ThinK(keep=0.5, window=w).key_channels(view)
    assert got.shape == (batch, n_kv, dim // 2) and got.dtype == torch.int64
    for b in range(batch):
        for h in range(n_kv):
            held = keys[b, h][positions[b, h] >= 0]  # [n, D]
            group = queries[b, 2 * h : 2 * h + 2].reshape(-1, dim)  # [G * w, D]
            score = [float(group[:, c].norm() * held[:, c].norm()) for c in range(dim)]
            want = sorted(sorted(range(dim), key=lambda c: -score[c])[: dim // 2])
            assert got[b, h].tolist() == want
    assert 5 not in got[0, 1].tolist()  # the empty slots were ignored


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", PRUNED_IMPLS)
def test_attention_over_a_pruned_layer_equals_the_kept_channel_oracle(impl, dtype):
    cache, q, k, v, channels = _pruned_cache(dtype)
    t = cache.seq_len(0)
    step = slice(t, t + 3)
    out = attention(q[:, :, step], k[:, :, step], v[:, :, step], cache=cache, impl=impl)
    assert out.out.shape == (2, 6, 3, 32)
    visible = _causal(torch.arange(t, t + 3), t + 3, 2, 6)
    check_against_reference(out, kept_channel_queries(q[:, :, step], channels), k[:, :, : t + 3],
                            v[:, :, : t + 3], visible, 32**-0.5)  # fmt: skip
    # the new keys are stored with the layer's channels; the values whole
    stored = cache.keys(0)[:, :, t : t + 3]
    assert torch.equal(stored, k[:, :, step].gather(-1, channels[:, :, None].expand(-1, -1, 3, -1)))
    assert torch.equal(cache.values(0)[:, :, t : t + 3], v[:, :, step])


def test_a_dropped_channel_or_the_pruned_scale_would_fail_the_oracle():
    """The check above can fail: the full-channel oracle and a 1/sqrt(Dk') scale are both far out."""
    cache, q, k, v, channels = _pruned_cache(torch.float32)
    t = cache.seq_len(0)
    out = attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache)
    visible = _causal(torch.tensor([t]), t + 1, 2, 6)
    for wrong_q, scale in (
        (q[:, :, t : t + 1], 32**-0.5),
        (kept_channel_queries(q[:, :, t : t + 1], channels), 12**-0.5),
    ):
        with pytest.raises(AssertionError):
            check_against_reference(
                out, wrong_q, k[:, :, : t + 1], v[:, :, : t + 1], visible, scale
            )


@pytest.mark.parametrize("impl", ["sdpa", "sparse", "sparse_cpp", "flex"])
def test_kernels_needing_one_head_dim_refuse_a_pruned_layer_and_leave_it_unchanged(impl):
    cache, q, k, v, _ = _pruned_cache(torch.float32)
    t = cache.seq_len(0)
    before = (cache.keys(0).clone(), cache.values(0).clone(), cache.head_positions(0).clone())
    with pytest.raises(ValueError, match="channel-pruned"):
        attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache,
                  impl=impl)  # fmt: skip
    assert cache.seq_len(0) == t
    after = (cache.keys(0), cache.values(0), cache.head_positions(0))
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_chunk_over_a_pruned_layer_runs_tiled():
    """A prefill chunk (more than 16 queries) after pruning: auto passes over SDPA and the block
    kernels (one head dim) and runs the tiled kernel, equal to the oracle."""
    cache, q, k, v, channels = _pruned_cache(torch.float32, t=60)
    q2, k2, v2 = make_qkv(2, 6, 2, 20, head_dim=32, seed=9)
    out = attention(q2, k2, v2, cache=cache)
    keys, values = torch.cat([k[:, :, :60], k2], dim=2), torch.cat([v[:, :, :60], v2], dim=2)
    check_against_reference(out, kept_channel_queries(q2, channels), keys, values,
                            _causal(torch.arange(60, 80), 80, 2, 6), 32**-0.5)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_token_by_token_after_pruning_equals_one_pass(dtype):
    cache, q, k, v, channels = _pruned_cache(dtype)
    t = cache.seq_len(0)
    whole = copy.deepcopy(cache)
    steps = [
        attention(q[:, :, s : s + 1], k[:, :, s : s + 1], v[:, :, s : s + 1], cache=cache).out
        for s in range(t, t + 8)
    ]
    one_pass = attention(q[:, :, t:], k[:, :, t:], v[:, :, t:], cache=whole)
    assert torch.equal(cache.keys(0), whole.keys(0)) and torch.equal(
        cache.head_positions(0), whole.head_positions(0)
    )
    visible = _causal(torch.arange(t, t + 8), t + 8, 2, 6)
    oracle = (kept_channel_queries(q[:, :, t:], channels), k, v, visible, 32**-0.5)
    check_against_reference(one_pass, *oracle)
    check_against_reference(torch.cat(steps, dim=2), *oracle)


def test_bytes_held_drop_by_the_pruned_channels():
    q, k, v = make_qkv(2, 6, 2, 100, head_dim=32)
    cache = KVCache(1, page_size=16)
    cache.append(0, k, v)
    nbytes, capacity_nbytes, slots = cache.nbytes(), cache.capacity_nbytes(), cache.capacity(0)
    channels = torch.arange(0, 32, 4).expand(2, 2, 8).contiguous()  # keep 8 of 32
    cache.prune_channels(0, channels)
    pages = slots // 16
    assert nbytes - cache.nbytes() == 2 * 2 * 100 * 24 * 4  # the pruned key channels, used slots
    dropped_meta = 2 * 2 * pages * 24 * (2 * 2 + 4)  # page key bounds (2, bf16) and sums (fp32)
    assert capacity_nbytes - cache.capacity_nbytes() == 2 * 2 * slots * 24 * 4 + dropped_meta
    assert cache.keys(0).shape == (2, 2, 100, 8) and cache.values(0).shape == (2, 2, 100, 32)
    assert torch.equal(cache.keys(0), k[..., ::4])


def test_think_through_attention_prunes_at_the_first_decode_step():
    """ThinK alone: every token kept; at the first decode step the keys shrink to floor(keep * D)
    channels per KV head, the bytes by exactly those channels against a dense run."""
    q, k, v = make_qkv(1, 6, 2, 70, head_dim=32, seed=3)
    caches = {name: KVCache(2, page_size=16) for name in ("think", "dense")}
    methods = {"think": ThinK(keep=0.75, window=8), "dense": None}
    for name, cache in caches.items():
        for layer in range(2):
            attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], method=methods[name], cache=cache,
                      layer=layer)  # fmt: skip
        assert cache.key_channels(0) is None
        for s in range(64, 70):
            for layer in range(2):
                attention(q[:, :, s : s + 1], k[:, :, s : s + 1], v[:, :, s : s + 1],
                          method=methods[name], cache=cache, layer=layer)  # fmt: skip
    think, dense = caches["think"], caches["dense"]
    assert think.key_channels(1).shape == (1, 2, 24)
    assert think.head_lengths(0).tolist() == [[70, 70]]
    assert dense.nbytes() - think.nbytes() == 2 * 2 * 70 * 8 * 4


def test_think_with_snapkv_keeps_snapkv_tokens_and_prunes_their_channels():
    q, k, v = make_qkv(2, 4, 2, 90, head_dim=16, seed=4)
    fields = dict(budget=0.5, window=8, sinks=2, recent=4)
    held = {}
    for method in (SnapKV(**fields), ThinK(keep=0.5, scorer="snapkv", **fields)):
        cache = KVCache(1, page_size=16)
        attention(q[:, :, :80], k[:, :, :80], v[:, :, :80], method=method, cache=cache)
        attention(q[:, :, 80:81], k[:, :, 80:81], v[:, :, 80:81], method=method, cache=cache)
        held[method.name] = cache.head_positions(0)
    assert torch.equal(held["snapkv"], held["think"])
    assert cache.key_channels(0).shape == (2, 2, 8)
    assert cache.keys(0).shape[-1] == 8 and cache.values(0).shape[-1] == 16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(keep=0.0), ValueError, "keep must be in"),
        (dict(keep=1.5), ValueError, "keep must be in"),
        (dict(keep=-0.1), ValueError, "keep must be in"),
        (dict(keep="0.5"), TypeError, "keep must be float"),
        (dict(budget=0.5), ValueError, "need scorer"),
        (dict(tokens=64), ValueError, "need scorer"),
        (dict(scorer="think"), ValueError, "eviction method"),
        (dict(scorer="quest"), ValueError, "eviction method"),
        (dict(scorer="qfilters"), ValueError, "calibrated"),
        (dict(scorer="snapkv:budget=0.3"), ValueError, "sets budget"),
        (dict(scorer="nosuch"), ValueError, "nosuch"),
    ],
)
def test_bad_fields_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        ThinK(**kwargs)


def test_method_strings_round_trip():
    for spec in ("think", "think:keep=0.5,budget=0.25,scorer=snapkv:kernel=3;pooling=avg"):
        method = from_string(spec)
        assert from_string(method.describe()) == method
    assert from_string("think:scorer=h2o,budget=0.5").needs == frozenset({"accumulated"})


def test_a_prompt_shorter_than_the_window_is_refused_before_anything_changes():
    q, k, v = make_qkv(1, 4, 2, 21, head_dim=16)
    method = ThinK(window=32)
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], method=method, cache=cache)
    before = (cache.keys(0).clone(), cache.head_positions(0).clone(), cache.nbytes())
    with pytest.raises(ValueError, match="shorter than the window"):
        attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], method=method, cache=cache)
    assert cache.key_channels(0) is None and cache.seq_len(0) == 20
    assert torch.equal(cache.keys(0), before[0]) and torch.equal(cache.head_positions(0), before[1])
    assert cache.nbytes() == before[2]


@pytest.mark.parametrize(
    "channels, match",
    [
        (torch.tensor([[[0, 0, 1], [1, 2, 3]]]), "ascending and distinct"),
        (torch.tensor([[[2, 1, 0], [1, 2, 3]]]), "ascending and distinct"),
        (torch.tensor([[[0, 1, 16], [1, 2, 3]]]), "ascending and distinct"),
        (torch.tensor([[[0, 1, 2]]]), "must be"),
        (torch.arange(16).expand(1, 2, 16), "0 < Dk' < D=16"),
        (torch.zeros(1, 2, 3), "integer"),
    ],
)
def test_bad_channel_index_is_refused_before_anything_changes(channels, match):
    _, k, v = make_qkv(1, 4, 2, 20, head_dim=16)
    cache = KVCache(1, page_size=16)
    cache.append(0, k, v)
    capacity = cache.capacity_nbytes()
    with pytest.raises((ValueError, TypeError), match=match):
        cache.prune_channels(0, channels)
    assert cache.key_channels(0) is None and torch.equal(cache.keys(0), k)
    assert cache.capacity_nbytes() == capacity


def test_a_layer_is_pruned_once_and_select_methods_refuse_it():
    cache, q, k, v, channels = _pruned_cache(torch.float32)
    with pytest.raises(ValueError, match="pruned already"):
        cache.prune_channels(0, channels[..., :4])
    t = cache.seq_len(0)
    with pytest.raises(ValueError, match="channel-pruned"):
        attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache,
                  method="quest:budget=32")  # fmt: skip
    assert cache.seq_len(0) == t


def test_auto_runs_a_pruned_decode_step_on_the_cpp_kernel(caplog):
    cache, q, k, v, _ = _pruned_cache(torch.float32)
    t = cache.seq_len(0)
    with caplog.at_level("DEBUG", logger="longattn"):
        attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], cache=cache)
    chose = [r.getMessage() for r in caplog.records if "impl=auto chose" in r.getMessage()]
    assert chose and "chose 'decode_cpp'" in chose[-1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["decode_cpp", "decode", "tiled"])
def test_unequal_dim_kernels_hide_padding_and_empty_slots(kernel, dtype):
    """The decode and tiled kernels with Dk != Dv: empty key slots and padded queries are hidden,
    a query that sees no key gets zeros and lse = -inf, the rest equals the oracle."""
    from longattn.kernels.decode import decode_attention, decode_dense_cpp
    from longattn.kernels.tiled import tiled_attention
    from longattn.methods import Dense

    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 3, 10, generator=g), torch.randn(2, 2, 20, 10, generator=g)
    v = torch.randn(2, 2, 20, 24, generator=g)
    kv_pos = torch.arange(20).expand(2, 20).clone()
    kv_pos[1, 5:9] = -1
    q_pos = torch.tensor([[17, 18, 19], [-1, 18, 19]])
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if kernel == "decode_cpp":  # keys of 10 channels: the kernel's run-time head dim path
        out = decode_dense_cpp(q, k, v, scale=0.3, q_pos=q_pos, kv_pos=kv_pos)
    elif kernel == "decode":
        out = decode_attention(q, k, v, scale=0.3, q_pos=q_pos, kv_pos=kv_pos)
    else:
        out = tiled_attention(q, k, v, scale=0.3, q_pos=q_pos, kv_pos=kv_pos,
                              mask_fn=Dense().mask, tile_q=2, tile_k=8)  # fmt: skip
    assert out.out.shape == (2, 4, 3, 24)
    assert bool((out.out[1, :, 0] == 0).all()) and bool(torch.isneginf(out.lse[1, :, 0]).all())
    visible = (kv_pos[:, None, None, :] >= 0) & (
        kv_pos[:, None, None, :] <= q_pos[:, None, :, None]
    )
    visible = visible & (q_pos[:, None, :, None] >= 0)
    check_against_reference(out, q, k, v, visible.expand(2, 4, 3, 20), 0.3)
