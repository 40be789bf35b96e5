"""``longattn bench prefill`` on tiny problems: gated rows in both modes (no wall-clock asserts)."""

import json

import pytest
import torch

from longattn import prefill
from longattn.api import choose_impl, make_call
from longattn.bench import prefill as bench
from longattn.cli import main
from longattn.method import from_string
from longattn.testing import make_qkv, reference_bound

TINY = ["block_topk:block_size=16,budget=0.3", "block_topp:block_size=16,budget=0.8"]
# vertical-slash plans: blocks plus token columns (tau=0: every FlexPrefill head vertical-slash)
COLUMN_PLANS = [
    "minference:block_size=16,budget=0.1,vertical=0.1,last_q=16",
    "flexprefill:block_size=16,gamma=0.6,tau=0.0",
]


def _lined_qkv(t: int, heads: int = 2, dim: int = 64, columns=(37, 70)):
    """q/k/v whose attention has a strong main diagonal (each query's own key) and strong key
    ``columns`` (every query leans towards them), as a real model's vertical-slash heads: the
    plans keep token columns outside their blocks (random q/k plans nearly every block there)."""
    x, _, v = make_qkv(1, heads, heads, t, t, dim, seed=0)
    line = torch.zeros(dim)
    line[0] = 12.0
    q, k = 1.5 * x + line, 1.5 * x
    k[:, :, list(columns)] += line
    return q, k, v


@pytest.mark.parametrize("spec", ["block_topk:block_size=16,budget=0.3", *COLUMN_PLANS])
def test_element_density_counts_visited_causal_pairs(spec):
    # 100 tokens: the last block is partial; a vertical-slash plan's columns count too
    q, k, v = _lined_qkv(100)
    call = make_call(q, k, v, from_string(spec))
    index = prefill.plan_index(call)
    columns = call.derived["plan_columns"]
    assert (columns is not None) == (spec in COLUMN_PLANS)
    rows = torch.arange(100)
    visible = prefill.visible_rows(index, rows, call.q_pos, call.kv_pos, columns)
    expected = visible.expand(1, 2, 100, 100).sum().item() / (2 * 100 * 101 / 2)
    assert bench.element_density(index, columns) == pytest.approx(expected)
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


@pytest.mark.parametrize("spec", COLUMN_PLANS)
def test_gate_holds_a_plan_with_token_columns_to_its_blocks_and_columns(spec):
    # 200 tokens: the last block is partial
    q, k, v = _lined_qkv(200)
    call = make_call(q, k, v, from_string(spec))
    out = choose_impl(call).run(call).out
    index, columns = call.derived["block_index"], call.derived["plan_columns"]
    assert columns is not None and int((columns >= 0).sum()) > 0
    rows = bench.sample_rows(200, 48)
    assert bench.chunked_gate(call, out, rows, index)[1] <= 1
    # the same blocks without the columns are another attention, which the gate refuses
    blocks_only = prefill.visible_rows(index, rows, call.q_pos, call.kv_pos)
    wrong = out.clone()
    wrong[:, :, rows] = reference_bound(
        q[:, :, rows], k, v, blocks_only, call.scale
    ).ref.out.float()
    assert bench.chunked_gate(call, wrong, rows, index)[1] > 1


@pytest.mark.parametrize("spec", COLUMN_PLANS)
def test_recall_counts_the_mass_on_a_plans_token_columns(spec):
    q, k, v = _lined_qkv(200)  # the last block is partial
    call = make_call(q, k, v, from_string(spec))
    choose_impl(call).run(call)
    rows = torch.arange(200)
    facts = bench.layer_facts(call.method, {0: (q, k, v)}, rows)
    # the exact recall in float64: each query's softmax weights on what the plan visits, averaged
    # over each query block's queries, then over blocks and heads
    index, columns = call.derived["block_index"], call.derived["plan_columns"]
    keys = torch.arange(200)
    logits = (q.double() @ k.double().transpose(-1, -2)) * call.scale
    weights = torch.softmax(logits.masked_fill(keys > keys.view(-1, 1), -torch.inf), dim=-1)
    visible = prefill.visible_rows(index, rows, call.q_pos, call.kv_pos, columns)

    def recall(seen):  # [1, H, 200, 200] -> per query, then per query block, then the mean
        per_query = (weights * seen).sum(-1)  # [1, H, 200]
        return float(
            torch.stack([per_query[..., lo : lo + 16].mean(-1) for lo in rows[::16]]).mean()
        )

    assert facts["recall"] == pytest.approx(recall(visible), abs=1e-6)
    blocks_only = prefill.visible_rows(index, rows, call.q_pos, call.kv_pos)
    assert recall(blocks_only) < facts["recall"] - 1e-5  # the columns hold mass here
    assert facts["gate"]


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
