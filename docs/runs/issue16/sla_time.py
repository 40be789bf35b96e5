"""One layer's attention at 8K (9 / 3 heads, d = 64, fp32, 1 thread): SLA's torch form against
causal SDPA, one timed call each after a warm-up (docs/runs/issue16/sla_error.md)."""

import time

import torch

from longattn import attention
from longattn.methods import SLA
from longattn.testing import make_qkv

torch.set_num_threads(1)
q, k, v = make_qkv(1, 9, 3, 8192, 8192, 64, seed=1)


def sdpa():
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    )


for name, fn in [
    ("sdpa", sdpa),
    ("sla", lambda: attention(q, k, v, method=SLA(feature="elu")).out),
    ("sparse", lambda: attention(q, k, v, method=SLA(marginal=0.0)).out),
    ("sdpa", sdpa),
]:
    fn()
    t = time.perf_counter()
    fn()
    print(name, round(time.perf_counter() - t, 2), "s", flush=True)
