"""The linear-attention engine: chunkwise = recurrent = float64 quadratic reference within the
derived bound (``longattn.testing.linear_bound``), for every transition, dtype, GQA, length and
chunk size; state carried across calls = one pass; and the bound's power to catch errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from longattn.kernels.linear import LinearState, linear_attention, linear_recurrent
from longattn.testing import assert_linear_close, linear_bound

TRANSITIONS = ["none", "fixed", "head", "channel", "delta", "gated_delta", "channel_delta"]
FEAT, DV = 8, 8


def _inputs(transition, *, length=17, batch=1, n_heads=4, n_kv=1, dtype=torch.float32, seed=0,
            window=0, q_len=None):  # fmt: skip
    """Feature-mapped q, k (non-negative for the normalised forms), v and the call's keywords."""
    gen = torch.Generator().manual_seed(seed)
    q_len = length if q_len is None else q_len

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = randn(batch, n_heads, q_len, FEAT), randn(batch, n_kv, length, FEAT)
    v = randn(batch, n_kv, length, DV)
    kw: dict = {}
    delta = transition.endswith("delta")
    if delta:  # the delta rule: unit keys (as DeltaNet normalises them), no normaliser
        k = F.normalize(k, dim=-1)
        kw.update(normalize=False, beta=torch.rand(batch, n_kv, length, generator=gen))
    else:
        q, k = (F.elu(q) + 1) / math.sqrt(FEAT), F.elu(k) + 1
    if transition == "fixed":
        kw["log_decay"] = torch.log(1 - 2.0 ** (-5 - torch.arange(n_kv, dtype=torch.float32)))
    if transition in ("head", "gated_delta"):
        kw["log_decay"] = -0.3 * torch.rand(batch, n_kv, length, generator=gen)
    if transition in ("channel", "channel_delta"):
        kw["log_decay"] = -2.0 * torch.rand(batch, n_kv, length, FEAT, generator=gen)
    if window:
        kw.update(window=window, q_raw=randn(batch, n_heads, q_len, 4))
        kw["k_raw"] = randn(batch, n_kv, length, 4)
        kw["q_raw"], kw["k_raw"] = kw["q_raw"].to(dtype), kw["k_raw"].to(dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype), kw


NATIVE = ("none", "fixed")  # the transitions the C++ kernel runs


def _impls(transition):
    return ["torch", "native"] if transition in NATIVE else ["torch"]


CASES = [(t, impl) for t in TRANSITIONS for impl in _impls(t)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 17, 64, 200])
@pytest.mark.parametrize("transition,impl", CASES)
def test_chunkwise_equals_recurrent_equals_reference(transition, impl, length, dtype):
    q, k, v, kw = _inputs(transition, length=length, dtype=dtype, batch=2, n_heads=4, n_kv=1)
    bound = linear_bound(q, k, v, **kw)
    out, state = linear_attention(q, k, v, chunk_size=16, impl=impl, **kw)
    assert out.dtype == dtype and state.kv.dtype == torch.float32
    assert_linear_close(out, bound)
    rec, _ = linear_recurrent(q, k, v, **kw)
    assert_linear_close(rec, bound)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("transition", NATIVE)
def test_native_state_and_gqa(transition, normalize):
    """The C++ kernel: GQA (H = 4 Hkv), odd chunk sizes, a carried state, both normalisations."""
    q, k, v, kw = _inputs(transition, length=70, n_heads=8, n_kv=2, seed=7)
    if not normalize:
        kw["normalize"] = False
    bound = linear_bound(q, k, v, **kw)
    first, state = linear_attention(q[:, :, :33], k[:, :, :33], v[:, :, :33], chunk_size=5,
                                    impl="native", **kw)  # fmt: skip
    rest, state = linear_attention(q[:, :, 33:], k[:, :, 33:], v[:, :, 33:], chunk_size=64,
                                   impl="native", state=state, **kw)  # fmt: skip
    assert_linear_close(torch.cat([first, rest], dim=2), bound)
    one_pass = linear_attention(q, k, v, impl="torch", **kw)[1]
    torch.testing.assert_close(state.kv, one_pass.kv, rtol=1e-5, atol=1e-5)
    assert (state.k_sum is None) == (not normalize)


def test_native_refuses_what_it_cannot_run():
    q, k, v, kw = _inputs("channel", length=10)
    with pytest.raises(ValueError, match="impl='native' cannot run"):
        linear_attention(q, k, v, impl="native", **kw)
    with pytest.raises(ValueError, match="impl must be"):
        linear_attention(q, k, v, impl="cuda")


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("transition", ["none", "head", "channel", "channel_delta"])
def test_chunk_sizes(transition, chunk):
    q, k, v, kw = _inputs(transition, length=70, n_heads=2, n_kv=2, seed=1)
    out, _ = linear_attention(q, k, v, chunk_size=chunk, impl="torch", **kw)
    assert_linear_close(out, linear_bound(q, k, v, **kw))


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_state_carried_across_calls_equals_one_pass(transition):
    q, k, v, kw = _inputs(transition, length=90, n_heads=4, n_kv=2, seed=2)
    bound = linear_bound(q, k, v, **kw)
    state, outs = None, []
    for lo, hi in [(0, 30), (30, 31), (31, 90)]:
        part = {
            key: (val[:, :, lo:hi] if isinstance(val, torch.Tensor) and val.dim() >= 3 else val)
            for key, val in kw.items()
        }
        fn = linear_recurrent if hi - lo == 1 else linear_attention  # decode steps too
        out, state = fn(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state=state, **part)
        outs.append(out)
    assert_linear_close(torch.cat(outs, dim=2), bound)
    one_pass = linear_attention(q, k, v, impl="torch", **kw)[1]
    torch.testing.assert_close(state.kv, one_pass.kv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transition", ["none", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window(transition, dtype):
    q, k, v, kw = _inputs(transition, length=75, n_heads=4, n_kv=2, dtype=dtype, window=9)
    bound = linear_bound(q, k, v, **kw)
    out, _ = linear_attention(q, k, v, chunk_size=16, **kw)
    assert_linear_close(out, bound)
    assert_linear_close(linear_recurrent(q, k, v, **kw)[0], bound)


def test_window_state_with_held_keys_equals_one_pass():
    """With a window the state leaves out the last ``window`` keys: the caller holds them and
    passes them in front of the next call's keys (queries are the last positions)."""
    window = 6
    q, k, v, kw = _inputs("fixed", length=50, n_heads=2, n_kv=1, window=window, seed=3)
    bound = linear_bound(q, k, v, **kw)
    state, outs, held = None, [], 0
    for lo, hi in [(0, 4), (4, 23), (23, 24), (24, 50)]:
        ks = slice(max(lo - window, 0), hi)
        out, state = linear_attention(
            q[:, :, lo:hi], k[:, :, ks], v[:, :, ks], state=state, window=window,
            log_decay=kw["log_decay"], q_raw=kw["q_raw"][:, :, lo:hi], k_raw=kw["k_raw"][:, :, ks],
        )  # fmt: skip
        outs.append(out)
        held = hi - max(hi - window, 0)
    assert held == window
    assert_linear_close(torch.cat(outs, dim=2), bound)


@pytest.mark.parametrize("normalize", [True, False])
def test_non_causal(normalize):
    q, k, v, _ = _inputs("none", length=40, q_len=13, n_heads=4, n_kv=2)
    out, state = linear_attention(q, k, v, causal=False, normalize=normalize)
    assert state is None
    assert_linear_close(out, linear_bound(q, k, v, causal=False, normalize=normalize))


@pytest.mark.parametrize("transition", ["none", "channel", "delta"])
def test_queries_are_the_last_positions(transition):
    q, k, v, kw = _inputs(transition, length=40, q_len=7, n_heads=2, n_kv=1)
    assert_linear_close(
        linear_attention(q, k, v, chunk_size=8, **kw)[0], linear_bound(q, k, v, **kw)
    )
    assert_linear_close(linear_recurrent(q, k, v, **kw)[0], linear_bound(q, k, v, **kw))


def test_float64_inputs_keep_float64():
    q, k, v, kw = _inputs("channel", length=33, dtype=torch.float64)
    out, state = linear_attention(q, k, v, chunk_size=8, **kw)
    assert out.dtype == torch.float64 and state.kv.dtype == torch.float64
    assert_linear_close(out, linear_bound(q, k, v, **kw))


def test_strong_channel_gates_do_not_overflow():
    """log gates of -40 per token: exp(-cum) would overflow float32 within a chunk of 64."""
    q, k, v, kw = _inputs("channel", length=128, n_heads=2, n_kv=2)
    kw["log_decay"] = kw["log_decay"] * 20
    out, _ = linear_attention(q, k, v, chunk_size=64, **kw)
    assert torch.isfinite(out).all()
    assert_linear_close(out, linear_bound(q, k, v, **kw))


def test_zero_denominator_rows_are_zero():
    q, k, v, _ = _inputs("none", length=20)
    q[:, :, 5] = 0.0
    out, _ = linear_attention(q, k, v, chunk_size=8)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))


@pytest.mark.parametrize("transition", ["none", "head", "delta"])
def test_a_dropped_key_fails_the_bound(transition):
    q, k, v, kw = _inputs(transition, length=64, n_heads=2, n_kv=1, seed=4)
    bound = linear_bound(q, k, v, **kw)
    k_drop = k.clone()
    k_drop[:, :, 40] = 0.0
    out, _ = linear_attention(q, k_drop, v, **kw)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_linear_close(out, bound)


@pytest.mark.parametrize("transition", ["fixed", "head", "channel", "gated_delta"])
def test_a_wrong_decay_fails_the_bound(transition):
    q, k, v, kw = _inputs(transition, length=64, n_heads=2, n_kv=1, seed=5)
    bound = linear_bound(q, k, v, **kw)
    wrong = dict(kw, log_decay=kw["log_decay"] * 1.1)
    out, _ = linear_attention(q, k, v, **wrong)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_linear_close(out, bound)


def test_a_dropped_window_key_fails_the_bound():
    q, k, v, kw = _inputs("none", length=40, window=5)
    bound = linear_bound(q, k, v, **kw)
    k_raw = kw["k_raw"].clone()
    k_raw[:, :, 30] = -50.0
    out, _ = linear_attention(q, k, v, **dict(kw, k_raw=k_raw))
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_linear_close(out, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,sinks", [(9, 4), (3, 12), (1, 1)])
def test_sinks(window, sinks, dtype):
    """The first ``sinks`` keys stay exact for every query (never in the state): chunkwise =
    recurrent = reference, and the same call without them fails the bound."""
    q, k, v, kw = _inputs("none", length=75, n_heads=4, n_kv=2, dtype=dtype, window=window)
    kw["sinks"] = sinks
    bound = linear_bound(q, k, v, **kw)
    out, state = linear_attention(q, k, v, chunk_size=16, **kw)
    assert_linear_close(out, bound)
    assert_linear_close(linear_recurrent(q, k, v, **kw)[0], bound)
    torch.testing.assert_close(state.kv.double(), bound.state.kv, rtol=1e-4, atol=1e-4)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_linear_close(linear_attention(q, k, v, **dict(kw, sinks=0))[0], bound)


def test_sinks_held_in_front_of_later_calls_equal_one_pass():
    """The caller passes the sinks, then the window's keys, in front of each later call."""
    window, sinks = 6, 4
    q, k, v, kw = _inputs("none", length=60, n_heads=2, n_kv=1, window=window, seed=5)
    kw["sinks"] = sinks
    whole = linear_attention(q, k, v, **kw)[0]
    state, outs = None, []
    for lo, hi in [(0, 2), (2, 25), (25, 26), (26, 60)]:
        held = sorted(set(range(min(lo, sinks))) | set(range(max(lo - window, 0), lo)))
        idx = torch.tensor(held + list(range(lo, hi)), dtype=torch.long)
        out, state = linear_attention(
            q[:, :, lo:hi], k[:, :, idx], v[:, :, idx], state=state, window=window, sinks=sinks,
            q_raw=kw["q_raw"][:, :, lo:hi], k_raw=kw["k_raw"][:, :, idx],
        )  # fmt: skip
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-5, atol=1e-6)


def _bad_calls():
    q, k, v, _ = _inputs("none", length=10, n_heads=4, n_kv=2)
    good = LinearState(torch.zeros(1, 2, FEAT, DV), torch.zeros(1, 2, FEAT))
    return [
        ("must be 4-D", (q[0], k, v), {}),
        ("dtype", (q.half(), k.half(), v.half()), {}),
        ("dtypes differ", (q.double(), k, v), {}),
        ("not a multiple", (q[:, :3], k, v), {}),
        ("feature dims", (q[..., :3], k, v), {}),
        ("feature dims", (q[..., :0], k[..., :0], v), {}),
        ("lengths differ", (q, k, v[:, :, :5]), {}),
        ("chunk_size", (q, k, v), {"chunk_size": 0}),
        ("log_decay shape", (q, k, v), {"log_decay": torch.zeros(3)}),
        ("<= 0", (q, k, v), {"log_decay": torch.ones(2)}),
        ("<= 0", (q, k, v), {"log_decay": torch.full((2,), -math.inf)}),
        ("normalize=False", (q, k, v), {"beta": torch.ones(1, 2, 10)}),
        ("in \\[0, 1\\]", (q, k, v), {"beta": torch.full((1, 2, 10), 2.0), "normalize": False}),
        ("state.kv shape", (q, k, v), {"state": LinearState(torch.zeros(1, 2, FEAT, 3), None)}),
        ("state.kv dtype", (q, k, v), {"state": LinearState(good.kv.double(), good.k_sum)}),
        ("k_sum must be", (q, k, v), {"state": LinearState(good.kv, None)}),
        ("k_sum must be", (q, k, v), {"state": good, "normalize": False}),
        ("LinearState", (q, k, v), {"state": (good.kv, good.k_sum)}),
        ("causal calls", (q, k, v), {"state": good, "causal": False}),
        ("causal=False", (q, k, v), {"log_decay": torch.zeros(2), "causal": False}),
        ("q_raw and k_raw", (q, k, v), {"window": 3}),
        ("window=3 needs", (q, k, v), {"window": 3, "log_decay": torch.zeros(1, 2, 10)}),
        ("window must be", (q, k, v), {"window": -1}),
        ("sinks=2 needs a window", (q, k, v), {"sinks": 2}),
        (
            "sinks=2 needs a window",
            (q, k, v),
            {"sinks": 2, "window": 3, "q_raw": q, "k_raw": k, "log_decay": torch.zeros(2)},
        ),
        ("sinks must be", (q, k, v), {"sinks": -1}),
        ("q_len 20 > kv_len 10", (torch.cat([q, q], 2), k, v), {}),
    ]


@pytest.mark.parametrize("message,args,kwargs", _bad_calls(), ids=lambda x: str(x)[:24])
@pytest.mark.parametrize("fn", [linear_attention, linear_recurrent])
def test_bad_input_raises_naming_the_value(fn, message, args, kwargs):
    with pytest.raises((ValueError, TypeError), match=message):
        fn(*args, **kwargs)


def test_gradients_flow_through_the_torch_path():
    """Training (attention transfer, LoRA) backpropagates through the chunkwise form: its
    in-place shortcuts are taken only without autograd; the gradient matches the recurrence's."""
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, 4, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.rand(1, 2, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (linear_attention, linear_recurrent):
        out, _ = fn(q, k, v, chunk_size=16, log_decay=torch.full((2,), -0.1, dtype=torch.float64))
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for chunked, step in zip(*grads):
        torch.testing.assert_close(chunked, step, rtol=1e-9, atol=1e-9)
