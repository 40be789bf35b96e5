"""The latent, low-rank and recurrent forms (``forward`` methods): each method's forward pass
against its own float64 ``reference`` within its derived rounding bound (``error_bound``: the
model is ``longattn.methods.latte.Rounding``, each method's derivation in its docstring), chained
calls carrying the state equal one pass, causality, GQA, degenerate lengths and bad input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

from longattn.methods.aaren import Aaren
from longattn.methods.agent_attention import AgentAttention
from longattn.methods.flowformer import Flowformer
from longattn.methods.latte import Latte
from longattn.methods.mega import Mega
from longattn.methods.soft import SOFT
from longattn.methods.sse import SSE
from longattn.testing import check_against_reference, make_qkv

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


class View(NamedTuple):
    """What a ``forward`` method reads from the library's view: the call's scale and the layer's
    calibration tensors."""

    scale: float
    calibration: dict[str, torch.Tensor] | None = None


def bound(method, q, k, v, view=None, calls: int = 1):
    """The float64 reference of one pass and the method's derived bound around it."""
    ref = method.reference(q.double(), k.double(), v.double(), view)
    return ref, method.error_bound(q, k, v, ref, view, calls)


CAUSAL = [
    Latte(n_latents=8, chunk_size=16),
    Latte(n_latents=3, chunk_size=5, seed=3),
    Aaren(),
    Aaren(query="fixed"),
    Aaren(query="fixed", seed=1, scan_block=7),
    Mega(chunk_size=16, n_dims=4),
    Mega(chunk_size=7, gated=False, seed=2),
    SSE(top_k=4, chunk_size=16),
    SSE(top_k=1, chunk_size=5),
    Flowformer(chunk_size=16),
]
NON_CAUSAL = [AgentAttention(n_agents=8), AgentAttention(), SOFT(n_landmarks=8), SOFT()]
# (B, H, Hkv, T, D): one token, fewer tokens than a chunk, a ragged multiple, GQA, D != 64
SHAPES = [(2, 4, 4, 1, 16), (1, 4, 2, 5, 32), (2, 8, 2, 45, 16), (1, 4, 1, 70, 64)]


def _check(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    err = (out.double() - ref).abs()
    excess = err - bound
    if not bool((excess <= 0).all()):  # NaN fails too
        worst = excess.nan_to_num(torch.inf).argmax()
        raise AssertionError(
            f"|out - ref64| = {err.flatten()[worst]:.3e} exceeds its bound "
            f"{bound.flatten()[worst]:.3e} (max error {err.max():.3e})"
        )
    return float(err.max()) if err.numel() else 0.0


def _run(method, q, k, v, splits=None, view=None):
    """The method over q, k, v in one call, or chained over the given split points."""
    if not splits:
        return method.forward(q, k, v, None, view)[0]
    state, outs = None, []
    for lo, hi in zip([0, *splits], [*splits, q.shape[2]]):
        out, state = method.forward(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state, view)
        outs.append(out)
    return torch.cat(outs, 2)


def _id(m: Any) -> str:
    return m.describe()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", CAUSAL + NON_CAUSAL, ids=_id)
def test_forward_within_bound_of_reference(method, dtype, shape):
    batch, heads, kv_heads, length, dim = shape
    q, k, v = make_qkv(batch, heads, kv_heads, length, head_dim=dim, dtype=dtype, seed=length)
    out, _ = method.forward(q, k, v, None)
    assert out.dtype == dtype
    ref, limit = bound(method, q, k, v)
    _check(out, ref, limit)


@pytest.mark.parametrize(
    "splits", [[1, 2, 9, 16, 33, 49], list(range(30, 50))], ids=["ragged", "decode"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", CAUSAL, ids=_id)
def test_chained_calls_equal_one_pass(method, dtype, splits):
    """The state carried across calls (splits of 1 token, inside and across chunks; a prefill
    then one token per call) gives one pass's outputs, within the same bound."""
    q, k, v = make_qkv(2, 8, 2, 50, head_dim=16, dtype=dtype, seed=5)
    chained = _run(method, q, k, v, splits)
    ref, limit = bound(method, q, k, v, calls=len(splits) + 1)
    _check(chained, ref, limit)
    if dtype == torch.float64:  # and the float64 chained pass is the one pass up to rounding
        _check(chained, _run(method, q, k, v), limit)


@pytest.mark.parametrize("method", CAUSAL, ids=_id)
def test_future_tokens_do_not_change_past_outputs(method):
    """Past outputs stay within the bound of the past's own reference when every later query,
    key and value changes (up to rounding: Latte's chunk factorisation is relative to the
    chunk's largest logit, which may be a later key's)."""
    q, k, v = make_qkv(1, 4, 2, 40, head_dim=16, seed=7)
    gen = torch.Generator().manual_seed(1)
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, 23:] = 5 * torch.randn(t[:, :, 23:].shape, generator=gen)
    ref, limit = bound(method, *(t[:, :, :23] for t in (q, k, v)))
    out = method.forward(*changed, None)[0]
    _check(out[:, :, :23], ref, limit)
    assert not torch.equal(out[:, :, 23:], method.forward(q, k, v, None)[0][:, :, 23:])


@pytest.mark.parametrize("method", CAUSAL + NON_CAUSAL, ids=_id)
def test_gqa_equals_the_expanded_heads(method):
    """A KV head read by its group of query heads is the same as a copy per query head."""
    q, k, v = make_qkv(2, 8, 2, 30, head_dim=16, dtype=torch.float64, seed=3)
    grouped = method.forward(q, k, v, None)[0]
    expanded = method.forward(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), None)[0]
    torch.testing.assert_close(grouped, expanded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", CAUSAL + NON_CAUSAL, ids=_id)
def test_a_dropped_key_fails_the_bound(method):
    """The bound is tight enough to catch a real bug: the first key and value removed."""
    q, k, v = make_qkv(1, 4, 2, 40, head_dim=16, seed=11)
    ref, limit = bound(method, q, k, v)
    broken_k, broken_v = k.clone(), v.clone()
    broken_k[:, :, 0], broken_v[:, :, 0] = -30.0, 0.0  # the key gets no weight, its value none
    out = method.forward(q, broken_k, broken_v, None)[0]
    with pytest.raises(AssertionError, match="exceeds its bound"):
        _check(out, ref, limit)


def test_a_wrong_decay_fails_the_bound():
    """Mega with its EMA decay off by 1 % (calibrated parameters) is outside the bound."""
    method = Mega(chunk_size=16, n_dims=4)
    q, k, v = make_qkv(1, 4, 2, 40, head_dim=16, seed=12)
    scale = 16**-0.5
    params = {
        prefix + name: value.float().expand(2, -1, -1)
        for prefix, channels in (("", 16), ("v_", 16))
        for name, value in zip(
            ("alpha", "delta", "beta", "eta"), method.ema_params(None, 2, channels, prefix)
        )
    }
    exact = View(scale, {**params, "gate": method.gate_vector(None, 4, 16, torch.float32)})
    ref, limit = bound(method, q, k, v, exact)
    _check(method.forward(q, k, v, None, exact)[0], ref, limit)
    wrong = View(scale, {**exact.calibration, "delta": params["delta"] * 1.01})
    with pytest.raises(AssertionError, match="exceeds its bound"):
        _check(method.forward(q, k, v, None, wrong)[0], ref, limit)


def test_aaren_is_causal_softmax_attention():
    """Aaren's combine is exact causal softmax attention: within the library's own contract
    bound (``reference_bound``) of the dense oracle of the fixed query repeated at every
    position, and with the call's queries of those; the fixed query's state is O(1) per head."""
    q, k, v = make_qkv(1, 4, 2, 60, head_dim=32, seed=4)
    causal = torch.ones(60, 60, dtype=torch.bool).tril()
    fixed = Aaren(query="fixed", seed=9)
    out, state = fixed.forward(q, k, v, None)
    query = fixed.fixed_query(None, 4, 32, torch.float32)[None, :, None].expand_as(q)
    check_against_reference(out, query, k, v, causal, 32**-0.5)
    assert [tuple(t.shape) for t in state] == [(1, 4), (1, 4), (1, 4, 32)]
    check_against_reference(Aaren().forward(q, k, v, None)[0], q, k, v, causal, 32**-0.5)


def test_latte_wide_logit_spread_inside_a_chunk():
    """Logits spread over more than the factorised form allows take the per-query form."""
    method = Latte(n_latents=8, chunk_size=16)
    q, k, v = make_qkv(1, 4, 2, 40, head_dim=16, seed=8)
    k = k * torch.linspace(0.1, 60, 40).view(1, 1, -1, 1)
    _check(method.forward(q, k, v, None)[0], *bound(method, q, k, v))


def test_latte_state_has_constant_size():
    method = Latte(n_latents=8, chunk_size=16)
    q, k, v = make_qkv(1, 4, 2, 100, head_dim=16, seed=2)
    _, short = method.forward(q[:, :, :3], k[:, :, :3], v[:, :, :3], None)
    _, long = method.forward(q, k, v, None)
    assert [t.shape for t in short] == [t.shape for t in long]


def test_calibrated_parameters_are_used_and_checked():
    q, k, v = make_qkv(1, 4, 2, 20, head_dim=16, seed=6)
    latents = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    view = View(0.25, {"latents": latents})
    method = Latte(n_latents=8)
    _check(method.forward(q, k, v, None, view)[0], *bound(method, q, k, v, view))
    assert not torch.equal(method.forward(q, k, v, None, view)[0], method.forward(q, k, v, None)[0])
    with pytest.raises(ValueError, match="'latents' has shape"):
        Latte(n_latents=4).forward(q, k, v, None, view)
    with pytest.raises(ValueError, match="'query' has shape"):
        Aaren(query="fixed").forward(q, k, v, None, View(0.25, {"query": torch.zeros(3, 16)}))


@pytest.mark.parametrize("method", NON_CAUSAL, ids=_id)
def test_non_causal_forms_refuse_a_state(method):
    q, k, v = make_qkv(1, 4, 2, 10, head_dim=16)
    out, state = method.forward(q, k, v, None)
    assert state is None and not method.is_causal
    with pytest.raises(ValueError, match="non-causal"):
        method.forward(q, k, v, object())


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: Latte(n_latents=0), ValueError, "n_latents must be > 0"),
        (lambda: Latte(chunk_size=-1), ValueError, "chunk_size must be > 0"),
        (lambda: Aaren(query="learned"), ValueError, "Aaren.query must be one of"),
        (lambda: Mega(n_dims=0), ValueError, "n_dims must be > 0"),
        (lambda: Mega(gated="yes"), TypeError, "gated must be bool"),
        (lambda: SSE(top_k=0), ValueError, "top_k must be > 0"),
        (lambda: Flowformer(eps=-1.0), ValueError, "eps must be in"),
        (lambda: SOFT(iterations=0), ValueError, "iterations must be > 0"),
        (lambda: AgentAttention(n_agents=2.5), TypeError, "n_agents must be int"),
    ],
)
def test_bad_parameters_are_refused(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_sse_top_k_above_the_head_dim_is_refused():
    q, k, v = make_qkv(1, 2, 2, 4, head_dim=8)
    with pytest.raises(ValueError, match="top_k=9 exceeds the head dim 8"):
        SSE(top_k=9).forward(q, k, v, None)


def test_soft_pseudo_inverse_converges_on_a_well_conditioned_kernel():
    """Newton-Schulz reaches the pseudo-inverse (spread-out landmarks: a well-conditioned
    kernel)."""
    from longattn.methods.soft import gaussian, newton_schulz_pinv

    points = 3 * torch.randn(
        1, 1, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    a = gaussian(points, points, 0.25)
    torch.testing.assert_close(
        newton_schulz_pinv(a, 30), torch.linalg.pinv(a), rtol=1e-9, atol=1e-9
    )


def _states(method, length=20):
    q, k, v = make_qkv(2, 4, 2, length, head_dim=16, seed=1)
    return (q, k, v), method.forward(q, k, v, None)[1]


@pytest.mark.parametrize("method", CAUSAL, ids=_id)
def test_resuming_from_a_wrong_state_is_refused(method):
    """A state of another batch size or dtype, or another method's, is a clear error."""
    (q, k, v), state = _states(method)
    with pytest.raises(ValueError, match="state .* is"):
        method.forward(q[:1], k[:1], v[:1], state)  # the state holds 2 batch rows
    with pytest.raises(ValueError, match="state .* is"):
        method.forward(q.double(), k.double(), v.double(), state)  # a float32 state
    other = Latte() if not isinstance(method, Latte) else Aaren()
    with pytest.raises(ValueError, match="cannot resume from"):
        method.forward(q, k, v, _states(other)[1])
