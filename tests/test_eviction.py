"""Per-head retention and the library's eviction machinery (``longattn.compress``): budgets,
protected regions, per-head eviction that really frees storage, and eviction == masking on every
implementation."""

import dataclasses

import pytest
import torch

from longattn import KVCache, attention
from longattn.compress import ada_budgets, attention_weights, choose, compress, layer_budget
from longattn.method import Evict
from longattn.testing import check_against_reference, kept_channel_queries, with_compensation

IMPLS = ["decode_cpp", "decode", "reference", "tiled", "sparse", "sparse_cpp"]


@dataclasses.dataclass(frozen=True)
class SmallNorm(Evict):
    """Test scorer: keep the keys of smallest norm (differs per head)."""

    def score(self, view):
        return -view.keys.float().norm(dim=-1)


@dataclasses.dataclass(frozen=True)
class Fixed(Evict):
    """Test scorer: the scores of a tensor given by the test (via calibration)."""

    def score(self, view):
        return view.calibration["scores"]


def _qkv(batch=2, heads=4, n_kv=2, t=100, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t, dim, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, t, dim, generator=g).to(dtype)
    v = torch.randn(batch, n_kv, t, dim, generator=g).to(dtype)
    return q, k, v


def _held_mask(cache, layer, length):
    """bool [B, Hkv, length]: which original positions the layer holds per head."""
    pos = cache.head_positions(layer)
    mask = torch.zeros(*pos.shape[:2], length + 1, dtype=torch.bool)
    mask.scatter_(-1, torch.where(pos >= 0, pos, length), True)
    return mask[..., :length]


def _visible(q_pos, held, group):
    """[B, H, Tq, Tk] causal visibility restricted to the held keys of each KV head."""
    length = held.shape[-1]
    causal = torch.arange(length).view(1, -1) <= q_pos.view(-1, 1)  # [Tq, Tk]
    return causal[None, None] & held.repeat_interleave(group, dim=1)[:, :, None, :]


def test_per_head_eviction_frees_storage_and_keeps_order():
    cache = KVCache(1, page_size=16)
    q, k, v = _qkv(batch=1, heads=2, n_kv=2, t=64)
    cache.append(0, k, v)
    keep = torch.zeros(1, 2, 64, dtype=torch.bool)
    keep[0, 0, ::2] = True  # head 0 keeps the even positions
    keep[0, 1, :10] = True  # head 1 the first ten
    cache.evict(0, keep, capacity=32)
    assert cache.head_lengths(0).tolist() == [[32, 10]]
    assert cache.capacity(0) == 32  # bounded: exactly what was asked, in whole pages
    pos = cache.head_positions(0)
    assert pos[0, 0].tolist() == list(range(0, 64, 2))
    assert pos[0, 1, :10].tolist() == list(range(10)) and bool((pos[0, 1, 10:] == -1).all())
    assert torch.equal(cache.keys(0)[0, 1, :10], k[0, 1, :10])
    assert torch.equal(cache.values(0)[0, 0], v[0, 0, ::2])
    assert not cache.is_uniform(0)
    with pytest.raises(ValueError, match="different tokens per KV head"):
        cache.positions(0)
    with pytest.raises(ValueError, match="different tokens per KV head"):
        cache.row_lengths(0)
    # appends continue per head at each head's own next slot
    cache.append(0, k[:, :, :3] + 1, v[:, :, :3] + 1, positions=torch.tensor([64, 65, 66]))
    assert cache.head_lengths(0).tolist() == [[35, 13]]
    assert cache.head_positions(0)[0, 1, 10:13].tolist() == [64, 65, 66]
    assert torch.equal(cache.keys(0)[0, 1, 10:13], k[0, 1, :3] + 1)
    assert cache.capacity(0) <= 32 + max(16, 32 // 8)  # grown by an eighth, not doubled


def test_bad_keep_and_capacity_are_refused_before_anything_changes():
    cache = KVCache(1)
    _, k, v = _qkv(batch=1, n_kv=2, t=20)
    cache.append(0, k, v)
    before = cache.head_positions(0).clone()
    with pytest.raises(ValueError, match=r"\[B, seq_len\]"):
        cache.evict(0, torch.ones(1, 3, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        cache.evict(0, torch.ones(1, 2, 20))
    with pytest.raises(ValueError, match="below the 20 tokens kept"):
        cache.evict(0, torch.ones(1, 2, 20, dtype=torch.bool), capacity=8)
    with pytest.raises(ValueError, match="capacity"):
        cache.evict(0, torch.ones(1, 2, 20, dtype=torch.bool), capacity=0)
    assert torch.equal(cache.head_positions(0), before)


# the decode kernels take at most 16 queries; the block-sparse kernel is a prefill kernel
CASES = [(impl, q_len) for impl in IMPLS for q_len in (1, 3, 40)
         if not (impl.startswith("decode") and q_len > 16) and not (impl == "sparse_cpp" and q_len <= 16)]  # fmt: skip


@pytest.mark.parametrize("impl, q_len", CASES)
def test_eviction_equals_masking_on_every_implementation(impl, q_len):
    """After a per-head compression, decode steps and prefill chunks over the cache equal the
    float64 oracle over all keys with the evicted ones masked (per KV head)."""
    q, k, v = _qkv(t=100 + q_len)
    method = SmallNorm(budget=0.3, sinks=2, recent=4, window=8, when="chunk")
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], method=method, cache=cache)
    assert not cache.is_uniform(0)
    new = slice(100, 100 + q_len)
    out = attention(q[:, :, new], k[:, :, new], v[:, :, new], method=method, cache=cache, impl=impl)
    held = _held_mask(cache, 0, 100 + q_len) if q_len <= 16 else None
    if held is None:  # a chunk compresses after attending: rebuild what it attended over
        cache2 = KVCache(1, page_size=16)
        attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], method=method, cache=cache2)
        held = _held_mask(cache2, 0, 100)
        held = torch.cat([held, torch.ones(2, 2, q_len, dtype=torch.bool)], dim=-1)
    visible = _visible(torch.arange(100, 100 + q_len), held, group=2)
    check_against_reference(out, q[:, :, new], k, v, visible, 16**-0.5)


def test_prefill_mode_compresses_once_at_the_first_decode_step():
    q, k, v = _qkv(t=120)
    method = SmallNorm(budget=0.25, sinks=2, recent=4, window=8)  # when="prefill"
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], method=method, cache=cache)
    assert cache.is_uniform(0) and cache.seq_len(0) == 100  # nothing evicted during the prompt
    attention(q[:, :, 100:101], k[:, :, 100:101], v[:, :, 100:101], method=method, cache=cache)
    assert cache.head_lengths(0).tolist() == [[26, 26]] * 2  # ceil(0.25 * 100) + the new token
    assert cache.capacity(0) == 32  # the budget rounded up to a page
    for t in range(101, 110):  # once: later steps only append
        attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], method=method,
                  cache=cache)  # fmt: skip
    assert cache.head_lengths(0).tolist() == [[35, 35]] * 2


def test_decode_mode_compresses_every_n_steps_and_capacity_stays_bounded():
    q, k, v = _qkv(batch=1, t=300)
    method = SmallNorm(tokens=40, sinks=2, recent=4, window=8, when="decode", every=8)
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], method=method, cache=cache)
    for t in range(100, 300):
        attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], method=method,
                  cache=cache)  # fmt: skip
        assert int(cache.head_lengths(0).max()) <= 40 + 8
        assert cache.capacity(0) <= 40 + 8 + 16  # budget + headroom + less than a page
    pos = cache.head_positions(0)
    assert bool((pos[..., :2] == torch.tensor([0, 1])).all())  # sinks kept
    assert bool((pos.amax(dim=-1) == 299).all())  # the newest token kept


def test_chunked_prefill_holds_budget_plus_one_chunk():
    q, k, v = _qkv(batch=1, t=512)
    method = SmallNorm(budget=0.1, sinks=4, recent=8, window=8, when="chunk")
    cache = KVCache(1, page_size=16)
    for start in range(0, 512, 64):
        chunk = slice(start, start + 64)
        attention(q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], method=method, cache=cache)
        seen = start + 64
        assert int(cache.head_lengths(0).max()) == max(12, -(-seen // 10))
    assert cache.n_seen(0) == 512


def test_budgets_protection_and_infinite_scores():
    pos = torch.arange(20).view(1, 1, 20).expand(1, 2, 20)
    scores = torch.arange(20.0).flip(0).view(1, 1, 20).repeat(1, 2, 1)  # earlier = higher
    scores[0, 1, 15] = torch.inf  # keep whatever the budget
    scores[0, 1, 0] = -torch.inf  # a sink: protected all the same
    scores[0, 0, 5] = -torch.inf  # evict whatever the budget
    method = SmallNorm(tokens=8, sinks=1, recent=2)
    keep = choose(method, scores, pos, 20, 0, 1)
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6, 18, 19]
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 15, 18, 19]
    assert choose(SmallNorm(tokens=30, sinks=1, recent=2), scores, pos, 20, 0, 1).sum() == 39
    # empty slots are never kept
    holes = pos.clone()
    holes[0, 0, 3] = -1
    assert not choose(method, scores, holes, 20, 0, 1)[0, 0, 3]


def test_pyramid_and_ada_allocations_keep_the_total():
    method = SmallNorm(budget=0.5, allocation="pyramid")
    budgets = [layer_budget(method, 1000, layer, 10) for layer in range(10)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 500 > budgets[-1]
    assert abs(sum(budgets) - 5000) <= 10  # the average budget, up to rounding
    scores = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(1))
    scores[:, 0] += 1.0  # head 0 holds the high scores: AdaKV gives it more
    per_head = ada_budgets(scores.sort(dim=-1, descending=True).values, 10)
    assert per_head.sum(dim=-1).tolist() == [30, 30]
    assert bool((per_head[:, 0] > 10).all()) and bool((per_head >= 2).all())  # floor 0.2 * 10


def test_attention_weights_match_softmax_and_are_causal():
    q, k, _ = _qkv(batch=1, heads=4, n_kv=2, t=12, dtype=torch.float64)
    pos = torch.arange(12).view(1, 1, 12).expand(1, 2, 12)
    w = attention_weights(q[:, :, -3:], torch.tensor([[9, 10, 11]]), keys=k, positions=pos,
                          scale=0.25)  # fmt: skip
    kk = k.repeat_interleave(2, dim=1)
    s = (q[:, :, -3:] @ kk.transpose(-1, -2)) * 0.25
    s = s.masked_fill(torch.arange(12).view(1, -1) > torch.tensor([9, 10, 11]).view(-1, 1),
                      -torch.inf)  # fmt: skip
    assert torch.allclose(w, torch.softmax(s, dim=-1), atol=1e-12)


def test_a_refused_call_after_compression_leaves_the_cache_bit_identical():
    q, k, v = _qkv(t=110)
    method = SmallNorm(budget=0.25, sinks=2, recent=4, window=8)
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], method=method, cache=cache)
    before = (cache.head_positions(0).clone(), cache.keys(0).clone(), cache.capacity(0))
    with pytest.raises(ValueError, match="impl"):  # compression runs first, then the refusal
        attention(q[:, :, 100:101], k[:, :, 100:101], v[:, :, 100:101], method=method,
                  cache=cache, impl="sdpa")  # fmt: skip
    assert torch.equal(cache.head_positions(0), before[0])
    assert torch.equal(cache.keys(0), before[1]) and cache.capacity(0) == before[2]
    attention(q[:, :, 100:101], k[:, :, 100:101], v[:, :, 100:101], method=method, cache=cache)
    assert cache.seq_len(0) == 26


def test_scorer_output_is_checked():
    cache = KVCache(1)
    _, k, v = _qkv(batch=1, t=20)
    cache.append(0, k, v)
    bad = Fixed(budget=0.5)
    with pytest.raises(ValueError, match=r"\[B, Hkv, T\]"):
        compress(bad, cache, 0, {"scores": torch.zeros(1, 2, 19)})
    with pytest.raises(ValueError, match="NaN"):
        compress(bad, cache, 0, {"scores": torch.full((1, 2, 20), torch.nan)})
    assert cache.seq_len(0) == 20 and cache.is_uniform(0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"allocation": "tree"}, "allocation"),
        ({"when": "never"}, "when"),
        ({"tokens": 10, "sinks": 4, "recent": 8}, "sinks"),
        ({"every": 0}, "every"),
    ],
)
def test_bad_budgets_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SmallNorm(**kwargs)


def test_capacity_bytes_follow_the_budget():
    """A bounded method holds its budget plus less than a page per head, in capacity bytes."""
    q, k, v = _qkv(batch=1, heads=4, n_kv=2, t=1000, dim=32)
    method = SmallNorm(budget=0.25, sinks=4, recent=16)
    cache = KVCache(1, page_size=16)
    attention(q, k, v, method=method, cache=cache)
    attention(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], method=method, cache=cache,
              kv_positions=torch.tensor([1000]), q_positions=torch.tensor([1000]))  # fmt: skip
    slots = cache.capacity(0)
    assert 251 <= slots < 251 + 16
    kv_bytes = 2 * 1 * 2 * slots * 32 * 4
    assert kv_bytes <= cache.capacity_nbytes() <= kv_bytes * 1.5


def _evict_specs():
    from longattn.method import registry
    from longattn.testing import METHOD_EXAMPLES

    for name, cls in registry().items():
        if issubclass(cls, Evict):
            yield from METHOD_EXAMPLES[name]


def _with_calibration(spec, tmp_path, n_kv, dim):
    """``spec`` with a calibration file for the test's shape where the method needs one."""
    from longattn.calibration import calibrate_qfilters
    from longattn.method import from_string

    method = from_string(spec)
    if not hasattr(method, "calibration") or getattr(method, "pattern", None) is not None:
        return method  # no file needed (head-wise methods given an explicit pattern)
    if method.name == "qfilters":
        g = torch.Generator().manual_seed(3)
        q = torch.randn(1, 2 * n_kv, 64, dim, generator=g)
        k = torch.randn(1, n_kv, 64, dim, generator=g)
        path = calibrate_qfilters({0: (q, k, k)}, "toy").save(tmp_path / "qf.safetensors")
        return dataclasses.replace(method, calibration=str(path))
    pytest.skip(f"{method.name} is calibrated on a real model (tests/test_duo_razor.py)")


@pytest.mark.parametrize("spec", list(_evict_specs()))
def test_every_eviction_method_evicts_per_head_and_equals_masking(spec, tmp_path):
    """Prompt, compression at the first decode step, decode steps: every registered eviction
    method through ``attention(cache=)``; each step equals the oracle over the held keys, and each
    head holds at most its budget (plus the step's tokens and the protected ones)."""
    q, k, v = _qkv(t=90)
    method = _with_calibration(spec, tmp_path, n_kv=2, dim=16)
    cache = KVCache(1, page_size=16)
    attention(q[:, :, :80], k[:, :, :80], v[:, :, :80], method=method, cache=cache)
    for t in range(80, 90):
        step = slice(t, t + 1)
        out = attention(q[:, :, step], k[:, :, step], v[:, :, step], method=method, cache=cache)
        held = _held_mask(cache, 0, t + 1)
        visible = _visible(torch.tensor([t]), held, group=2)
        q_kept = kept_channel_queries(q[:, :, step], cache.key_channels(0))  # ThinK's channels
        kx, vx, visible = with_compensation(k[:, :, : t + 1], v[:, :, : t + 1], visible,
                                            cache.summary(0))  # fmt: skip
        check_against_reference(out, q_kept, kx, vx, visible, 16**-0.5)
    budget = method.tokens or -(-int(method.budget * 80 * 1e6) // 1_000_000)
    lengths = cache.head_lengths(0)  # [B, Hkv]; AdaKV shares a row's total over its heads
    if (
        getattr(method, "pattern", None) is not None
    ):  # retrieval heads all, the others sinks + recent
        for head in range(2):
            full = method.pattern[head % len(method.pattern)] == 1
            want = 90 if full else method.sinks + method.recent + 10
            assert (lengths[:, head] == want).all() if full else (lengths[:, head] <= want).all()
        return
    per_head = max(budget, method.sinks + method.recent) + 10
    assert int(lengths.sum(dim=-1).max()) <= 2 * per_head
    if method.allocation != "ada":
        assert int(lengths.max()) <= per_head


def test_streaming_in_chunks_holds_about_the_window_plus_one_chunk():
    """StreamingLLM fed in chunks: the storage settles near what one call needs (the window plus a
    chunk), not at the doubled capacity of the prompt's growth."""
    from longattn.methods import StreamingLLM

    q, k, v = _qkv(batch=1, heads=2, n_kv=1, t=2048, dim=8)
    method = StreamingLLM(sinks=4, window=256)
    cache = KVCache(1, page_size=16)
    for start in range(0, 2048, 128):
        chunk = slice(start, start + 128)
        attention(q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], method=method, cache=cache)
    assert cache.seq_len(0) == 4 + 256 - 1
    assert cache.capacity(0) <= 4 + 256 + 128 + 32  # the need of one call, to a page or two


def _accumulated_reference(keys, positions, q, q_pos, scale):
    """float64 accumulated attention and latest hit (position + 1) per held key, from the whole
    [B, H, n, S] weight matrix at once."""
    group = q.shape[1] // keys.shape[1]
    kk = keys.double().repeat_interleave(group, dim=1)
    kp = positions.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, H, 1, S]
    qp = q_pos[:, None, :, None]  # [B, 1, n, 1]
    visible = (kp >= 0) & (kp <= qp)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~visible, -torch.inf), dim=-1).nan_to_num(0.0)
    nonzero = (p > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    hit = p * nonzero >= 1
    latest = torch.where(hit, qp.double() + 1, 0.0)
    shape = (keys.shape[0], keys.shape[1], group, *p.shape[2:])
    return p.view(shape).sum(dim=(2, 3)), latest.view(shape).amax(dim=(2, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_accumulated_attention_matches_the_whole_weight_matrix(dtype):
    """The prompt's chunked, causally cut accumulation (three chunks) and a later decode call over
    per-head evicted slots (empty slots included) equal the float64 whole-matrix sums."""
    from longattn.compress import WEIGHT_CHUNK, _accumulate

    t = 2 * WEIGHT_CHUNK + 88
    q, k, v = _qkv(batch=2, heads=6, n_kv=2, t=t + 3, dim=16, seed=3, dtype=dtype)
    cache = KVCache(1, page_size=16)
    cache.append(0, k[:, :, :t], v[:, :, :t])
    prompt_pos = torch.arange(t).expand(2, -1)
    _accumulate(cache, 0, q[:, :, :t], prompt_pos, 0.25)
    total, last = _accumulated_reference(cache.keys(0), cache.head_positions(0), q[:, :, :t],
                                         prompt_pos, 0.25)  # fmt: skip
    # the statistic is stored in float32 (one rounding per chunk); float32 weights add a relative
    # error of a few units of eps(float32) times the score range (|s| < 8 here)
    rtol = 2.0**-21 if dtype == torch.float64 else 2.0**-16
    got = cache.stat(0, "accumulated").double()
    assert torch.allclose(got, total, atol=1e-12, rtol=rtol), (got - total).abs().max()
    if dtype == torch.float64:
        assert torch.equal(cache.stat(0, "last_hit").double(), last)
    keep = torch.rand(2, 2, t, generator=torch.Generator().manual_seed(4)) < 0.4
    keep[1, 0] = False  # one (row, head) keeps nothing: its slots stay empty
    cache.evict(0, keep)
    before = cache.stat(0, "accumulated").clone(), cache.stat(0, "last_hit").clone()
    cache.append(0, k[:, :, t:], v[:, :, t:])
    step_pos = torch.arange(t, t + 3).expand(2, -1)
    _accumulate(cache, 0, q[:, :, t:], step_pos, 0.25)
    keys, pos = cache.keys(0), cache.head_positions(0)
    added, step_last = _accumulated_reference(keys, pos, q[:, :, t:], step_pos, 0.25)
    held = pos >= 0
    old_total = torch.zeros_like(added)
    old_total[..., : before[0].shape[-1]] = before[0].double()
    old_last = torch.zeros_like(step_last)
    old_last[..., : before[1].shape[-1]] = before[1].double()
    got = cache.stat(0, "accumulated").double()
    assert torch.allclose(got[held], (old_total + added)[held], atol=1e-12, rtol=rtol)
    if dtype == torch.float64:
        assert torch.equal(cache.stat(0, "last_hit").double()[held],
                           torch.maximum(old_last, step_last)[held])  # fmt: skip
