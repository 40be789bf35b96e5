"""Infini-attention: its limits, chained calls, bounded state, per-head gates, a wrong variant
against its bound, bad input. The contract (every dtype, one pass and a cache token by token) is
``test_linear_contract.py``."""

import dataclasses

import pytest
import torch

from longattn import KVCache, attention
from longattn.methods import InfiniAttention
from longattn.testing import assert_linear_method_close, make_qkv
from longattn.types import FeatureView


def _masked_softmax(q, k, v, visible):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~visible, -torch.inf), -1) @ v


def test_one_segment_is_causal_softmax():
    q, k, v = make_qkv(1, 4, 2, 50, 50, 16, dtype=torch.float64, seed=1)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    out = attention(q, k, v, method=InfiniAttention(segment=50)).out
    torch.testing.assert_close(out, _masked_softmax(q, k, v, causal))


def test_a_closed_gate_is_segment_local_softmax():
    q, k, v = make_qkv(1, 4, 2, 50, 50, 16, dtype=torch.float64, seed=2)
    seg = torch.arange(50) // 12
    local = torch.ones(50, 50, dtype=torch.bool).tril() & (seg[:, None] == seg[None, :])
    out = attention(q, k, v, method=InfiniAttention(segment=12, gate=-800.0)).out
    torch.testing.assert_close(out, _masked_softmax(q, k, v, local))


@pytest.mark.parametrize("splits", [[(0, 5), (5, 12), (12, 40), (40, 41), (41, 60)], [(0, 60)]])
def test_chained_calls_equal_one_pass_and_the_state_stays_bounded(splits):
    method = InfiniAttention(segment=12, gate=0.3)
    q, k, v = make_qkv(2, 4, 2, 60, 60, 16, dtype=torch.float64, seed=3)
    whole = attention(q, k, v, method=method).out
    cache, outs = KVCache(1), []
    for lo, hi in splits:
        s = slice(lo, hi)
        result = attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache)
        outs.append(result.out)
        assert result.state.k.shape[2] == hi % 12  # the open segment's keys only
        assert result.state.segments == hi // 12
        assert result.state.memory.shape == (2, 2, 16, 16)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-10, atol=1e-10)


def test_per_head_gates_from_calibration_tensors():
    method = InfiniAttention(segment=8, gate=0.0)
    q, k, v = make_qkv(1, 4, 2, 30, 30, 16, dtype=torch.float64, seed=4)
    logits = torch.tensor([[-1.0, 2.0], [0.5, -3.0]])  # [Hkv, G]
    view = FeatureView("query", 0, 0.25, {"gate": logits})
    out, _ = method.forward(q, k, v, None, view)
    for head, logit in enumerate(logits.flatten().tolist()):
        alone = dataclasses.replace(method, gate=logit).reference(q, k, v)
        torch.testing.assert_close(out[:, head], alone[:, head])
    with pytest.raises(ValueError, match="gate"):
        method.forward(q, k, v, None, FeatureView("query", 0, 0.25, {"gate": logits[:1]}))


def test_a_wrong_variant_fails_the_bound():
    """Another gate, or the memory left out, moves the float32 output far outside the bound that
    holds the right output."""
    method = InfiniAttention(segment=16, gate=0.0)
    q, k, v = make_qkv(1, 4, 2, 64, 64, 32, seed=5)
    assert_linear_method_close(attention(q, k, v, method=method), q, k, v, method)
    view = FeatureView("query", 0, 32**-0.5, None)
    ref = method.reference(q.double(), k.double(), v.double(), view)
    bound = method.error_bound(q, k, v, ref, view)
    assert torch.isfinite(bound).all()
    for wrong in (dataclasses.replace(method, gate=0.2), dataclasses.replace(method, gate=-50.0)):
        out = attention(q, k, v, method=wrong).out
        assert ((out.double() - ref).abs() > bound).any()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(segment=0), ValueError),
        (dict(segment=-4), ValueError),
        (dict(gate=float("nan")), ValueError),
        (dict(gate=float("inf")), ValueError),
        (dict(segment=2.0), TypeError),
        (dict(gate="open"), TypeError),
    ],
)
def test_bad_input_is_refused_at_construction(kwargs, error):
    with pytest.raises(error, match="InfiniAttention"):
        InfiniAttention(**kwargs)


def test_a_foreign_state_is_refused():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, seed=6)
    with pytest.raises(ValueError, match="InfiniState"):
        InfiniAttention().forward(q, k, v, (k, v), None)
