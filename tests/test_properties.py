"""Properties every static method must satisfy, checked on seeded sweeps and Hypothesis examples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn import attention, from_string, methods
from longattn.api import make_call, visible_mask
from longattn.testing import METHOD_EXAMPLES, make_qkv

# The static-pattern properties below hold for every ``mask`` method; select methods (decode-time
# selection) have their own property tests in test_decode.py and test_cache.py.
SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs if from_string(s).hook == "mask"]


def _dense_mask(method, n_heads, q_pos, kv_pos):
    q, k, v = make_qkv(1, n_heads, n_heads, len(q_pos), len(kv_pos), 8)
    return visible_mask(make_call(q, k, v, method, None, q_pos, kv_pos)).expand(
        1, n_heads, len(q_pos), len(kv_pos)
    )[0]


@pytest.mark.parametrize(
    "method, dense",
    [
        (methods.SlidingWindow(window=200), methods.Dense()),
        (methods.SlidingWindow(window=200, causal=False), methods.Dense(causal=False)),
        (methods.StreamingLLM(sinks=0, window=200), methods.Dense()),
        (methods.StreamingLLM(sinks=200, window=1), methods.Dense()),
        (methods.Strided(stride=200), methods.Dense()),
        (methods.Strided(stride=200, mode="fixed"), methods.Dense()),
        (methods.PowerAttention(block_size=8, window=25), methods.Dense()),
        (methods.PerHeadWindow(windows=(200, 300)), methods.Dense()),
        (methods.Neighborhood2D(height=14, width=14, kernel=14), methods.Dense(causal=False)),
    ],
    ids=lambda m: m.describe(),
)
def test_degenerate_limits_equal_dense(method, dense):
    """A window that covers the whole sequence is dense attention: same mask, same output."""
    q, k, v = make_qkv(1, 4, 2, 192, 192, 32, dtype=torch.float64)
    q_pos = torch.arange(192)
    assert torch.equal(_dense_mask(method, 4, q_pos, q_pos), _dense_mask(dense, 4, q_pos, q_pos))
    got = attention(q, k, v, method=method, impl="tiled").out
    want = attention(q, k, v, method=dense, impl="reference").out
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_causality(spec):
    """For causal methods, changing future keys and values leaves earlier outputs unchanged."""
    method = from_string(spec)
    if not method.is_causal:
        pytest.skip("non-causal method")
    q, k, v = make_qkv(1, 4, 2, 300, 300, 32, dtype=torch.float64, seed=1)
    base = attention(q, k, v, method=method).out
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 200:] += 5.0
    v2[:, :, 200:] -= 3.0
    changed = attention(q, k2, v2, method=method).out
    torch.testing.assert_close(changed[:, :, :200], base[:, :, :200], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_masked_keys_do_not_matter(spec):
    """Keys a query cannot see (in any head) can be changed without changing that query's output."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 4, 256, 256, 32, dtype=torch.float64, seed=2)
    pos = torch.arange(256)
    visible = _dense_mask(method, 4, pos, pos)  # [H, Tq, Tk]
    row = 200
    hidden = ~visible[:, row].any(0)  # [Tk]
    if not hidden.any():
        pytest.skip("the row sees every key")
    base = attention(q, k, v, method=method).out
    k2, v2 = k.clone(), v.clone()
    k2[:, :, hidden] = torch.randn_like(k2[:, :, hidden]) * 10
    v2[:, :, hidden] = torch.randn_like(v2[:, :, hidden]) * 10
    changed = attention(q, k2, v2, method=method).out
    torch.testing.assert_close(changed[:, :, row], base[:, :, row], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["tiled", "reference"])
@pytest.mark.parametrize("spec", SPECS)
def test_chunked_queries_equal_one_pass(spec, impl):
    """Queries split into chunks with explicit positions give the same rows as one call."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 333, 333, 32, dtype=torch.float64, seed=4)
    whole = attention(q, k, v, method=method, impl=impl)
    kv_pos = torch.arange(333)
    for start, stop in [(0, 100), (100, 101), (101, 333)]:
        part = attention(
            q[:, :, start:stop],
            k,
            v,
            method=method,
            impl=impl,
            q_positions=torch.arange(start, stop),
            kv_positions=kv_pos,
        )
        torch.testing.assert_close(part.out, whole.out[:, :, start:stop], rtol=0, atol=1e-12)
        torch.testing.assert_close(part.lse, whole.lse[:, :, start:stop], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_batch_rows_are_independent(spec):
    method = from_string(spec)
    q, k, v = make_qkv(3, 4, 2, 150, 150, 32, dtype=torch.float64, seed=5)
    whole = attention(q, k, v, method=method).out
    for b in range(3):
        one = attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], method=method).out
        torch.testing.assert_close(one, whole[b : b + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_kv_head_permutation_commutes(spec):
    """Permuting KV heads (with their query groups) permutes the output, for head-agnostic masks."""
    method = from_string(spec)
    if method.name == "per_head_window":
        pytest.skip("the mask depends on the head index by design")
    q, k, v = make_qkv(1, 6, 3, 150, 150, 32, dtype=torch.float64, seed=6)
    perm = torch.tensor([2, 0, 1])
    q_perm = q.view(1, 3, 2, 150, 32)[:, perm].reshape(1, 6, 150, 32)
    out = attention(q_perm, k[:, perm], v[:, perm], method=method).out
    want = attention(q, k, v, method=method).out.view(1, 3, 2, 150, 32)[:, perm].reshape(out.shape)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_mask_vectorises(spec):
    """The broadcast mask equals the mask evaluated one scalar (b, h, q, k) at a time, as Flex does."""
    method = from_string(spec)
    pos = torch.arange(0, 40, 3)
    grid = _dense_mask(method, 3, pos, pos)
    for h in range(3):
        for i, qp in enumerate(pos):
            for j, kp in enumerate(pos):
                scalar = method.mask(torch.tensor(0), torch.tensor(h), qp, kp)
                assert scalar.shape == () and bool(scalar) == bool(grid[h, i, j])


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    q_lo=st.integers(0, 900),
    q_span=st.integers(0, 70),
    kv_lo=st.integers(0, 900),
    kv_span=st.integers(0, 70),
)
def test_block_bounds_are_conservative(spec, q_lo, q_span, kv_lo, kv_span):
    """``any`` never misses a visible pair and ``all`` never claims a hidden one."""
    method = from_string(spec)
    limit = method.max_positions or 10**9
    q_pos = torch.arange(q_lo, min(q_lo + q_span, limit - 1) + 1)
    kv_pos = torch.arange(kv_lo, min(kv_lo + kv_span, limit - 1) + 1)
    if q_pos.numel() == 0 or kv_pos.numel() == 0:
        return
    n_heads = 3
    truth = _dense_mask(method, n_heads, q_pos, kv_pos)  # [H, tq, tk]
    heads = torch.arange(n_heads).view(-1, 1, 1)
    res = method.block_bounds(
        heads,
        q_pos.min().view(1, 1, 1),
        q_pos.max().view(1, 1, 1),
        kv_pos.min().view(1, 1, 1),
        kv_pos.max().view(1, 1, 1),
    )
    assert res is not None
    any_, all_ = (torch.broadcast_to(torch.as_tensor(x), (n_heads, 1, 1)).flatten() for x in res)
    for h in range(n_heads):
        if truth[h].any():
            assert any_[h], f"head {h}: any=False but a pair is visible"
        if all_[h]:
            assert truth[h].all(), f"head {h}: all=True but a pair is hidden"


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    """Queries placed before every key see nothing: out = 0 and lse = -inf, on every impl."""
    q, k, v = make_qkv(1, 2, 2, 4, 6, 16, dtype=torch.float64)
    for impl in ("tiled", "reference"):
        res = attention(
            q, k, v, impl=impl, q_positions=torch.arange(4), kv_positions=torch.arange(10, 16)
        )
        assert torch.equal(res.out, torch.zeros_like(res.out))
        assert torch.isneginf(res.lse).all()


def test_empty_sequences():
    q, k, v = make_qkv(1, 2, 2, 0, 0, 16)
    res = attention(q, k, v)
    assert res.out.shape == (1, 2, 0, 16) and res.lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 2, 3, 0, 16)
    res = attention(q, k, v, q_positions=torch.arange(3), kv_positions=torch.arange(0))
    assert torch.equal(res.out, torch.zeros(1, 2, 3, 16)) and torch.isneginf(res.lse).all()


@pytest.mark.parametrize("impl", ["tiled", "reference"])
@pytest.mark.parametrize("spec", SPECS)
def test_padding_slots_equal_removing_them(spec, impl):
    """Left padding (position -1) gives the same rows as the unpadded sequence; pad rows are zero."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 120, 120, 32, dtype=torch.float64, seed=7)
    pad = 9
    k_pad = torch.cat([torch.randn(1, 2, pad, 32, dtype=torch.float64) * 5, k], dim=2)
    v_pad = torch.cat([torch.randn(1, 2, pad, 32, dtype=torch.float64) * 5, v], dim=2)
    q_pad = torch.cat([torch.randn(1, 4, pad, 32, dtype=torch.float64), q], dim=2)
    pos = torch.cat([torch.full((pad,), -1), torch.arange(120)])
    got = attention(
        q_pad, k_pad, v_pad, method=method, impl=impl, q_positions=pos, kv_positions=pos
    )
    want = attention(q, k, v, method=method, impl=impl)
    torch.testing.assert_close(got.out[:, :, pad:], want.out, rtol=0, atol=1e-12)
    assert torch.equal(got.out[:, :, :pad], torch.zeros_like(got.out[:, :, :pad]))
    assert torch.isneginf(got.lse[:, :, :pad]).all()
