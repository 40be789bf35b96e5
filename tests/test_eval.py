"""The evaluation harness without the real model: tasks, resume, refusal, report, plots, CLI errors."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from longattn.eval import report, runner, tasks, text

CHAT = "<|user|>\n{content}<|end|>\n<|assistant|>\n"


class WordTokenizer:
    """A deterministic word-level tokenizer with a chat template (no files, no network).

    With ``vocab`` set, ids are folded into ``[3, vocab)`` so that a tiny random model can embed them.
    """

    bos_token_id, eos_token_id = 1, 2
    chat_template = CHAT

    def __init__(self, vocab: int | None = None):
        self.vocab, self.ids, self.words = vocab, {}, {}

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = 3 + len(self.ids)
            self.words[self.ids[word]] = word
        i = self.ids[word]
        return i if self.vocab is None else 3 + i % (self.vocab - 3)

    def __call__(self, s, add_special_tokens=False, return_tensors=None):
        ids = [self._id(w) for w in re.findall(r"\s*\S+|\s+", s)]
        return SimpleNamespace(input_ids=ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return CHAT.format(content=messages[0]["content"])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words.get(i, "") for i in ids)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [300, 1000])
def test_tasks_are_deterministic_exact_length_and_contain_the_answer(task, length):
    tok = WordTokenizer()
    a = tasks.make(task, tok, length, seed=3)
    b = tasks.make(task, WordTokenizer(), length, seed=3)
    c = tasks.make(task, tok, length, seed=4)
    assert len(a.input_ids) == length == len(c.input_ids)
    assert a.input_ids == b.input_ids and a.answers == b.answers and a.answers != c.answers
    prompt = tok.decode(a.input_ids)
    assert all(answer in prompt for answer in a.answers)
    assert prompt.startswith("<|user|>") and "<|assistant|>" in prompt[-100:]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_needle_sits_at_its_depth(depth):
    tok = WordTokenizer()
    sample = tasks.needle(tok, 2000, seed=0, depth=depth)
    words = [tok.words[i] for i in sample.input_ids]
    at = next(i for i, w in enumerate(words) if sample.answers[0] in w)
    assert abs(at / 2000 - depth) < 0.1


def test_a_length_too_short_for_the_task_is_refused():
    with pytest.raises(ValueError, match="too short"):
        tasks.make("passkey", WordTokenizer(), 40, seed=0)


def test_score_counts_the_expected_answers():
    assert tasks.score(" 123 and 456", ["123", "456"]) == 1.0
    assert tasks.score(" 123", ["123", "456"]) == 0.5


def test_offline_corpora_and_text_windows():
    assert "pydoc" in text.available() and len(text.corpus("pydoc")) > 400_000
    ids = tasks.text_window(WordTokenizer(), "pydoc", 700, seed=1)
    assert len(ids) == 700 and ids == tasks.text_window(WordTokenizer(), "pydoc", 700, seed=1)
    with pytest.raises(ValueError, match="nope"):
        text.corpus("nope")


def test_method_lists_lengths_and_position_limits():
    assert runner.split_methods(
        "dense,streaming_llm:sinks=4,window=64,sliding_window:window=8"
    ) == [
        "dense",
        "streaming_llm:sinks=4,window=64",
        "sliding_window:window=8",
    ]
    assert [runner.parse_length(x) for x in ("1k", "2k", "1500")] == [1024, 2048, 1500]
    with pytest.raises(ValueError, match="'abc'"):
        runner.parse_length("abc")
    with pytest.raises(ValueError, match="16384"):
        runner.check_lengths([1024, 16384], 8192)


def test_an_existing_results_folder_is_never_silently_overwritten(tmp_path):
    (tmp_path / "cases.jsonl").write_text("{}\n")
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--force"):
        runner.check_out(tmp_path, force=False, resume=False)
    runner.check_out(tmp_path, force=False, resume=True)
    runner.prepare_out(tmp_path, force=True)
    assert not (tmp_path / "cases.jsonl").exists() and (tmp_path / "mine.txt").exists()


# --- the runner on a tiny random Llama through the real ``use()`` (transformers needed) ---

METHODS = ["dense", "streaming_llm:sinks=2,window=30", "sliding_window:window=32"]


def _tiny_loader(max_positions=512):
    transformers = pytest.importorskip("transformers")

    def load(name):
        if name != "tiny":
            raise ValueError(f"unknown model {name!r}")
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=max_positions,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval(), WordTokenizer(vocab=96)

    return load


def _config(out, **kw):
    base = dict(
        model="tiny", methods=METHODS, tasks=["passkey", "needle", "ppl", "fidelity"],
        lengths=[128, 192], out=out, samples=2, depths=[0.2, 0.8], new_tokens=3,
    )  # fmt: skip
    return runner.EvalConfig(**{**base, **kw})


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_then_resume_redoes_no_finished_case(tmp_path):
    out = tmp_path / "r"
    counts = runner.run_eval(_config(out), loader=_tiny_loader(), show_progress=False)
    records = _lines(out / "cases.jsonl")
    n = len(runner.enumerate_cases(_config(out)))
    assert counts == {"run": n, "skipped": 0, "failed": 0} and len(records) == n
    expected = {runner.BASELINE} | {runner.from_string(m).describe() for m in METHODS}
    assert {r["method"] for r in records} == expected
    assert all(r["prefill_ms"] > 0 for r in records if r["task"] != "fidelity")
    # an interrupted run: keep the first 10 lines and a torn 11th, then resume
    lines = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:20] + "\n")
    counts = runner.run_eval(_config(out), resume=True, loader=_tiny_loader(), show_progress=False)
    assert counts == {"run": n - 10, "skipped": 10, "failed": 0}
    again = runner.run_eval(_config(out), resume=True, loader=_tiny_loader(), show_progress=False)
    assert again["run"] == 0
    keys = [r["case"] for r in _lines_tolerant(out / "cases.jsonl")]
    assert len(keys) == len(set(keys)) == n
    with pytest.raises(FileExistsError):
        runner.run_eval(_config(out), loader=_tiny_loader(), show_progress=False)


def _lines_tolerant(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_dense_through_use_equals_the_models_own_attention(tmp_path):
    out = tmp_path / "d"
    runner.run_eval(
        _config(out, methods=["dense"], tasks=["ppl", "passkey"], lengths=[128]),
        loader=_tiny_loader(), show_progress=False,
    )  # fmt: skip
    by = {(r["method"], r["task"], r["sample"]): r for r in _lines(out / "cases.jsonl")}
    for s in range(2):
        base, dense = by[runner.BASELINE, "ppl", s], by["dense:causal=true", "ppl", s]
        assert dense["ppl"] == pytest.approx(base["ppl"], rel=1e-4)
        assert (
            by["dense:causal=true", "passkey", s]["generated"]
            == (by[runner.BASELINE, "passkey", s]["generated"])
        )


def test_a_length_beyond_the_models_positions_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        runner.run_eval(
            _config(tmp_path / "x", lengths=[128, 1024]), loader=_tiny_loader(512),
            show_progress=False,
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_report_and_plots_are_written(tmp_path):
    from longattn.eval import plots

    out = tmp_path / "p"
    runner.run_eval(_config(out), loader=_tiny_loader(), show_progress=False)
    path = plots.render_all(out)
    md = path.read_text()
    for label in ("hf_sdpa (baseline)", "dense", "streaming_llm:sinks=2,window=30"):
        assert f"| {label} |" in md
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == [
        "accuracy_vs_budget.png", "attention_maps.png", "fidelity_by_layer.png",
        "needle_heatmap.png", "speedup_vs_length.png",
    ]  # fmt: skip
    assert "<table>" in (out / "report.html").read_text()
    rows, lengths, _ = report.summarise(report.load_records(out))
    assert lengths == [128, 192] and rows[0]["method"] == runner.BASELINE
    assert [r["kv_budget"] for r in rows[1:]] == sorted(
        (r["kv_budget"] for r in rows[1:]), reverse=True
    )


def test_report_from_a_synthetic_jsonl_with_failed_cases(tmp_path):
    from longattn.eval import plots

    base = dict(task="needle", length=1024, sample=0, depth=0.5, density_kind="pairs")
    records = [
        dict(base, case="a", method="hf_sdpa", density=1.0, kv_budget=1024, score=1.0,
             prefill_ms=100.0, decode_tok_s=20.0, kv_bytes=2**20, peak_rss_mib=10.0),
        dict(base, case="b", method="sliding_window:window=256", density=0.4, kv_budget=256,
             score=0.0, prefill_ms=50.0, decode_tok_s=25.0, kv_bytes=2**19, peak_rss_mib=8.0),
        dict(base, case="c", method="streaming_llm:window=252", density=0.4, kv_budget=256,
             error="RuntimeError: boom"),
    ]  # fmt: skip
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = plots.render_all(tmp_path).read_text()
    assert "| sliding_window:window=256 | 256 | 40% pairs | 0% |" in md  # needle acc @1024
    assert "2.00×" in md and "RuntimeError: boom" in md


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    from longattn.cli import main

    assert main(["eval", "--model", "no-such-model", "--out", str(tmp_path / "a")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["eval", "--methods", "streaming_llm:window=-3", "--out", str(tmp_path / "b")]) == 2
    assert "-3" in capsys.readouterr().err
    assert main(["eval", "--tasks", "sudoku", "--out", str(tmp_path / "c")]) == 2
    assert "sudoku" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cases.jsonl").write_text("")
    assert main(["eval", "--out", str(tmp_path / "d")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert main(["eval", "--corpus", "klingon", "--out", str(tmp_path / "e")]) == 2
    assert "klingon" in capsys.readouterr().err


def test_an_unsupported_architecture_is_named(tmp_path):
    pytest.importorskip("transformers")
    from longattn.eval.models import load

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "frobnicator", "architectures": ["FrobnicatorForCausalLM"]})
    )
    with pytest.raises(ValueError, match="FrobnicatorForCausalLM"):
        load(str(tmp_path))


def _pattern(kind: str, t: int = 256) -> torch.Tensor:
    """A synthetic causal attention matrix [t, t] of one pure pattern, rows normalised."""
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    causal = k <= q
    shapes = {
        "local": (q - k < 8) & (k >= 4),
        "vertical": (k == 100) | (k == 150) | (q - k == 0),
        "slash": (q - k == 90) | (q - k == 0),
        "retrieval": (k * 7 + q * 13) % 97 == 0,
    }
    weight = (shapes[kind] & causal).float() + 1e-9 * causal
    weight[:, 0] += 1e-6  # every row has mass somewhere
    return weight / weight.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["local", "vertical", "slash", "retrieval"])
def test_head_classification_of_pure_patterns(kind):
    from longattn.eval import analyze

    stats = analyze.head_stats(_pattern(kind), window=16)
    assert analyze.classify(stats) == kind, stats
