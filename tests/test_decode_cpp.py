"""The native decode kernels (csrc/decode.cpp) against the float64 oracle.

They skip only when no C++ compiler exists; with one, a build failure fails these tests.
"""

import shutil

import pytest
import torch

from longattn import KVCache, attention, methods
from longattn.api import choose_impl
from longattn.call import make_cache_call
from longattn.kernels.decode import decode_cpp_unavailable, decode_dense_cpp, decode_selected_cpp
from longattn.kernels.selection import row_mass, top_index_cpp
from longattn.method import top_index
from longattn.testing import assert_attention_close, make_qkv
from longattn.types import AttnOutput, DecodeSelection

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"
)
DTYPES = [torch.float32, torch.bfloat16]
QUEST = methods.Quest(
    budget=16, page_size=8, dense_layers=0
)  # the oracle only needs a select method


def _positions(batch, cap, seed):
    """[B, cap] increasing positions with empty slots (-1): left padding, holes, a free tail."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.full((batch, cap), -1, dtype=torch.int64)
    for b in range(batch):
        used = cap - 7 * b - 5  # per-row lengths
        keep = torch.rand(used, generator=gen) > 0.1
        keep[-1] = True
        slots = torch.arange(used)[keep]
        pos[b, slots] = torch.arange(slots.numel()) + 3 * b
    return pos


def test_the_native_kernel_builds():
    assert decode_cpp_unavailable(torch.zeros(1, 1, 1, 8)) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_heads", "n_kv", "dim"), [(4, 4, 64), (6, 2, 40), (8, 2, 128)])
@pytest.mark.parametrize("q_len", [1, 5])
def test_dense_matches_the_oracle(dtype, n_heads, n_kv, dim, q_len):
    q, k, v = make_qkv(3, n_heads, n_kv, q_len, 300, dim, dtype=dtype, seed=q_len + dim)
    kv_pos = _positions(3, 300, seed=1)
    q_pos = kv_pos.amax(1, keepdim=True) - torch.arange(q_len - 1, -1, -1)  # last positions
    q_pos[2, 0] = -1  # a padding query row: zeros, lse -inf
    for causal in (True, False):
        res = decode_dense_cpp(q, k, v, scale=dim**-0.5, q_pos=q_pos, kv_pos=kv_pos, causal=causal)
        method = methods.Dense(causal=causal)
        assert_attention_close(res, q, k, v, method, q_positions=q_pos, kv_positions=kv_pos)
        assert torch.isneginf(res.lse[2, :, 0]).all() and (res.out[2, :, 0] == 0).all()


def test_dense_reads_strided_cache_views():
    q, k, v = make_qkv(2, 8, 2, 1, 1000, 64, seed=3)
    kv_pos = torch.arange(600).view(1, -1)
    q_pos = torch.tensor([[599]])
    res = decode_dense_cpp(q, k[:, :, :600], v[:, :, :600], scale=0.125, q_pos=q_pos, kv_pos=kv_pos)
    assert_attention_close(res, q, k[:, :, :600], v[:, :, :600])


def _selection(batch, heads, n, n_entries, seed):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack(
        [torch.randperm(n_entries, generator=gen)[:n] for _ in range(batch * heads)]
    ).view(batch, heads, n)
    index = index.sort(-1).values
    index[:, :, -1] = -1  # an unused entry
    return index


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_heads", "n_kv"), [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("unit", [1, 8])
@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("q_len", [1, 3])
def test_selected_matches_the_oracle(dtype, n_heads, n_kv, unit, per_query_head, q_len):
    cap, dim, batch = 256, 64, 2
    q, keys, values = make_qkv(batch, n_heads, n_kv, q_len, cap, dim, dtype=dtype, seed=unit)
    positions = _positions(batch, cap, seed=unit)
    q_pos = positions.amax(1, keepdim=True) - torch.arange(q_len - 1, -1, -1)
    heads = n_heads if per_query_head else n_kv
    index = _selection(batch, heads, 96 // unit, cap // unit, seed=q_len)
    res = decode_selected_cpp(q, keys, values, positions, index, unit, scale=dim**-0.5, q_pos=q_pos)
    selection = DecodeSelection(index, unit)
    assert_attention_close(
        AttnOutput(res.out, res.lse, selection),
        q,
        keys,
        values,
        QUEST,
        q_positions=q_pos,
        kv_positions=positions,
    )


def test_selected_rejects_out_of_range_entries():
    q, keys, values = make_qkv(1, 4, 2, 1, 64, 32)
    positions = torch.arange(64).view(1, -1)
    index = torch.tensor([[[0, 9]], [[0, 1]]]).view(1, 2, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        decode_selected_cpp(
            q, keys, values, positions, index, 8, scale=0.1, q_pos=torch.tensor([[63]])
        )


def _mass_float64(rows, table, present, scale):
    """row_mass's definition in float64: sum_r softmax_n(scale * rows_r . table_n) over present n."""
    scores = (rows.double() @ table.double().transpose(-1, -2)) * scale  # [B, H, R, N]
    absent = ~present[:, None, None, :]
    mass = torch.softmax(scores.masked_fill(absent, -torch.inf), -1).nan_to_num(0.0).sum(2)
    return mass.masked_fill(absent[:, :, 0], -torch.inf)


# width 64: the bf16 dot-product path where the CPU has it; 16: one vector (Loki's rank);
# 40: not a whole number of vectors
@pytest.mark.parametrize("width", [64, 16, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_mass_matches_its_definition(dtype, width):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 5, width, generator=gen)
    table = torch.randn(2, 3, 1100, width, generator=gen).to(dtype)
    present = torch.rand(2, 1100, generator=gen) > 0.3
    present[1] = False  # a batch row with no entry at all: every entry -inf, nothing else
    scale = 0.05
    want = _mass_float64(rows, table, present, scale)
    # Derived bound: the native kernel may round the rows to bf16 for a bf16 table (relative 2^-9
    # per element; fp32 accumulation), which moves each scaled score by at most delta below; a
    # softmax whose logits move by <= delta moves by a factor within exp(+-2 delta).
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    magnitude = table.double().abs().amax(2, keepdim=True).transpose(-1, -2)  # [B, H, E, 1]
    delta = scale * eps * float((rows.double().abs() @ magnitude).max())
    tol = want.abs() * (2 * delta + 4 * delta**2) + 1e-7
    finite = torch.isfinite(want)
    for cpp_kernel in (False, True):
        got = row_mass(rows, table, present, scale, cpp_kernel=cpp_kernel)
        assert got.dtype == torch.float32 and got.shape == (2, 3, 1100)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        err = (got.double() - want).abs()
        assert bool((err[finite] <= tol[finite]).all()), float((err / tol)[finite].max())
    # each row's softmax sums to 1 over the present entries (5 rows per head)
    got = row_mass(rows, table, present, scale, cpp_kernel=True)
    torch.testing.assert_close(
        got[0].clamp(min=0).sum(-1), torch.full((3,), 5.0), rtol=1e-4, atol=0
    )


@pytest.mark.parametrize(
    "width, present_dtype, match",
    [(64, torch.bool, "differ"), (32, torch.int64, "present must be bool")],
)
def test_row_mass_rejects_mismatched_inputs(width, present_dtype, match):
    rows, table = torch.randn(1, 2, 4, 32), torch.zeros(1, 2, 10, width)
    with pytest.raises(RuntimeError, match=match):
        row_mass(rows, table, torch.ones(1, 10, dtype=present_dtype), 1.0, cpp_kernel=True)


@pytest.mark.parametrize("method", [methods.Dense(), methods.Quest(budget=128, dense_layers=0)])
def test_auto_chooses_the_cpp_kernel_for_decode_steps(method):
    """What auto picks for a decode step over a cache, judged on the call it builds (a separate
    cache: choosing must not need the step to run), then the step itself against the oracle."""
    q, k, v = make_qkv(1, 8, 2, 1, 700, 64, seed=9)
    probe, cache = KVCache(1), KVCache(1)
    for c in (probe, cache):
        c.append(0, k[:, :, :-1], v[:, :, :-1])
    call = make_cache_call(q, k[:, :, -1:], v[:, :, -1:], method, None, None, None, probe, 0)
    assert choose_impl(call, "auto").name == "decode_cpp"
    res = attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache)
    assert_attention_close(res, q, k, v, method)


def test_decode_cpp_refuses_what_it_cannot_run():
    q, k, v = make_qkv(1, 4, 2, 1, 50, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        attention(q, k, v, impl="decode_cpp")
    q, k, v = make_qkv(1, 4, 2, 1, 50, 32)
    with pytest.raises(ValueError, match="dense and select"):
        attention(q, k, v, method=methods.SlidingWindow(window=8), impl="decode_cpp")


def test_cpp_top_index_matches_the_torch_one():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 5000, generator=gen)  # distinct values: the same picks, same order
    scores[1, 2, 100:] = -torch.inf  # fewer finite scores than k: -1 fills the tail
    for k in (1, 64, 1000, 5000):
        got = top_index_cpp(scores, k)
        assert torch.equal(got, top_index(scores, k)), k
    picked = top_index_cpp(scores, 64)[1, 2]  # finite picks, in index order
    assert bool((picked.diff() > 0).all()) and int(picked.max()) < 100


def test_native_top_index_ties_and_order():
    scores = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -torch.inf, 3.0, 1.0]])
    # k = 3: 3.0 and two of the three 2.0s (the lowest indices), ascending
    assert top_index_cpp(scores, 3).tolist() == [[1, 3, 6]]
    # k = 8 takes everything; the -inf pick becomes -1 at the end
    assert top_index_cpp(scores, 8).tolist() == [[0, 1, 2, 3, 4, 6, 7, -1]]
    with pytest.raises(RuntimeError, match="k must be in"):
        top_index_cpp(scores, 9)
    assert top_index_cpp(scores.double(), 2) is None  # not float32: the caller uses torch


def test_native_top_index_over_long_rows():
    """Rows long enough for the sampled threshold: the same picks as torch, including rows whose
    sample misleads it (a few large scores the strided sample misses) and rows of equal scores."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 70000, generator=gen)
    # row 1: large scores exactly where the strided sample (every 34th) looks, so its threshold
    # lets too few through and the kernel must fall back to the whole row
    scores[1, ::34] = 100.0 + torch.rand(scores[1, ::34].numel(), generator=gen)
    scores[2] = torch.randn(70000, generator=gen).round()  # many ties at the threshold
    scores[3, 5000:] = -torch.inf
    for k in (1, 1024, 4000):
        got = top_index_cpp(scores, k)
        want = top_index(scores, k)
        for row in (0, 1, 3):
            assert torch.equal(got[row], want[row]), (row, k)
        # ties: the same number of picks at each score value, ascending, lowest indices at the tie
        picked = scores[2, got[2]]
        assert bool((got[2].diff() > 0).all())
        assert torch.equal(picked.sort().values, scores[2].topk(k).values.sort().values)
