"""The eval report measures each method where it acts, shows memory as used and capacity bytes, and
refuses a malformed cases.jsonl with the file, line and field."""

import contextlib
import json

import pytest
import torch

from longattn.eval import report, runner
from tests.test_eval import _config, _lines, _tiny_loader

QUEST = "quest:budget=32,page_size=16,dense_layers=0"


@pytest.fixture(scope="module")
def select_run(tmp_path_factory):
    """A run with dense, a static pattern and a decode-time select method on the tiny model."""
    pytest.importorskip("transformers")
    from longattn.eval import plots

    out = tmp_path_factory.mktemp("select") / "r"
    config = _config(
        out, methods=["dense", "sliding_window:window=32", QUEST], tasks=["passkey", "ppl", "fidelity"],
        lengths=[160], samples=1, decode_tokens=48,
    )  # fmt: skip
    runner.run_eval(config, loader=_tiny_loader(), show_progress=False)
    return _lines(out / "cases.jsonl"), plots.render_all(out).read_text()


def test_a_select_method_has_no_prefill_perplexity_or_error(select_run):
    records, _ = select_run
    label = runner.from_string(QUEST).describe()
    ppl = next(r for r in records if r["method"] == label and r["task"] == "ppl")
    assert "ppl" not in ppl and ppl["ppl_tail_phase"] == "decode" and ppl["ppl_tail_tokens"] == 48
    fid = next(r for r in records if r["method"] == label and r["task"] == "fidelity")
    assert fid["fidelity_phase"] == "decode"
    # 32 of ~160 keys per step: a decode selection drops keys, a prefill figure would be dense (0)
    assert fid["error_mean"] > 0 and fid["recall_mean"] < 1
    assert fid["density_kind"] == "kv read/decode step"
    static = next(
        r for r in records if r["method"].startswith("sliding") and r["task"] == "fidelity"
    )
    assert static["fidelity_phase"] == "prefill"


def test_the_report_prints_n_a_for_a_select_methods_prefill_figures(select_run):
    _, md = select_run
    row = next(line for line in md.splitlines() if line.startswith("| quest"))
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert cells["ppl (prefill) @160"].strip() == "n/a¹"
    assert cells["prefill speedup @160"].strip() == "n/a¹"
    assert cells["ppl last tokens² @160"].strip() not in ("n/a¹", "–")
    assert "kv read/decode step" in cells["density @160"]
    assert "¹ n/a" in md and "teacher-forced decode" in md


def test_memory_is_reported_as_used_and_capacity_bytes(select_run):
    records, md = select_run
    timed = [r for r in records if r["task"] != "fidelity"]
    assert all(0 < r["kv_bytes"] <= r["kv_capacity_bytes"] for r in timed)
    assert "KV MiB used @160" in md and "KV MiB capacity @160" in md


def test_teacher_forced_decode_scores_the_same_tokens_as_the_prefill():
    """Dense through the cache one token at a time equals the prefill's log-probs of the last
    tokens (an off-by-one in the decode loop would score other tokens)."""
    pytest.importorskip("transformers")
    from longattn.integrations.hf import use

    model, _ = _tiny_loader()("tiny")
    ids = torch.randint(3, 96, (1, 100), generator=torch.Generator().manual_seed(1))
    prefill = runner.score_text(model, contextlib.nullcontext(None), ids, 40)
    decode = runner.score_decode(model, use(model, "dense"), ids, 40)
    assert decode["ppl_tail"] == pytest.approx(prefill["ppl_tail"], rel=1e-4)
    assert prefill["ppl_tail"] != pytest.approx(prefill["ppl"], rel=1e-4)


GOOD = dict(case="a", method="hf_sdpa", task="ppl", length=64, sample=0, kv_budget=64,
            density=1.0, density_kind="pairs", ppl=3.0)  # fmt: skip


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no cases"),
        (json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n", "line 2: not JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "length"}) + "\n", "line 1: missing field 'length'"),
        (json.dumps(dict(GOOD, length="64")) + "\n", "field 'length' has the wrong type"),
        (json.dumps([1, 2]) + "\n", "line 1: expected a JSON object"),
        (json.dumps(dict(GOOD, method="nosuch:x=1")) + "\n", "line 1: field 'method'"),
        (json.dumps(dict(GOOD, task="fidelity")) + "\n", "missing field 'layer_error'"),
    ],
)  # fmt: skip
def test_a_malformed_cases_file_names_the_file_line_and_field(tmp_path, content, message):
    (tmp_path / "cases.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        report.load_records(tmp_path)
    assert str(tmp_path / "cases.jsonl") in str(info.value)


def test_a_write_cut_short_at_the_end_is_skipped(tmp_path):
    (tmp_path / "cases.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20])
    assert len(report.load_records(tmp_path)) == 1


def test_plot_on_a_bad_cases_file_exits_2_with_the_reason(tmp_path, capsys):
    from longattn.cli import main

    (tmp_path / "cases.jsonl").write_text(
        json.dumps({k: v for k, v in GOOD.items() if k != "task"}) + "\n"
    )
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "'task'" in err and "cases.jsonl" in err and "Traceback" not in err
    (tmp_path / "cases.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no cases" in capsys.readouterr().err


def test_a_resumed_run_drops_a_torn_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20] + "\n")
    runner.drop_torn_lines(path)
    assert path.read_text() == json.dumps(GOOD) + "\n"
