"""Inputs that require grad: every method's output stays in the autograd graph with the gradient
of its definition, or the call is refused; never an output cut from the graph."""

import pytest
import torch

from longattn import KVCache, attention, from_string
from longattn.kernels import reference
from longattn.testing import METHOD_EXAMPLES, make_qkv

SPECS = [spec for specs in METHOD_EXAMPLES.values() for spec in specs]

# Finite differences cannot check these: SLA's expansion points are rounded to float32 by
# definition (every dtype finds the same centres), so its float64 output moves in float32 steps.
NOT_SMOOTH = ("sla:",)


def _leaves(dtype, seed=0, heads=(4, 2), length=96, dim=16):
    q, k, v = make_qkv(1, *heads, length, length, dim, dtype=torch.float32, seed=seed)
    return tuple(t.to(dtype).requires_grad_(True) for t in (q, k, v))


def _grads(spec: str, dtype) -> list[torch.Tensor]:
    q, k, v = _leaves(dtype)
    out = attention(q, k, v, method=from_string(spec)).out
    assert out.grad_fn is not None, f"{spec}: the output carries no gradient"
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * weight.to(dtype)).sum().backward()
    return [torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double()
            for t in (q, k, v)]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_float32_gradients_are_the_float64_ones(spec):
    """The float32 call runs on an implementation with a backward (the fast kernels have none)
    and its gradients are the float64 call's, up to float32 rounding."""
    for got, want in zip(_grads(spec, torch.float32), _grads(spec, torch.float64)):
        scale = want.abs().max().clamp(min=1e-30)
        assert float((got - want).abs().max() / scale) < 1e-4, spec


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith(NOT_SMOOTH)])
def test_float64_gradients_match_finite_differences(spec):
    method = from_string(spec)
    q, k, v = _leaves(torch.float64, heads=(2, 1), length=48)
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, method=method).out,
        (q, k, v),
        fast_mode=True,
        atol=1e-6,
        rtol=1e-4,
    )


@pytest.mark.parametrize("impl", ["sparse_cpp", "sparse", "tiled", "flex"])
def test_a_named_kernel_without_backward_is_refused(impl):
    q, k, v = _leaves(torch.float32)
    with pytest.raises(ValueError, match="no backward"):
        attention(q, k, v, method=from_string("sliding_window:window=16"), impl=impl)
    with torch.no_grad():  # inference on the same tensors runs there
        out = attention(q, k, v, method=from_string("sliding_window:window=16"), impl="sparse")
    assert out.out.grad_fn is None


def test_without_a_differentiable_implementation_auto_refuses(monkeypatch):
    monkeypatch.setenv(reference.MAX_BYTES_ENV, "1024")  # the reference over its cap
    q, k, v = _leaves(torch.float32)
    with pytest.raises(ValueError, match="no implementation can run this call.*no backward"):
        attention(q, k, v, method=from_string("block_topk:block_size=16,budget=0.3"))


def test_a_plan_is_the_same_with_and_without_grad():
    method = from_string("block_topk:block_size=16,budget=0.3")
    q, k, v = _leaves(torch.float32)
    with torch.no_grad():
        want = attention(q, k, v, method=method).out
    got = attention(q, k, v, method=method).out
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_cache_refuses_inputs_that_require_grad():
    cache = KVCache(1)
    q, k, v = _leaves(torch.float32, length=8)
    with torch.no_grad():
        attention(q, k, v, cache=cache)
    before = cache.seq_len(0)
    with pytest.raises(ValueError, match="must not require grad"):
        attention(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], cache=cache)
    assert cache.seq_len(0) == before


def test_hf_use_trains_through_a_plan_method():
    """Under ``hf.use`` a model's loss reaches the attention projections through a sparse
    prefill method (its plan computed without autograd)."""
    pytest.importorskip("transformers")
    from longattn import hf
    from tests.test_hf_use import tiny_model, tokens

    model = tiny_model("llama")
    ids = tokens(1, 64)
    with hf.use(model, from_string("block_topk:block_size=16,budget=0.5")):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_a_linear_methods_state_in_a_cache_keeps_its_graph():
    """Chained calls through a cache differentiate as one call: the recurrent state carries the
    earlier keys' gradient."""
    method = from_string("elu_linear")
    grads = []
    for chained in (True, False):
        q, k, v = _leaves(torch.float32, length=64)
        if chained:
            cache = KVCache(1)
            parts = [attention(*(t[:, :, s] for t in (q, k, v)), method=method, cache=cache).out
                     for s in (slice(0, 32), slice(32, 64))]  # fmt: skip
            out = torch.cat(parts, dim=2)
        else:
            out = attention(q, k, v, method=method).out
        out.sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
