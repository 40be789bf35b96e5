"""The two halves of `longattn bench prefill --model smollm2-135m`, run apart: the whole-model
prefill time of the model's own sdpa against plan methods through `hf.use`, interleaved in one
process (needs a quiet machine), and with ``--facts`` the per-layer facts (density, recall, error vs
dense, the gate against the float64 oracle) and the continuation perplexity, which do not depend on
the machine's load (``--repeats 0`` skips the timing).

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/runs/issue14/time_model_prefill.py \
        --length 8192 --repeats 3 block_topk:budget=0.17,last_blocks=1
    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue14/time_model_prefill.py \
        --length 8192 --repeats 0 --facts block_topk:budget=0.17,last_blocks=1
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from longattn.bench.common import cpu_line
from longattn.bench.prefill import (
    CONTINUATION,
    GATE_ROWS,
    _in_use,
    _interleaved,
    continuation_ppl,
    layer_facts,
    prefill_pass,
    sample_rows,
)
from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv, use
from longattn.method import from_string


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="0: no timing")
    parser.add_argument("--facts", action="store_true", help="per-layer facts and perplexity")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, tokenizer = models.load("smollm2-135m")
    model.set_attn_implementation("sdpa")
    limit = int(model.config.max_position_embeddings)
    length = min(args.length, limit - CONTINUATION)
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", length + CONTINUATION, 0)])
    prompt, cont = ids[:, :length], ids[:, length:]
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"prompt {length} tokens (pydoc text window 0, as bench prefill)")
    with torch.no_grad():
        if args.repeats:
            timing(model, prompt, args.methods, args.repeats)
        if args.facts:
            facts(model, prompt, cont, args.methods)


def timing(model, prompt, specs, repeats) -> None:
    runs = {"sdpa": lambda: prefill_pass(model, prompt)}
    for spec in specs:
        method = from_string(spec)
        runs[spec] = lambda m=method: _in_use(model, m, prompt, use)
    times = _interleaved(runs, repeats)
    print(f"median of {repeats} interleaved repeats after one warm-up each")
    for name, ms in times.items():
        row = {"run": name, "ms": round(ms, 1), "x_sdpa": round(times["sdpa"] / ms, 3)}
        print(json.dumps(row), flush=True)


def facts(model, prompt, cont, specs) -> None:
    import contextlib

    captured = capture_qkv(model, prompt)
    rows = sample_rows(prompt.shape[1], min(GATE_ROWS, prompt.shape[1]))
    ppl_dense = continuation_ppl(model, contextlib.nullcontext(), prompt, cont)
    for spec in specs:
        method = from_string(spec)
        rec = layer_facts(method, captured, rows)
        ppl = continuation_ppl(model, use(model, method), prompt, cont)
        keep = ("density", "element_density", "recall", "rel_err_dense", "bound_used", "gate")
        row = {"run": spec, **{k: rec[k] for k in keep if k in rec}, "ppl": ppl,
               "ppl_dense": ppl_dense, "ppl_delta": ppl / ppl_dense - 1}  # fmt: skip
        print(json.dumps(row, default=float), flush=True)


if __name__ == "__main__":
    main()
