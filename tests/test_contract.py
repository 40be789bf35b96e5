"""Contract: every registered method x every implementation that must run it x dtype matches its
float64 oracle within ``longattn.testing.reference_bound``.

``must_run`` states, per method and call, which implementations run it; the table is exact both ways:
a listed implementation that refuses fails (a regression that loses an implementation shows as a
failure, never as a skip), and an unlisted one that accepts fails too (the table is stale). The default
run covers every method x implementation x dtype on a few shapes; ``-m slow`` adds the wide grid.
"""

import functools
import itertools

import pytest
import torch

import longattn
from longattn import attention, from_string
from longattn.api import choose_impl, impl_names, make_call
from longattn.kernels.decode import MAX_DECODE_QUERIES
from longattn.linear import HOOKS
from longattn.methods import Dense
from longattn.prefill import dense_reason
from longattn.testing import (
    METHOD_EXAMPLES,
    assert_attention_close,
    make_qkv,
)

DTYPES = [torch.float32, torch.bfloat16]
# linear methods (a recurrent state, no softmax) have their own contract: test_linear_contract.py
SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs if from_string(s).hook not in HOOKS]
# Compiled Flex costs seconds per new shape and mask on CPU: it has its own grid in test_flex.py.
GRID_IMPLS = [
    name for name in impl_names() if name not in ("flex", "linear", "recurrent", "forward")
]
# (Tq, Tk, H, Hkv, D): few queries over many keys (decode), a ragged prefill with GQA, a square one.
SHAPES = [(1, 1000, 8, 2, 64), (5, 17, 4, 4, 128), (40, 128, 8, 2, 64), (128, 128, 4, 4, 128)]
WIDE = [
    (tq, tk, h, hkv, d)
    for (tq, tk), (h, hkv), d in itertools.product(
        [(1, 1), (17, 17), (5, 17), (128, 128), (40, 128), (1000, 1000), (1, 1000)],
        [(4, 4), (8, 2)],
        [64, 128],
    )
]


@functools.cache
def must_run(spec: str, impl: str, dtype: torch.dtype, q_len: int, dim: int, kv_len: int) -> bool:
    """Whether ``impl`` must run ``spec`` on a call with these queries, dtype and head dim."""
    method = from_string(spec)
    few = q_len <= MAX_DECODE_QUERIES
    if method.hook == "score" or (method.hook == "select" and not few):
        # a select method's prefill and an eviction method's attention are dense calls
        # (longattn.call.phase_method)
        method = Dense()
    if method.hook == "plan" and (few or dense_reason(method, q_len, kv_len)):
        method = Dense()  # a plan acts in prefill, on calls of a few blocks at least
    dense, mask = isinstance(method, Dense), method.hook in ("mask", "plan")
    return {
        "decode_cpp": few and (dense or method.hook == "select") and dtype in DTYPES and dim <= 256,
        "decode": few and method.hook in ("mask", "select"),
        "sdpa": dense,
        "sparse_cpp": mask,  # bfloat16 too: it runs on every CPU (block_sparse.bf16_path)
        "sparse": mask,
        "tiled": mask and method.hook == "mask",
        "reference": True,
    }[impl]


def _cases(shapes):
    for spec, impl, dtype, shape in itertools.product(SPECS, GRID_IMPLS, DTYPES, shapes):
        if must_run(spec, impl, dtype, shape[0], shape[4], shape[1]):
            yield pytest.param(spec, impl, dtype, shape, id=f"{spec}-{impl}-{dtype}-{shape}")


def _run(spec, impl, dtype, shape):
    q_len, kv_len, heads, kv_heads, dim = shape
    method = from_string(spec)
    batch = 2 if q_len < 100 else 1
    q, k, v = make_qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype=dtype, seed=q_len + dim)
    call = make_call(q, k, v, method)
    result = choose_impl(call, impl).run(call)  # a refusal raises: it fails the test
    assert_attention_close(result, q, k, v, method)


def test_every_registered_method_has_examples():
    missing = set(longattn.registry()) - set(METHOD_EXAMPLES)
    assert not missing, f"add METHOD_EXAMPLES entries for {sorted(missing)}"


@pytest.mark.parametrize("spec", SPECS)
def test_the_must_run_table_is_exact(spec):
    """Each implementation accepts a call exactly when ``must_run`` says it must."""
    for impl, dtype, (q_len, kv_len, heads, kv_heads, dim) in itertools.product(
        GRID_IMPLS, DTYPES, SHAPES
    ):
        q, k, v = make_qkv(1, heads, kv_heads, q_len, kv_len, dim, dtype=dtype)
        call = make_call(q, k, v, from_string(spec))
        try:
            choose_impl(call, impl)
            runs = True
        except ValueError:
            runs = False
        assert runs == must_run(spec, impl, dtype, q_len, dim, kv_len), (impl, dtype, q_len, dim)


@pytest.mark.parametrize("spec, impl, dtype, shape", list(_cases(SHAPES)))
def test_contract(spec, impl, dtype, shape):
    _run(spec, impl, dtype, shape)


@pytest.mark.slow
@pytest.mark.parametrize("spec, impl, dtype, shape", list(_cases(WIDE)))
def test_contract_wide(spec, impl, dtype, shape):
    _run(spec, impl, dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_auto_matches_oracle(spec, dtype):
    """What users call: impl='auto' on a prefill and on a decode-sized call."""
    method = from_string(spec)
    for q_len in (64, 3):
        q, k, v = make_qkv(1, 8, 2, q_len, 200, 64, dtype=dtype, seed=q_len)
        assert_attention_close(attention(q, k, v, method=method), q, k, v, method)


@pytest.mark.parametrize("spec", SPECS)
def test_auto_matches_oracle_with_explicit_positions(spec):
    """Chunk-style call: queries at arbitrary increasing positions inside a longer key range."""
    method = from_string(spec)
    q, k, v = make_qkv(1, 4, 2, 24, 300, 64, seed=3)
    kv_pos = torch.arange(300)
    q_pos = torch.arange(100, 124)
    out = attention(q, k, v, method=method, q_positions=q_pos, kv_positions=kv_pos)
    assert_attention_close(out, q, k, v, method, q_positions=q_pos, kv_positions=kv_pos)
