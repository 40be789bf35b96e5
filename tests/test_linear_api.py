"""Linear attention through ``attention()`` and a cache (``longattn.linear``): the recurrent state a
layer holds, chained calls equal one pass, O(1) memory per step, and the refusals."""

from dataclasses import dataclass

import pytest
import torch

from longattn import KVCache, attention
from longattn.linear import record
from longattn.method import LinearAttention
from longattn.methods import Dense
from longattn.testing import assert_linear_method_close, make_qkv


@dataclass(frozen=True)
class EluMap(LinearAttention):
    """elu + 1 (unregistered: the library's side is under test, not a method)."""

    def feature_map(self, x, view):
        return torch.nn.functional.elu(x) + 1


@dataclass(frozen=True)
class BadMap(LinearAttention):
    value: float = float("nan")

    def feature_map(self, x, view):
        return torch.full_like(x, self.value) if view.layer == 1 else x.exp()


def chained(method, q, k, v, sizes, impl="auto"):
    """The call cut into consecutive pieces of ``sizes`` through one cache."""
    cache, outs, start = KVCache(2), [], 0
    for size in sizes:
        part = slice(start, start + size)
        res = attention(q[:, :, part], k[:, :, part], v[:, :, part], method=method, cache=cache,
                        impl=impl)  # fmt: skip
        outs.append(res.out)
        start += size
    return torch.cat(outs, dim=2), cache


METHODS = [EluMap(), EluMap(decay="retnet"), EluMap(decay=0.9, normalize=False)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe())
@pytest.mark.parametrize("sizes", [(40,), (17, 1, 1, 21), (1,) * 12 + (28,)])
def test_chained_calls_through_a_cache_equal_one_pass(method, sizes):
    q, k, v = make_qkv(2, 4, 2, 40, 40, 16, dtype=torch.float64, seed=3)
    whole = attention(q, k, v, method=method).out
    parts, cache = chained(method, q, k, v, sizes)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert cache.n_seen(0) == 40 and cache.seq_len(0) == 0  # a state, no keys


def test_the_state_is_o1_memory_per_step():
    method = EluMap()
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16, seed=1)
    cache = KVCache(1)
    sizes = []
    for t in range(64):
        s = slice(t, t + 1)
        attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache)
        sizes.append(cache.capacity_nbytes())
    assert len(set(sizes)) == 1 and sizes[0] == (2 * 16 * 16 + 2 * 16) * 4  # kv + k_sum, float32
    assert record(cache, 0).n_seen == 64


def test_queries_fewer_than_keys_without_a_cache_are_the_last_rows():
    method = EluMap()
    q, k, v = make_qkv(1, 4, 2, 30, 30, 16, dtype=torch.float64, seed=2)
    whole = attention(q, k, v, method=method).out
    last = attention(q[:, :, -3:], k, v, method=method).out
    torch.testing.assert_close(last, whole[:, :, -3:], rtol=1e-12, atol=1e-12)


def test_refusals_leave_the_cache_as_it_was():
    method = EluMap()
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, seed=4)
    cache = KVCache(2)
    attention(q, k, v, method=method, cache=cache)
    before = record(cache, 0)
    with pytest.raises(ValueError, match="consecutive positions 8...9"):
        pos = torch.arange(3, 5)
        attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], method=method, cache=cache,
                  q_positions=pos, kv_positions=pos)  # fmt: skip
    with pytest.raises(ValueError, match="holds the state of"):
        attention(q, k, v, method=EluMap(decay="retnet"), cache=cache)
    with pytest.raises(ValueError, match="Tq == Tk"):
        attention(q[:, :, :1], k, v, method=method, cache=cache)
    assert record(cache, 0) is before
    attention(q, k, v, method=Dense(), cache=cache, layer=1)
    with pytest.raises(ValueError, match="holds softmax keys"):
        attention(q, k, v, method=method, cache=cache, layer=1)


def test_a_non_finite_feature_map_names_the_method_layer_and_role():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=5)
    with pytest.raises(ValueError, match=r"feature_map\(query\) at layer 1 is not finite"):
        attention(q, k, v, method=BadMap(), layer=1)
    with pytest.raises(ValueError, match="negative features with normalize=True"):
        attention(q, k, v, method=BadMap(value=-1.0), layer=1)
    attention(q, k, v, method=BadMap(value=-1.0, normalize=False), layer=1)  # allowed


def test_impls_that_do_not_run_linear_attention_say_so():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=6)
    with pytest.raises(ValueError, match="does not run linear attention"):
        attention(q, k, v, method=EluMap(), impl="sdpa")
    with pytest.raises(ValueError, match="runs linear attention methods"):
        attention(q, k, v, method=Dense(), impl="linear")
    with pytest.raises(ValueError, match="'forward' methods"):
        attention(q, k, v, method=EluMap(), impl="forward")


@pytest.mark.parametrize("bad", [{"chunk_size": 0}, {"window": -1}, {"decay": 1.5},
                                 {"decay": "gla"}, {"window": 4, "normalize": False},
                                 {"window": 4, "causal": False}, {"sinks": 2},
                                 {"sinks": 2, "window": 4, "decay": "retnet"},
                                 {"sinks": -1, "window": 4}])  # fmt: skip
def test_bad_fields_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        EluMap(**bad)


def test_non_causal_attends_every_key_and_takes_no_cache():
    method = EluMap(causal=False)
    q, k, v = make_qkv(1, 2, 2, 6, 9, 16, dtype=torch.float64, seed=7)
    out = attention(q, k, v, method=method).out
    fq, fk = method.feature_map(q, None), method.feature_map(k, None)
    weights = fq @ fk.transpose(-1, -2)
    expected = (weights @ v) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    cache = KVCache(1)
    with pytest.raises(ValueError, match="takes no cache"):
        attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], method=method, cache=cache)
    assert record(cache, 0) is None


@torch.no_grad()
def test_a_model_decodes_token_by_token_from_the_state():
    """``hf.use`` with the use() block's cache: a prompt then single tokens, each step's logits
    equal to the same model run over the whole sequence at once (float64)."""
    transformers = pytest.importorskip("transformers")
    from longattn.integrations import hf

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    ids = torch.randint(3, 50, (1, 24), generator=torch.Generator().manual_seed(1))
    method = EluMap(decay="retnet")
    with hf.use(model, method):
        whole = model(ids, use_cache=False).logits
    with hf.use(model, method) as cache:
        steps = [model(ids[:, :16], past_key_values=cache, use_cache=True).logits]
        for t in range(16, 24):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        assert cache.kv.n_seen(0) == 24 and cache.kv.seq_len(0) == 0
        assert cache.get_seq_length() == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("sizes", [(30,), (7, 1, 1, 1, 20), (1,) * 30, (3, 27)])
def test_a_windowed_method_through_a_cache_equals_one_pass(window, sizes):
    """The cache holds the window's raw keys and the engine's state the rest: chained calls equal
    one pass, and what the layer holds is the last ``window`` tokens."""
    method = EluMap(window=window, decay="retnet")
    q, k, v = make_qkv(2, 4, 2, 30, 30, 16, dtype=torch.float64, seed=window)
    whole = attention(q, k, v, method=method).out
    parts, cache = chained(method, q, k, v, sizes)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert cache.positions(0).tolist() == [list(range(30 - window, 30))] * 2
    assert cache.n_seen(0) == 30


@pytest.mark.parametrize("sizes", [(40,), (2, 1, 9, 1, 27), (1,) * 40])
def test_sinks_stay_in_the_cache_and_chained_calls_equal_one_pass(sizes):
    """The layer holds its first ``sinks`` tokens and the last ``window`` ones; the rest is state."""
    method = EluMap(window=5, sinks=3)
    q, k, v = make_qkv(2, 4, 2, 40, 40, 16, dtype=torch.float64, seed=11)
    whole = attention(q, k, v, method=method).out
    parts, cache = chained(method, q, k, v, sizes)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert cache.positions(0).tolist() == [[0, 1, 2, 35, 36, 37, 38, 39]] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "method", METHODS + [EluMap(window=8), EluMap(window=8, sinks=2)], ids=lambda m: m.describe()
)
def test_the_library_path_is_within_the_oracles_bound(method, dtype):
    q, k, v = make_qkv(2, 4, 2, 70, 70, 32, dtype=dtype, seed=8)
    for impl in ("linear", "recurrent"):
        assert_linear_method_close(attention(q, k, v, method=method, impl=impl), q, k, v, method)


def test_the_bound_catches_a_dropped_key():
    method = EluMap()
    q, k, v = make_qkv(1, 4, 2, 70, 70, 32, seed=9)
    dropped = k.clone()
    dropped[:, :, 30] = -30.0  # elu(-30) + 1 ~ 0: key 30 no longer weighs
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_linear_method_close(attention(q, dropped, v, method=method), q, k, v, method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_give_the_oracles_answer(dtype):
    """Transposed, sliced and expanded inputs: the same answer as contiguous ones."""
    q, k, v = make_qkv(2, 4, 2, 48, 48, 32, dtype=dtype, seed=10)
    variants = {
        "token_major": tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)),
        "sliced": tuple(torch.cat([x, x], dim=-1)[..., :32] for x in (q, k, v)),
        "expanded": tuple(x[:1].expand(2, -1, -1, -1) for x in (q, k, v)),
    }
    for qs, ks, vs in variants.values():
        for impl in ("linear", "recurrent"):
            out = attention(qs, ks, vs, method=EluMap(), impl=impl)
            assert_linear_method_close(out, qs, ks, vs, EluMap())
