"""Contract: every registered method x every implementation x dtype x shape matches its float64 oracle."""

import pytest
import torch

import longattn
from longattn import attention, from_string
from longattn.api import choose_impl, impl_names, make_call
from longattn.testing import METHOD_EXAMPLES, assert_attention_close, make_qkv

DTYPES = [torch.float32, torch.bfloat16]
# (Tq, Tk): equal lengths and fewer queries than keys.
LENGTHS = [(1, 1), (17, 17), (5, 17), (128, 128), (40, 128), (1000, 1000), (1, 1000)]
HEADS = [(4, 4), (8, 2)]
DIMS = [64, 128]
SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs]
# Compiled Flex costs seconds per new shape and mask on CPU: it has its own grid in test_flex.py.
GRID_IMPLS = [name for name in impl_names() if name != "flex"]


def test_every_registered_method_has_examples():
    missing = set(longattn.registry()) - set(METHOD_EXAMPLES)
    assert not missing, f"add METHOD_EXAMPLES entries for {sorted(missing)}"


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_has_a_fast_impl(spec):
    q, k, v = make_qkv(q_len=64)
    call = make_call(q, k, v, from_string(spec))
    fast = [name for name in GRID_IMPLS if name != "reference"]
    runnable = [name for name in fast if _can(call, name)]
    assert runnable, f"{spec} has no implementation besides the reference"


def _can(call, name):
    try:
        choose_impl(call, name)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda t: f"q{t[0]}k{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", GRID_IMPLS)
@pytest.mark.parametrize("spec", SPECS)
def test_contract(spec, impl, dtype, lengths, heads, dim):
    method = from_string(spec)
    q_len, kv_len = lengths
    q, k, v = make_qkv(
        2 if q_len < 100 else 1,
        heads[0],
        heads[1],
        q_len,
        kv_len,
        dim,
        dtype=dtype,
        seed=q_len + dim,
    )
    call = make_call(q, k, v, method)
    try:
        chosen = choose_impl(call, impl)
    except ValueError as exc:
        pytest.skip(str(exc))
    result = chosen.run(call)
    assert_attention_close(result, q, k, v, method)


@pytest.mark.parametrize("spec", SPECS)
def test_auto_matches_oracle_with_explicit_positions(spec):
    """Chunk-style call: queries at arbitrary increasing positions inside a longer key range."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 24, 300, 64, seed=3)
    kv_pos = torch.arange(300)
    q_pos = torch.arange(100, 124)
    out = attention(q, k, v, method=method, q_positions=q_pos, kv_positions=kv_pos)
    assert_attention_close(out, q, k, v, method, q_positions=q_pos, kv_positions=kv_pos)
