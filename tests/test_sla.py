"""SLA (sparse-linear attention): its limits, its block classes, causality, a wrong variant against
its bound, bad input. The contract (every dtype, one pass and a cache token by token) is
``test_linear_contract.py``."""

import dataclasses

import pytest
import torch

from longattn import KVCache, attention
from longattn.methods import SLA
from longattn.methods.sla import CRITICAL, MARGINAL
from longattn.testing import assert_linear_method_close, make_qkv
from longattn.types import FeatureView


def _dense_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_every_block_critical_is_causal_softmax():
    q, k, v = make_qkv(1, 4, 2, 100, 100, 32, dtype=torch.float64, seed=1)
    out = attention(q, k, v, method=SLA(block_size=8, critical=1.0, marginal=0.0)).out
    torch.testing.assert_close(out, _dense_causal(q, k, v), rtol=1e-12, atol=1e-12)


def test_no_marginal_block_is_softmax_over_the_critical_blocks():
    """marginal=0 is block-sparse attention: softmax restricted to the critical blocks' keys."""
    method = SLA(block_size=8, critical=0.3, marginal=0.0)
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16, dtype=torch.float64, seed=2)
    classes = method.classify(q, k, 0, 0, 7, 16**-0.5)
    assert set(classes.unique().tolist()) <= {0, CRITICAL}
    keep = (classes == CRITICAL).repeat_interleave(8, -1).repeat_interleave(8, -2)
    keep &= torch.ones(64, 64, dtype=torch.bool).tril()
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 16**-0.5
    ref = torch.softmax(scores.masked_fill(~keep, -torch.inf), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(attention(q, k, v, method=method).out, ref)


def test_block_counts_follow_the_fractions():
    method = SLA(block_size=4, critical=0.25, marginal=0.5, sink_blocks=1)
    q, k, v = make_qkv(2, 3, 3, 64, 64, 8, seed=3)
    classes = method.classify(q, k, 0, 0, 15, 8**-0.5)  # [B, H, 16, 16]
    for i in range(16):
        row = classes[..., i, :]
        n = i + 1
        crit = max(1, -(-n // 4))
        assert (row[..., i] == CRITICAL).all()  # the diagonal
        assert (row[..., i + 1 :] == 0).all()  # causal
        if i > 0:
            assert (row[..., 0] == CRITICAL).all()  # the sink block
        n_crit = (row == CRITICAL).sum(-1)
        assert (n_crit == max(crit, 2 if i > 0 else 1)).all()
        assert ((row > 0).sum(-1) == max(-(-3 * n // 4), int(n_crit.max()))).all()
    assert (classes == MARGINAL).any()


@pytest.mark.parametrize(
    "fields, length",
    [(dict(critical=0.25, marginal=0.5, sink_blocks=1), 64),
     (dict(critical=0.1, marginal=0.8, sink_blocks=3), 61),
     (dict(critical=0.05, marginal=0.0, sink_blocks=0), 40),
     (dict(critical=0.6, marginal=0.4, sink_blocks=2), 37)],
)  # fmt: skip
def test_class_shares_are_the_counts_classify_gives(fields, length):
    """The critical and marginal shares of the causal key blocks, computed from the length
    alone, equal what ``classify`` assigns on inputs (lengths not block multiples included)."""
    method = SLA(block_size=4, **fields)
    q, k, _ = make_qkv(2, 3, 3, length, length, 8, seed=5)
    n = -(-length // 4)
    classes = method.classify(q, k, 0, 0, n - 1, 8**-0.5)
    causal_blocks = 2 * 3 * n * (n + 1) / 2
    critical, marginal = method.class_shares(length)
    assert critical == pytest.approx(float((classes == CRITICAL).sum()) / causal_blocks)
    assert marginal == pytest.approx(float((classes == MARGINAL).sum()) / causal_blocks)


def test_eval_density_of_sla_is_its_exact_block_share():
    from longattn.eval import metrics

    method = SLA(critical=0.1, marginal=0.8)
    value, kind = metrics.density(method, 2048)
    assert kind == metrics.EXACT_BLOCKS
    assert value == method.class_shares(2048)[0]
    assert 0.1 < value < 0.2  # ceil(0.1 n) per row and the forced diagonal and sink


def test_a_later_token_does_not_change_earlier_outputs():
    method = SLA(block_size=8, critical=0.2, marginal=0.6)
    q, k, v = make_qkv(1, 4, 2, 80, 80, 16, dtype=torch.float64, seed=4)
    out = attention(q, k, v, method=method).out
    for t in (41, 47, 48):  # inside a block, its last token, the next block's first
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] += 3.0
        k2[:, :, t:] -= 2.0
        v2[:, :, t:] *= -1
        torch.testing.assert_close(
            attention(q2, k2, v2, method=method).out[:, :, :t], out[:, :, :t]
        )


@pytest.mark.parametrize(
    "method",
    [
        SLA(block_size=8, critical=0.2, marginal=0.6, feature="taylor", combine="shared"),
        SLA(block_size=8, critical=0.2, marginal=0.6, feature="elu", combine="mass"),
        SLA(block_size=8, critical=0.2, marginal=0.6, feature="expansion", points=3),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chained_calls_across_blocks_equal_one_pass(method, dtype):
    """float32 runs the expansion form through the C++ kernel, told where each call's rows start
    (a call's first rows inside a block)."""
    q, k, v = make_qkv(2, 4, 2, 70, 70, 16, dtype=dtype, seed=5)
    whole = attention(q, k, v, method=method).out
    cache, outs = KVCache(1), []
    for lo, hi in [(0, 5), (5, 8), (8, 30), (30, 31), (31, 70)]:
        s = slice(lo, hi)
        outs.append(attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache).out)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "feature, combine", [("elu", "shared"), ("elu", "mass"), ("expansion", "mass")]
)
def test_a_wrong_variant_fails_the_bound(feature, combine):
    """Leaving the marginal blocks out (sparse-only) is not SLA: its float32 output is far outside
    SLA's derived bound, which holds the right output."""
    method = SLA(block_size=8, critical=0.2, marginal=0.6, feature=feature, combine=combine)
    q, k, v = make_qkv(1, 4, 2, 96, 96, 32, seed=6)
    assert_linear_method_close(attention(q, k, v, method=method), q, k, v, method)
    wrong = attention(q, k, v, method=dataclasses.replace(method, marginal=0.0)).out
    view = FeatureView("query", 0, 32**-0.5, None)
    ref = method.reference(q.double(), k.double(), v.double(), view)
    bound = method.error_bound(q, k, v, ref, view)
    assert torch.isfinite(bound).all()
    assert ((wrong.double() - ref).abs() > bound).any()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(critical=0.6, marginal=0.5), ValueError),
        (dict(critical=0.0), ValueError),
        (dict(critical=-0.1), ValueError),
        (dict(marginal=-0.1), ValueError),
        (dict(block_size=0), ValueError),
        (dict(sink_blocks=-1), ValueError),
        (dict(feature="relu"), ValueError),
        (dict(combine="sum"), ValueError),
        (dict(points=0), ValueError),
        (dict(critical="0.1"), TypeError),
        (dict(marginal=True), TypeError),
    ],
)
def test_bad_input_is_refused_at_construction(kwargs, error):
    with pytest.raises(error, match="SLA"):
        SLA(**kwargs)


def test_a_foreign_state_is_refused():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, seed=7)
    with pytest.raises(ValueError, match="SLAState"):
        SLA().forward(q, k, v, (k, v), None)


def test_the_mass_form_weighs_the_linear_average_by_the_pooled_mass():
    """combine="mass" on one query block with one marginal block: the exact part plus the marginal
    keys' linear average weighted by ``block * exp(scale q . mean(k))``."""
    method = SLA(
        block_size=4, critical=0.5, marginal=0.5, sink_blocks=0, feature="elu", combine="mass"
    )
    q, k, v = make_qkv(1, 1, 1, 8, 8, 8, dtype=torch.float64, seed=8)
    out = attention(q, k, v, method=method).out[0, 0, 4:]  # query block 1: blocks 0 and 1
    assert (method.classify(q, k, 0, 1, 1, 8**-0.5)[0, 0, 0] == torch.tensor([1, 2])).all()
    scores = (q[0, 0, 4:] @ k[0, 0].T) * 8**-0.5
    exact = torch.exp(scores[:, 4:]).tril()
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731
    kern = phi(q[0, 0, 4:]) @ phi(k[0, 0, :4]).T
    average = (kern @ v[0, 0, :4]) / kern.sum(-1, keepdim=True)
    mass = 4 * torch.exp((q[0, 0, 4:] @ k[0, 0, :4].mean(0)) * 8**-0.5)[:, None]
    expected = (exact @ v[0, 0, 4:] + mass * average) / (exact.sum(-1, keepdim=True) + mass)
    torch.testing.assert_close(out, expected)


def test_the_expansion_is_exact_where_the_queries_equal_their_pooled_query():
    """With every query equal (so equal to the pooled query it is expanded around), each marginal
    block's expansion is its exact mass and average: SLA with every other block marginal is
    causal softmax."""
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16, dtype=torch.float64, seed=9)
    q = q[:, :, :1].expand_as(q).contiguous()
    method = SLA(block_size=8, critical=0.1, marginal=0.9, sink_blocks=0, feature="expansion")
    assert (method.classify(q, k, 0, 0, 7, 0.25) == MARGINAL).any()
    torch.testing.assert_close(attention(q, k, v, method=method).out, _dense_causal(q, k, v))


@pytest.mark.parametrize("points", [1, 4])
def test_the_expansion_is_the_first_order_estimate_and_a_lower_bound(points):
    """One query block (block 1) with one marginal block (block 0), expanded around the nearest
    of block 0's query centres (one point: their mean; four points in a block of four: the
    queries themselves): the weights of block 0 are ``exp(scale a . k_s + scale (q - a) .
    k_hat)`` and their sum never exceeds the block's exact mass."""
    method = SLA(
        block_size=4, critical=0.5, marginal=0.5, sink_blocks=0, feature="expansion", points=points
    )
    q, k, v = make_qkv(1, 1, 1, 8, 8, 8, dtype=torch.float64, seed=8)
    assert (method.classify(q, k, 0, 1, 1, 8**-0.5)[0, 0, 0] == torch.tensor([1, 2])).all()
    out = attention(q, k, v, method=method).out[0, 0, 4:]
    scale, rows, keys = 8**-0.5, q[0, 0, 4:], k[0, 0, :4]
    centres = q[0, 0, :4].mean(0, keepdim=True) if points == 1 else q[0, 0, :4]
    anchor = centres[torch.cdist(rows, centres).argmin(-1)]  # [4, D]: each row's point
    probs = torch.softmax(scale * anchor @ keys.T, -1)
    k_hat = probs @ keys  # [4, D]
    lin = torch.exp(scale * anchor @ keys.T + scale * ((rows - anchor) * k_hat).sum(-1, True))
    assert (lin.sum(-1) <= torch.exp(scale * rows @ keys.T).sum(-1) * (1 + 1e-12)).all()
    exact = torch.exp(scale * rows @ k[0, 0, 4:].T).tril()
    expected = (exact @ v[0, 0, 4:] + lin @ v[0, 0, :4]) / (exact.sum(-1) + lin.sum(-1))[:, None]
    torch.testing.assert_close(out, expected)


def test_more_points_than_queries_in_a_block_use_one_per_query():
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, dtype=torch.float64, seed=10)
    many = SLA(block_size=4, critical=0.25, marginal=0.75, points=16)
    assert many.n_points == 4
    torch.testing.assert_close(
        attention(q, k, v, method=many).out,
        attention(q, k, v, method=dataclasses.replace(many, points=4)).out,
        rtol=0,
        atol=0,
    )
