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
    assert all(r["gate"] and r["speedup"] > 0 for r in records if r["bench"] == "methods")
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


def test_bench_decode_config_reports_ratios_from_the_same_run(tmp_path):
    from longattn.bench.common import JsonlWriter
    from longattn.bench.decode import CopyProbe, bench_config

    writer = JsonlWriter(tmp_path / "decode.jsonl")
    rows = bench_config(
        2048, "smollm2", torch.float32, [512], ["quest"], 3, writer, CopyProbe(1 << 24)
    )
    names = [r["name"] for r in rows]
    assert names == ["sdpa enable_gqa", "sdpa folded", "ours dense", "quest"]
    dense = rows[2]
    assert dense["copy_gbps"] > 0 and 0 < dense["of_copy"] < 10
    assert (
        min(r["vs_best_sdpa"] for r in rows[:2]) <= 1.0 == max(r["vs_best_sdpa"] for r in rows[:2])
    )
    assert rows[3]["budget"] == 512 and rows[3]["select_ms"] > 0
    assert len((tmp_path / "decode.jsonl").read_text().splitlines()) == 4
