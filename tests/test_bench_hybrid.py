"""``longattn bench hybrid-error`` on synthetic q/k/v (the real model run is the benchmark)."""

import math

import torch

from longattn.bench import hybrid_error
from longattn.testing import make_qkv


def test_measure_compares_each_hybrid_with_its_parts():
    q, k, v = make_qkv(1, 3, 1, 64, 64, 16, seed=0)
    records = hybrid_error.measure({0: (q, k, v), 5: (q * 2, k, v)})
    assert [r["family"] for r in records] == [c[0] for c in hybrid_error.cases()]
    for rec in records:
        assert len(rec["hybrid_layers"]) == 2
        assert all(math.isfinite(rec[key]) for key in ("hybrid", "vs_best_part"))
        parts = [rec[key] for key in ("low_rank", "sparse") if key in rec]
        assert math.isclose(rec["vs_best_part"], rec["hybrid"] / min(parts))
    by = {(r["family"], r["budget"]): r for r in records}
    # budgets that cover all 64 tokens are exact softmax: the hybrid and its sparse part agree
    for key in [
        ("sea", "F=32, top_k=64"),
        ("combiner", "region=64"),
        ("window_linear", "window=64, d'=16"),
    ]:
        exact = by[key]["oracle" if key[0] == "sea" else "sparse"]
        assert by[key]["hybrid"] < 1e-5 and exact < 1e-12
    assert "oracle" not in by[("combiner", "region=64")]  # SEA's oracle is not in its ratio
    density = [r["density"] for r in records if r["family"] == "scatterbrain"]
    assert all(0 < d <= 1 for d in density)
    control = hybrid_error.measure(hybrid_error.control_qkv(32), families=("scatterbrain",))
    assert {r["family"] for r in control} == {"scatterbrain"}
    header = {"command": "c", "model": "m", "T": 64, "layers": [0, 5], "cpu_line": "x", "torch": "t",
              "threads": 1, "control": control}  # fmt: skip
    text = hybrid_error.markdown(records, header)
    assert text.count("| scatterbrain |") == 2 * len(hybrid_error.SCATTERBRAIN)


def test_masked_softmax_is_softmax_and_empty_rows_are_zero():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=torch.float64, seed=1)
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    out = hybrid_error.masked_softmax(q, k, v, keep)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want)
    keep[3] = False
    assert bool((hybrid_error.masked_softmax(q, k, v, keep)[:, :, 3] == 0).all())
