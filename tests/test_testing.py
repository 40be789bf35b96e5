"""The contract's error bound (``longattn.testing.reference_bound``): it admits legitimate
reduction orders and fails real bugs (a dropped key, a wrong scale, a non-zero empty row)."""

import pytest
import torch

from longattn.kernels.reference import reference_attention
from longattn.kernels.tiled import tiled_attention
from longattn.testing import check_against_reference, make_qkv

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1000, 64), (128, 128), (17, 64)]


def _causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_summation_orders_pass(dtype, shape):
    """The eager oracle, a tiled online softmax with small tiles and a reversed key order are all
    legitimate evaluations of the same attention."""
    t, dim = shape
    q, k, v = make_qkv(1, 4, 2, t, t, dim, dtype=dtype, seed=t)
    visible, scale = _causal(t), dim**-0.5
    check_against_reference(reference_attention(q, k, v, visible, scale), q, k, v, visible, scale)
    pos = torch.arange(t).view(1, -1)
    tiled = tiled_attention(q, k, v, scale=scale, q_pos=pos, kv_pos=pos,
                            mask_fn=lambda b, h, qp, kp: kp <= qp, tile_q=64, tile_k=7)  # fmt: skip
    check_against_reference(tiled, q, k, v, visible, scale)
    flip = [x.flip(2) for x in (k, v)]
    reversed_keys = reference_attention(q, *flip, visible.flip(-1), scale)
    check_against_reference(reversed_keys.out, q, k, v, visible, scale)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bug", ["drop_diagonal", "drop_first", "scale_1_over_d"])
def test_real_bugs_fail(dtype, shape, bug):
    t, dim = shape
    q, k, v = make_qkv(1, 4, 2, t, t, dim, dtype=dtype, seed=t)
    visible, scale = _causal(t), dim**-0.5
    wrong_visible, wrong_scale = visible, scale
    if bug == "drop_diagonal":
        wrong_visible = visible & ~torch.eye(t, dtype=torch.bool)
    elif bug == "drop_first":
        wrong_visible = visible & (torch.arange(t) > 0)
    else:
        wrong_scale = 1.0 / dim
    wrong = reference_attention(q, k, v, wrong_visible, wrong_scale)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_against_reference(wrong.out, q, k, v, visible, scale)


def test_a_one_percent_scale_error_fails_in_float32():
    q, k, v = make_qkv(1, 4, 4, 128, 128, 64, seed=5)
    visible = _causal(128)
    wrong = reference_attention(q, k, v, visible, 1.01 * 64**-0.5)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_against_reference(wrong, q, k, v, visible, 64**-0.5)


def test_a_row_that_sees_nothing_must_be_exactly_zero():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=1)
    visible = _causal(8)
    visible[3] = False
    good = reference_attention(q, k, v, visible, 0.25)
    check_against_reference(good, q, k, v, visible, 0.25)
    leaked = good.out.clone()
    leaked[:, :, 3] = 1e-30
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_against_reference(leaked, q, k, v, visible, 0.25)


def test_a_wrong_lse_fails():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, seed=2)
    visible = _causal(64)
    good = reference_attention(q, k, v, visible, 0.2)
    shifted = good._replace(lse=good.lse + 1e-3)
    with pytest.raises(AssertionError, match="lse"):
        check_against_reference(shifted, q, k, v, visible, 0.2)


def test_nan_fails():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 32, seed=2)
    visible = _causal(16)
    out = reference_attention(q, k, v, visible, 0.2).out.clone()
    out[0, 1, 5, 3] = torch.nan
    with pytest.raises(AssertionError, match="exceeds its bound"):
        check_against_reference(out, q, k, v, visible, 0.2)
