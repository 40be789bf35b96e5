"""The figures of docs/runs/issue15/distill.md: a distilled model (``longattn distill``) against the
original on held-out text, and its decode memory.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue15/distill_measure.py \
        runs/hedgehog_smollm2.safetensors --lengths 2048,8192 --json docs/runs/issue15/distill.json

Perplexity of held-out windows (disjoint from the distillation's training windows) under the
model's own sdpa attention, the sliding window alone, the sinks and the window alone (the
converted model without its linear part) and the converted model through
``hf.use(model, Hedgehog(calibration=..., window=W, sinks=S))``;
then the bytes the cache holds while decoding one token at a time past the window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time

import torch

from longattn.calibration import Calibration
from longattn.eval import distill as D
from longattn.eval.metrics import kv_bytes, kv_capacity_bytes
from longattn.eval.models import load
from longattn.eval.runner import forward_perplexity as score
from longattn.integrations.hf import use
from longattn.methods.hedgehog import Hedgehog
from longattn.methods.sliding_window import SlidingWindow
from longattn.methods.streaming_llm import StreamingLLM


def cpu_line() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(wanted)})"


@torch.no_grad()
def decode_memory(model, ids: torch.Tensor, method, prefill: int, every: int) -> dict:
    """While decoding ``ids`` one token at a time after a ``prefill``-token prompt: ``points``
    [(tokens seen, bytes of keys/values held, bytes allocated)] and ``tokens_per_s`` (the whole
    model's decode steps, the points' bookkeeping excluded)."""
    points, seconds = [], 0.0
    with use(model, method) as cache:
        model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        for t in range(prefill, ids.shape[1]):
            start = time.perf_counter()
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            seconds += time.perf_counter() - start
            if (t + 1 - prefill) % every == 0:
                points.append([t + 1, kv_bytes(cache), kv_capacity_bytes(cache)])
    return {"points": points, "tokens_per_s": (ids.shape[1] - prefill) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("calibration")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--decode", type=int, default=128, help="decode steps (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cal = Calibration.load(args.calibration)
    fields = {f.name for f in dataclasses.fields(D.DistillSettings)}
    settings = D.DistillSettings(**{k: v for k, v in cal.params.items() if k in fields})
    model, tokenizer = load(settings.model)
    D.check_calibration(cal, model.config)
    train = D.disjoint_windows(tokenizer, settings.corpus, settings.length, settings.windows,
                               seed=settings.seed)  # fmt: skip
    hedgehog = Hedgehog(calibration=args.calibration, window=settings.window, sinks=settings.sinks)
    alone = [("window", SlidingWindow(window=settings.window))]
    if settings.sinks:
        alone.append(("sinks+window", StreamingLLM(sinks=settings.sinks, window=settings.window)))
    result = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "calibration": args.calibration, "train_s": cal.params.get("train_s"),
              "mse": cal.params.get("mse"), "ppl": {}}  # fmt: skip
    for length in (int(x) for x in args.lengths.split(",")):
        seed = D.HELDOUT_SEED + 1000 + length  # not the per-layer held-out window either
        held = D.disjoint_windows(tokenizer, settings.corpus, length, 1, train, seed=seed)
        ids = torch.tensor(held)
        row = {}
        for name, method in [("sdpa", None), *alone, ("hedgehog", hedgehog)]:
            ppl, seconds = score(model, ids, method)
            row[name] = {"ppl": ppl, "s": seconds}
            print(f"{length} {name}: ppl {ppl:.3f} ({seconds:.1f} s)", flush=True)
        result["ppl"][length] = row
    if args.decode:
        ids = torch.tensor(D.disjoint_windows(tokenizer, settings.corpus, 512 + args.decode, 1,
                                              train, seed=D.HELDOUT_SEED + 99))  # fmt: skip
        every = max(args.decode // 8, 1)
        result["decode"] = {
            "hedgehog": decode_memory(model, ids, hedgehog, 512, every),
            "dense": decode_memory(model, ids, "dense", 512, every),
        }
        print(json.dumps(result["decode"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
