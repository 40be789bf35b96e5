"""The Intersection wrapper: the AND of two masks, exact on every implementation, conservative bounds."""

import pytest
import torch

from longattn import attention
from longattn.methods import Dense, SlidingWindow, StreamingLLM, Strided
from longattn.methods.intersection import Intersection
from longattn.testing import assert_attention_close, make_qkv

PAIRS = [
    (StreamingLLM(sinks=4, window=32), SlidingWindow(window=20)),
    (Strided(stride=8), SlidingWindow(window=40)),
    (Dense(), SlidingWindow(window=5, dilation=3)),
]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0].name}&{p[1].name}")
@pytest.mark.parametrize("impl", ["tiled", "reference"])
def test_intersection_matches_its_oracle_and_is_the_and_of_both_masks(pair, impl):
    method = Intersection(*pair)
    q, k, v = make_qkv(2, 4, 2, q_len=100, kv_len=130, seed=3)
    assert_attention_close(attention(q, k, v, method=method, impl=impl), q, k, v, method)
    q_pos, kv_pos = torch.arange(130).view(-1, 1), torch.arange(130).view(1, -1)
    both = pair[0].mask(None, None, q_pos, kv_pos) & pair[1].mask(None, None, q_pos, kv_pos)
    assert torch.equal(method.mask(None, None, q_pos, kv_pos), both)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0].name}&{p[1].name}")
def test_intersection_block_bounds_are_conservative(pair):
    method = Intersection(*pair)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        q_lo, kv_lo = (int(x) for x in torch.randint(0, 300, (2,), generator=gen))
        q_hi, kv_hi = q_lo + int(torch.randint(0, 40, (1,), generator=gen)), kv_lo + 31
        q_pos, kv_pos = torch.arange(q_lo, q_hi + 1), torch.arange(kv_lo, kv_hi + 1)
        truth = method.mask(None, None, q_pos.view(-1, 1), kv_pos.view(1, -1))
        any_, all_ = method.block_bounds(
            torch.tensor(0), *(torch.tensor(x) for x in (q_lo, q_hi, kv_lo, kv_hi))
        )
        assert bool(any_) or not truth.any()
        assert not bool(all_) or truth.all()


def test_intersection_refuses_what_is_not_a_mask_method():
    with pytest.raises(ValueError, match="first"):
        Intersection(None, Dense())
