"""``longattn bench linear`` on tiny problems: the gate, the extrapolation, the summary and the
plot (no wall-clock asserts)."""

import json

import torch

from longattn.bench import linear as bench
from longattn.cli import main


def test_gate_passes_the_engine():
    checked = bench.gate(torch.float32, heads=2, dim=16, length=128)
    assert checked["gate"] and checked["gate_of_bound"] <= 1


def _fake(length, dtype="float32", sdpa=None, ms=1.0):
    return {"bench": "linear_prefill", "T": length, "dtype": dtype, "linear_ms": ms,
            "sdpa_ms": sdpa}  # fmt: skip


def test_extrapolation_is_quadratic_and_marked(tmp_path):
    records = [_fake(8192, sdpa=100.0, ms=2.0), _fake(32768, ms=8.0)]
    bench.extrapolate(records)
    assert records[1]["sdpa_extrapolated_ms"] == 1600.0
    assert records[1]["speedup_extrapolated"] == 200.0
    lines = bench.summary(records)
    assert any("32K / 8K = 4.0" in line for line in lines)
    assert any("extrapolated" in line for line in lines)
    bench.plot(records + [{"bench": "linear_decode", "T": 8192, "dtype": "float32",
                           "linear_ms": 0.1, "dense_ms": 2.0}], tmp_path / "p.png")  # fmt: skip
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_runs_a_tiny_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "GATE_LENGTH", 64)
    monkeypatch.setattr(bench, "QUICK_DECODE", (256,))
    monkeypatch.setattr(
        bench, "gemm_rates", lambda dtype, feat: {"gemm_gflops": 1.0, "chunk_gemm_gflops": 1.0}
    )
    out = tmp_path / "lin.jsonl"
    code = main(["bench", "linear", "--quick", "--lengths", "128,256", "--sdpa-max", "128",
                 "--heads", "2", "--dim", "16", "--dtypes", "float32", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pre = {r["T"]: r for r in rows if r["bench"] == "linear_prefill"}
    assert pre[128]["sdpa_ms"] is not None and pre[256]["sdpa_ms"] is None
    assert pre[256]["sdpa_extrapolated_ms"] > 0 and pre[128]["gate"]
    assert [r["T"] for r in rows if r["bench"] == "linear_decode"] == [256]
    assert out.with_suffix(".png").exists()


def test_scaling_record_times_both_lengths_in_turn():
    rec = bench.scaling_record(64, 256, torch.float32, heads=2, dim=16, repeats=2)
    assert rec["ideal_ratio"] == 4 and rec["ratio"] > 0 and rec["bench"] == "linear_scaling"
    assert any("timed in turn" in line for line in bench.summary([rec]))
