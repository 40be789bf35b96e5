"""``longattn bench infini-memory``: InfiniAttention's memory over a long stream.

Synthetic q/k/v (seeded normal; ``--heads`` query heads over a third as many KV heads, ``--dim``)
streamed through a ``KVCache`` in calls of 3/4 of a segment (2048 tokens) up to ``--length``
(default 32768), so that the open segment's keys are held between calls: after each call, the bytes of the layer's state (``InfiniState``: memory, norm and
the open segment's keys and values) and of the cache's own key/value storage, against the bytes a
full KV cache of the tokens seen would hold, and the call's time. JSONL and a table.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch

from longattn import KVCache, attention
from longattn.bench.common import JsonlWriter, cpu_line, environment, format_table
from longattn.methods import InfiniAttention

COLUMNS = [
    ("tokens", "tokens"), ("state_bytes", "state bytes"), ("cache_bytes", "cache KV bytes"),
    ("full_kv_bytes", "full KV bytes"), ("ratio", "full / state"), ("ms", "ms / call"),
]  # fmt: skip


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))


def stream(
    length: int, segment: int, n_heads: int, dim: int, call: int | None = None, seed: int = 0
) -> list[dict]:
    """One record per call of ``call`` tokens (default ``segment``; the last may be shorter)."""
    method = InfiniAttention(segment=segment)
    n_kv = max(1, n_heads // 3)
    gen = torch.Generator().manual_seed(seed)
    cache, records = KVCache(1), []
    call = call or segment
    for lo in range(0, length, call):
        n = min(call, length - lo)
        q = torch.randn(1, n_heads, n, dim, generator=gen)
        k, v = (torch.randn(1, n_kv, n, dim, generator=gen) for _ in range(2))
        start = time.perf_counter()
        out = attention(q, k, v, method=method, cache=cache)
        ms = (time.perf_counter() - start) * 1e3
        tokens = lo + n
        full = 2 * n_kv * tokens * dim * k.element_size()
        held = state_bytes(out.state)
        records.append({"tokens": tokens, "state_bytes": held, "cache_bytes": cache.nbytes(),
                        "full_kv_bytes": full, "ratio": full / held, "ms": ms})  # fmt: skip
    return records


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    length, segment = args.length or 32768, 2048
    out = pathlib.Path(args.out or "results/bench_infini_memory.jsonl")
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    records = stream(length, segment, args.heads, args.dim, call=segment * 3 // 4)
    writer, env = JsonlWriter(out), environment()
    for rec in records:
        rec.update({"bench": "infini_memory", "segment": segment, "call": segment * 3 // 4,
                    "heads": args.heads,
                    "dim": args.dim, **env})  # fmt: skip
        writer.write(rec)
    print(format_table(records, COLUMNS))
    return 0
