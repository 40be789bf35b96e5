"""The one-call decode step (``longattn.step``, ``KVCache.decode_step``): a decode step whose
attention is dense causal over its cache layer gives, bit for bit, the general path's output and
leaves the cache bit for bit as the general path leaves it (``impl="decode_cpp"`` forces the
general path on the same C++ kernel), for a dense layer, an evicted (head-wise) one, a
channel-pruned one (ThinK) and a plan method at decode, in float32 and bfloat16, across the
storage growing; it declines (nothing changed) what it does not take; an interrupted step puts
the cache back."""

import logging

import pytest
import torch

import longattn.cache
from longattn import KVCache, Method, attention, from_string, get, registry
from longattn.cache_layer import Layer

SPECS = [
    "dense",
    "streaming_llm:sinks=4,window=40",
    "sliding_window:window=24",
    "snapkv:budget=0.25",
    "think:budget=0.25,scorer=snapkv,keep=0.5",
    "block_topk:budget=0.2",
]


def _tokens(dtype, n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, n, 32, generator=gen).to(dtype)
    k = torch.randn(1, 2, n, 32, generator=gen).to(dtype)
    v = torch.randn(1, 2, n, 32, generator=gen).to(dtype)
    return q, k, v


def _state(cache):
    entry = cache._layers[0]
    tensors = [entry.keys, entry.values, entry.pos, entry.row_len, entry.next_pos]
    tensors += [entry.page_bounds, entry.page_sum, entry.page_count]
    return [t.clone() for t in tensors], (entry.seq_len, entry.n_seen, entry.stale, entry.dense)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


def _prefilled(method, q, k, v, prompt=200):
    cache = KVCache(1)
    attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], method=method, cache=cache)
    return cache


@pytest.fixture
def chosen(caplog):
    """How many calls the one-call step took."""
    caplog.set_level(logging.DEBUG, logger="longattn")
    return lambda: sum("decode step in one call" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("positions", [False, True], ids=["default", "given"])
def test_the_step_equals_the_general_path(spec, dtype, positions, chosen):
    method = from_string(spec)
    q, k, v = _tokens(dtype)
    fast, general = _prefilled(method, q, k, v), _prefilled(method, q, k, v)
    for t in range(200, 300):  # the compressed layers' storage grows on the way
        pos = torch.tensor([t]) if positions else None
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        a = attention(*step, method=method, cache=fast, q_positions=pos, kv_positions=pos)
        b = attention(*step, method=method, cache=general, impl="decode_cpp", q_positions=pos,
                      kv_positions=pos)  # fmt: skip
        assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse), t
    assert _same(_state(fast), _state(general))
    # every step but the compressing first one and those that grew the storage
    assert chosen() >= 90
    if spec.startswith(("streaming", "sliding")):  # the window's retention evicted on the way
        assert fast.seq_len(0) < 100


def test_what_the_step_declines_runs_the_general_path(chosen):
    q, k, v = _tokens(torch.float32)
    cache = _prefilled(from_string("dense"), q, k, v)
    step = (q[:, :, 200:201], k[:, :, 200:201], v[:, :, 200:201])
    for kwargs in (
        {"impl": "decode_cpp"},  # a named implementation
        {"q_positions": torch.tensor([205]), "kv_positions": torch.tensor([205])},  # a gap
        {"scale": 0.5, "q_positions": torch.tensor([206]), "kv_positions": torch.tensor([206])},
        {"method": from_string("sliding_window:window=16,dilation=2")},  # another mask
    ):
        seen = cache.n_seen(0)
        attention(*step, cache=cache, **kwargs)
        assert cache.n_seen(0) == seen + 1
    assert chosen() == 0
    wrong = torch.tensor([[[208]]])  # a position of three dims: the general path refuses it
    with pytest.raises(ValueError):
        attention(*step, cache=cache, q_positions=wrong, kv_positions=wrong)
    bad = k[:, :, 207:208].clone()
    bad[0, 1, 0, 3] = float("inf")
    before = _state(cache)
    with pytest.raises(ValueError, match="k holds a non-finite value"):
        attention(q[:, :, 207:208], bad, v[:, :, 207:208], cache=cache)
    assert _same(_state(cache), before) and chosen() == 0
    attention(q[:, :, 207:208], k[:, :, 207:208], v[:, :, 207:208], cache=cache)
    assert chosen() == 1


@pytest.mark.parametrize("where", ["after the kernel", "in the bookkeeping"])
@pytest.mark.parametrize("spec", ["dense", "snapkv:budget=0.25"])
def test_an_interrupted_step_puts_the_cache_back(spec, where, monkeypatch):
    """An interruption once the C++ call has written (the step's storage written, its fields not
    yet replaced) leaves the cache bit for bit as before the call."""
    method = from_string(spec)
    q, k, v = _tokens(torch.float32)
    cache = _prefilled(method, q, k, v)
    attention(q[:, :, 200:201], k[:, :, 200:201], v[:, :, 200:201], method=method, cache=cache)
    before = _state(cache)
    real = longattn.cache.decode_step_cpp

    def then_interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    def interrupted(self, lo, hi):
        raise KeyboardInterrupt

    if where == "after the kernel":
        monkeypatch.setattr(longattn.cache, "decode_step_cpp", then_interrupted)
    else:
        monkeypatch.setattr(Layer, "mark_stale", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attention(q[:, :, 201:202], k[:, :, 201:202], v[:, :, 201:202], method=method, cache=cache)
    assert _same(_state(cache), before)
    monkeypatch.undo()
    attention(q[:, :, 201:202], k[:, :, 201:202], v[:, :, 201:202], method=method, cache=cache)
    assert cache.n_seen(0) == before[1][1] + 1


def test_slots_past_each_heads_length_are_empty_after_an_eviction():
    """The invariant the step's undo rests on: zero keys and values, position -1."""
    method = from_string("adakv:budget=0.25")  # head-wise budgets: rows of unequal lengths
    q, k, v = _tokens(torch.float32)
    cache = _prefilled(method, q, k, v)
    attention(q[:, :, 200:201], k[:, :, 200:201], v[:, :, 200:201], method=method, cache=cache)
    entry = cache._layers[0]
    assert len(set(entry.row_len.view(-1).tolist())) > 1
    past = torch.arange(entry.capacity) >= entry.row_len[..., None]  # [1, Hkv, cap]
    assert past.any() and (entry.pos[past] == -1).all()
    assert (entry.keys[past] == 0).all() and (entry.values[past] == 0).all()


DECLARING = sorted(n for n, c in registry().items() if c.sink_window is not Method.sink_window)


def test_the_sink_window_declarations_are_found():
    assert {"streaming_llm", "sliding_window"} <= set(DECLARING)


@pytest.mark.parametrize("name", DECLARING)
def test_a_declared_sink_window_is_the_mask_and_the_retention(name):
    """Every registered method that declares ``sink_window``, at its defaults and at a small
    window, against its own mask and retention over every (query, key) position pair."""
    cls = get(name)
    for method in (cls(), cls(window=7)):
        declared = method.sink_window
        if declared is None:
            continue
        sinks, window = declared
        q_pos = torch.arange(0, 300).view(-1, 1)
        kv_pos = torch.arange(0, 300).view(1, -1)
        b, h = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
        visible = (kv_pos <= q_pos) & ((kv_pos < sinks) | (q_pos - kv_pos < window))
        assert torch.equal(method.mask(b, h, q_pos, kv_pos).expand_as(visible), visible)
        kept = method.retain(kv_pos, q_pos)
        assert torch.equal(
            kept.expand_as(visible), (kv_pos < sinks) | (kv_pos > q_pos + 1 - window)
        )
