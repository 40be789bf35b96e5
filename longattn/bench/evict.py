"""``longattn bench evict``: one attention decode step over a compressed cache vs the full cache,
in the same run.

For each KV length, head shape, dtype, kept fraction and eviction method (default: every registered
``Evict`` method that needs no calibration file, plus StreamingLLM, the uniform policy: every head
keeps the same sinks + window at the same budget), the cache is built through the public API: a
prompt call with the last ``PROMPT_QUERIES`` queries, ``attention(q[:, :, -32:], k, v, method=m,
cache=c)``, which attends those queries and appends every key. The first decode step scores and
evicts (``compress ms``: its median over fresh caches); then the median decode step over what is
held is timed against the decode step of the full cache (``method="dense"``) and a dense call over
the same held keys (``held dense ms``: the attention alone, without the method's per-step
bookkeeping), the three steps in turn within each repeat, so that a slow phase of a shared machine
hits them alike; ``x full`` is the median over the repeats of the per-repeat ratio. Capacity
bytes (``KVCache.capacity_nbytes()``) and used bytes (``nbytes()``) are recorded for both, after
compression (before the slots the timed steps append into are reserved).

Every timed row is gated twice (the compressing step, and a step after the timing): the held keys
and values must be the original tokens at their recorded positions, and the step's output must
match the float64 oracle over the held keys of each KV head; no timing is reported for a red gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys
import time

import torch

from longattn import KVCache, attention, from_string
from longattn.bench.common import (
    ImplLog,
    JsonlWriter,
    cpu_line,
    environment,
    format_table,
)
from longattn.bench.decode import SHAPES
from longattn.cache_channels import gather_channels
from longattn.method import Evict, Method, registry
from longattn.testing import check_against_reference, kept_channel_queries

BUDGETS = (0.5, 0.25, 0.1)
PROMPT_QUERIES = 32
UNIFORM = "streaming_llm"
UNIFORM_SINKS = 4
COLUMNS = [
    ("kv_len", "T"),
    ("shape", "heads"),
    ("dtype", "dtype"),
    ("budget", "kept"),
    ("name", "method"),
    ("impl", "impl"),
    ("gate", "gate"),
    ("compress_ms", "compress ms"),
    ("ms", "step ms"),
    ("dense_ms", "full ms"),
    ("speedup", "x full"),
    ("held_dense_ms", "held dense ms"),
    ("attention_speedup", "x full (dense call)"),
    ("capacity_mb", "cap MB"),
    ("dense_capacity_mb", "full cap MB"),
    ("used_mb", "used MB"),
    ("dense_used_mb", "full used MB"),
]


# ThinK alone keeps every token (its budget must stay 1): here it runs with a token scorer, so that
# the budget applies and its channel pruning comes on top of SnapKV's eviction
DEFAULT_SPECS = {"think": "think:scorer=snapkv"}


def eviction_specs() -> list[str]:
    """Every registered eviction method that needs no calibration file, at its defaults (ThinK
    with a token scorer, ``DEFAULT_SPECS``)."""
    names = []
    for name, cls in registry().items():
        fields = {f.name for f in dataclasses.fields(cls)}
        if issubclass(cls, Evict) and "calibration" not in fields:
            names.append(DEFAULT_SPECS.get(name, name))
    return names


def default_methods() -> list[str]:
    """Every eviction method that needs no calibration file, then the uniform policy."""
    return eviction_specs() + [UNIFORM]


def make_method(spec: str, budget: float, kv_len: int) -> Method:
    """``spec`` at ``budget``: an eviction method's ``budget`` field; StreamingLLM's window sized
    so that sinks + window hold the same number of tokens."""
    if spec == UNIFORM:
        window = max(1, math.ceil(budget * kv_len) - UNIFORM_SINKS)
        return from_string(f"{UNIFORM}:sinks={UNIFORM_SINKS},window={window}")
    method = from_string(spec)
    if not isinstance(method, Evict):
        raise ValueError(f"bench evict times eviction methods and {UNIFORM}, got {spec!r}")
    return dataclasses.replace(method, budget=budget)


class Tokens:
    """The benchmark's tokens: the prompt's keys and values, its last queries, and the one decode
    token appended at every later position."""

    def __init__(self, kv_len: int, shape: str, dtype: torch.dtype) -> None:
        n_heads, n_kv, dim = SHAPES[shape]
        gen = torch.Generator().manual_seed(0)
        self.k = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
        self.v = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
        self.q = torch.randn(1, n_heads, PROMPT_QUERIES, dim, generator=gen).to(dtype)
        self.step_q = torch.randn(1, n_heads, 1, dim, generator=gen).to(dtype)
        self.k_new = torch.randn(1, n_kv, 1, dim, generator=gen).to(dtype)
        self.v_new = torch.randn(1, n_kv, 1, dim, generator=gen).to(dtype)
        self.kv_len, self.scale = kv_len, dim**-0.5

    def original(self, pos: torch.Tensor, which: str) -> torch.Tensor:
        """[B, Hkv, S, D] the original keys (or values) at positions ``pos`` [B, Hkv, S] (-1: 0)."""
        prompt, new = (self.k, self.k_new) if which == "k" else (self.v, self.v_new)
        full = torch.cat([prompt, new], dim=2)  # position >= kv_len: the decode token
        index = pos.clamp(min=0, max=self.kv_len).unsqueeze(-1).expand(-1, -1, -1, full.shape[-1])
        return torch.gather(full, 2, index)


def build(method: Method, tokens: Tokens) -> KVCache:
    """A cache after the prompt call: the last queries attended, every key appended."""
    cache = KVCache(1)
    attention(tokens.q, tokens.k, tokens.v, method=method, cache=cache)
    return cache


def step(method: Method, tokens: Tokens, cache: KVCache):
    return attention(tokens.step_q, tokens.k_new, tokens.v_new, method=method, cache=cache)


def gate(result, tokens: Tokens, cache: KVCache, seen: torch.Tensor | None = None) -> str | None:
    """None when the step's output is right over what the cache holds, else why not: the held
    slots must hold the original tokens of their positions, and the output must match the float64
    oracle over the keys the step saw per KV head: ``seen`` [B, Hkv, S] positions (-1 empty),
    by default what the cache holds after the step."""
    pos = cache.head_positions(0)  # [B, Hkv, S]
    held = pos >= 0
    channels = cache.key_channels(0)  # a channel-pruned layer (ThinK) holds its kept key channels
    for name, stored in (("k", cache.keys(0)), ("v", cache.values(0))):
        want = tokens.original(pos, name)
        want = want if name == "v" or channels is None else gather_channels(want, channels)
        if not torch.equal(stored[:, :, : pos.shape[-1]][held], want[held]):
            return f"a held slot's {name} is not the original token of its position"
    if not bool((pos.amax(dim=-1) == cache.n_seen(0) - 1).all()):
        return "a KV head does not hold the token being decoded"
    seen = pos if seen is None else seen
    group = tokens.step_q.shape[1] // seen.shape[1]
    visible = (seen >= 0).repeat_interleave(group, dim=1).unsqueeze(2)  # [B, H, 1, S]
    keys, values = tokens.original(seen, "k"), tokens.original(seen, "v")
    try:
        q = kept_channel_queries(tokens.step_q, channels)
        check_against_reference(result, q, keys, values, visible, tokens.scale)
    except AssertionError as exc:
        return str(exc)
    return None


def gated_step(method: Method, tokens: Tokens, cache: KVCache) -> tuple[object, str | None]:
    """One decode step and its gate. A method with a retention rule (StreamingLLM) evicts after
    attending: its step saw what its mask allows of what was held before it, plus the new token."""
    before = cache.head_positions(0).clone()
    result = step(method, tokens, cache)
    seen = None
    if not isinstance(method, Evict) and type(method).retain is not Method.retain:
        q_pos = cache.n_seen(0) - 1
        held = torch.cat([before, torch.full_like(before[..., :1], q_pos)], dim=-1)
        allowed = method.mask(0, 0, torch.tensor(q_pos), held) & (held >= 0)
        seen = torch.where(allowed, held, -1)
    return result, gate(result, tokens, cache, seen)


def _compress(method: Method, tokens: Tokens, repeats: int) -> tuple[KVCache, float, str, str]:
    """Time the compressing first step on ``repeats`` fresh caches, then run it once more gated;
    (that cache, median ms, the implementation that ran it, the gate's failure or None)."""
    times = []
    for _ in range(repeats):
        cache = build(method, tokens)
        start = time.perf_counter()
        step(method, tokens, cache)
        times.append((time.perf_counter() - start) * 1e3)
    cache = build(method, tokens)
    with ImplLog() as seen:
        _, failure = gated_step(method, tokens, cache)
    return cache, statistics.median(times), ", ".join(seen.chosen), failure


def interleaved(steps: dict, repeats: int) -> tuple[dict, dict]:
    """Median ms of each step of ``steps`` (name -> (method, tokens, cache)), timed in turn within
    each repeat, so that a slow phase of a shared machine hits them alike; and the median over the
    repeats of each step's ratio to the first one's time in the same repeat."""
    for method, tokens, cache in steps.values():
        # growing inside a timed step would time a copy
        cache.reserve(0, cache.capacity(0) + repeats + 4)
        step(method, tokens, cache)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (method, tokens, cache) in steps.items():
            start = time.perf_counter()
            step(method, tokens, cache)
            times[name].append((time.perf_counter() - start) * 1e3)
    first = next(iter(steps))
    ratios = {
        n: statistics.median(a / b for a, b in zip(times[first], t)) for n, t in times.items()
    }
    return {n: statistics.median(t) for n, t in times.items()}, ratios


def time_row(method: Method, tokens: Tokens, dense: KVCache, repeats: int) -> dict:
    """Gate, time and gate again one method's decode step, next to a dense step's timing."""
    cache, compress_ms, impl, failure = _compress(method, tokens, 3)
    row = {"name": method.name, "impl": impl, "compress_ms": compress_ms,
           "capacity_bytes": cache.capacity_nbytes(), "used_bytes": cache.nbytes(),
           "kept_tokens": float(cache.head_lengths(0).float().mean())}  # fmt: skip
    if failure is None:
        dense_call = from_string("dense")
        # the full cache; the method's step; attention alone over what is held (a dense call,
        # without the method's bookkeeping)
        ms, ratio = interleaved({"dense_ms": (dense_call, tokens, dense),
                                 "ms": (method, tokens, cache),
                                 "held_dense_ms": (dense_call, tokens, cache)}, repeats)  # fmt: skip
        row.update(ms, speedup=ratio["ms"], attention_speedup=ratio["held_dense_ms"])
        failure = gated_step(method, tokens, cache)[1]
    row["gate"] = failure is None
    if failure is not None:
        row.pop("ms", None)
        row["gate_error"] = failure
    return row


def bench_config(kv_len, shape, dtype, budgets, methods, repeats, writer) -> list[dict]:
    tokens = Tokens(kv_len, shape, dtype)
    dense_method = from_string("dense")
    dense = build(dense_method, tokens)
    dense_bytes = {
        "dense_capacity_bytes": dense.capacity_nbytes(),
        "dense_used_bytes": dense.nbytes(),
    }
    n_heads, n_kv, dim = SHAPES[shape]
    base = {"kv_len": kv_len, "shape": f"{n_heads}/{n_kv}/d{dim}", "dtype": str(dtype)[6:]}
    dense_gate = gated_step(dense_method, tokens, dense)[1]
    rows = []
    for budget in budgets:
        for spec in methods:
            method = make_method(spec, budget, kv_len)
            if dense_gate is not None:
                row = {
                    "name": method.name,
                    "gate": False,
                    "gate_error": f"full cache: {dense_gate}",
                }
            else:
                row = time_row(method, tokens, dense, repeats)
            row = {**base, "budget": budget, "method": method.describe(), **dense_bytes, **row}
            writer.write({**row, **environment()})
            rows.append(row)
    return rows


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    lengths = [args.length] if args.length else ([8192] if args.quick else [8192, 32768])
    repeats = 9 if args.quick else 15
    budgets = getattr(args, "budgets", None)
    budgets = tuple(float(b) for b in budgets.split(",") if b) if budgets else BUDGETS
    methods = getattr(args, "methods", None)
    methods = [m for m in methods.split(",") if m] if methods else default_methods()
    out = pathlib.Path(args.out or "results/bench_evict.jsonl")
    writer = JsonlWriter(out)
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for kv_len in lengths:
                rows += bench_config(kv_len, shape, dtype, budgets, methods, repeats, writer)
    for row in rows:
        for key in ("capacity", "dense_capacity", "used", "dense_used"):
            if row.get(f"{key}_bytes") is not None:
                row[f"{key}_mb"] = row[f"{key}_bytes"] / 1e6
    print(format_table(rows, COLUMNS))
    print("x full: median full-cache step / median step over what is held, timed back to back; "
          "x full (dense call): the same over the held keys with method=dense (attention alone); "
          "compress ms: the first decode step (scores, evicts, attends)")  # fmt: skip
    print(f"wrote {out}")
    red = [f"{r['method']} T={r['kv_len']} {r['dtype']}: {r['gate_error']}" for r in rows
           if r["gate"] is False]  # fmt: skip
    if red:
        print("correctness gate FAILED (not timed):\n  " + "\n  ".join(red), file=sys.stderr)
    return 1 if red else 0
