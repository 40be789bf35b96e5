"""Dynamic sparse prefill (``plan`` methods, ``longattn.prefill``): the library's guarantees."""

import dataclasses
import logging
import math

import pytest
import torch

from longattn import KVCache, attention, from_string, methods
from longattn.api import block_index, choose_impl, make_call
from longattn.methods.block_topk import top_k_blocks, top_p_blocks
from longattn.prefill import causal_layout
from longattn.testing import assert_attention_close, make_qkv
from longattn.types import BlockIndex

PLAN_SPECS = [
    "block_topk:block_size=16,budget=0.25",
    "block_topp:block_size=16,budget=0.7",
    "block_oracle:block_size=16,budget=0.25",
]


def _visited(index: BlockIndex) -> torch.Tensor:
    return index.layout()[0]  # [Bi, Hi, nq, nk]


@pytest.mark.parametrize("spec", PLAN_SPECS)
def test_a_plan_runs_its_blocks_and_the_reference_agrees(spec):
    q, k, v = make_qkv(2, 4, 2, 200, 200, 32, seed=1)
    out = attention(q, k, v, method=spec)
    assert isinstance(out.state, BlockIndex)
    visited = _visited(out.state)
    causal, _ = causal_layout(torch.arange(200).view(1, -1), torch.arange(200).view(1, -1), 16)
    assert not (visited & ~causal).any()  # only blocks with a causal pair
    assert visited.sum() < causal.sum() * visited.shape[0] * visited.shape[1]  # really sparse
    assert_attention_close(out, q, k, v, from_string(spec))
    for impl in ("sparse", "reference"):
        again = attention(q, k, v, method=spec, impl=impl)
        assert torch.equal(_visited(again.state), visited)  # deterministic plan


@pytest.mark.parametrize("spec", PLAN_SPECS)
def test_every_query_sees_itself_and_the_sink(spec):
    q, k, v = make_qkv(1, 2, 2, 160, 160, 16, seed=2)
    visited = _visited(attention(q, k, v, method=spec).state)[0]  # [Hi, nq, nk]
    n_blocks = visited.shape[-1]
    assert visited[:, :, 0].all()
    diagonal = torch.arange(n_blocks)
    assert visited[:, diagonal, diagonal].all()


def test_budget_one_is_dense_causal_attention():
    q, k, v = make_qkv(1, 4, 2, 130, 130, 32, seed=3, dtype=torch.float64)
    out = attention(q, k, v, method="block_topk:block_size=16,budget=1.0")
    dense = attention(q, k, v, method="dense", impl="reference")
    torch.testing.assert_close(out.out, dense.out)


def test_top_k_keeps_the_fraction_of_causal_blocks_per_row():
    causal = torch.ones(4, 8, dtype=torch.bool).tril(4)  # rows of 5..8 causal blocks
    scores = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    chosen = top_k_blocks(scores, causal, 0.5)
    assert chosen.sum(-1).tolist() == [[[3, 3, 4, 4], [3, 3, 4, 4]]]
    assert not (chosen & ~causal).any()
    best = scores.masked_fill(~causal, -math.inf).argmax(-1)
    assert chosen.gather(-1, best.unsqueeze(-1)).all()
    forced = torch.zeros(4, 8, dtype=torch.bool)
    forced[:, 0] = True  # a sink block: counted in the budget, kept whatever its score
    with_sink = top_k_blocks(scores.masked_fill(forced, -1e9), causal, 0.5, forced)
    assert with_sink[..., 0].all() and torch.equal(with_sink.sum(-1), chosen.sum(-1))


def test_top_p_reaches_the_mass_with_the_fewest_blocks():
    mass = torch.tensor([[[[0.5, 0.3, 0.15, 0.05]]]])
    causal = torch.ones(1, 4, dtype=torch.bool)
    assert top_p_blocks(mass, causal, 0.5).tolist() == [[[[True, False, False, False]]]]
    assert top_p_blocks(mass, causal, 0.8).tolist() == [[[[True, True, False, False]]]]
    assert top_p_blocks(mass, causal, 0.81).tolist() == [[[[True, True, True, False]]]]


def test_the_oracle_keeps_the_blocks_of_most_attention():
    """Every query points along ``u`` and the keys of block 2 are ``3 u``: they draw nearly all the
    attention of every later query, and the oracle chooses it first."""
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(16, generator=gen)
    q = u + 0.1 * torch.randn(1, 1, 128, 16, generator=gen)
    k = 0.1 * torch.randn(1, 1, 128, 16, generator=gen)
    k[:, :, 32:48] = 3 * u
    out = attention(q, k, k, method="block_oracle:block_size=16,budget=0.3,sink_blocks=0")
    visited = _visited(out.state)[0, 0]
    # query blocks 3..5 keep ceil(0.3 x 4..6) = 2 blocks: the diagonal (forced) and block 2
    assert visited[3:, 2].all() and visited[3:6].sum(-1).tolist() == [2, 2, 2]


def test_short_calls_and_decode_are_dense(caplog):
    method = from_string("block_topk:block_size=64,dense_below=256")
    q, k, v = make_qkv(1, 2, 2, 200, 200, 16)
    with caplog.at_level(logging.DEBUG, logger="longattn"):
        out = attention(q, k, v, method=method)
    assert out.state is None and "dense_below=256" in caplog.text
    call = make_call(q[:, :, -3:], k, v, method)
    assert isinstance(call.method, methods.Dense)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16)  # under one block: dense, and it works
    out = attention(q, k, v, method="block_topk")
    assert_attention_close(out, q, k, v, methods.Dense())


def test_chunked_prefill_over_a_cache_plans_each_chunk():
    q, k, v = make_qkv(1, 4, 2, 256, 256, 32, seed=5)
    method = from_string("block_topk:block_size=32,budget=0.3")
    cache = KVCache(1)
    for lo in (0, 128):
        sl = slice(lo, lo + 128)
        out = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], method=method, cache=cache)
        assert isinstance(out.state, BlockIndex)
        assert_attention_close(
            out, q[:, :, sl], k[:, :, : lo + 128], v[:, :, : lo + 128], method,
            q_positions=torch.arange(lo, lo + 128), kv_positions=torch.arange(lo + 128),
        )  # fmt: skip


@pytest.mark.parametrize(
    "spec, error",
    [
        ("block_topk:budget=0", ValueError),
        ("block_topk:budget=1.5", ValueError),
        ("block_topk:block_size=0", ValueError),
        ("block_topk:local_blocks=0", ValueError),
        ("block_oracle:mode=best", ValueError),
    ],
)
def test_bad_parameters_are_refused(spec, error):
    with pytest.raises(error):
        from_string(spec)
    with pytest.raises(TypeError, match="budget"):
        methods.BlockTopP(budget=True)


class _BadShape(methods.BlockTopK):
    def plan(self, view):
        return torch.ones(1, 1, 2, 2, dtype=torch.bool)


class _BadType(methods.BlockTopK):
    def plan(self, view):
        return view.pooled_logits()


@pytest.mark.parametrize("bad, error", [(_BadShape, ValueError), (_BadType, TypeError)])
def test_a_plan_of_the_wrong_shape_or_type_is_refused(bad, error):
    q, k, v = make_qkv(1, 2, 2, 128, 128, 16)
    call = make_call(q, k, v, bad(block_size=16))
    with pytest.raises(error, match="plan must return"):
        choose_impl(call, "sparse").run(call)


LAYERS_SEEN: list[int] = []


@dataclasses.dataclass(frozen=True)
class LayerSpy(methods.BlockTopK):
    """Block top-k that records the layer each plan is made for (unregistered, test only)."""

    def plan(self, view):
        LAYERS_SEEN.append(view.layer)
        return super().plan(view)


@torch.no_grad()
def test_a_model_without_the_blocks_cache_plans_each_layer_as_itself():
    """``hf.use`` without the use() block's cache (transformers' own, or none) still tells each
    plan its layer: a calibrated method reads that layer's calibration."""
    transformers = pytest.importorskip("transformers")
    from longattn.integrations import hf

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 50, (1, 96), generator=torch.Generator().manual_seed(1))
    LAYERS_SEEN.clear()
    with hf.use(model, LayerSpy(block_size=16)):
        model(ids, use_cache=False)
    assert LAYERS_SEEN == [0, 1, 2]


@pytest.mark.parametrize("spec", ["block_topk:block_size=16,budget=0.2", "dhsa:block_size=16"])
def test_last_blocks_visit_every_causal_block_and_stay_exact(spec):
    q, k, v = make_qkv(1, 4, 2, 200, 200, 32, seed=6)  # 13 query blocks, the last one partial
    causal, _ = causal_layout(torch.arange(200).view(1, -1), torch.arange(200).view(1, -1), 16)
    plain = _visited(attention(q, k, v, method=spec).state)
    method = from_string(spec + ",last_blocks=2")
    out = attention(q, k, v, method=method)
    visited = _visited(out.state)
    assert visited[..., -2:, :].eq(causal[-2:]).all()  # the last two rows: every causal block
    assert not plain[..., -2:, :].eq(causal[-2:]).all()  # which the plan alone does not choose
    assert torch.equal(visited[..., :-2, :], plain[..., :-2, :])  # the other rows unchanged
    assert_attention_close(out, q, k, v, method)


def test_last_blocks_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="last_blocks must be >= 0, got -1"):
        from_string("block_topk:last_blocks=-1")
    with pytest.raises(TypeError, match="last_blocks must be int"):
        methods.BlockTopK(last_blocks=1.5)


def test_a_plan_mostly_of_diagonal_blocks_runs_on_a_sparse_kernel():
    """At a low density most visited blocks are the diagonal ones (partial): the tiled executor,
    faster for mask methods with many partial blocks, cannot run a plan, so auto keeps a sparse
    kernel rather than the float64 reference."""
    q, k, v = make_qkv(1, 4, 2, 1024, 1024, 16, seed=1)
    call = make_call(q, k, v, from_string("block_topk:block_size=64,budget=0.05"))
    index = block_index(call)
    assert int(index.partial.sum()) > index.visited // 2  # the case the rule is about
    assert choose_impl(call).name in ("sparse_cpp", "sparse")
