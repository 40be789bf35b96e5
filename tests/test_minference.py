"""MInference (vertical-slash token columns on the block-sparse kernels, per-head patterns, the
offline pattern search) and FlexPrefill."""

from dataclasses import dataclass

import pytest
import torch

import longattn
from longattn.api import choose_impl
from longattn.call import make_call
from longattn.kernels.vertical import column_attention
from longattn.methods import BlockTopK, MInference
from longattn.testing import assert_attention_close, cpu_runs_bf16_brgemm
from longattn.types import BlockIndex, PrefillPlan


def _qkv(dtype=torch.float32, t=200, heads=4, kv_heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, t, 64), (2, kv_heads, t, 64), (2, kv_heads, t, 64)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


VS = MInference(block_size=16, budget=0.1, vertical=0.1, last_q=16)
CASES = [(torch.float64, "sparse"), (torch.float32, "sparse"), (torch.float32, "sparse_cpp")]
CASES += [(torch.bfloat16, "sparse")]
CASES += [(torch.bfloat16, "sparse_cpp")] if cpu_runs_bf16_brgemm() else []


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
