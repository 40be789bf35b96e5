"""Sparse + low-rank hybrids (Scatterbrain, SEA, Combiner, WindowPlusLinear): their limits,
their parts, causality, bad input, and wrong variants that their derived bounds must reject.

The contract (each against its float64 reference within its ``error_bound``, one pass and
through a cache) is ``test_linear_contract.py``, driven by ``METHOD_EXAMPLES``.
"""

import pytest
import torch
import torch.nn.functional as F

from longattn import KVCache, attention, methods
from longattn.testing import make_qkv
from longattn.types import FeatureView


def dense_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def normalised(weights, v, shape):
    """Rows of ``weights`` [B, Hkv, G, Tq, Tk] applied to v [B, Hkv, Tk, Dv], as [B, H, Tq, Dv]."""
    out = (weights @ v.unsqueeze(2)) / weights.sum(-1, keepdim=True)
    return out.reshape(*shape[:3], v.shape[-1])


@pytest.mark.parametrize(
    "method",
    [
        methods.Scatterbrain(n_buckets=1, n_features=8),
        methods.Scatterbrain(sparse="topk_blocks", block_size=8, n_blocks=6, n_features=8),
        methods.SEA(top_k=64),
        methods.SEA(fraction=1.0, estimator="elu"),
        methods.Combiner(region=1),
        methods.Combiner(region=64),
        methods.Combiner(region=1, factorization="axial"),
        methods.Combiner(region=64, factorization="axial"),
        methods.WindowPlusLinear(window=64, features=4),
    ],
    ids=lambda m: m.describe(),
)
def test_degenerate_limits_are_dense_causal(method):
    q, k, v = make_qkv(1, 4, 2, 48, 48, 32, dtype=torch.float64, seed=1)
    out = attention(q, k, v, method=method).out
    torch.testing.assert_close(out, dense_causal(q, k, v), rtol=1e-10, atol=1e-10)


def test_scatterbrain_off_its_support_is_performer():
    """With no pair in the support the estimate is Performer's with the same draw."""
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, dtype=torch.float64, seed=2)
    method = methods.Scatterbrain(n_features=16, n_buckets=20000, seed=0)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert not bool((method.support(q, k) & causal).any())
    performer = attention(q, k, v, method=methods.Performer(features=16, seed=0)).out
    torch.testing.assert_close(attention(q, k, v, method=method).out, performer)


def test_scatterbrain_on_its_support_is_exact():
    """Within the support the weights are exp(scale q . k) up to the row's common factor."""
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, dtype=torch.float64, seed=3)
    method = methods.Scatterbrain(n_features=8, n_buckets=3)
    w = method.weights(q, k, 0, 16**-0.5, 0)  # [B, Hkv, 1, T, T]
    on = method.support(q, k) & torch.ones(30, 30, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * 16**-0.5).unsqueeze(2)
    ratio = torch.where(on, w / scores.exp(), torch.nan)  # one factor per row
    spread = ratio.nan_to_num(0).amax(-1) - torch.where(on, ratio, torch.inf).amin(-1)
    assert on.any()
    assert float(spread.nan_to_num(0).clamp(min=0).max()) < 1e-12


def test_scatterbrain_top_blocks_are_the_own_block_and_the_best_earlier_ones():
    q, k, _ = make_qkv(1, 2, 1, 40, 40, 8, dtype=torch.float64, seed=8)
    method = methods.Scatterbrain(sparse="topk_blocks", block_size=10, n_blocks=1)
    on = method.support(q, k, 0)[0, 0]  # [G, T, T]
    means = k[0, 0].view(4, 10, 8).mean(1)  # [4 blocks, D]
    for head in range(2):
        for t in (5, 15, 39):
            blocks = set((on[head, t].nonzero().flatten() // 10).tolist())
            own = t // 10
            best = {int((q[0, head, t] @ means[:own].T).argmax())} if own else set()
            assert blocks == {own} | best, (head, t)


def test_logsparse_spans_cover_each_earlier_region_once():
    from longattn.methods.combiner import log_spans

    spans = log_spans(40)
    q, k, v = make_qkv(1, 2, 1, 41 * 3, 41 * 3, 8, seed=9)
    visible = methods.Combiner(region=3, factorization="logsparse").regions(q, k, v, 1.0).visible
    for b in range(41):
        covered = sorted(
            r for j in visible[b].nonzero().flatten().tolist() for r in range(*spans[j])
        )
        assert covered == list(range(b)), b
        assert int(visible[b].sum()) == b.bit_length()  # one span per power of two


def test_logsparse_equals_fixed_up_to_three_regions():
    """Query regions 0, 1 and 2 read the same single regions under both factorisations."""
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, dtype=torch.float64, seed=10)
    fixed = attention(q, k, v, method=methods.Combiner(region=8)).out
    log = attention(q, k, v, method=methods.Combiner(region=8, factorization="logsparse")).out
    torch.testing.assert_close(log, fixed, rtol=1e-12, atol=1e-12)
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, dtype=torch.float64, seed=10)
    log = attention(q, k, v, method=methods.Combiner(region=8, factorization="logsparse")).out
    assert not torch.allclose(log, attention(q, k, v, method=methods.Combiner(region=8)).out)


def test_axial_reads_each_earlier_row_at_the_querys_column():
    """The definition, query by query: the own row up to the query exactly, and each earlier row
    a through all its keys read at q_ac, weighed by lse_ac + scale (q - q_ac) . khat_ac."""
    r, scale = 4, 16**-0.5
    q, k, v = make_qkv(1, 4, 2, 22, 22, 16, dtype=torch.float64, seed=11)
    out = attention(q, k, v, method=methods.Combiner(region=r, factorization="axial")).out
    for head, i in [(0, 0), (1, 7), (2, 13), (3, 19), (3, 21)]:
        kv, row, col = head // 2, i // r, i % r
        logits = list(scale * k[0, kv, row * r : i + 1] @ q[0, head, i])
        values = list(v[0, kv, row * r : i + 1])
        for a in range(row):
            row_a = slice(a * r, a * r + r)
            keys, vals, q_ac = k[0, kv, row_a], v[0, kv, row_a], q[0, head, a * r + col]
            p = torch.softmax(scale * keys @ q_ac, 0)
            lse = torch.logsumexp(scale * keys @ q_ac, 0)
            logits.append(lse + scale * (q[0, head, i] - q_ac) @ (p @ keys))
            values.append(p @ vals)
        expected = torch.softmax(torch.stack(logits), 0) @ torch.stack(values)
        torch.testing.assert_close(out[0, head, i], expected, rtol=1e-12, atol=1e-12)


def test_axial_is_dense_when_each_columns_queries_repeat_down_the_rows():
    """q_bc = q_ac for all rows: every row's abstraction is read at the query itself, so the
    expansion is exact and every earlier row contributes exactly what dense attention gives it;
    "fixed" (read at the row's mean query) is not."""
    q, k, v = make_qkv(1, 4, 2, 45, 45, 16, dtype=torch.float64, seed=12)
    q = q[:, :, :6].repeat(1, 1, 8, 1)[:, :, :45]  # period 6 = region: equal down each column
    axial = attention(q, k, v, method=methods.Combiner(region=6, factorization="axial")).out
    torch.testing.assert_close(axial, dense_causal(q, k, v), rtol=1e-10, atol=1e-10)
    fixed = attention(q, k, v, method=methods.Combiner(region=6)).out
    assert not torch.allclose(fixed, dense_causal(q, k, v))


def _wrong(method, q, k, v, **variant):
    scale = q.shape[-1] ** -0.5
    q32, k32, v32 = (t.float() for t in (q, k, v))
    return normalised(method.weights(q32, k32, 0, scale, 0, **variant), v32, q.shape)


def _combiner_local_only(method, q, k, v):
    q32, k32, v32 = (t.float() for t in (q, k, v))
    regions = method.regions(q32, k32, v32, q.shape[-1] ** -0.5)
    w_d, w_r = method.weights(q32, k32, 0, q.shape[-1] ** -0.5, regions)
    return method._mix(w_d, torch.zeros_like(w_r), v32, regions).reshape(q.shape)


def _axial_read_at_the_mean(method, q, k, v):
    """Each earlier row read at its mean query (the "fixed" abstraction), not at the column's."""
    fixed = methods.Combiner(region=method.region)
    return attention(*(t.float() for t in (q, k, v)), method=fixed).out


@pytest.mark.parametrize(
    "name, wrong",
    [
        ("scatterbrain-double-count", lambda m, q, k, v: _wrong(m, q, k, v, low_rank_on_support=True)),
        ("sea-dropped-key", lambda m, q, k, v: _wrong(m, q, k, v, drop_one=True)),
        ("combiner-no-regions", _combiner_local_only),
        ("combiner_axial-no-regions", _combiner_local_only),
        ("combiner_axial-read-at-the-mean", _axial_read_at_the_mean),
    ],
)  # fmt: skip
def test_a_wrong_variant_fails_the_bound(name, wrong):
    method = {
        "scatterbrain": methods.Scatterbrain(n_features=16, n_buckets=4),
        "sea": methods.SEA(top_k=8, n_features=16),
        "combiner": methods.Combiner(region=8),
        "combiner_axial": methods.Combiner(region=8, factorization="axial"),
    }[name.split("-")[0]]
    q, k, v = make_qkv(1, 4, 2, 64, 64, 32, seed=4)
    view = FeatureView("query", 0, 32**-0.5)
    ref = method.reference(q, k, v, view)
    bound = method.error_bound(q, k, v, ref, view)
    right = attention(q, k, v, method=method).out
    assert bool(((right.double() - ref).abs() <= bound).all())
    assert bool(((wrong(method, q, k, v).double() - ref).abs() > bound).any())


@pytest.mark.parametrize(
    "method",
    [
        methods.Scatterbrain(n_features=8, n_buckets=4),
        methods.SEA(top_k=4),
        methods.Combiner(region=5),
        methods.Combiner(region=5, factorization="axial"),
    ],
    ids=lambda m: m.describe(),
)
def test_future_keys_do_not_change_past_outputs(method):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, dtype=torch.float64, seed=5)
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[:, :, 25:] += 3.0
    v2[:, :, 25:] -= 2.0
    q2[:, :, 25:] *= -1
    a = attention(q, k, v, method=method).out[:, :, :25]
    b = attention(q2, k2, v2, method=method).out[:, :, :25]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_chunked_calls_through_a_cache_equal_one_pass_in_float32():
    q, k, v = make_qkv(1, 4, 2, 100, 100, 32, seed=6)
    for method in (
        methods.Scatterbrain(n_features=16),
        methods.SEA(top_k=9),
        methods.Combiner(region=16),
        methods.Combiner(region=16, factorization="axial"),
    ):
        whole = attention(q, k, v, method=method).out
        cache, outs = KVCache(1), []
        for lo, hi in [(0, 37), (37, 38), (38, 100)]:
            s = slice(lo, hi)
            outs.append(
                attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache).out
            )
        torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (methods.Scatterbrain, {"n_buckets": 0}, "n_buckets"),
        (methods.Scatterbrain, {"n_buckets": -3}, "-3"),
        (methods.Scatterbrain, {"n_features": 0}, "n_features"),
        (methods.Scatterbrain, {"n_rounds": 0}, "n_rounds"),
        (methods.Scatterbrain, {"sparse": "buckets"}, "buckets"),
        (methods.Scatterbrain, {"block_size": 0}, "block_size"),
        (methods.SEA, {"top_k": 0}, "top_k"),
        (methods.SEA, {"fraction": 1.5}, "1.5"),
        (methods.SEA, {"estimator": "cnn"}, "cnn"),
        (methods.Combiner, {"region": 0}, "region"),
        (methods.Combiner, {"factorization": "vertical"}, "vertical"),
        (methods.WindowPlusLinear, {"window": 0}, "window"),
    ],
)
def test_bad_input_is_refused_naming_the_value(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


def test_a_foreign_state_is_refused():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, seed=7)
    state = attention(q, k, v, method=methods.SEA(top_k=2)).state
    with pytest.raises(ValueError, match="Combiner"):
        methods.Combiner(region=4).forward(q, k, v, state, None)
    with pytest.raises(ValueError, match="HeldState"):
        methods.Scatterbrain().forward(q, k, v, (k, v), None)
