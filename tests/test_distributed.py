"""Distributed attention on local gloo groups of 2 and 4 processes against the float64 oracle.

One group per world size runs every case (``distributed_cases.run_cases``), so the suite pays the
process start-up once per world size; the tests then read the results."""

from __future__ import annotations

import pytest
import torch
from distributed_cases import absent_peer, inputs, prompt, run_cases, tiny_llama

from longattn import from_string
from longattn.distributed import (
    LAYOUTS,
    ring_attention,
    shard,
    shard_positions,
    star_visible,
    unshard,
)
from longattn.distributed.local import run_local
from longattn.testing import (
    assert_attention_close,
    assert_linear_method_close,
    check_against_reference,
    oracle,
    reference_bound,
)
from longattn.types import AttnOutput

RING_CASES = {}
for _layout in LAYOUTS:
    for _causal in (True, False):
        RING_CASES[f"{_layout}-causal={_causal}-float32"] = dict(
            kind="ring", layout=_layout, method=f"dense:causal={str(_causal).lower()}",
            length=37, dtype="float32",
        )  # fmt: skip
    RING_CASES[f"{_layout}-causal=True-bfloat16"] = dict(
        kind="ring", layout=_layout, method="dense", length=37, dtype="bfloat16"
    )
    RING_CASES[f"{_layout}-balance"] = dict(
        kind="ring", layout=_layout, method="dense", length=128, dtype="float32"
    )
RING_CASES["contiguous-window"] = dict(
    kind="ring", layout="contiguous", method="sliding_window:window=8", length=130, dtype="float32"
)
RING_CASES["striped-streaming"] = dict(
    kind="ring", layout="striped", method="streaming_llm:sinks=4,window=16", length=130,
    dtype="float32",
)  # fmt: skip
LASP2_CASES = {
    "lasp2-elu-float32": dict(
        kind="lasp2", method="elu_linear:chunk_size=16", length=37, dtype="float32"
    ),
    "lasp2-elu-bfloat16": dict(
        kind="lasp2", method="elu_linear:chunk_size=16", length=37, dtype="bfloat16"
    ),
    "lasp2-retnet-float32": dict(
        kind="lasp2", method="elu_linear:decay=retnet,chunk_size=8", length=130, dtype="float32"
    ),
    "lasp2-retnet-bfloat16": dict(
        kind="lasp2", method="elu_linear:decay=retnet", length=37, dtype="bfloat16"
    ),
    "lasp2-hedgehog": dict(
        kind="lasp2", method="hedgehog:features=8,chunk_size=16", length=37, dtype="float32"
    ),
    "lasp2-noncausal": dict(kind="lasp2", method="cosine:causal=false", length=37, dtype="float32"),
    "lasp2-noncausal-bfloat16": dict(
        kind="lasp2", method="cosine:causal=false", length=37, dtype="bfloat16"
    ),
}
STAR_CASES = {
    "star-float32": dict(kind="star", length=130, n_query=5, dtype="float32"),
    "star-anchor-bfloat16": dict(kind="star", length=37, n_query=3, anchor=4, dtype="bfloat16"),
}
HF_CASES = {
    "hf-contiguous": dict(kind="hf", layout="contiguous", length=37),
    "hf-zigzag": dict(kind="hf", layout="zigzag", length=37),
}
ERROR_CASES = {
    "bad-length": dict(kind="ring", layout="contiguous", method="dense", length=37,
                       dtype="float32", bad="length"),
    "bad-dtype": dict(kind="ring", layout="striped", method="dense", length=37,
                      dtype="float32", bad="dtype"),
    "bad-heads": dict(kind="ring", layout="zigzag", method="dense", length=37,
                      dtype="float32", bad="heads"),
    "raises-late": dict(kind="ring", layout="contiguous", method="fails_late", length=37,
                        dtype="float32"),
    "star-bad-n-query": dict(kind="star", length=37, n_query=3, dtype="float32", bad=True),
    "lasp2-delta": dict(kind="lasp2", method="gated_deltanet", length=37, dtype="float32"),
    "lasp2-not-finite": dict(kind="lasp2", method="elu_linear", length=37, dtype="float32",
                             bad="nan"),
}  # fmt: skip
ALL_CASES = {**RING_CASES, **LASP2_CASES, **STAR_CASES, **HF_CASES, **ERROR_CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world={w}")
def group_results(request):
    world = request.param
    preload = ("transformers", "longattn.integrations.hf_ring")  # once, in the fork server
    return world, run_local(run_cases, world, ALL_CASES, timeout=60.0, preload=preload)


def _gathered(results, name, layout):
    for rank, res in enumerate(results):
        assert res[name]["ok"], f"rank {rank}: {res[name]}"
    out = unshard([res[name]["out"] for res in results], layout)
    lse = unshard([res[name]["lse"] for res in results], layout)
    return AttnOutput(out, lse, None)


@pytest.mark.parametrize("name", sorted(RING_CASES))
def test_ring_equals_the_oracle(group_results, name):
    world, results = group_results
    case = RING_CASES[name]
    q, k, v = inputs(case["length"], case["dtype"])
    result = _gathered(results, name, case["layout"])
    assert result.out.dtype == q.dtype
    assert_attention_close(result, q, k, v, from_string(case["method"]))


@pytest.mark.parametrize("name", sorted(LASP2_CASES))
def test_lasp2_equals_the_linear_oracle(group_results, name):
    _, results = group_results
    case = LASP2_CASES[name]
    q, k, v = inputs(case["length"], case["dtype"], seed=1)
    for rank, res in enumerate(results):
        assert res[name]["ok"], f"rank {rank}: {res[name]}"
    out = unshard([res[name]["out"] for res in results], "contiguous")
    assert out.dtype == q.dtype
    assert_linear_method_close(out, q, k, v, from_string(case["method"]))


def test_lasp2_refuses_the_delta_rule_on_every_rank(group_results):
    world, results = group_results
    for res in results:
        entry = res["lasp2-delta"]
        assert not entry["ok"] and entry["type"] == "ValueError", entry
        assert "delta rule" in entry["message"] and f"rank {world - 1}" in entry["message"]


def test_lasp2_features_failing_on_one_rank_fail_every_rank(group_results):
    world, results = group_results
    for res in results:
        entry = res["lasp2-not-finite"]
        assert not entry["ok"] and entry["type"] == "ValueError", entry
        assert f"rank {world - 1} raised" in entry["message"] and "not finite" in entry["message"]
        assert "rank 0 raised" not in entry["message"]


@pytest.mark.parametrize("name", sorted(STAR_CASES))
def test_star_computes_its_two_phase_mask_exactly(group_results, name):
    world, results = group_results
    case = STAR_CASES[name]
    q, k, v = inputs(case["length"], case["dtype"], seed=2)
    result = _gathered(results, name, "contiguous")
    visible = star_visible(case["length"], world, case["n_query"], case.get("anchor"))
    check_against_reference(result, q, k, v, visible, q.shape[-1] ** -0.5)
    # the query tokens' rows are exact causal attention; the context rows of later blocks are not
    exact = oracle(q, k, v, from_string("dense"))
    tail = slice(case["length"] - case["n_query"], None)
    causal = torch.ones(case["length"], case["length"], dtype=torch.bool).tril()
    bound = reference_bound(q, k, v, causal, q.shape[-1] ** -0.5)
    diff = (result.out.double() - exact.out)[:, :, tail].abs()
    assert bool((diff <= bound.out[:, :, tail]).all())
    if world > 2 or case.get("anchor"):  # with 2 ranks and a whole anchor block, Star is exact
        assert (result.out.double() - exact.out).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_ring_prefill_of_a_llama_matches_one_process(group_results, name):
    pytest.importorskip("transformers")
    world, results = group_results
    case = HF_CASES[name]
    for rank, res in enumerate(results):
        assert res[name]["ok"], f"rank {rank}: {res[name]}"
    logits = unshard([res[name]["logits"] for res in results], case["layout"], dim=1)
    with torch.no_grad():
        alone = tiny_llama()(input_ids=prompt(case["length"])).logits
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=0)
    for rank, res in enumerate(results):  # each cache holds its own shard only
        held = shard_positions(case["length"], rank, world, case["layout"]).numel()
        assert all(shape[2] == held for shape in res[name]["cached"])


def _imbalance(results, name):
    pairs = [res[name]["pairs"] for res in results]
    assert min(pairs) > 0
    return max(pairs) / min(pairs)


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_causal_work_is_balanced(group_results, layout):
    _, results = group_results
    assert _imbalance(results, f"{layout}-balance") <= 1.15
    assert _imbalance(results, "contiguous-balance") >= 2.0


def test_a_window_stops_the_ring_early(group_results):
    world, results = group_results
    # each shard of 130 / world >= 32 tokens is within reach of the next shard only: one transfer,
    # and rank 0 receives nothing (the last shard is in its future)
    assert [res["contiguous-window"]["steps"] for res in results] == [0] + [1] * (world - 1)
    assert [res["contiguous-window"]["blocks"] for res in results] == [1] + [2] * (world - 1)


def test_causal_contiguous_skips_future_blocks(group_results):
    world, results = group_results
    blocks = [res["contiguous-causal=True-float32"]["blocks"] for res in results]
    assert blocks == list(range(1, world + 1))


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("bad-length", "ValueError", ["holds", "tokens"]),
        ("bad-dtype", "ValueError", ["dtype", "torch.float64"]),
        ("bad-heads", "ValueError", ["kv heads", "1"]),
        ("raises-late", "RankError", ["mask refused query position"]),
        ("star-bad-n-query", "ValueError", ["n_query=4", "n_query=3"]),
    ],
)
def test_a_bad_rank_fails_every_rank_naming_it(group_results, name, kind, words):
    world, results = group_results
    for res in results:
        entry = res[name]
        assert not entry["ok"]
        assert entry["type"] == kind, entry
        assert f"rank {world - 1}" in entry["message"], entry["message"]
        for word in words:
            assert word in entry["message"], entry["message"]


def test_a_rank_that_never_arrives_fails_the_others_within_the_timeout():
    results = run_local(absent_peer, 2, timeout=3.0)
    assert results[1] == {"ok": True, "joined": False}
    assert not results[0]["ok"], results[0]


def test_a_group_of_one_needs_no_process_group():
    q, k, v = inputs(37, "float32")
    res = ring_attention(q, k, v, layout="zigzag")
    assert_attention_close(res, q, k, v, from_string("dense"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("length", "world"), [(37, 2), (37, 4), (130, 4), (8, 8), (9, 3)])
def test_shard_and_unshard_are_inverse(layout, length, world):
    x = torch.arange(length).view(1, 1, length, 1).float()
    parts = [shard(x, r, world, layout) for r in range(world)]
    assert all(p.shape[2] >= 1 for p in parts)
    assert max(p.shape[2] for p in parts) - min(p.shape[2] for p in parts) <= 2
    torch.testing.assert_close(unshard(parts, layout), x)
    positions = torch.cat([shard_positions(length, r, world, layout) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(length))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((3, 0, 4, "contiguous"), ["length 3", "world size 4"]),
        ((8, 4, 4, "striped"), ["rank", "4"]),
        ((8, 0, 2, "ring"), ["layout", "'ring'"]),
    ],
)
def test_shard_positions_refuses_bad_input(args, words):
    with pytest.raises(ValueError) as info:
        shard_positions(*args)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("gate", ["fixed", "head", "channel"])
def test_lasp2_states_fold_to_the_engines_state(gate):
    from longattn.distributed.lasp2 import _fold, local_state
    from longattn.kernels.linear import linear_attention

    gen = torch.Generator().manual_seed(4)
    batch, n_kv, length, feat, dv = 1, 2, 29, 8, 5
    phi_k = torch.rand(batch, n_kv, length, feat, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_kv, length, dv, generator=gen, dtype=torch.float64)
    shapes = {
        "fixed": (n_kv,),
        "head": (batch, n_kv, length),
        "channel": (batch, n_kv, length, feat),
    }
    log_decay = -0.3 * torch.rand(shapes[gate], generator=gen, dtype=torch.float64)
    _, whole = linear_attention(phi_k, phi_k, v, log_decay=log_decay, chunk_size=4)
    values = torch.nn.functional.pad(v, (0, 1), value=1.0)
    cuts, parts = [0, 11, 20, length], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        piece = log_decay if gate == "fixed" else log_decay[:, :, lo:hi]
        parts.append(local_state(phi_k[:, :, lo:hi], values[:, :, lo:hi], piece))
    folded = _fold(parts + [parts[0]], rank=len(parts), causal=True)  # every earlier part
    torch.testing.assert_close(folded[..., :-1], whole.kv)
    torch.testing.assert_close(folded[..., -1], whole.k_sum)
