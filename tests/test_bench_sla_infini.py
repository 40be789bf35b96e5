"""The SLA error and InfiniAttention memory benchmarks on small synthetic inputs (no model)."""

from longattn.bench.infini_memory import stream
from longattn.bench.sla_error import critical_used, measure
from longattn.methods import SLA
from longattn.testing import make_qkv


def test_sla_error_records_every_variant_against_sparse_only():
    captured = {layer: make_qkv(1, 6, 2, 256, 256, 32, seed=layer) for layer in range(2)}
    records = measure(captured, [0.1, 0.25])
    labels = [r["label"] for r in records]
    assert labels[:2] == ["linear-elu", "linear-taylor"]
    expansion = [f"sla-expansion-{n}pt" for n in (1, 4, 8)]
    forms = ["sparse", "sla-elu", "sla-taylor", "sla-elu-mass", "sla-taylor-mass", *expansion]
    assert labels[2:] == forms * 2
    for rec in records:
        assert len(rec["layer_err"]) == 2 and all(e > 0 for e in rec["layer_err"])
    for rec in records[2:]:
        assert 0 < rec["critical_used"] <= 1
        sparse = next(
            r for r in records if r["label"] == "sparse" and r["critical"] == rec["critical"]
        )
        assert rec["vs_sparse"] == rec["mean_err"] / sparse["mean_err"]


def test_critical_used_counts_the_forced_blocks():
    q, k, _ = make_qkv(1, 2, 2, 64 * 4, 64 * 4, 16, seed=1)
    # 4 query blocks with 1..4 causal blocks: the diagonal and the sink are always critical
    assert critical_used(SLA(critical=0.01, marginal=0.0), q, k) == (1 + 2 + 2 + 2) / 10
    assert critical_used(SLA(critical=1.0, marginal=0.0), q, k) == 1.0


def test_infini_state_stays_flat_over_the_stream():
    records = stream(length=5 * 64 + 10, segment=64, n_heads=6, dim=16)
    assert [r["tokens"] for r in records] == [64, 128, 192, 256, 320, 330]
    full = [r["state_bytes"] for r in records[:-1]]
    assert len(set(full)) == 1  # whole segments folded: memory and norm only
    assert records[-1]["state_bytes"] == full[0] + 2 * 2 * 10 * 16 * 4  # + the open segment's K/V
    assert all(r["cache_bytes"] == 0 for r in records)
    assert records[-1]["full_kv_bytes"] == 2 * 2 * 330 * 16 * 4
