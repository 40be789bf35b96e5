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


def test_ring_model_reduces_to_its_parts():
    from longattn.bench.ring_model import predict_ms, projection_rows

    assert predict_ms("striped", 1, 10.0, 6.0, 99.0) == 6.0  # one rank: its diagonal block only
    # compute-bound: the critical path is the diagonal plus W - 1 blocks of the layout's kind
    assert predict_ms("contiguous", 4, 10.0, 6.0, 1.0) == 6.0 + 3 * 10.0
    assert predict_ms("zigzag", 4, 10.0, 6.0, 1.0) == 6.0 + 3 * 5.0
    assert predict_ms("striped", 4, 10.0, 6.0, 8.0) == 6.0 + 3 * 8.0  # transfer-bound steps
    assert predict_ms("striped", 4, 10.0, 6.0, 1.0, cores=2) == 2 * (6.0 + 3 * 6.0)
    base = {"T": 4096, "world": 4, "kv_heads": 2, "dim": 64, "block_full_ms": 200.0,
            "block_diag_ms": 150.0}  # fmt: skip
    rows = projection_rows(base, link_gb_s=0.1)
    assert [r["world"] for r in rows] == [8, 16, 32, 64]
    assert all(r["zigzag_s"] < r["contiguous_s"] for r in rows)
