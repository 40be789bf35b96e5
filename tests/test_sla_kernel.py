"""SLA's expansion form through the library's C++ kernel (``kernels/expansion.py``): the same
classes, points and outputs as the PyTorch form, within the method's derived bound."""

from __future__ import annotations

import pytest
import torch

from longattn import attention
from longattn.kernels import expansion
from longattn.methods import SLA
from longattn.testing import assert_linear_method_close, make_qkv
from longattn.types import FeatureView

CASES = [  # B, H, Hkv, T, D, block, points
    (1, 4, 2, 300, 32, 16, 4),
    (2, 6, 3, 200, 64, 64, 8),
    (1, 2, 1, 40, 16, 64, 8),  # shorter than one block
    (1, 3, 3, 129, 8, 8, 3),
]


def _torch_form(method, q, k, v):
    """The method's own PyTorch computation (no kernel in its view)."""
    lead = torch.zeros_like(q[:, :, :0])
    out, _ = method.forward(q, k, v, None, FeatureView("query", 0, q.shape[-1] ** -0.5))
    return torch.cat([lead, out], dim=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_kernel_matches_the_torch_form_within_the_bound(case, dtype):
    batch, heads, n_kv, length, dim, block, points = case
    assert expansion.unavailable(torch.empty(0, dtype=dtype), block, points) is None
    method = SLA(block_size=block, critical=0.2, marginal=0.6, points=points)
    q, k, v = make_qkv(batch, heads, n_kv, length, length, dim, dtype=dtype, seed=length)
    q, k = q * 2, k * 2  # sharper attention than unit normals give
    got = attention(q, k, v, method=method)
    assert_linear_method_close(got, q, k, v, method)
    torch.testing.assert_close(got.out, _torch_form(method, q, k, v), rtol=0, atol=2e-2)


def test_a_dropped_marginal_block_fails_the_bound():
    """The kernel's output with the marginal blocks left out is outside the bound that holds the
    kernel's real output: the bound would catch a kernel that skipped them."""
    method = SLA(block_size=8, critical=0.2, marginal=0.6)
    q, k, v = make_qkv(1, 4, 2, 96, 96, 32, seed=6)
    assert_linear_method_close(attention(q, k, v, method=method), q, k, v, method)
    sparse = SLA(block_size=8, critical=0.2, marginal=0.0)
    with pytest.raises(AssertionError):
        assert_linear_method_close(attention(q, k, v, method=sparse), q, k, v, method)


def test_the_kernel_refuses_what_it_cannot_run():
    q = torch.empty(1, 1, 1, 8, dtype=torch.float64)
    assert "float64" in expansion.unavailable(q, 8, 2)
    assert "up to 64" in expansion.unavailable(q.float(), 128, 2)
