"""The hybrids inside the real model: perplexity of a held-out real-text window and the whole
model's forward time, each method through ``hf.use`` against the model's own sdpa, in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/hybrid_ppl.py --length 2048 \
        --json docs/runs/issue16/hybrid_ppl_2k.json
"""

from __future__ import annotations

import argparse
import json

import torch

from longattn import from_string
from longattn.bench.common import cpu_line
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(METHODS), help="';'-separated specs")
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
    result = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "length": args.length, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
