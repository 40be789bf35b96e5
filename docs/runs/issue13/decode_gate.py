"""Bit-identity gate for decode-path changes under ``hf.use``: the logits of a prefill, a chunk and
single-token steps past the first evictions, per method, saved so that two versions of the package
(before and after a change) can be compared with ``torch.equal``.

    # once per version (``--package`` names the importable copy, e.g. a renamed archive of the old code)
    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue13/decode_gate.py --out /tmp/after.pt
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old python docs/runs/issue13/decode_gate.py \
        --package longattn_before --out /tmp/before.pt
    python docs/runs/issue13/decode_gate.py --compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import argparse
import importlib

import torch

VARIANTS = {
    "dense": ("Dense", {}),
    "streaming_cache_1024": ("StreamingLLM", {"sinks": 4, "window": 1024, "positions": "cache"}),
    "streaming_original_1024": ("StreamingLLM", {"sinks": 4, "window": 1024}),
    "streaming_cache_64": ("StreamingLLM", {"sinks": 4, "window": 64, "positions": "cache"}),
    "sliding_window_100": ("SlidingWindow", {"window": 100}),
}


@torch.no_grad()
def logits_of(package: str, prompt: int, chunk: int, steps: int) -> dict[str, torch.Tensor]:
    """Per variant the logits [chunk + steps + 1, vocab]: the prompt's last token, every token of
    the chunk, then every single-token step."""
    hf = importlib.import_module(f"{package}.integrations.hf")
    methods = importlib.import_module(f"{package}.methods")
    models = importlib.import_module(f"{package}.eval.models")
    text = importlib.import_module(f"{package}.eval.text")
    model, tokenizer = models.load("smollm2-135m")
    ids = text.leading_ids(tokenizer, prompt + chunk + steps)
    out = {}
    for label, (name, kwargs) in VARIANTS.items():
        method = getattr(methods, name)(**kwargs)
        rows = []
        with hf.use(model, method) as cache:
            rows.append(model(ids[:, :prompt], past_key_values=cache).logits[0, -1:])
            rows.append(model(ids[:, prompt : prompt + chunk], past_key_values=cache).logits[0])
            for t in range(prompt + chunk, prompt + chunk + steps):
                rows.append(model(ids[:, t : t + 1], past_key_values=cache).logits[0])
        out[label] = torch.cat(rows)
        print(label, tuple(out[label].shape), flush=True)
    return out


def compare(before: str, after: str) -> bool:
    a, b = torch.load(before), torch.load(after)
    same = True
    for label in VARIANTS:
        equal = torch.equal(a[label], b[label])
        diff = float((a[label] - b[label]).abs().max())
        print(f"{label:26s} bit-identical={equal} max|diff|={diff:.3e}")
        same &= equal
    return same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--package", default="longattn")
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2)
    args = p.parse_args()
    if args.compare:
        raise SystemExit(0 if compare(*args.compare) else 1)
    torch.save(logits_of(args.package, args.prompt, args.chunk, args.steps), args.out)


if __name__ == "__main__":
    main()
