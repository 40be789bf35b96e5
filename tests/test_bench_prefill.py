"""``longattn bench prefill`` on tiny problems: gated rows in both modes (no wall-clock asserts)."""

import json

import pytest
import torch

from longattn import prefill
from longattn.api import choose_impl, make_call
from longattn.bench import prefill as bench
from longattn.cli import main
from longattn.method import from_string
from longattn.testing import make_qkv

TINY = ["block_topk:block_size=16,budget=0.3", "block_topp:block_size=16,budget=0.8"]


def test_element_density_counts_visited_causal_pairs():
    # 100 tokens: the last block is partial
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16, seed=3)
    call = make_call(q, k, v, from_string("block_topk:block_size=16,budget=0.3"))
    index = prefill.plan_index(call)
    rows = torch.arange(100)
    visible = prefill.visible_rows(index, rows, call.q_pos, call.kv_pos).expand(1, 2, 100, 100)
    expected = visible.sum().item() / (2 * 100 * 101 / 2)
    assert bench.element_density(index) == pytest.approx(expected)
    assert expected < 1


def test_gate_catches_a_wrong_output():
    q, k, v = make_qkv(1, 2, 2, 128, 128, 16, seed=4)
    call = make_call(q, k, v, from_string(TINY[0]))
    out = choose_impl(call).run(call).out
    rows = bench.sample_rows(128, 16)
    index = call.derived["block_index"]
    assert bench.chunked_gate(call, out, rows, index)[1] <= 1
    wrong = out.clone()
    wrong[:, :, rows[3]] += 0.1
    assert bench.chunked_gate(call, wrong, rows, index)[1] > 1


def test_timed_plan_plans_the_same_blocks_and_counts_calls():
    method = from_string(TINY[0])
    timed, spent = bench.timed_plan(method)
    q, k, v = make_qkv(1, 2, 1, 96, 96, 16, seed=5)
    a = prefill.plan_index(make_call(q, k, v, method))
    b = prefill.plan_index(make_call(q, k, v, timed))
    assert torch.equal(a.layout()[0], b.layout()[0])
    assert len(spent) == 1 and spent[0] >= 0
    assert timed.describe() == method.describe()


def test_parse_methods_refuses_a_method_that_does_not_plan():
    with pytest.raises(ValueError, match="sliding_window"):
        bench.parse_methods("block_topk,sliding_window:window=64", (0.1,))
    defaults = [m.describe() for m in bench.default_methods((0.1, 0.2))]
    assert len(defaults) == len(set(defaults))
    assert any("budget=0.1" in d and d.startswith("block_topk") for d in defaults)


def test_synthetic_writes_gated_rows(tmp_path):
    out = tmp_path / "p.jsonl"
    methods = [from_string(s) for s in TINY]
    records = bench.run_synthetic(
        [136], ["8/8/d64"], [torch.float32], methods, 1, out, log=lambda _: None
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) == 2
    for rec in lines:
        assert rec["gate"] is True and rec["bound_used"] <= 1
        assert 0 < rec["element_density"] <= rec["density"] + 1e-9 <= 1 + 1e-9
        assert rec["ms"] > 0 and rec["estimate_ms"] > 0 and rec["baseline_ms"] > 0
        assert rec["cpu_flags"] is not None and rec["T"] == 136


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_model_mode_writes_gated_rows(tmp_path, tiny_llama):
    ids = torch.randint(3, 128, (1, 144), generator=torch.Generator().manual_seed(1))
    methods = [from_string(s) for s in TINY]
    writer = bench.JsonlWriter(tmp_path / "m.jsonl")
    records = bench.run_model(tiny_llama, ids, methods, 1, 16, writer, log=lambda _: None)
    assert len(records) == 2
    for rec in records:
        assert rec["gate"] is True and rec["T"] == 128
        assert rec["planned_layers"] == 2 and len(rec["layer_recall"]) == 2
        assert 0 < rec["recall"] <= 1 + 1e-6 and 0 < rec["density"] <= 1
        assert rec["ms"] > 0 and rec["sdpa_ms"] > 0 and rec["plan_index_ms"] > 0
        assert rec["ppl"] > 1 and rec["ppl_dense"] > 1
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
    # a full budget plans every causal block: recall 1 and the model's own output
    full = bench.run_model(tiny_llama, ids, [from_string("block_topk:block_size=16,budget=1.0")],
                           1, 16, writer, log=lambda _: None)[0]  # fmt: skip
    assert full["recall"] == pytest.approx(1.0) and full["density"] == pytest.approx(1.0)
    assert full["ppl_delta"] == pytest.approx(0.0, abs=1e-4)


def test_cli_refuses_bad_lengths(capsys):
    assert main(["bench", "prefill", "--lengths", "8192,x"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["bench", "prefill", "--shapes", "8/8/d64,4/4/d32"]) == 2
    assert "4/4/d32" in capsys.readouterr().err


def test_eval_runs_a_plan_method_in_prefill_and_reports_its_realised_density(tmp_path):
    from longattn.eval import metrics, report, runner
    from tests.test_eval import _config, _tiny_loader

    plan = "block_topk:block_size=16,budget=0.3"
    assert metrics.density(from_string(plan), 128)[1] == metrics.PLANNED
    assert metrics.kv_budget(from_string(plan), 128) == 128
    out = tmp_path / "e"
    config = _config(out, methods=[plan], tasks=["needle", "fidelity"], lengths=[128],
                     samples=1, depths=[0.5], new_tokens=2)  # fmt: skip
    runner.run_eval(config, loader=_tiny_loader(), show_progress=False)
    label = from_string(plan).describe()
    records = [r for r in report.load_records(out) if r["method"] == label]
    assert records and all(not r.get("error") for r in records)
    for rec in records:
        assert rec["density_kind"] == metrics.PLANNED and 0 < rec["density"] < 1
        assert rec["plan_ms"] > 0
    fidelity = next(r for r in records if r["task"] == "fidelity")
    assert all(0 < x <= 1 + 1e-6 for x in fidelity["mass_recall"])
    rows, _, _ = report.summarise(report.load_records(out))
    header, body = report.table(rows, [128], ["needle", "fidelity"])
    assert any(h.startswith("plan estimate ms") for h in header)
