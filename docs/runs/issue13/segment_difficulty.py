"""How hard each 4K segment of the 64K streaming text is on its own: the model's dense perplexity
over each segment read as a fresh sequence (positions 0..4095, under the model's 8,192), beside
StreamingLLM's perplexity of the same segment in the stream (``streaming.md``'s table, the run of
``benchmarks/streaming.py --tokens 65536``). The text is heterogeneous (the stdlib's docs, then
licenses), so a segment's perplexity moves with its text; the ratio of the two columns is what the
stream adds.

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/runs/issue13/segment_difficulty.py
"""

import pathlib
import re

import torch

from longattn.bench.common import cpu_line
from longattn.eval.models import load
from longattn.eval.text import leading_ids

HERE = pathlib.Path(__file__).parent
SEGMENT, TOKENS = 4096, 65536


def streamed() -> list[float]:
    """StreamingLLM's per-segment perplexities from ``streaming.md``."""
    rows = re.findall(r"^\| (\d+) \| \d+ \| ([\d.]+) \|", (HERE / "streaming.md").read_text(), re.M)
    return [float(ppl) for _, ppl in rows]


@torch.no_grad()
def main() -> None:
    model, tokenizer = load("smollm2-135m")
    ids = leading_ids(tokenizer, TOKENS)[:, :TOKENS]
    stream = streamed()
    print(cpu_line())
    print(
        "| segment | StreamingLLM ppl | / first | dense ppl, segment alone | / first | ratio | / first |"
    )
    print("|---|---|---|---|---|---|---|")
    first = None
    for i, ppl in enumerate(stream):
        part = ids[:, i * SEGMENT : (i + 1) * SEGMENT]
        logits = model(part, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, part[0, 1:])
        alone = float(nll.exp())
        row = (ppl, alone, ppl / alone)
        first = first or row
        print(f"| {i} | {ppl:.2f} | {ppl / first[0]:.3f} | {alone:.2f} | {alone / first[1]:.3f} | "
              f"{row[2]:.3f} | {row[2] / first[2]:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
