"""The Combiner rows of ``longattn bench hybrid-error`` alone (every factorisation, axial
included), on the same captured SmolLM2-135M q/k/v as the full run: T = 2048 tokens of pydoc
text, layers 2, 10, 18, 26.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/hybrid_error_combiner.py OUT.md
"""

import sys

import torch

from longattn.bench.common import cpu_line
from longattn.bench.hybrid_error import DEFAULT_LAYERS, measure, table
from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv


def main(out: str) -> None:
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", 2048, 0)])
    captured = capture_qkv(model, ids, layers=list(DEFAULT_LAYERS))
    records = measure(captured, families=("combiner",))
    lines = [
        "# Combiner vs its direct part: output error vs softmax on captured SmolLM2-135M q/k/v",
        "",
        "- command: `OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/hybrid_error_combiner.py`",
        f"- T=2048, layers {list(DEFAULT_LAYERS)}, pydoc text; CPU: {cpu_line()}; torch {torch.__version__}",
        "- error: |out - softmax|_F / |softmax|_F, mean over the layers; sparse alone: softmax inside",
        "  each query's region (the direct part); vs best part = hybrid / sparse alone",
        "",
        *table(records),
    ]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
