"""Compiled FlexAttention over the same BlockIndex: every method on one shape by default (each new
mask costs a compile of seconds on CPU), a wider grid under ``-m slow``."""

import pytest
import torch

from longattn import from_string
from longattn.api import choose_impl, make_call
from longattn.kernels.flex import flex_block_attention
from longattn.linear import HOOKS
from longattn.testing import METHOD_EXAMPLES, assert_attention_close, make_qkv
from longattn.types import BlockIndex

# linear methods have no flex path (a recurrent state, not a mask)
SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs if from_string(s).hook not in HOOKS]


def _check(spec, dtype, q_len, kv_len, heads, dim, **positions):
    method = from_string(spec)
    if method.name == "per_head_window":
        pytest.skip("its mask builds a tensor inside mask_mod, which Inductor's CPU Flex rejects")
    q, k, v = make_qkv(1, heads[0], heads[1], q_len, kv_len, dim, dtype=dtype, seed=q_len)
    call = make_call(q, k, v, method, None, *positions.values())
    try:
        chosen = choose_impl(call, "flex")
    except ValueError as exc:
        pytest.skip(str(exc))
    assert_attention_close(chosen.run(call), q, k, v, method, **positions)


@pytest.mark.parametrize("spec", SPECS)
def test_flex_matches_oracle(spec):
    """Tq != Tk, GQA, a ragged last block: one compile per method."""
    _check(spec, torch.float32, 200, 300, (4, 2), 64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [(17, 17), (128, 128), (1, 1000)], ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_flex_grid(spec, dtype, lengths):
    _check(spec, dtype, *lengths, (8, 2), 64)


def test_flex_padding_and_all_full_blocks():
    """Padding slots and an index with only full blocks (the CPU compile workaround) are exact."""
    q, k, v = make_qkv(2, 4, 4, 256, 256, 32, seed=5)
    layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    index = BlockIndex.from_block_mask(layout, 128)
    pos = torch.arange(256).repeat(2, 1)
    pos[1, :40] = -1
    got = flex_block_attention(q, k, v, index, scale=0.2, q_pos=pos, kv_pos=pos)
    assert_attention_close(
        got,
        q,
        k,
        v,
        from_string("dense:causal=false"),
        scale=0.2,
        q_positions=pos,
        kv_positions=pos,
    )
    assert (got.out[1, :, :40] == 0).all()
