"""How the decode-step ratio of ``bench evict`` depends on what the CPU caches hold when a step
starts: the full cache's step, a method's step at 25 % kept and a dense step over the same held
keys, timed three ways in one run:

- ``blocks``: 100 steps of one cache back to back, then the next cache (each reads warm keys);
- ``interleaved``: one step of each in turn, 40 rounds (as the bench times them);
- ``flushed``: interleaved, with 64 MB read between steps (each step reads cold keys, as a model's
  layer does after the other layers' work).

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue13/decode_cache_state.py snapkv smollm2 fp32

Medians in ms and the full step over the method's step (x full) and over the dense held step.
"""

import statistics
import sys
import time

import torch

from longattn.api import from_string
from longattn.bench.common import cpu_line
from longattn.bench.evict import Tokens, build, make_method, step

FLUSH = torch.ones(16 * 2**20)  # 64 MB


def timed(method, tokens, cache, flush: bool) -> float:
    if flush:
        FLUSH.sum()
    start = time.perf_counter()
    step(method, tokens, cache)
    return (time.perf_counter() - start) * 1e3


def main(spec: str, shape: str, dtype_name: str) -> None:
    torch.set_num_threads(1)
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    tokens = Tokens(8192, shape, dtype)
    dense, method = from_string("dense"), make_method(spec, 0.25, 8192)
    caches = {"full": (dense, build(dense, tokens))}
    for name, runner in (("method", method), ("held dense", dense)):
        cache = build(method, tokens)
        step(method, tokens, cache)  # the compressing first step
        caches[name] = (runner, cache)
    for _, cache in caches.values():
        cache.reserve(0, cache.capacity(0) + 600)
    print(f"CPU: {cpu_line()}, 1 thread, torch {torch.__version__}; {spec} {shape} {dtype_name}")
    for mode in ("blocks", "interleaved", "flushed"):
        times: dict[str, list[float]] = {name: [] for name in caches}
        if mode == "blocks":
            for name, (runner, cache) in caches.items():
                times[name] = [timed(runner, tokens, cache, False) for _ in range(100)]
        else:
            for _ in range(40):
                for name, (runner, cache) in caches.items():
                    times[name].append(timed(runner, tokens, cache, mode == "flushed"))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{mode:12s} " + " ".join(f"{n} {m:.3f}" for n, m in med.items())
              + f" | x full {med['full'] / med['method']:.2f},"
              f" held dense {med['full'] / med['held dense']:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
