"""The hybrids inside the real model: perplexity of a held-out real-text window and the whole
model's forward time, each method through ``hf.use`` against the model's own sdpa, in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/hybrid_ppl.py --length 2048 \
        --json docs/runs/issue16/hybrid_ppl_2k.json

``--prefill-repeats N`` adds the measure of ``longattn bench prefill --model`` (which times plan
methods only): the window's last 128 tokens held out as a continuation scored by the model's own
dense attention after the method's prefill of the rest (``continuation_ppl``, against the same
after a dense prefill), and the whole-model prefill (last position's logits, as generation's
prefill) timed against the model's sdpa, the runs taken in turn, median of N.
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
    parser.add_argument("--prefill-repeats", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", args.length, 31_337)])
    specs = args.methods.split(";") if ";" in args.methods else list(METHODS)
    rows = [{"method": "sdpa", **dict(zip(("ppl", "s"), score(model, ids)))}]
    print(rows[-1], flush=True)
    for spec in specs:
        ppl, seconds = score(model, ids, from_string(spec))
        rows.append({"method": spec, "ppl": ppl, "s": seconds})
        print(rows[-1], flush=True)
    base = rows[0]
    for row in rows:
        row["ppl_vs_sdpa"] = row["ppl"] / base["ppl"]
        row["time_vs_sdpa"] = row["s"] / base["s"]
    if args.prefill_repeats:
        prefill_facts(model, ids, specs, rows, args.prefill_repeats)
    result = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "length": args.length, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


def prefill_facts(model, ids, specs, rows, repeats: int) -> None:
    """Into each row: the continuation's perplexity after the method's prefill and the prefill's
    median time over sdpa's, both against the model's own attention."""
    import contextlib

    from longattn.integrations.hf import use

    prompt, cont = ids[:, :-CONTINUATION], ids[:, -CONTINUATION:]

    def run_in_use(spec):
        with use(model, from_string(spec)):
            prefill_pass(model, prompt)

    runs = {"sdpa": lambda: prefill_pass(model, prompt)}
    runs.update({spec: lambda s=spec: run_in_use(s) for spec in specs})
    times = _interleaved(runs, repeats)
    dense = continuation_ppl(model, contextlib.nullcontext(), prompt, cont)
    for row in rows:
        name = row["method"]
        ppl = dense if name == "sdpa" else continuation_ppl(model, use(model, from_string(name)), prompt, cont)  # fmt: skip
        row.update(cont_ppl=ppl, cont_ppl_vs_sdpa=ppl / dense, prefill_ms=times[name],
                   prefill_speedup=times["sdpa"] / times[name])  # fmt: skip
        print(name, {k: row[k] for k in ("cont_ppl_vs_sdpa", "prefill_speedup")}, flush=True)


if __name__ == "__main__":
    main()
