"""hip.plan(view) with the C++ key maxima against its PyTorch path (main's code), interleaved in one
process, 1 thread, on the synthetic bench's inputs (make_qkv(1, 8, 8, T, T, 64, seed=0), budget 0.2).

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue14/hip_native_plan_time.py
"""

import dataclasses
import time

import torch

from longattn import from_string
from longattn.call import make_call
from longattn.prefill import make_view
from longattn.testing import make_qkv

torch.set_num_threads(1)
for T in (16384, 32768):
    for dtype in (torch.float32, torch.bfloat16):
        m = from_string("hip")
        q, k, v = make_qkv(1, 8, 8, T, T, 64, dtype=dtype, seed=0)
        view = make_view(make_call(q, k, v, m))
        fallback = dataclasses.replace(view, key_maxima=None)
        assert torch.equal(m.plan(view), m.plan(fallback))
        ts = {"native": [], "torch": []}
        reps = 9 if T == 16384 else 5
        for _ in range(reps):
            for name, vw in (("native", view), ("torch", fallback)):
                t = time.perf_counter()
                m.plan(vw)
                ts[name].append(1e3 * (time.perf_counter() - t))
        med = {n: sorted(x)[len(x) // 2] for n, x in ts.items()}
        mins = {n: min(x) for n, x in ts.items()}
        print(
            f"{T} {str(dtype)[6:]}: plan ms median native {med['native']:.1f} torch {med['torch']:.1f} "
            f"(ratio {med['native'] / med['torch']:.2f}); min native {mins['native']:.1f} torch {mins['torch']:.1f}",
            flush=True,
        )
