"""The hybrids inside the real model: perplexity of a held-out real-text window and the whole
model's forward time, each method through ``hf.use`` against the model's own sdpa, in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/hybrid_ppl.py --length 2048 \
        --json docs/runs/issue16/hybrid_ppl_2k.json

``--continuation`` and ``--prefill-repeats N`` add the measures of ``longattn bench prefill
--model`` (which runs plan methods only): the window's last 128 tokens held out as a continuation
scored by the model's own dense attention after the method's prefill of the rest
(``continuation_ppl``, against the same after a dense prefill); the whole-model prefill (the last
position's logits, as generation's prefill) timed against the model's sdpa, the runs taken in
turn, median of N. ``--seed`` picks another held-out window, ``--no-prompt`` skips the prompt's
own perplexity.
"""

from __future__ import annotations

import argparse
import json

import torch

from longattn import from_string
from longattn.bench.common import cpu_line
from longattn.bench.prefill import CONTINUATION, _interleaved, continuation_ppl, prefill_pass
from longattn.eval import tasks
from longattn.eval.models import load
from longattn.eval.runner import forward_perplexity as score

METHODS = (
    "sla:critical=0.1,marginal=0.9,feature=elu",
    "sla:critical=0.1,marginal=0.9",
    "sla:critical=0.1,marginal=0.0",
    "combiner:region=64",
    "combiner:region=64,factorization=logsparse",
    "scatterbrain:n_features=128,sparse=topk_blocks,block_size=64,n_blocks=8",
    "sea:top_k=256",
    "infini_attention:segment=512",
    "streaming_llm:sinks=64,window=448",
    "block_topk:budget=0.2",
)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(METHODS), help="';'-separated specs")
    parser.add_argument("--seed", type=int, default=31_337, help="the held-out window's seed")
    parser.add_argument("--no-prompt", action="store_true", help="skip the prompt perplexity")
    parser.add_argument("--continuation", action="store_true", help="the continuation measure")
    parser.add_argument("--prefill-repeats", type=int, default=0, help="time the prefills")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", args.length, args.seed)])
    specs = args.methods.split(";") if ";" in args.methods else list(METHODS)
    rows = [{"method": name} for name in ("sdpa", *specs)]
    if not args.no_prompt:
        prompt_facts(model, ids, rows)
    if args.continuation:
        continuation_facts(model, ids, rows)
    if args.prefill_repeats:
        prefill_times(model, ids, rows, args.prefill_repeats)
    result = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "length": args.length, "seed": args.seed, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


def _method(name: str):
    return None if name == "sdpa" else from_string(name)


def prompt_facts(model, ids, rows) -> None:
    """Into each row: the prompt's own perplexity (every position under the method) and the
    forward's time, against the model's sdpa."""
    for row in rows:
        row["ppl"], row["s"] = score(model, ids, _method(row["method"]))
        row["ppl_vs_sdpa"] = row["ppl"] / rows[0]["ppl"]
        row["time_vs_sdpa"] = row["s"] / rows[0]["s"]
        print(row, flush=True)


def continuation_facts(model, ids, rows) -> None:
    """Into each row: the continuation's perplexity after the method's prefill, scored by the
    model's own dense attention, against the same after a dense prefill."""
    import contextlib

    from longattn.integrations.hf import use

    prompt, cont = ids[:, :-CONTINUATION], ids[:, -CONTINUATION:]
    for row in rows:
        method = _method(row["method"])
        context = contextlib.nullcontext() if method is None else use(model, method)
        row["cont_ppl"] = continuation_ppl(model, context, prompt, cont)
        row["cont_ppl_vs_sdpa"] = row["cont_ppl"] / rows[0]["cont_ppl"]
        print(row["method"], "continuation", row["cont_ppl_vs_sdpa"], flush=True)


def prefill_times(model, ids, rows, repeats: int) -> None:
    """Into each row: the whole-model prefill's median time (the runs taken in turn) and sdpa's
    over it."""
    from longattn.integrations.hf import use

    prompt = ids[:, :-CONTINUATION]

    def run_in_use(method):
        with use(model, method):
            prefill_pass(model, prompt)

    runs = {"sdpa": lambda: prefill_pass(model, prompt)}
    methods = {row["method"]: _method(row["method"]) for row in rows[1:]}
    runs.update({name: lambda m=method: run_in_use(m) for name, method in methods.items()})
    times = _interleaved(runs, repeats)
    for row in rows:
        row["prefill_ms"] = times[row["method"]]
        row["prefill_speedup"] = times["sdpa"] / times[row["method"]]
        print(row["method"], "prefill speedup", row["prefill_speedup"], flush=True)


if __name__ == "__main__":
    main()
