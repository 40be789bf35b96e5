"""`longattn bench ring` as a group of one (torchrun launches it with more ranks)."""

from __future__ import annotations

import json

from longattn.cli import main


def test_bench_ring_runs_as_a_group_of_one(tmp_path, capsys):
    out = tmp_path / "ring.jsonl"
    code = main(["bench", "ring", "--quick", "--length", "256", "--heads", "4", "--dim", "16",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["layout"] for r in records] == ["contiguous", "striped", "zigzag"]
    for record in records:
        assert record["world"] == 1 and record["T"] == 256
        assert record["pairs"] == [4 * 256 * 257 // 2]  # causal: every visible pair once
        assert record["hidden_share"] is None and record["ms_per_call"] > 0
    assert "ring attention, world 1" in capsys.readouterr().out
