"""``longattn bench evict``: its gate catches a wrong output or a wrong held token, and a small run
writes gated, timed rows for an eviction method and the uniform policy."""

import argparse
import dataclasses
import json

import torch

from longattn.bench import evict
from longattn.method import Evict


@dataclasses.dataclass(frozen=True)
class SmallNorm(Evict):
    """Test scorer: keep the keys of smallest norm (differs per head)."""

    def score(self, view):
        return -view.keys.float().norm(dim=-1)


def _compressed(dtype=torch.float32):
    tokens = evict.Tokens(256, "smollm2", dtype)
    method = SmallNorm(budget=0.25, sinks=2, recent=4)
    cache = evict.build(method, tokens)
    result = evict.step(method, tokens, cache)
    return tokens, cache, result


def test_gate_passes_a_right_step_over_a_per_head_compressed_cache():
    tokens, cache, result = _compressed()
    assert not cache.is_uniform(0) and cache.head_lengths(0).max() == 64 + 1
    assert evict.gate(result, tokens, cache) is None


def test_gate_catches_a_wrong_output():
    tokens, cache, result = _compressed()
    bad = result.out.clone()
    bad[0, 4, 0, 7] += 1e-3
    assert "exceeds its bound" in evict.gate(result._replace(out=bad), tokens, cache)
    # the step over every key (as if nothing had been evicted) is wrong for what is held
    full = evict.build(evict.from_string("dense"), tokens)
    dense = evict.step(evict.from_string("dense"), tokens, full)
    assert evict.gate(dense, tokens, cache) is not None


def test_gate_catches_a_held_slot_that_is_not_its_token():
    tokens, cache, result = _compressed()
    cache.keys(0)[0, 1, 3] += 1.0  # corrupt one held key in place
    assert "not the original token" in evict.gate(result, tokens, cache)


def test_a_small_run_writes_gated_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(evict, "SHAPES", {"smollm2": (9, 3, 64)})
    out = tmp_path / "evict.jsonl"
    args = argparse.Namespace(
        quick=True, length=512, out=str(out), methods="streaming_llm", budgets="0.25"
    )
    assert evict.run_cli(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["gate"] for r in rows)  # fp32 and bf16
    row = rows[0]
    assert row["ms"] > 0 and row["dense_ms"] > 0 and row["compress_ms"] > 0
    assert row["held_dense_ms"] > 0 and row["speedup"] > 0 and row["attention_speedup"] > 0
    # sinks + window less the next token's slot, plus fewer than a page of dead keys not yet evicted
    assert 4 + 124 - 1 <= row["kept_tokens"] < 4 + 124 - 1 + 16
    assert row["used_bytes"] < row["dense_used_bytes"]


def test_think_runs_with_a_token_scorer_and_its_gate_reads_the_kept_channels():
    assert "think:scorer=snapkv" in evict.default_methods()
    tokens = evict.Tokens(256, "smollm2", torch.float32)
    method = evict.make_method("think:scorer=snapkv", 0.25, 256)
    cache = evict.build(method, tokens)
    result = evict.step(method, tokens, cache)
    assert cache.keys(0).shape[-1] == 38 and cache.values(0).shape[-1] == 64  # floor(0.6 * 64)
    assert evict.gate(result, tokens, cache) is None
    bad = result.out.clone()
    bad[0, 4, 0, 7] += 1e-3
    assert "exceeds its bound" in evict.gate(result._replace(out=bad), tokens, cache)
