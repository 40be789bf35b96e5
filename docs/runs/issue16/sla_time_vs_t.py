"""One layer's causal prefill attention against T (9 / 3 heads, d = 64, fp32, synthetic inputs):
causal SDPA, SLA sparse-only (``marginal=0``, the critical blocks alone) and SLA with its
expansion form (critical 0.1 and 0.6, the rest marginal, 8 points), median of the repeats'
interleaved timed calls after a warm-up, all in one run. Threads: ``OMP_NUM_THREADS``. SLA runs
as ``attention`` runs it: in float32, the C++ pass of ``longattn.kernels.expansion``.

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/runs/issue16/sla_time_vs_t.py 8192,16384,32768 [repeats]
"""

import statistics
import sys
import time

import torch

from longattn import attention
from longattn.bench.common import cpu_line
from longattn.methods import SLA
from longattn.testing import make_qkv

METHODS = {
    "sparse-only 0.1": SLA(critical=0.1, marginal=0.0),
    "sla expansion 0.1": SLA(critical=0.1, marginal=0.9),
    "sla expansion 0.6": SLA(critical=0.6, marginal=0.4),
}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )


def main(lengths: list[int], repeats: int) -> None:
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| T | sdpa s | " + " | ".join(f"{m} s (x sdpa)" for m in METHODS) + " |")
    print("|---" * (len(METHODS) + 2) + "|")
    for length in lengths:
        q, k, v = make_qkv(1, 9, 3, length, length, 64, seed=1)
        calls = {"sdpa": lambda q=q, k=k, v=v: sdpa(q, k, v)}
        for name, method in METHODS.items():
            calls[name] = lambda q=q, k=k, v=v, m=method: attention(q, k, v, method=m).out
        times = {name: [] for name in calls}
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = [f"{med[m]:.2f} ({med['sdpa'] / med[m]:.2f}x)" for m in METHODS]
        print(f"| {length} | {med['sdpa']:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(
        [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192").split(",")],
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
    )
