"""The eviction eval's shared prefill (``longattn.eval.evict``) on a tiny random-init Llama: each
method run on a copy of one shared prefill gives what it gives when run from scratch."""

import dataclasses
import json
from typing import ClassVar

import pytest
import torch

from longattn.eval import evict
from longattn.eval.evict_report import summarise, write_report
from longattn.method import Evict
from longattn.methods.dense import Dense
from longattn.methods.streaming_llm import StreamingLLM
from longattn.methods.think import ThinK

transformers = pytest.importorskip("transformers")
from longattn.integrations.hf import use  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Heavy(Evict):
    """Test scorer: the accumulated attention (H2O-like)."""

    needs: ClassVar[frozenset[str]] = frozenset({"accumulated"})

    def score(self, view):
        return view.accumulated


@dataclasses.dataclass(frozen=True)
class Votes(Evict):
    """Test scorer: the window's summed attention weights (SnapKV-like, without pooling)."""

    def score(self, view):
        probs = view.weights(view.queries, view.q_pos)  # [B, H, w, T]
        batch, n_kv = view.keys.shape[:2]
        return probs.view(batch, n_kv, -1, probs.shape[-1]).sum(dim=2)


def tiny_model():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=512,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


PROMPT = torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(1))
METHODS = [
    Heavy(budget=0.3, sinks=2, recent=4, window=8),
    Votes(budget=0.25, sinks=2, recent=4, window=8),
    Votes(budget=0.5, sinks=1, recent=2, window=1),
    Votes(budget=0.2, sinks=2, recent=4, window=4, when="decode", every=3),
]


@torch.no_grad()
def _from_scratch(model, method, steps):
    """Prefill and greedy decode under ``method`` alone: (logits per step, positions, bytes)."""
    with use(model, method) as cache:
        out = model(input_ids=PROMPT, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = [out.logits[0, -1]]
        for _ in range(steps):
            token = logits[-1].argmax().view(1, 1)
            logits.append(
                model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
            )
        held = [cache.kv.head_positions(layer) for layer in range(2)]
        return logits, held, cache.kv.capacity_nbytes()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe())
@torch.no_grad()
def test_shared_prefill_answers_as_the_method_from_scratch(method):
    model = tiny_model()
    steps = 6
    want, held, capacity = _from_scratch(model, method, steps)
    prefilled = evict.shared_prefill(model, PROMPT, window=8)
    torch.testing.assert_close(prefilled.logits, want[0], rtol=0, atol=0)
    got = evict.answer(model, method, prefilled, steps + 1, base_kib=0)
    assert got["tokens"] == [int(x.argmax()) for x in want]
    assert got["kv_capacity_bytes"] == capacity
    with evict.resumed(model, method, prefilled) as cache:  # the same steps, positions compared
        for token in got["tokens"][:steps]:
            model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        for layer in range(2):
            assert torch.equal(cache.kv.head_positions(layer), held[layer])
    assert int(cache.kv.head_lengths(0).max()) < PROMPT.shape[1] * 0.6  # it really evicted
    # the prefilled cache itself is untouched by the methods run on its copies
    assert prefilled.kv.seq_len(0) == PROMPT.shape[1] and prefilled.kv.is_uniform(0)


@pytest.mark.parametrize("method", [METHODS[0], METHODS[3], Dense()], ids=lambda m: m.describe())
def test_forced_decode_perplexity_equals_one_token_at_a_time(method):
    _forced_equals_steps(method)


THINK = [ThinK(keep=0.5, window=8), ThinK(keep=0.75, budget=0.3, sinks=2, recent=4, window=8,
                                          scorer="snapkv")]  # fmt: skip


@pytest.mark.parametrize("method", THINK, ids=lambda m: m.describe())
@torch.no_grad()
def test_think_from_the_shared_prefill_answers_as_from_scratch_with_fewer_key_channels(method):
    """ThinK in a model: the shared prefill stands for its own; every layer's keys are pruned to
    floor(keep * 8) channels at the first decode step, the values keep all 8."""
    model = tiny_model()
    want, held, capacity = _from_scratch(model, method, 4)
    prefilled = evict.shared_prefill(model, PROMPT, window=8)
    got = evict.answer(model, method, prefilled, 5, base_kib=0)
    assert got["tokens"] == [int(x.argmax()) for x in want]
    assert got["kv_capacity_bytes"] == capacity
    with evict.resumed(model, method, prefilled) as cache:
        model(input_ids=torch.tensor([[got["tokens"][0]]]), past_key_values=cache, use_cache=True)
        for layer in range(2):
            assert cache.kv.keys(layer).shape[-1] == int(method.keep * 8)
            assert cache.kv.values(layer).shape[-1] == 8
    dense = evict.answer(model, Dense(), prefilled, 5, base_kib=0)
    assert got["kv_bytes"] < dense["kv_bytes"]


@pytest.mark.parametrize("method", THINK, ids=lambda m: m.describe())
@torch.no_grad()
def test_think_forced_decode_perplexity_equals_one_token_at_a_time(method):
    _forced_equals_steps(method)


def _forced_equals_steps(method):
    """Teacher-forced decode through the method's cache, 16 tokens a call from the shared prefill
    (``evict.forced``), equals one token a call from a prefill of its own."""
    model = tiny_model()
    tail = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    nll = []
    with torch.no_grad(), use(model, method) as cache:
        out = model(input_ids=PROMPT, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for t in range(tail.shape[1]):
            nll.append(-torch.log_softmax(out.logits[0, -1], -1)[tail[0, t]])
            out = model(input_ids=tail[:, t : t + 1], past_key_values=cache, use_cache=True)
    got = evict.forced(model, method, evict.shared_prefill(model, PROMPT, 8), tail, base_kib=0)
    torch.testing.assert_close(torch.tensor(got["nll"]), torch.stack(nll), rtol=1e-4, atol=1e-4)


def test_methods_the_shared_prefill_cannot_stand_for_are_refused():
    with pytest.raises(ValueError, match="window=64"):
        evict.check_shareable(Votes(window=64), 32)
    with pytest.raises(ValueError, match="chunk"):
        evict.check_shareable(Votes(when="chunk"), 32)
    with pytest.raises(ValueError, match="eviction methods"):
        evict.check_shareable(StreamingLLM(), 32)
    evict.check_shareable(Dense(), 32)


def test_report_tables_compare_with_the_dense_row(tmp_path):
    cases = []
    for sample in range(2):
        for label, name, budget, score, cap in [("dense", "dense", None, 1.0, 400),
                                                ("snapkv:budget=0.25", "snapkv", 0.25, 0.5, 100)]:  # fmt: skip
            cases.append({"case": f"{label}|needle|2048|{sample}", "method": label, "name": name,
                          "budget": budget, "task": "needle", "length": 2048, "sample": sample,
                          "score": score, "kv_capacity_bytes": cap * 2**20, "kv_bytes": 1,
                          "decode_tok_s": 10.0 if name == "dense" else 20.0})  # fmt: skip
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    rows = summarise(cases)["needle", 2048]
    assert [r["name"] for r in rows] == ["dense", "snapkv"]
    snap = rows[1]
    assert snap["vs_dense"] == -50.0 and snap["kv_ratio"] == 0.25 and snap["speed_ratio"] == 2.0
    text = write_report(tmp_path).read_text()
    assert "| snapkv | 0.25 | 2 | 50.0 | -50.0 | 100.0 | 0.250 |" in text
    assert "best at 25 % = snapkv (-50.0 points vs dense, n=2): within 2 points missed" in text


def test_a_cell_the_dense_model_fails_decides_no_target(tmp_path):
    cases = [{"case": f"{label}|needle|4096|0", "method": label, "name": label.split(":")[0],
              "budget": budget, "task": "needle", "length": 4096, "sample": 0, "score": 0.0,
              "kv_capacity_bytes": 2**20, "kv_bytes": 1, "decode_tok_s": 1.0}
             for label, budget in [("dense", None), ("snapkv:budget=0.25", 0.25)]]  # fmt: skip
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    text = write_report(tmp_path).read_text()
    assert "Dense answers none of these 1 prompts" in text
    assert "needle 4096: not decided, dense answers none of the prompts" in text
    assert "within 2 points met" not in text and "within 10 points met" not in text


def test_the_default_method_list_is_every_eviction_method_one_prefill_serves():
    from longattn.eval.evict import default_specs, method_grid

    specs = default_specs()
    assert specs[0] == "dense" and "snapkv" in specs and "think:scorer=snapkv" in specs
    assert "duo_attention" not in specs and "razor_attention" not in specs  # compress in prefill
    assert "qfilters" not in specs  # its calibration file has no default
    grid = method_grid(specs, [0.5, 0.1])
    assert len(grid) == 1 + 2 * (len(specs) - 1)
    assert {m.budget for m in grid[1:]} == {0.5, 0.1}
