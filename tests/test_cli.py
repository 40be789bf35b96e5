"""The ``longattn`` command end to end on tiny problems."""

import json

import pytest

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


def test_bad_length_is_refused():
    with pytest.raises(SystemExit, match="-5"):
        main(["bench", "--length", "-5"])
