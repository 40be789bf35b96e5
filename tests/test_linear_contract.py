"""Contract of the linear methods (``feature_map`` and ``forward`` hooks): every registered one x
every implementation that runs it x dtype matches its float64 oracle within its derived bound
(``longattn.testing.assert_linear_method_close``), in one pass and through a cache token by token.

The softmax contract (``test_contract.py``) covers the other hooks; the implementation table here
is exact both ways too: ``linear`` and ``recurrent`` run every ``feature_map`` method, ``forward``
every ``forward`` method, and no softmax implementation runs either.
"""

import itertools

import pytest
import torch

from longattn import KVCache, attention, from_string
from longattn.api import IMPLS
from longattn.linear import HOOKS
from longattn.testing import METHOD_EXAMPLES, assert_linear_method_close, make_qkv

DTYPES = [torch.float32, torch.bfloat16]
SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs if from_string(s).hook in HOOKS]
# (T, H, Hkv, D): one token, a ragged GQA call across chunks, a square one
SHAPES = [(1, 4, 4, 16), (70, 8, 2, 64), (128, 4, 4, 128)]
WIDE = [(t, h, hkv, d) for t, (h, hkv), d in itertools.product(
    [1, 17, 64, 200], [(4, 4), (8, 2)], [32, 64])]  # fmt: skip


def impls_of(spec: str) -> list[str]:
    return ["forward"] if from_string(spec).hook == "forward" else ["linear", "recurrent"]


def _cases(shapes):
    for spec, dtype, shape in itertools.product(SPECS, DTYPES, shapes):
        for impl in impls_of(spec):
            yield pytest.param(spec, impl, dtype, shape, id=f"{spec}-{impl}-{dtype}-{shape}")


def _run(spec, impl, dtype, shape):
    t, heads, kv_heads, dim = shape
    method = from_string(spec)
    q, k, v = make_qkv(2, heads, kv_heads, t, t, dim, dtype=dtype, seed=t + dim)
    assert_linear_method_close(attention(q, k, v, method=method, impl=impl), q, k, v, method)


@pytest.mark.parametrize("spec, impl, dtype, shape", list(_cases(SHAPES)))
def test_linear_contract(spec, impl, dtype, shape):
    _run(spec, impl, dtype, shape)


@pytest.mark.slow
@pytest.mark.parametrize("spec, impl, dtype, shape", list(_cases(WIDE)))
def test_linear_contract_wide(spec, impl, dtype, shape):
    _run(spec, impl, dtype, shape)


@pytest.mark.parametrize("spec", SPECS)
def test_float64_is_the_definition(spec):
    """Float64 inputs: the whole call (the map included) against the definition in float64."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 50, 50, 32, dtype=torch.float64, seed=5)
    assert_linear_method_close(attention(q, k, v, method=method), q, k, v, method)


@pytest.mark.parametrize("spec", SPECS)
def test_a_cache_token_by_token_equals_one_pass(spec):
    """Prefill, then single-token steps through a cache: the outputs of one pass (float64)."""
    method = from_string(spec)
    if not method.is_causal:
        pytest.skip("a non-causal method keeps no state")
    q, k, v = make_qkv(1, 4, 2, 40, 40, 32, dtype=torch.float64, seed=6)
    whole = attention(q, k, v, method=method).out
    cache, outs = KVCache(1), []
    for lo, hi in [(0, 33)] + [(t, t + 1) for t in range(33, 40)]:
        s = slice(lo, hi)
        outs.append(attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache).out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", SPECS)
def test_the_implementation_table_is_exact(spec):
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 20, 20, 32, seed=7)
    for impl in [i.name for i in IMPLS] + ["linear", "recurrent", "forward"]:
        try:
            attention(q, k, v, method=method, impl=impl)
            runs = True
        except ValueError:
            runs = False
        assert runs == (impl in impls_of(spec)), impl
