"""Bad input gets a clear ValueError / TypeError that names the offending value."""

import pytest
import torch

from longattn import attention, from_string, get, methods, register
from longattn.kernels.reference import MAX_BYTES_ENV
from longattn.method import Method
from longattn.testing import make_qkv


def qkv(**kw):
    return make_qkv(**{"batch": 1, "n_heads": 4, "q_len": 8, "head_dim": 16, **kw})


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), ValueError, "head_dim"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), ValueError, "multiple"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "dtypes differ"),
        (lambda q, k, v: (q.half(), k.half(), v.half()), TypeError, "float16"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating point"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "k and v shapes"),
        (lambda q, k, v: (torch.cat([q, q], 2), k, v), ValueError, "16 > 8"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors(mutate, exc, words):
    with pytest.raises(exc, match=words):
        attention(*mutate(*qkv()))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"q_positions": torch.arange(8.0), "kv_positions": torch.arange(8)}, TypeError, "integer"),
        ({"q_positions": torch.arange(7), "kv_positions": torch.arange(8)}, ValueError, r"\[8\]"),
        ({"kv_positions": torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])}, ValueError, "increasing"),
        ({"q_positions": torch.arange(-2, 6)}, ValueError, "-2"),
        ({"scale": "big"}, TypeError, "big"),
        ({"scale": float("nan")}, TypeError, "nan"),
        ({"impl": "fastest"}, ValueError, "fastest"),
        ({"method": 3}, TypeError, "int"),
        ({"method": "nope"}, ValueError, "nope"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        attention(*qkv(), **kwargs)


def test_explicit_impl_that_cannot_run_names_the_reason():
    with pytest.raises(ValueError, match="impl='sdpa' cannot run.*sliding_window"):
        attention(*qkv(), method=methods.SlidingWindow(window=4), impl="sdpa")


def test_reference_refuses_beyond_its_memory_cap(monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, str(1 << 10))
    with pytest.raises(ValueError, match="impl='tiled'"):
        attention(*qkv(q_len=64), impl="reference")
    # auto skips the reference and still answers
    assert attention(*qkv(q_len=64), method=methods.SlidingWindow(window=4)).out.shape[2] == 64
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="lots"):
        attention(*qkv(), impl="reference")


@pytest.mark.parametrize(
    "build, exc, words",
    [
        (lambda: methods.SlidingWindow(window=0), ValueError, "window must be > 0, got 0"),
        (lambda: methods.SlidingWindow(window=-3), ValueError, "-3"),
        (lambda: methods.SlidingWindow(window=2.5), TypeError, "2.5"),
        (lambda: methods.SlidingWindow(dilation=0), ValueError, "dilation"),
        (lambda: methods.StreamingLLM(sinks=-1), ValueError, "sinks must be >= 0, got -1"),
        (lambda: methods.StreamingLLM(window=0), ValueError, "window"),
        (lambda: methods.Strided(mode="diagonal"), ValueError, "diagonal"),
        (lambda: methods.Strided(stride=4, summary=5), ValueError, "summary"),
        (lambda: methods.PowerAttention(block_size=0), ValueError, "block_size"),
        (lambda: methods.Neighborhood2D(height=4, kernel=5), ValueError, "height=4"),
        (lambda: methods.PerHeadWindow(windows=()), ValueError, "windows"),
        (lambda: methods.PerHeadWindow(windows=(4, 0)), ValueError, r"windows\[1\]"),
        (lambda: from_string("sliding_window:window=abc"), ValueError, "abc"),
        (lambda: from_string("sliding_window:size=4"), ValueError, "size"),
        (lambda: from_string("sliding_window:window"), ValueError, "field=value"),
        (lambda: get("flash9"), ValueError, "flash9"),
    ],
)
def test_bad_method_parameters(build, exc, words):
    with pytest.raises(exc, match=words):
        build()


def test_positions_outside_a_grid_method():
    q, k, v = qkv(q_len=20)
    with pytest.raises(ValueError, match="positions must be < 16"):
        attention(q, k, v, method=methods.Neighborhood2D(height=4, width=4, kernel=3))


def test_register_rejects_duplicates_and_non_methods():
    with pytest.raises(ValueError, match="already registered"):
        register("dense")(type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="Method subclass"):
        register("not_a_method_xyz")(int)


def test_from_string_round_trips_every_default():
    from longattn import registry

    for cls in registry().values():
        method = cls()
        assert from_string(method.describe()) == method
