"""One test per class of silent failure: strided inputs, undeclared or false causality, non-finite
keys and values, loosely typed method fields, refused calls that change a cache, an explicit
implementation that runs another, and storage that does not follow eviction."""

from dataclasses import dataclass

import pytest
import torch

import longattn
from longattn import KVCache, attention, from_string, linear, methods
from longattn.api import IMPLS, impl_names
from longattn.calibration import Calibration
from longattn.method import Method
from longattn.testing import (
    METHOD_EXAMPLES,
    assert_attention_close,
    make_qkv,
    sparse_cpp_runs_bf16,
)

SPECS = [s for specs in METHOD_EXAMPLES.values() for s in specs]
# the softmax implementations (the linear ones run linear methods: test_linear_api.py)
IMPLS_NO_FLEX = [name for name in impl_names() if name != "flex" and name not in linear.IMPLS]


def _strided_variants(dtype):
    q, k, v = make_qkv(2, 4, 2, 48, 48, 128, dtype=dtype, seed=4)
    t_major = [x[..., :64].transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    return {
        "every_other_channel": (q[..., ::2], k[..., ::2], v[..., ::2]),
        "keys_stored_DxT": (
            q[..., :64],
            k[..., :64].transpose(-1, -2).contiguous().transpose(-1, -2),
            v[..., :64].transpose(-1, -2).contiguous().transpose(-1, -2),
        ),
        "token_major": tuple(t_major),
        "expanded_batch": tuple(x[:1, ..., :64].expand(2, -1, -1, -1) for x in (q, k, v)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS_NO_FLEX)
def test_strided_inputs_give_the_oracles_answer(impl, dtype):
    """Any strided input gives the oracle's answer (sdpa and decode once returned garbage)."""
    ran = 0
    for q, k, v in _strided_variants(dtype).values():
        for q_len in (48, 3):
            q_part = q[:, :, -q_len:]
            try:
                result = attention(q_part, k, v, impl=impl)
            except ValueError:
                continue  # this impl does not take this call shape (the contract suite says which)
            assert_attention_close(result, q_part, k, v)
            ran += 1
    cpu_refuses = impl == "sparse_cpp" and dtype == torch.bfloat16 and not sparse_cpp_runs_bf16()
    assert ran > 0 or cpu_refuses


@dataclass(frozen=True)
class SymmetricWindow(Method):
    """A user's one-file method with a non-causal rule and no ``is_causal``."""

    window: int = 8

    def mask(self, b, h, q_pos, kv_pos):
        return (q_pos - kv_pos).abs() < self.window

    def block_bounds(self, h, q_lo, q_hi, kv_lo, kv_hi):
        near_any = (kv_lo - q_hi < self.window) & (q_lo - kv_hi < self.window)
        near_all = (kv_hi - q_lo < self.window) & (q_hi - kv_lo < self.window)
        return near_any, near_all


@dataclass(frozen=True)
class FalselyCausal(SymmetricWindow):
    @property
    def is_causal(self) -> bool:
        return True


@pytest.mark.parametrize("impl", ["auto", "sparse_cpp", "sparse", "tiled", "reference"])
def test_a_method_without_is_causal_is_not_taken_as_causal(impl):
    method = SymmetricWindow(window=300)
    q, k, v = make_qkv(1, 4, 4, 1024, 1024, 64)
    assert not method.is_causal
    assert_attention_close(attention(q, k, v, method=method, impl=impl), q, k, v, method)


def test_a_false_causal_declaration_is_refused_before_a_kernel_relies_on_it():
    q, k, v = make_qkv(1, 4, 4, 512, 512, 64)
    with pytest.raises(ValueError, match="declares is_causal.*later position"):
        attention(q, k, v, method=FalselyCausal(window=300), impl="sparse_cpp")


CAUSAL_MASKS = [s for s in SPECS if from_string(s).hook == "mask" and from_string(s).is_causal]


@pytest.mark.parametrize("spec", CAUSAL_MASKS)
def test_every_causal_declaration_agrees_with_the_mask(spec):
    """Registered methods: a method that declares ``is_causal`` shows no later key, anywhere."""
    method = from_string(spec)
    gen = torch.Generator().manual_seed(0)
    limit = method.max_positions or 4096
    q_pos = torch.randint(0, limit - 1, (4096,), generator=gen)
    kv_pos = q_pos + 1 + torch.randint(0, limit, (4096,), generator=gen) % (limit - 1 - q_pos)
    heads = torch.randint(0, 16, (4096,), generator=gen)
    seen = method.mask(torch.zeros_like(q_pos), heads, q_pos, kv_pos)
    assert not bool(seen.any())


@pytest.mark.parametrize("where", ["padding_key", "masked_key", "padding_value", "future_value"])
def test_non_finite_keys_and_values_are_refused(where):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    kv_pos = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6])
    q_pos = kv_pos.clone()
    target = k if where.endswith("key") else v
    slot = 0 if where.startswith("padding") else 7
    target[0, 1, slot, 3] = torch.nan if slot else torch.inf
    for method in (methods.Dense(), methods.SlidingWindow(window=2)):
        with pytest.raises(
            ValueError, match="non-finite.*must be finite, padding and masked slots"
        ):
            attention(q, k, v, method=method, q_positions=q_pos, kv_positions=kv_pos)
    cache = KVCache(1)
    with pytest.raises(ValueError, match="non-finite"):
        attention(q, k, v, cache=cache)
    assert cache.seq_len(0) == 0


@pytest.mark.parametrize("impl", ["auto", "decode", "tiled"])
def test_a_non_finite_query_is_refused(impl):
    """The fused kernels return zeros for a NaN query row (a silent wrong answer): refused instead."""
    q, k, v = make_qkv(1, 2, 2, 4, 16, 16)
    q[0, 0, 2, 0] = torch.nan
    with pytest.raises(ValueError, match="q holds a non-finite value"):
        attention(q, k, v, impl=impl)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: methods.Dense(causal="no"), TypeError),
        (lambda: methods.SlidingWindow(window=16, causal="false"), TypeError),
        (lambda: methods.SlidingWindow(window=16.0), TypeError),
        (lambda: methods.StreamingLLM(sinks=True), TypeError),
        (lambda: from_string("sliding_window:window=64,window=128"), ValueError),
        (lambda: from_string("dense:causal=maybe"), ValueError),
    ],
)
def test_loosely_typed_method_parameters_are_refused(make, error):
    with pytest.raises(error):
        make()


@pytest.mark.parametrize("name", list(longattn.registry()))
def test_describe_round_trips_every_default(name):
    method = longattn.registry()[name]()
    assert from_string(method.describe()) == method


def test_reserve_refuses_what_it_cannot_do():
    cache = KVCache(1)
    k, v = make_qkv(1, 2, 2, 1, 8, 16)[1:]
    cache.append(0, k, v)
    for capacity, error in ((-5, ValueError), (0, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="reserve"):
            cache.reserve(0, capacity)
    with pytest.raises(ValueError, match="could not be allocated"):
        cache.reserve(0, 1 << 50)
    assert cache.capacity(0) == 256


def _state(cache, layer=0):
    """Everything a refused call must leave bit-identical."""
    if cache.seq_len(layer) == 0 and cache.capacity(layer) == 0:
        return None
    keys, values, positions = cache.storage(layer)
    entry = cache._layers[layer]
    meta = [entry.page_bounds, entry.page_sum, entry.page_count]
    meta += [buf for _, buf in entry.projections.values()]
    counters = (cache.seq_len(layer), cache.n_seen(layer), cache.capacity(layer), entry.stale)
    return [t.clone() for t in (keys, values, positions, *meta)], counters, entry.row_len.clone()


def _same(a, b):
    if a is None or b is None:
        return a is b
    return (
        all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        and a[1:2] == b[1:2]
        and torch.equal(a[2], b[2])
    )


def _refusals(tmp_path):
    """Calls that must raise: (description, method, impl, q_len, extra kwargs)."""
    wrong_cal = Calibration("loki", "toy", 3, 2, 16, {"basis": torch.eye(16).expand(3, 2, 16, 16)},
                            {"rank": 4}).save(tmp_path / "wrong.safetensors")  # fmt: skip
    return [
        ("unknown impl", methods.Dense(), "fastest", 1, {}),
        ("impl that cannot run the method", methods.SlidingWindow(window=4), "sdpa", 1, {}),
        ("too many queries for decode", methods.Quest(budget=16, dense_layers=0), "decode", 20, {}),
        ("too many queries for decode_cpp", methods.Dense(), "decode_cpp", 20, {}),
        ("reference over its cap", methods.Dense(), "reference", 1, {"cap": "1"}),
        (
            "calibration of another shape",
            methods.Loki(budget=16, rank=4, calibration=str(wrong_cal)),
            "auto",
            1,
            {},
        ),  # fmt: skip
        ("bad scale", methods.Dense(), "auto", 1, {"scale": float("nan")}),
        ("non-finite value", methods.Dense(), "auto", 1, {"nan": True}),
    ]


@pytest.mark.parametrize("refill", ["dense", "evicted", "select"])
def test_a_refused_cache_call_changes_nothing(tmp_path, monkeypatch, refill):
    """Property over every kind of refusal and cache state: the cache is bit-identical after a call
    that raises, and a valid step after three refusals sees exactly one more token."""
    q, k, v = make_qkv(1, 4, 2, 20, 300, 16, seed=1)
    cache = KVCache(2)
    cache.append(0, k[:, :, :200], v[:, :, :200])
    if refill == "evicted":
        attention(q[:, :, :1], k[:, :, 200:201], v[:, :, 200:201], cache=cache,
                  method=methods.StreamingLLM(sinks=4, window=64))  # fmt: skip
    if refill == "select":
        attention(q[:, :, :1], k[:, :, 200:201], v[:, :, 200:201], cache=cache,
                  method=methods.Quest(budget=32, dense_layers=0))  # fmt: skip
    for what, method, impl, q_len, extra in _refusals(tmp_path):
        before, seen = _state(cache), cache.n_seen(0)
        k_new, v_new = k[:, :, 250 : 250 + q_len].clone(), v[:, :, 250 : 250 + q_len]
        if extra.get("nan"):
            k_new[0, 0, -1, 0] = torch.nan
        if "cap" in extra:
            monkeypatch.setenv("LONGATTN_REFERENCE_MAX_BYTES", extra["cap"])
        with pytest.raises((ValueError, TypeError)):
            attention(q[:, :, :q_len], k_new, v_new, method=method, cache=cache, impl=impl,
                      scale=extra.get("scale"))  # fmt: skip
        monkeypatch.delenv("LONGATTN_REFERENCE_MAX_BYTES", raising=False)
        assert _same(_state(cache), before), what
        assert cache.n_seen(0) == seen, what
    held = cache.seq_len(0)
    attention(q[:, :, :1], k[:, :, 260:261], v[:, :, 260:261], cache=cache)
    assert cache.seq_len(0) == held + 1


def test_a_refused_first_call_leaves_the_layer_empty():
    cache = KVCache(1)
    q, k, v = make_qkv(1, 4, 2, 1, 4, 16)
    with pytest.raises(ValueError, match="unknown impl"):
        attention(q, k, v, cache=cache, impl="nope")
    assert cache.seq_len(0) == 0 and cache.capacity(0) == 0


def test_an_explicit_impl_runs_or_raises_and_never_runs_another(monkeypatch):
    """A select method's prefill is a dense call: impl='decode' refuses 64 queries, impl='sdpa' runs
    it, and no implementation chooses another one while it runs."""
    import longattn.api as api

    q, k, v = make_qkv(1, 8, 2, 64, 64, 64)
    quest = methods.Quest(budget=32, dense_layers=0)
    with pytest.raises(ValueError, match="impl='decode' cannot run.*at most 16 queries"):
        attention(q, k, v, method=quest, impl="decode")
    real = api.choose_impl
    for impl in ("sdpa", "auto"):
        chosen = api.choose_impl(api.make_call(q, k, v, quest), impl)
        monkeypatch.setattr(api, "choose_impl", _no_nested_choice)
        result = chosen.run(api.make_call(q, k, v, quest))
        monkeypatch.setattr(api, "choose_impl", real)
        assert_attention_close(result, q, k, v, methods.Dense())
    assert [i.name for i in IMPLS][:2] == ["decode_cpp", "decode"]


def _no_nested_choice(*args, **kwargs):
    raise AssertionError("an implementation chose another implementation while running")


def test_a_bounded_method_holds_bounded_memory():
    """StreamingLLM: after a long prefill and many steps the storage is what it keeps, not what it saw."""
    q, k, v = make_qkv(1, 4, 2, 4096, 4096, 32)
    method = methods.StreamingLLM(sinks=4, window=64)
    cache = KVCache(1)
    attention(q, k, v, method=method, cache=cache)
    after_prefill = cache.capacity_nbytes()
    for t in range(200):
        attention(q[:, :, :1], k[:, :, t : t + 1], v[:, :, t : t + 1], method=method, cache=cache)
    assert cache.seq_len(0) < 4 + 64 - 1 + cache.page_size  # + dead keys not yet compacted
    assert cache.capacity(0) == 256  # the initial capacity: 4096 slots were given back
    assert cache.capacity_nbytes() == after_prefill
    assert cache.nbytes() < cache.capacity_nbytes()
