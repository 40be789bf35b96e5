"""Decode kernel and decode-time select methods against their own float64 references."""

import pytest
import torch

from longattn import KVCache, attention, from_string, methods
from longattn.calibration import Calibration
from longattn.kernels.decode import decode_attention
from longattn.testing import METHOD_EXAMPLES, assert_attention_close, make_qkv, oracle

SELECT_SPECS = [
    s for specs in METHOD_EXAMPLES.values() for s in specs if from_string(s).hook == "select"
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_len", [1, 4, 16])
def test_dense_decode_kernel_matches_the_oracle(dtype, q_len):
    q, k, v = make_qkv(2, 8, 2, q_len, 333, 64, dtype=dtype, seed=q_len)
    kv_pos = torch.arange(333).view(1, -1).repeat(2, 1)
    kv_pos[1, :5] = -1  # left padding in row 1
    q_pos = kv_pos[:, -q_len:]
    res = decode_attention(q, k, v, scale=0.125, q_pos=q_pos, kv_pos=kv_pos)
    assert_attention_close(res, q, k, v, q_positions=q_pos, kv_positions=kv_pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SELECT_SPECS)
def test_select_methods_through_the_cache_match_their_reference(spec, dtype):
    """Prefill in chunks, then decode steps; every step equals the reference on the same selection."""
    method = from_string(spec)
    q, k, v = make_qkv(2, 8, 2, 260, 260, 32, dtype=dtype, seed=11)
    cache = KVCache(3, page_size=getattr(method, "page_size", 16))
    for layer in range(3):
        cache.append(layer, k[:, :, :200], v[:, :, :200])
    for t in range(200, 260, 4):
        sl = slice(t, t + 4)
        for layer in range(3):
            res = attention(
                q[:, :, sl], k[:, :, sl], v[:, :, sl], method=method, cache=cache, layer=layer
            )
            dense = _dense_layer(method, layer)  # the method's own rule, stated independently
            assert (res.state is None) == dense, (layer, res.state)
            assert_attention_close(
                res,
                q[:, :, sl],
                k[:, :, : t + 4],
                v[:, :, : t + 4],
                methods.Dense() if dense else method,
                q_positions=torch.arange(t, t + 4),
                kv_positions=torch.arange(t + 4),
            )
            if not dense:
                assert res.state.to_mask(t + 4).sum(-1).max() <= 80  # within budget (+1 page)


def _dense_layer(method, layer):
    """Layers where a select method attends to every key: Quest's ``dense_layers``, and TidalDecode's
    layers before its first selecting layer (budgets here are far below the cache's 200+ tokens)."""
    if method.name == "quest":
        return layer < method.dense_layers
    if method.name == "tidal_decode":
        return layer < method.select_layers[0]
    return False


@pytest.mark.parametrize(
    "method",
    [
        methods.Quest(budget=512),
        methods.OracleTopK(budget=512),
        methods.Loki(budget=512),
        methods.DoubleSparsity(budget=512),
        methods.InfLLM(budget=512),
        methods.TidalDecode(budget=512),
        methods.Quest(budget=16, fraction=1.0),
    ],
    ids=lambda m: m.describe(),
)
def test_budget_covering_the_cache_is_dense(method):
    q, k, v = make_qkv(1, 4, 2, 1, 300, 32, dtype=torch.float64, seed=2)
    res = attention(q, k, v, method=method)
    assert res.state is None
    torch.testing.assert_close(res.out, oracle(q, k, v).out)


def test_prefill_of_a_select_method_is_dense_causal():
    q, k, v = make_qkv(1, 4, 2, 64, 64, 32, seed=3)
    res = attention(q, k, v, method=methods.Quest(budget=16))
    assert_attention_close(res, q, k, v)


def test_quest_always_keeps_the_newest_page_and_its_bound_is_an_upper_bound():
    q, k, v = make_qkv(1, 4, 1, 1, 512, 16, seed=4)
    cache = KVCache(1)
    cache.append(0, k[:, :, :-1], v[:, :, :-1])
    res = attention(
        q, k[:, :, -1:], v[:, :, -1:], method=methods.Quest(budget=64, dense_layers=0), cache=cache
    )
    assert 31 in res.state.index[0, 0].tolist()
    view = cache.select_view(0, torch.tensor([[511]]), 0.25)
    exact = (q.view(1, 1, 4, 16) @ k.transpose(-1, -2)).view(1, 1, 4, 32, 16).amax(-1)
    rows = q.view(1, 1, 4, 16)
    bound = rows.clamp(min=0) @ view.page_max.float().transpose(-1, -2) + rows.clamp(
        max=0
    ) @ view.page_min.float().transpose(-1, -2)
    assert bool((bound >= exact - 1e-5).all())


@pytest.mark.parametrize(
    "method, n_dense",
    [(methods.Quest(budget=64, dense_layers=1), 1), (methods.Quest(budget=64), 2)],
    ids=["dense_layers=1", "default"],
)
def test_quest_dense_layers_attend_to_everything(method, n_dense):
    q, k, v = make_qkv(1, 4, 2, 1, 512, 16, seed=4)
    cache = KVCache(n_dense + 1)
    for layer in range(n_dense + 1):
        cache.append(layer, k[:, :, :-1], v[:, :, :-1])
    for layer in range(n_dense):
        res = attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=layer)
        assert res.state is None
        assert_attention_close(res, q, k, v)
    last = attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=n_dense)
    assert last.state is not None and last.state.index.shape[-1] == 4
    for bad, err in (("x", TypeError), (-1, ValueError), (True, TypeError)):
        with pytest.raises(err, match="dense_layers"):
            methods.Quest(dense_layers=bad)


def test_quest_shared_selection_follows_each_heads_own_best_page():
    # two query heads share a KV head; each has one best page. Head 0's scores are larger everywhere:
    # its second-best pages (2, 3) outrank head 1's best page (4) by bound, but carry almost none of
    # head 0's mass, so a 3-page budget (newest page + two) keeps pages 1 and 4 (the largest bound
    # over the group would keep 1 and 2)
    dim, t = 8, 16 * 8
    k = torch.zeros(1, 1, t, dim)
    k[0, 0, 16:32, 0] = 1.0  # page 1 answers head 0
    k[0, 0, 32:64, 0] = 0.5  # pages 2, 3: head 0's distant second choices
    k[0, 0, 64:80, 1] = 1.0  # page 4 answers head 1
    v = torch.randn(1, 1, t, dim)
    q = torch.zeros(1, 2, 1, dim)
    q[0, 0, 0, 0], q[0, 1, 0, 1] = 40.0, 8.0
    cache = KVCache(1)
    cache.append(0, k[:, :, :-1], v[:, :, :-1])
    res = attention(
        q, k[:, :, -1:], v[:, :, -1:], method=methods.Quest(budget=48, dense_layers=0), cache=cache
    )
    assert res.state.index[0, 0].tolist() == [1, 4, 7]


def test_tidal_decode_reuses_the_selection_layer_positions():
    q, k, v = make_qkv(1, 4, 2, 1, 400, 32, seed=5)
    method = methods.TidalDecode(budget=64, select_layers=(1,))
    cache = KVCache(4)
    for layer in range(4):
        cache.append(layer, k[:, :, :-1], v[:, :, :-1])
    states = [
        attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=layer).state
        for layer in range(4)
    ]
    assert states[0] is None
    assert torch.equal(states[1].index, states[2].index) and torch.equal(
        states[2].index, states[3].index
    )


def test_tidal_decode_reselects_when_a_layer_is_shorter_than_the_saved_slots():
    """Layer 0 holds more tokens than layer 1: the slots it saved do not all exist in layer 1,
    which selects for itself instead of indexing past its end."""
    q, k, v = make_qkv(1, 4, 2, 1, 400, 32, seed=5)
    method = methods.TidalDecode(budget=64, select_layers=(0,))
    cache = KVCache(2)
    cache.append(0, k[:, :, :-1], v[:, :, :-1])
    cache.append(1, k[:, :, :300], v[:, :, :300])
    attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=0)
    assert int(cache.state["tidal_decode"][0].max()) >= 301  # saved slots beyond layer 1's end
    q1 = q.clone()
    res = attention(q1, k[:, :, 300:301], v[:, :, 300:301], method=method, cache=cache, layer=1)
    assert int(res.state.index.max()) < 301
    assert_attention_close(res, q1, k[:, :, :301], v[:, :, :301], method)


def test_bad_budgets_and_page_sizes_are_refused():
    with pytest.raises(ValueError):
        methods.Quest(budget=0)
    with pytest.raises(ValueError):
        methods.Quest(budget=100, page_size=16)
    with pytest.raises(ValueError):
        methods.Loki(fraction=1.5)
    q, k, v = make_qkv(1, 4, 2, 1, 300, 32)
    cache = KVCache(1, page_size=16)
    cache.append(0, k[:, :, :-1], v[:, :, :-1])
    before = cache.keys(0).clone()
    with pytest.raises(ValueError, match="page"):
        attention(
            q,
            k[:, :, -1:],
            v[:, :, -1:],
            method=methods.Quest(budget=64, page_size=32),
            cache=cache,
        )
    assert cache.seq_len(0) == 299 and torch.equal(cache.keys(0), before)


def test_calibration_round_trip_and_shape_check(tmp_path):
    q, k, v = make_qkv(1, 4, 2, 1, 300, 32, seed=6)
    basis = torch.linalg.qr(torch.randn(2, 2, 32, 32)).Q
    cal = Calibration("loki", "toy", 2, 2, 32, {"basis": basis}, {"rank": 8})
    path = cal.save(tmp_path / "loki.safetensors")
    back = Calibration.load(path)
    assert back.metadata() == cal.metadata() and torch.equal(back.tensors["basis"], basis)
    method = methods.Loki(budget=64, rank=8, calibration=str(path))
    cache = KVCache(2)
    cache.append(1, k[:, :, :-1], v[:, :, :-1])
    res = attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=1)
    assert_attention_close(res, q, k, v, method)
    wrong = KVCache(3)
    wrong.append(0, k[:, :, :-1], v[:, :, :-1])
    with pytest.raises(ValueError, match="shape"):
        attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=wrong, layer=0)
    assert wrong.seq_len(0) == 299


def test_decode_fidelity_of_dense_is_exact_and_of_a_selection_is_bounded():
    """Dense attention through the cache reproduces the float64 dense output; a selection's error is
    that of attending its selected keys only (so recall < 1 goes with a non-zero error)."""
    from longattn.eval.fidelity import decode_fidelity
    from longattn.methods import Dense, OracleTopK

    captured = {layer: make_qkv(1, 4, 2, 64, 64, 16, seed=layer) for layer in range(2)}
    rows = decode_fidelity(captured, {"dense": Dense(), "top": OracleTopK(budget=32)}, steps=4)
    dense = [r for r in rows if r["method"] == "dense"]
    top = [r for r in rows if r["method"] == "top"]
    assert dense and all(r["recall"] == 1.0 and r["rel_error"] < 1e-5 for r in dense)
    assert top and all(0 < r["recall"] < 1 and 0 < r["rel_error"] < 1 for r in top)


def test_infllm_full_rows_select_what_the_general_path_selects():
    """Rows with no empty slot take InfLLM's O(blocks) path; a padded row in the batch sends the
    same keys through the general per-slot path: both pick the same tokens."""
    q, k, v = make_qkv(2, 4, 2, 1, 700, 32, seed=11)
    k[1], v[1], q[1] = k[0], v[0], q[0]
    method = methods.InfLLM(budget=448, sinks=40, window=100, block_size=64)  # 4 memory blocks
    full = KVCache(1)
    full.append(0, k[:1], v[:1])
    padded = KVCache(1)
    pos = torch.arange(700).repeat(2, 1)
    pos[1, 0], pos[1, 1:] = -1, torch.arange(699)  # row 1: one padding slot, then the same keys
    padded.append(0, k, v, positions=pos)
    fast = method.select(q[:1], full.select_view(0, torch.tensor([[700]]), 32**-0.5)).index
    general = method.select(q, padded.select_view(0, torch.tensor([[700]]), 32**-0.5)).index
    assert fast.shape == general[:1].shape
    for h in range(2):
        picked = fast[0, h][fast[0, h] >= 0]
        assert picked.numel() == 40 + 4 * 64 + 100
        assert bool((picked.diff() > 0).all())  # ascending, no duplicates
        assert set(picked.tolist()) == set(general[0, h][general[0, h] >= 0].tolist())
