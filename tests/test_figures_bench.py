"""Benchmarks gate every kernel they time and record the implementation that really ran."""

import pytest
import torch

from longattn import KVCache, from_string
from longattn.api import block_index, choose_impl, make_call
from longattn.bench import kernels
from longattn.bench.common import ImplLog, cache_step, cpu_info, cpu_line, impl_that_runs
from longattn.kernels.sparse import sparse_attention
from longattn.testing import make_qkv


def _flex_case():
    q, k, v = make_qkv(1, 2, 2, 512, 512, 64, seed=3)
    call = make_call(q, k, v, from_string("sliding_window:window=128"))
    rows = torch.arange(0, 512, 37)
    return call, block_index(call), rows


def _sparse(scale_by):
    def flex(q, k, v, index, *, scale, mask_fn):
        out = sparse_attention(q, k, v, index, scale=scale, mask_fn=mask_fn)
        return out._replace(out=out.out * scale_by)

    return flex


@pytest.mark.parametrize("scale_by, timed", [(1.0, True), (1.001, False)])
def test_flex_is_timed_only_behind_a_green_gate(monkeypatch, scale_by, timed):
    monkeypatch.setattr(kernels, "flex_block_attention", _sparse(scale_by))
    call, index, rows = _flex_case()
    rec = kernels.time_flex(call, index, rows, repeats=3)
    assert rec["flex_gate"] is timed and ("flex_ms" in rec) is timed
    assert rec["flex_bound_used"] > 1 or timed


@pytest.mark.parametrize("q_len", [1, 128])
def test_the_recorded_impl_is_the_one_that_ran(q_len):
    """A select method with a prefill's queries is run by dense attention's implementation; the
    record must name that one (what the library's dispatch log says ran last), not the first pick."""
    q, k, v = make_qkv(1, 4, 2, q_len, 256, 64, seed=1)
    call = make_call(q, k, v, from_string("quest:budget=64,dense_layers=0"))
    with ImplLog() as seen:
        choose_impl(call).run(call)
    ran = list(seen.chosen)[-1]
    assert impl_that_runs(call) == ran


def test_a_cache_step_names_its_impl_and_appends_once():
    q, k, v = make_qkv(1, 4, 2, 1, 300, 64, seed=2)
    cache = KVCache(1)
    cache.append(0, k[:, :, :-1], v[:, :, :-1])
    with ImplLog() as seen:
        _, name = cache_step(q, k[:, :, -1:], v[:, :, -1:], method=from_string("loki:budget=64"),
                             cache=cache, layer=0)  # fmt: skip
    assert name in seen.chosen and cache.seq_len(0) == 300


def test_every_record_names_the_cpu_and_its_vector_extensions():
    info = cpu_info()
    assert info["cpu"] and set(info["cpu_flags"]) <= {
        "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"
    }  # fmt: skip
    line = cpu_line(info)
    assert ("no AVX-512" in line) == ("avx512f" not in info["cpu_flags"])
    assert ("no AMX" in line) == ("amx_tile" not in info["cpu_flags"])
