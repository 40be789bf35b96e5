"""``longattn bench linear-error``'s measurement on captured q/k/v (random here; the real model in
the benchmark)."""

import pytest
import torch
from test_linear_api import EluMap

from longattn.bench.linear_error import layer_errors, linear_methods, softmax_reference
from longattn.testing import make_qkv


def test_the_error_is_relative_to_softmax_per_layer():
    captured = {i: make_qkv(1, 4, 2, 64, 64, 16, seed=i) for i in range(3)}
    rec = layer_errors(captured, EluMap())
    assert len(rec["layer_err"]) == 3 and rec["features"] == 16
    assert 0 < rec["min_err"] <= rec["median_err"] <= rec["max_err"] < 10
    # a method's error is exactly the softmax distance of its output
    q, k, v = captured[1]
    from longattn import attention

    out = attention(q, k, v, method=EluMap()).out.double()
    ref = softmax_reference(q, k, v)
    assert rec["layer_err"][1] == pytest.approx(float((out - ref).norm() / ref.norm()))


def test_softmax_reference_is_causal_attention_with_groups():
    q, k, v = make_qkv(1, 4, 2, 9, 9, 8, dtype=torch.float64, seed=2)
    ref = softmax_reference(q, k, v)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -torch.inf)
    torch.testing.assert_close(ref, torch.softmax(scores, -1) @ vv)


def test_only_linear_methods_are_measured():
    with pytest.raises(ValueError, match="linear methods only"):
        linear_methods("dense,block_topk")
