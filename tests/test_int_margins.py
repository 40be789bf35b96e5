"""The C++ integer-margin kernel (SALE's estimate by 8-bit dot products) gives bit for bit the
margins of its PyTorch definition (``longattn.methods.sale.int_margins_torch``): GQA, block sizes
that are not multiples of 16, head dims that are not multiples of 4, fewer queries than keys,
left padding in one batch row, 4 and 8 bits, bf16 inputs. Skipped where the CPU has no AVX-512
VNNI (the PyTorch margins run there, and ``tests/test_plan_equivalence.py`` checks them)."""

import dataclasses
import math

import pytest
import torch

from longattn import from_string
from longattn.call import make_call
from longattn.kernels import int_margins
from longattn.prefill import make_view
from longattn.testing import make_qkv

# (batch, heads, kv heads, queries, keys, dim, block, bits, dtype, left padding of row 1)
CASES = [
    (1, 9, 3, 640, 640, 64, 64, 8, torch.float32, 0),
    (2, 4, 2, 300, 777, 48, 32, 4, torch.float32, 37),
    (2, 6, 2, 130, 130, 18, 48, 8, torch.bfloat16, 5),
    (1, 8, 8, 257, 257, 128, 128, 8, torch.bfloat16, 0),
    (1, 2, 1, 40, 90, 20, 20, 4, torch.float32, 0),
]


def _view(case):
    batch, heads, n_kv, t_q, t_k, dim, block, bits, dtype, pad = case
    method = from_string(f"sale:block_size={block},bits={bits},budget=0.3")
    q, k, v = make_qkv(batch, heads, n_kv, t_q, t_k, dim, dtype=dtype, seed=t_k)
    kv_pos = torch.arange(t_k).repeat(batch, 1)
    if pad:  # batch row 1 is left-padded: its first slots hold no token
        kv_pos[1] = torch.cat([torch.full((pad,), -1), torch.arange(t_k - pad)])
    call = make_call(q * 3, k, v, method, q_positions=kv_pos[:, t_k - t_q :], kv_positions=kv_pos)
    return method, make_view(call)


@pytest.fixture(autouse=True)
def _needs_vnni():
    reason = int_margins.unavailable(torch.zeros(1, 1, 1, 4))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}/{c[2]}x{c[3]}/{c[4]}d{c[5]}b{c[6]}")
def test_kernel_margins_equal_the_pytorch_definition(case):
    method, view = _view(case)
    assert view.int_margins is int_margins.int_margins
    kernel = method.margins(view)
    defined = method.margins(dataclasses.replace(view, int_margins=None))
    assert torch.isfinite(kernel).any() and torch.isneginf(kernel).any()
    assert torch.equal(
        torch.isneginf(kernel), ~view.causal.expand_as(kernel) | torch.isneginf(defined)
    )
    assert torch.equal(kernel, defined)


def test_kernel_margins_follow_one_changed_key():
    """A key made the best of its block for one query moves that block's margin; only the KV
    head's query heads move, and only in its key block or where it is in the anchor's window (the
    query blocks of its diagonal)."""
    method, view = _view(CASES[0])
    before = method.margins(view)
    k = view.k.clone()
    k[0, 1, 300] = view.q[0, 4, 500] * 4  # query head 4 is in KV head 1's group
    after_view = dataclasses.replace(view, k=k)
    after = method.margins(after_view)
    assert torch.equal(after, method.margins(dataclasses.replace(after_view, int_margins=None)))
    moved = (after != before).nonzero().tolist()
    assert [0, 4, 500 // 64, 300 // 64] in moved
    assert all(3 <= h <= 5 and (kb == 4 or qb in (4, 5)) for _, h, qb, kb in moved)


def test_kernel_reasons():
    meta = torch.empty(1, 1, 1, 4, device="meta")
    assert "CPU only" in int_margins.unavailable(meta)
    wide = torch.zeros(1, 1, 1, int_margins.MAX_DIM + 1)
    assert "head dim" in int_margins.unavailable(wide)
    assert math.isfinite(int_margins.MAX_DIM)
