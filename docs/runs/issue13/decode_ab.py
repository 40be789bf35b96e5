"""Before / after per-token decode in one process, interleaved token by token
(``benchmarks/decode_overhead.py``'s ``interleaved``), the before code as a renamed copy of the
package (``longattn_before``: ``git archive <sha> longattn``, every ``longattn`` module path, the
extension names, the native-dir variable (``LONGATTN_BEFORE_NATIVE_DIR``) and the ``hf.use``
registration names renamed) under ``/tmp/dd2_before``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue13/decode_ab.py 1100 48
"""

# ruff: noqa: E402 -- packages chosen or put on the path at run time

import importlib.util
import json
import statistics
import sys

import torch

sys.path.insert(0, "/tmp/dd2_before")
spec = importlib.util.spec_from_file_location("decode_overhead", "benchmarks/decode_overhead.py")
do = importlib.util.module_from_spec(spec)
spec.loader.exec_module(do)
import longattn_before.integrations.hf as hf_b
from longattn_before.methods import Dense as DenseB
from longattn_before.methods import StreamingLLM as SB

from longattn import hf
from longattn.bench.common import cpu_line, environment
from longattn.eval.models import load
from longattn.eval.text import leading_ids
from longattn.methods import Dense, StreamingLLM

prompt, new, warm = int(sys.argv[1]), int(sys.argv[2]), 4
torch.set_num_threads(1)
model, tok = load("smollm2-135m")
model.set_attn_implementation("sdpa")
ids = leading_ids(tok, prompt + new)
chosen = {
    do.BASELINE: (None, None),
    "dense_before": (hf_b.use, DenseB()),
    "dense": (hf.use, Dense()),
    "streaming_llm_before": (hf_b.use, SB(sinks=4, window=1024, positions="cache")),
    "streaming_llm": (hf.use, StreamingLLM(sinks=4, window=1024, positions="cache")),
    "streaming_original_before": (hf_b.use, SB(sinks=4, window=1024)),
    "streaming_original": (hf.use, StreamingLLM(sinks=4, window=1024)),
}
runs = do.interleaved(model, ids, prompt, new, chosen)
env = environment()
print(f"CPU: {cpu_line(env)}, {env['threads']} threads, torch {env['torch']}")
for label in ("dense", "streaming_llm", "streaming_original"):
    print(
        label,
        "logits bit-identical before/after:",
        torch.equal(runs[label][1], runs[label + "_before"][1]),
    )
base = runs[do.BASELINE][0][warm:]
bm = statistics.median(base) * 1e3
print(
    f"{'variant':28s} {'ms/token':>9s} {'ms/layer over base':>18s} {'after/before (median of per-step ratios)':>10s}"
)
out = []
for label, (secs, _) in runs.items():
    ms = statistics.median(secs[warm:]) * 1e3
    line = f"{label:28s} {ms:9.1f} {(ms - bm) / 30:18.2f}"
    rec = {
        "variant": label,
        "ms_per_token": ms,
        "baseline_ms": bm,
        "ms_per_layer_over_baseline": (ms - bm) / 30,
        "steps": len(secs) - warm,
        "prompt": prompt,
    }
    if label + "_before" in runs:
        r = statistics.median(a / b for a, b in zip(secs[warm:], runs[label + "_before"][0][warm:]))
        line += f" {r:10.3f}"
        rec["after_over_before"] = r
    print(line)
    out.append(rec)
with open("/tmp/dd2_ab.jsonl", "w") as fh:
    for r in out:
        fh.write(
            json.dumps(
                {**r, **{k: env[k] for k in ("threads", "torch") if k in env}, "cpu": cpu_line(env)}
            )
            + "\n"
        )
