"""MInference (vertical-slash token columns on the block-sparse kernels, per-head patterns, the
offline pattern search) and FlexPrefill."""

import math
from dataclasses import dataclass

import pytest
import torch

import longattn
from longattn.api import choose_impl
from longattn.call import make_call
from longattn.kernels.vertical import column_attention
from longattn.methods import BlockTopK, FlexPrefill, MInference
from longattn.methods.block_topk import top_p_blocks
from longattn.methods.flexprefill import cumulative_count, js_divergence
from longattn.testing import assert_attention_close, sparse_cpp_runs_bf16
from longattn.types import BlockIndex, PrefillPlan


def _qkv(dtype=torch.float32, t=200, heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, t, 64), (2, kv_heads, t, 64), (2, kv_heads, t, 64)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


VS = MInference(block_size=16, budget=0.1, vertical=0.1, last_q=16)
CASES = [(torch.float64, "sparse"), (torch.float32, "sparse"), (torch.float32, "sparse_cpp")]
CASES += [(torch.bfloat16, "sparse")]
CASES += [(torch.bfloat16, "sparse_cpp")] if sparse_cpp_runs_bf16() else []


@pytest.mark.parametrize("dtype, impl", CASES)
def test_vertical_slash_runs_its_columns_and_the_reference_agrees(dtype, impl):
    q, k, v = _qkv(dtype)
    result = longattn.attention(q, k, v, method=VS, impl=impl)
    assert isinstance(result.state, PrefillPlan) and isinstance(result.state.blocks, BlockIndex)
    assert int((result.state.columns >= 0).sum()) > 0
    assert_attention_close(result, q, k, v, VS)
    # the columns count: the same blocks without them are another attention
    blocks_only = result._replace(state=result.state.blocks)
    with pytest.raises(AssertionError):
        assert_attention_close(blocks_only, q, k, v, VS)


def test_columns_are_each_once_and_never_inside_a_visited_block():
    q, k, v = _qkv()
    state = longattn.attention(q, k, v, method=VS, impl="sparse").state
    visited = state.blocks.layout()[0]  # [B?, H, nq, nk]
    cols = state.columns
    used = cols >= 0
    covered = torch.gather(visited.expand(*cols.shape[:2], -1, -1), -1, cols.clamp(min=0) // 16)
    assert not bool((covered & used).any())
    ordered = cols[..., 1:] > cols[..., :-1]
    assert bool((ordered | ~used[..., 1:]).all())  # ascending, -1 only after the used slots


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", [(2, 3), (1, 3), (2, 1)])
def test_tidy_columns_equals_a_set_by_set_reference(shared, shape):
    """Per row: the distinct columns (>= 0) whose key block is causal for the row's query block
    and not visited, ascending, -1 after; the width is the widest row's."""
    from longattn.prefill import tidy_columns

    gen = torch.Generator().manual_seed(7)
    n_q, n_k, block, n = 6, 6, 4, 15
    rows = 1 if shared else n_q
    columns = torch.randint(-1, n_k * block, (*shape, rows, n), generator=gen)
    columns = columns.expand(*shape, n_q, n)
    visited = torch.rand(2, 3, n_q, n_k, generator=gen) < 0.4
    causal = torch.ones(n_q, n_k, dtype=torch.bool).tril()
    got = tidy_columns(columns, visited, block, causal)
    want = []
    for b, h, qb in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(n_q)):
        cols = {int(c) for c in columns[b % shape[0], h % shape[1], qb] if c >= 0}
        want.append(
            sorted(c for c in cols if causal[qb, c // block] and not visited[b, h, qb, c // block])
        )
    width = max(map(len, want))
    expect = torch.full((2 * 3 * n_q, width), -1, dtype=torch.int64)
    for i, cols in enumerate(want):
        expect[i, : len(cols)] = torch.tensor(cols, dtype=torch.int64)
    assert got is not None and torch.equal(got.reshape(-1, got.shape[-1]), expect)
    assert tidy_columns(torch.full_like(columns, -1), visited, block, causal) is None


def _dense(q, k, v):
    return longattn.attention(q.double(), k.double(), v.double(), impl="reference").out


@pytest.mark.parametrize(
    "method",
    [
        MInference(block_size=16, budget=1.0, vertical=0.0),  # every diagonal
        MInference(block_size=16, budget=0.01, vertical=1.0, local_blocks=1),  # every column
        MInference(block_size=16, pattern="block", budget=1.0),
        MInference(block_size=16, pattern="ashape", budget=1.0),
    ],
)
def test_degenerate_budgets_are_dense_causal_attention(method):
    q, k, v = _qkv(torch.float64, t=150)
    result = longattn.attention(q, k, v, method=method, impl="sparse")
    torch.testing.assert_close(result.out, _dense(q, k, v))


def test_column_kernel_over_every_key_is_dense_causal():
    q, k, v = _qkv(torch.float64, t=40, heads=2, kv_heads=1)
    pos = torch.arange(40).view(1, -1)
    columns = torch.arange(40).view(1, 1, 1, -1).expand(1, 2, 3, 40)
    out, lse = column_attention(q, k, v, columns, 16, 0.125, pos, pos)
    ref = longattn.attention(q, k, v, impl="reference")
    torch.testing.assert_close(out, ref.out)
    torch.testing.assert_close(lse, ref.lse)


def test_block_pattern_is_block_top_k():
    q, k, v = _qkv()
    ours = longattn.attention(q, k, v, method=MInference(block_size=16, pattern="block"))
    theirs = longattn.attention(q, k, v, method=BlockTopK(block_size=16))
    assert isinstance(ours.state, BlockIndex)  # no columns: the plain block form
    assert torch.equal(ours.state.layout()[0], theirs.state.layout()[0])


def test_slash_lines_become_the_blocks_they_cross():
    # the last queries attend to the key 20 positions back only: a diagonal at offset 20
    q, k, v = _qkv(torch.float32, t=128, heads=1, kv_heads=1)
    k[:, :, :108] = q[:, :, 20:] * 4
    method = MInference(block_size=16, budget=0.01, vertical=0.0, sink_blocks=0, last_q=16)
    result = longattn.attention(q, k, v, method=method, impl="sparse")
    visited = result.state.blocks.layout()[0][0, 0]
    for row in range(2, 8):  # rows 32 + 16 i .. cross key blocks i - 2 and i - 1 at offset 20
        assert visited[row, row - 2] and visited[row, row - 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pattern="dense"),
        dict(vertical=1.5),
        dict(last_q=0),
        dict(budget=0.0),
        dict(budget=1.5),
    ],
)
def test_bad_minference_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        MInference(**kwargs)


@dataclass(frozen=True)
class _BadColumns(MInference):
    columns: int = 0

    def plan(self, view):
        nq, nk = view.causal.shape
        blocks = torch.zeros(1, 1, nq, nk, dtype=torch.bool)
        bad = {
            0: torch.zeros(1, 1, nq, 2),  # float
            1: torch.zeros(1, 1, nq + 1, 2, dtype=torch.int64),  # wrong nq
            2: torch.full((1, 1, nq, 2), view.k.shape[2], dtype=torch.int64),  # out of range
        }[self.columns]
        return PrefillPlan(blocks, bad)


@pytest.mark.parametrize("which, error", [(0, TypeError), (1, ValueError), (2, ValueError)])
def test_bad_plan_columns_are_refused(which, error):
    q, k, v = _qkv(t=64)
    call = make_call(q, k, v, _BadColumns(block_size=16, columns=which))
    with pytest.raises(error, match="PrefillPlan.columns"):
        choose_impl(call, "sparse").run(call)


def _tiny_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


SEARCH = dict(model="tiny", length=160, block_size=16, last_q=16, target=0.5)


def test_pattern_search_runs_saves_resumes_and_loads(tmp_path, monkeypatch):
    from longattn.eval import pattern_search as ps

    model, out = _tiny_model(), tmp_path / "mi.safetensors"
    ids = torch.randint(3, 64, (1, 160), generator=torch.Generator().manual_seed(1))
    settings = ps.SearchSettings(**SEARCH)
    searched = []
    real = ps.search_layer

    def counting(q, k, v, s, layer):
        searched.append(layer)
        if layer == 1 and len(searched) == 2:
            raise KeyboardInterrupt  # stopped after layer 0's checkpoint
        return real(q, k, v, s, layer)

    monkeypatch.setattr(ps, "search_layer", counting)
    with pytest.raises(KeyboardInterrupt):
        ps.search(model, ids, settings, out)
    assert not out.exists() and out.with_name(out.name + ".checkpoint").exists()
    cal = ps.search(model, ids, settings, out)  # resumes: layer 1 only
    assert searched == [0, 1, 1] and out.exists()
    assert not out.with_name(out.name + ".checkpoint").exists()
    assert cal.tensors["pattern"].shape == (2, 2, 2)
    assert bool((cal.tensors["density"] <= settings.target + 1e-6).all())
    # loaded by path, runs, and the reference agrees with what ran
    q, k, v = _qkv(t=160, heads=4, kv_heads=2)
    q, k, v = (x[..., :16].contiguous() for x in (q, k, v))
    method = MInference(block_size=16, calibration=str(out))
    result = longattn.attention(q, k, v, method=method, layer=1)
    assert_attention_close(result, q, k, v, method)


def test_pattern_search_picks_the_best_recall_within_the_target():
    from longattn.eval import pattern_search as ps

    q, k, v = _qkv(t=160, heads=4, kv_heads=2)
    settings = ps.SearchSettings(**SEARCH)
    chosen = ps.search_layer(q[:1], k[:1], v[:1], settings, 0)
    grid = ps.candidates(settings)
    view = longattn.prefill.make_view(longattn.call.make_call(q[:1], k[:1], v[:1], grid[0]))
    for head in range(4):
        best, found = float(chosen["recall"][head]), []
        for method in grid:
            visible = ps._visible(view, method)[0, head]
            density = float(visible.sum()) / (160 * 161 / 2)
            if density <= settings.target:
                found.append(float(_recall(q[:1], k[:1], visible, head)))
        assert best == pytest.approx(max(found), abs=1e-5)  # the best that fits, measured exactly


def _recall(q, k, visible, head):
    logits = (q[0, head] @ k[0, head // 2].T) / 8.0
    causal = torch.ones(160, 160, dtype=torch.bool).tril()
    weights = torch.softmax(logits.masked_fill(~causal, -torch.inf), -1)
    return (weights * visible).sum() / 160


def _write_calibration(path, n_layers=2, n_kv=2, group=2, head_dim=64, **over):
    from longattn.calibration import Calibration

    shape = (n_layers, n_kv, group)
    tensors = {
        "pattern": torch.ones(shape, dtype=torch.int64),
        "budget": torch.full(shape, 0.1, dtype=torch.float64),
        "vertical": torch.full(shape, 0.1, dtype=torch.float64),
    }
    tensors.update(over)
    Calibration("minference", "tiny", n_layers, n_kv, head_dim, tensors).save(path)
    return str(path)


@pytest.mark.parametrize(
    "write, layer, match",
    [
        (dict(head_dim=32), 0, "head dim"),  # another model's shape
        (dict(n_kv=1), 0, "kv heads"),
        ({}, 2, "layer 2"),  # fewer layers than the call's layer
        (dict(group=1, n_kv=2), 0, "pattern, budget, vertical"),
        (dict(pattern=torch.full((2, 2, 2), 7)), 0, "patterns must index"),
        (dict(budget=torch.zeros(2, 2, 2, dtype=torch.float64)), 0, r"\(0, 1\]"),
    ],
)
def test_a_calibration_for_another_model_or_shape_is_refused(tmp_path, write, layer, match):
    path = _write_calibration(tmp_path / "c.safetensors", **write)
    method = MInference(block_size=16, calibration=path)
    q, k, v = _qkv(t=64)
    with pytest.raises(ValueError, match=match):
        longattn.attention(q, k, v, method=method, layer=layer)


def test_the_shipped_smollm2_patterns_load_by_model_name():
    method = MInference(calibration="smollm2-135m")
    layer = longattn.prefill.plan_calibration(method, 3, 64, 29)
    assert layer["pattern"].shape == (3, 3)
    with pytest.raises(ValueError, match="kv heads"):
        longattn.prefill.plan_calibration(method, 2, 64, 0)  # another model's shape


def test_the_cli_parses_calibrate_minference():
    from longattn.cli import build_parser
    from longattn.eval.pattern_search import SearchSettings

    argv = ["calibrate", "minference", "--out", "x.safetensors", "--target", "0.1"]
    args = build_parser().parse_args(argv)
    assert (args.calibration, args.target, args.length, args.block_size) == (
        "minference",
        0.1,
        2048,
        64,
    )
    with pytest.raises(ValueError, match="target density"):
        SearchSettings(target=0.0)


FLEX_CASES = [(torch.float32, "sparse"), (torch.float32, "sparse_cpp"), (torch.bfloat16, "sparse")]


@pytest.mark.parametrize("dtype, impl", FLEX_CASES)
@pytest.mark.parametrize("tau", [0.0, 0.3, 10.0])
def test_flexprefill_runs_its_choice_and_the_reference_agrees(dtype, impl, tau):
    q, k, v = _qkv(dtype)
    method = FlexPrefill(block_size=16, gamma=0.6, tau=tau)
    result = longattn.attention(q, k, v, method=method, impl=impl)
    assert_attention_close(result, q, k, v, method)


def test_flexprefill_tau_switches_between_query_aware_and_vertical_slash():
    q, k, v = _qkv()
    aware = longattn.attention(q, k, v, method=FlexPrefill(block_size=16, gamma=0.6, tau=10.0))
    assert isinstance(aware.state, BlockIndex)  # every head trusts the pooled estimate
    view = longattn.prefill.make_view(longattn.call.make_call(q, k, v, FlexPrefill(block_size=16)))
    estimate = torch.softmax(view.pooled_logits(), -1).nan_to_num(0.0)
    expected = top_p_blocks(estimate, view.causal, 0.6)
    expected = expected | view.forced
    assert torch.equal(aware.state.layout()[0], expected & view.causal)
    # every head runs vertical-slash; at gamma 0.2 its diagonals leave causal blocks unvisited,
    # so columns remain (at 0.6 they cover every causal block and the plan keeps none)
    slash = longattn.attention(q, k, v, method=FlexPrefill(block_size=16, gamma=0.2, tau=0.0))
    assert isinstance(slash.state, PrefillPlan)


def test_flexprefill_gamma_one_query_aware_is_dense():
    q, k, v = _qkv(torch.float64, t=150)
    method = FlexPrefill(block_size=16, gamma=1.0, tau=10.0)
    result = longattn.attention(q, k, v, method=method, impl="sparse")
    torch.testing.assert_close(result.out, _dense(q, k, v))


def test_flexprefill_helpers():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(js_divergence(p, q), torch.tensor([0.0, math.log(2)]))
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.0, 0.0, 0.0]])
    assert cumulative_count(scores, 0.6).tolist() == [1, 1]
    assert cumulative_count(scores, 0.61).tolist() == [2, 1]
    assert cumulative_count(scores, 1.0).tolist() == [3, 1]


@pytest.mark.parametrize("kwargs", [dict(gamma=0.0), dict(gamma=1.1), dict(tau=-0.1)])
def test_bad_flexprefill_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        FlexPrefill(**kwargs)


def test_a_cache_call_checks_the_calibration_against_the_cache(tmp_path):
    path = _write_calibration(tmp_path / "c.safetensors", n_layers=3)
    q, k, v = _qkv(t=64)
    cache = longattn.KVCache(2)  # a model of 2 layers: the 3-layer config is another model
    with pytest.raises(ValueError, match="shape"):
        longattn.attention(q, k, v, method=MInference(block_size=16, calibration=path), cache=cache)
    shipped = MInference(block_size=16, calibration="smollm2-135m")  # by model name: 30 layers
    with pytest.raises(ValueError, match="shape"):
        longattn.attention(q, k, v, method=shipped, cache=longattn.KVCache(2))
