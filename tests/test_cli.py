"""The ``longattn`` command end to end on tiny problems."""

import json

import pytest
import torch

from longattn import registry
from longattn.cli import main


def test_bench_methods_writes_a_row_per_benchmarked_method(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    code = main(
        ["bench", "--length", "512", "--quick", "--memory-length", "1024", "--out", str(out)]
    )
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    methods = {r["method"] for r in records if r["bench"] == "methods"}
    assert methods == set(registry())
    rows = [r for r in records if r["bench"] == "methods"]
    assert all(r["gate"] for r in rows)
    select = {name for name, cls in registry().items() if cls().hook == "select"}
    assert all(r["speedup"] > 0 for r in rows if r["method"] not in select)
    # a select method on a prefill is dense attention: no timing under its name
    assert all("speedup" not in r and "decode" in r["note"] for r in rows if r["method"] in select)
    assert all(r["impl"] for r in rows)
    assert any(r["bench"] == "tiled_memory" for r in records)
    printed = capsys.readouterr().out
    assert "speedup" in printed and "peak extra memory" in printed


def test_docs_prints_the_method_reference(capsys):
    assert main(["docs"]) == 0
    assert "## `sliding_window`" in capsys.readouterr().out


def test_bad_length_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--length", "-5"])
    assert info.value.code == 2 and "'-5'" in capsys.readouterr().err


def test_bench_decode_gates_and_times_every_row_and_layer_kind(tmp_path):
    from longattn.bench.common import JsonlWriter
    from longattn.bench.decode import CopyProbe, bench_config

    writer = JsonlWriter(tmp_path / "decode.jsonl")
    rows = bench_config(
        2048, "smollm2", torch.float32, [512], ["quest", "tidal_decode"], 3, writer,
        CopyProbe(1 << 24),
    )  # fmt: skip
    names = [r["name"] for r in rows]
    assert names == [
        "sdpa enable_gqa", "sdpa folded", "ours dense", "quest", "tidal_decode (reusing layer)",
        "tidal_decode (selecting layer)",
    ]  # fmt: skip
    dense = rows[2]
    assert dense["copy_gbps"] > 0 and 0 < dense["of_copy"] < 10
    assert (
        min(r["vs_best_sdpa"] for r in rows[:2]) <= 1.0 == max(r["vs_best_sdpa"] for r in rows[:2])
    )
    assert all(r["gate"] is True and r["ms"] > 0 for r in rows[2:])
    assert rows[3]["budget"] == 512 and rows[3]["select_ms"] > 0
    # all bytes read: a selection reads its selected K/V plus its metadata (Quest: the page
    # bounds of the whole cache; TidalDecode's selecting layer: every key)
    selected_kv = 2 * 3 * 512 * 64 * 4
    assert rows[3]["read_bytes"] > selected_kv
    assert rows[5]["read_bytes"] > dense["read_bytes"] / 2 > rows[4]["read_bytes"]
    records = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["cpu"] and "cpu_flags" in r for r in records)
    assert {r["impl"] for r in records[2:]} <= {"decode", "decode_cpp"}


def test_bench_decode_reports_no_timing_for_a_red_gate(monkeypatch):
    from longattn.bench import decode

    def broken(step, q, cache, layer, method):
        return step(), "decode", "max|out - ref64| = 1 exceeds the bound 0"

    monkeypatch.setattr(decode, "gated_step", broken)
    rows = decode.bench_config(
        1024, "smollm2", torch.float32, [256], ["loki"], 3, decode.JsonlWriter(None),
        decode.CopyProbe(1 << 20),
    )  # fmt: skip
    assert [r["gate"] for r in rows[2:]] == [False, False]
    assert not any("ms" in r or "gbps" in r for r in rows[2:])


def test_bench_kernels_runs_only_the_named_shapes(tmp_path):
    out = tmp_path / "kernels.jsonl"
    argv = ["bench", "kernels", "--efficiency", "--quick", "--no-flex", "--length", "256"]
    assert main([*argv, "--shapes", "8/8/d64", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {(r["H"], r["Hkv"], r["D"]) for r in rows} == {(8, 8, 64)}
