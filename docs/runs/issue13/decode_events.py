"""aten events per layer and token of a steady-state decode step (prompt 1,040, 8 profiled steps
after 20 warm-up steps) for transformers' DynamicCache and three hf.use methods; the package to
measure by name (``longattn`` or a renamed copy of older code).

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue13/decode_events.py longattn
"""

# ruff: noqa: E402 -- packages chosen or put on the path at run time

import contextlib
import importlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

pkg = sys.argv[1]
hf = importlib.import_module(f"{pkg}.integrations.hf")
methods = importlib.import_module(f"{pkg}.methods")
models = importlib.import_module(f"{pkg}.eval.models")
text = importlib.import_module(f"{pkg}.eval.text")
from transformers import DynamicCache

torch.set_num_threads(1)
model, tok = models.load("smollm2-135m")
model.set_attn_implementation("sdpa")
P, W = 1040, 20
ids = text.leading_ids(tok, P + W + 10)
for label, m in [
    ("hf_dynamic_cache", None),
    ("dense", methods.Dense()),
    ("streaming_llm cache", methods.StreamingLLM(sinks=4, window=1024, positions="cache")),
    ("streaming_llm original", methods.StreamingLLM(sinks=4, window=1024)),
]:
    with torch.no_grad(), contextlib.ExitStack() as st:
        cache = (
            DynamicCache(config=model.config) if m is None else st.enter_context(hf.use(model, m))
        )
        model(ids[:, :P], past_key_values=cache, logits_to_keep=1)
        for t in range(P, P + W):
            model(ids[:, t : t + 1], past_key_values=cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for t in range(P + W, P + W + 8):
                model(ids[:, t : t + 1], past_key_values=cache)
    n = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    print(f"EVENTS {pkg} {label}: {n / 8 / 30:.1f} aten events / layer / token", flush=True)
