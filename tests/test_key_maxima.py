"""The C++ key-maxima kernel (``kernels/key_maxima.py``) against HiP's PyTorch maxima and the
float64 exact ones, its fixed arithmetic (a key's score does not depend on the other keys of the
call), the fallback with its reason, and HiP's search in one call against its search by rounds.

Bound: both paths accumulate the D products of a score in float32 from inputs widened exactly
(bfloat16 and float32 are exact in float32; the kernel's bf16 dot products, for an even D on a
CPU with them, also add exact products one rounded sum at a time), in any order: each score is within
``gamma(D) sum_d |q_d k_d|`` of the exact one (Higham, ch. 3; ``gamma(n) = n u / (1 - n u)``,
``u`` float32's unit roundoff), and a maximum moves by at most its terms' largest error, so the
kernel's maxima are within ``gamma(D) A`` of the exact ones (``A`` the row's largest
``sum_d |q_d k_d|``) and within ``2 gamma(D) A`` of the PyTorch path's.
"""

import dataclasses
import math
import shutil

import pytest
import torch

from longattn import from_string
from longattn.call import make_call
from longattn.kernels import extension, key_maxima
from longattn.methods import hip
from longattn.prefill import make_view
from longattn.testing import make_qkv

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")


def test_the_kernel_builds():
    assert extension.unavailable(key_maxima.NAME) is None
    assert key_maxima.unavailable(torch.zeros(1, 1, 1, 4)) is None
    assert key_maxima.unavailable(torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16)) is None


def _inputs(dtype, bs=16, dim=24, width=12, seed=0):
    """Query blocks (batch row 1 left-padded: its first block holds positions -1), random key rows
    per row, random representative positions and ``some`` marks, and counts with a row of 0."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, n_kv, n_blocks, t_k = 2, 4, 2, 5, 90
    q = torch.randn(batch, heads, n_blocks, bs, dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv, t_k, dim, generator=gen).to(dtype)
    q_pos = torch.arange(n_blocks * bs).view(1, n_blocks, bs).repeat(batch, 1, 1)
    q_pos[1, 0, :7] = -1
    buffer = torch.empty(batch * heads * (n_blocks + 1) * dim * bs)  # a plan's: room to spare
    queries = hip.group_queries(q, q_pos, buffer)
    n_rows = batch * heads * n_blocks
    rows = torch.randint(0, batch * n_kv * t_k, (n_rows, width), generator=gen)
    count = torch.randint(1, width + 1, (n_rows,), generator=gen)
    count[3], count[5] = 0, width
    rep_pos = torch.randint(-1, n_blocks * bs, (n_rows, width), generator=gen)
    used = torch.arange(width) < count.unsqueeze(-1)
    some = (torch.rand(n_rows, width, generator=gen) < 0.3) & used  # as HiP marks them
    some[5, 0], rep_pos[5, 0] = True, n_blocks * bs  # seen by no query of the row: -inf
    return k, queries, rows, count, some, rep_pos


def _native(k, queries, rows, count, some, rep_pos):
    got = key_maxima.key_maxima(k, queries.t.flatten(0, 1), queries.pos, rows, count, some, rep_pos)
    assert got is not None
    return got


def _exact(k, queries, rows, some, rep_pos):
    """float64 maxima and the row's largest sum_d |q_d k_d| (the bound's A), [N, W]."""
    dim = k.shape[-1]
    keys = k.reshape(-1, dim).double()[rows]  # [N, W, D]
    q_t = queries.t.flatten(0, 1).double()  # [N, D, bs]
    scores = keys @ q_t
    mags = keys.abs() @ q_t.abs()
    pos = queries.pos.unsqueeze(1)  # [N, 1, bs]
    seen = ~some.unsqueeze(-1) | ((pos >= rep_pos.clamp(min=0).unsqueeze(-1)) & (pos >= 0))
    return scores.masked_fill(~seen, -math.inf).amax(-1), mags.amax(-1)


@pytest.mark.parametrize("dim", [24, 23])  # bf16: pair dot products for an even D, else widened
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bs", [16, 13, 64])
def test_native_maxima_equal_the_torch_path_within_rounding(dtype, bs, dim):
    k, queries, rows, count, some, rep_pos = _inputs(dtype, bs=bs, dim=dim)
    got = _native(k, queries, rows, count, some, rep_pos)
    torch_path = hip.block_maxima(k, queries, rows, count, some, rep_pos)
    exact, mags = _exact(k, queries, rows, some, rep_pos)
    used = torch.arange(rows.shape[1]) < count.unsqueeze(-1)
    assert used.sum() < used.numel() and not used[3].any()
    assert torch.isneginf(got[~used]).all()  # past count, and the row of count 0
    assert torch.isneginf(got[5, 0]) and torch.isneginf(torch_path[5, 0])
    u = torch.finfo(torch.float32).eps / 2
    gamma = k.shape[-1] * u / (1 - k.shape[-1] * u)
    finite = used & torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got) & used, finite)
    err = (got.double() - exact).abs()[finite]
    assert (err <= gamma * mags[finite]).all()
    diff = (got - torch_path).double().abs()[finite]
    assert (diff <= 2 * gamma * mags[finite]).all()


def test_bf16_keys_with_queries_finer_than_bf16_keep_the_queries_exact():
    """The bf16 pair products read the queries as bf16: float32 query columns that bf16 does not
    hold exactly are not rounded to it (the kernel widens the keys instead)."""
    k, queries, rows, count, some, rep_pos = _inputs(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    fine = queries.t + 1e-3 * torch.randn(queries.t.shape, generator=gen)  # not bf16-exact
    queries = queries._replace(t=fine)
    got = _native(k, queries, rows, count, some, rep_pos)
    exact, mags = _exact(k, queries, rows, some, rep_pos)
    u = torch.finfo(torch.float32).eps / 2
    gamma = k.shape[-1] * u / (1 - k.shape[-1] * u)
    used = torch.arange(rows.shape[1]) < count.unsqueeze(-1)
    finite = used & torch.isfinite(exact)
    assert ((got.double() - exact).abs()[finite] <= gamma * mags[finite]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_keys_score_does_not_depend_on_the_other_keys(dtype):
    """The same key against the same queries gives the same bits whatever the other keys, its
    slot and the row's count (HiP compares a kept score with fresh ones)."""
    k, queries, rows, count, some, rep_pos = _inputs(dtype, width=23)
    count = torch.full_like(count, rows.shape[1])
    first = _native(k, queries, rows, count, some, rep_pos)
    gen = torch.Generator().manual_seed(1)
    order = torch.argsort(torch.rand(rows.shape, generator=gen), dim=-1)
    shuffled = [x.gather(-1, order) for x in (rows, some, rep_pos)]
    again = _native(k, queries, shuffled[0], count, *shuffled[1:])
    assert torch.equal(again, first.gather(-1, order))
    for width in (1, 5, 7):  # fewer keys: other register blocks
        part = _native(k, queries, rows[:, :width], count.clamp(max=width), some[:, :width],
                       rep_pos[:, :width])  # fmt: skip
        assert torch.equal(part, first[:, :width])


def test_keys_read_through_strides():
    """Keys that are a view (a cache's slice) are read in place, as their contiguous copy."""
    k, queries, rows, count, some, rep_pos = _inputs(torch.float32)
    wide = torch.randn(k.shape[0], k.shape[1], k.shape[2] + 9, k.shape[3] * 2)
    wide[:, :, 3 : 3 + k.shape[2], : k.shape[3]] = k
    view = wide[:, :, 3 : 3 + k.shape[2], : k.shape[3]]
    assert not view.is_contiguous()
    assert torch.equal(_native(view, queries, rows, count, some, rep_pos),
                       _native(k, queries, rows, count, some, rep_pos))  # fmt: skip


def test_bad_rows_are_refused():
    k, queries, rows, count, some, rep_pos = _inputs(torch.float32)
    rows[0, 0] = k.shape[0] * k.shape[1] * k.shape[2]
    with pytest.raises(RuntimeError, match="outside k"):
        _native(k, queries, rows, count, some, rep_pos)


def test_without_the_kernel_the_reason_is_given_and_hip_computes_the_maxima(monkeypatch):
    assert "float64" in key_maxima.unavailable(torch.zeros(1, 1, 1, 4, dtype=torch.float64))
    k, queries, rows, count, some, rep_pos = _inputs(torch.float64)
    args = (queries.t.flatten(0, 1), queries.pos, rows, count, some, rep_pos)
    assert key_maxima.key_maxima(k, *args) is None
    monkeypatch.setattr(extension, "unavailable", lambda name: "no C++ compiler found (test)")
    assert "no C++ compiler" in key_maxima.unavailable(torch.zeros(1, 1, 1, 4))
    assert key_maxima.key_maxima(k.float(), *args) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hip_selects_the_same_blocks_with_either_maxima(dtype):
    """On random inputs the two paths' rounding never reorders HiP's choices."""
    method = from_string("hip:block_size=16,budget=0.2")
    q, k, v = make_qkv(1, 4, 2, 1024, 1024, 32, dtype=dtype, seed=3)
    view = make_view(make_call(q, k, v, method))
    native = method.plan(view)
    fallback = method.plan(dataclasses.replace(view, key_maxima=None, key_search=None))
    assert native.any() and torch.equal(native, fallback)


def _padded_call(dtype, method, heads, n_kv, t_q, t_k, dim):
    """A call of two batch rows, the second left-padded by 37 slots (position -1), its queries
    the last ``t_q`` of ``t_k`` keys (a chunk of a prefill when t_q < t_k)."""
    q, k, v = make_qkv(2, heads, n_kv, t_q, t_k, dim, dtype=dtype, seed=5)
    kv_pos = torch.arange(t_k).repeat(2, 1)
    kv_pos[1] = torch.where(kv_pos[1] < 37, -1, kv_pos[1] - 37)
    return make_call(q, k, v, method, None, kv_pos[:, t_k - t_q :], kv_pos)


CASES = {
    "gqa": ("hip:block_size=16,budget=0.25", 4, 2, 300, 300, 32),
    "odd_dim": ("hip:block_size=16,budget=0.3", 2, 1, 250, 250, 15),
    "block64": ("hip:block_size=64,budget=0.2", 2, 2, 1000, 1000, 64),
    "chunk": ("hip:block_size=16,budget=0.5,local_blocks=2", 4, 1, 200, 517, 16),
    "block13": ("hip:block_size=13,budget=0.1", 3, 3, 777, 777, 24),
}


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_one_call_search_finds_the_blocks_of_the_search_by_rounds(dtype, case, padded):
    """``key_search`` (every round in C++) chooses exactly the blocks of HiP's PyTorch search
    over the key-maxima kernel: the same representatives, the same scores bit for bit, the same
    ties."""
    spec, heads, n_kv, t_q, t_k, dim = CASES[case]
    method = from_string(spec)
    if padded:
        call = _padded_call(dtype, method, heads, n_kv, t_q, t_k, dim)
    else:
        q, k, v = make_qkv(1, heads, n_kv, t_q, t_k, dim, dtype=dtype, seed=3)
        call = make_call(q, k, v, method)
    view = make_view(call)
    by_rounds = method.plan(dataclasses.replace(view, key_search=None))
    assert by_rounds.any() and torch.equal(method.plan(view), by_rounds)


def test_the_search_declines_what_it_does_not_run():
    method = from_string("hip:block_size=16,budget=0.25")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, seed=0)
    view = make_view(make_call(q, k, v, method))
    n = torch.ones(4, dtype=torch.long)
    pos = view.q_pos.view(1, 4, 16)
    assert key_maxima.hierarchical_search(k, q.bfloat16(), pos, view.kv_pos, n, n, 4, 1.0) is None
    kv3 = view.kv_pos.unsqueeze(1).expand(1, 2, 64)  # per KV head
    assert key_maxima.hierarchical_search(k, q, pos, kv3, n, n, 4, 1.0) is None
    with pytest.raises(RuntimeError, match="out of range"):
        key_maxima.hierarchical_search(k, q, pos, view.kv_pos, n * 5, n, 4, 1.0)
