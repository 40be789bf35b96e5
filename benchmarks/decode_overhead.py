"""Per-token decode of the embedded SmolLM2-135M: ``hf.use`` against the model's own SDPA with
transformers' ``DynamicCache``, interleaved token by token in one process.

Every variant gets its own cache, filled with the same ``--prompt`` tokens of offline text (not
timed); then the next ``--new`` tokens are fed one at a time, each step to every variant in turn
(the order rotates each step), so a change in the machine's load hits every variant alike. Reported:
median ms per token and its ratio to the baseline's median from the same steps, and ms per layer
above the baseline (the model has 30 layers; the MLPs and the LM head are the same work in every
variant). Variants: ``dense`` (``Dense()``), ``streaming_llm`` (sinks 4, window ``--window``, the
cache frame, ``positions="cache"``, as ``benchmarks/streaming.py`` runs it) and
``streaming_original`` (original positions). Gate: ``dense``'s logits equal the baseline's to 1e-4
relative to the largest logit at every step, else no timing is reported.

    PYTHONPATH=. python benchmarks/decode_overhead.py [--prompt 1100] [--new 64] [--window 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import time

import torch

from longattn import hf
from longattn.bench.common import cpu_line, environment
from longattn.eval.models import load
from longattn.eval.text import leading_ids
from longattn.integrations.hf import attn_implementation
from longattn.methods import Dense, StreamingLLM

BASELINE = "hf_dynamic_cache"


def variants(window: int, use=hf.use) -> dict:
    """label -> (the ``use`` context manager, method); the baseline has none."""
    return {
        BASELINE: (None, None),
        "dense": (use, Dense()),
        "streaming_llm": (use, StreamingLLM(sinks=4, window=window, positions="cache")),
        "streaming_original": (use, StreamingLLM(sinks=4, window=window)),
    }


@torch.no_grad()
def interleaved(model, ids: torch.Tensor, prompt: int, n_new: int, chosen: dict) -> dict:
    """Per variant its per-step seconds and last-token logits [n_new, vocab], steps interleaved."""
    from transformers import DynamicCache

    seconds = {label: [] for label in chosen}
    logits = {label: [] for label in chosen}
    with contextlib.ExitStack() as stack:
        caches, names = {}, {}
        for label, (use, method) in chosen.items():
            if use is None:
                caches[label], names[label] = DynamicCache(config=model.config), "sdpa"
            else:
                caches[label] = stack.enter_context(use(model, method))
                names[label] = model.config._attn_implementation
            with attn_implementation(model, names[label]):
                model(ids[:, :prompt], past_key_values=caches[label], logits_to_keep=1)
        labels = list(chosen)
        for step in range(n_new):
            t = prompt + step
            shift = step % len(labels)
            for label in labels[shift:] + labels[:shift]:
                with attn_implementation(model, names[label]):
                    start = time.perf_counter()
                    out = model(ids[:, t : t + 1], past_key_values=caches[label]).logits
                    seconds[label].append(time.perf_counter() - start)
                logits[label].append(out[0, -1])
    return {label: (seconds[label], torch.stack(logits[label])) for label in chosen}


def rows(runs: dict, n_layers: int, warmup: int) -> list[dict]:
    """One record per variant: median ms per token (after ``warmup`` steps) and vs the baseline."""
    base = statistics.median(runs[BASELINE][0][warmup:]) * 1e3
    out = []
    for label, (secs, _) in runs.items():
        ms = statistics.median(secs[warmup:]) * 1e3
        out.append(
            {
                "bench": "decode_overhead",
                "variant": label,
                "ms_per_token": ms,
                "baseline_ms_per_token": base,
                "ratio": ms / base,
                "ms_per_layer_over_baseline": (ms - base) / n_layers,
                "steps": len(secs) - warmup,
            }
        )
    return out


def gate(runs: dict) -> float:
    """max |dense logits - baseline logits| / max |baseline logits| over the steps."""
    ours, base = runs["dense"][1], runs[BASELINE][1]
    return float((ours - base).abs().max() / base.abs().max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=1100)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSONL file to append to")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load("smollm2-135m")
    model.set_attn_implementation("sdpa")
    ids = leading_ids(tokenizer, args.prompt + args.new)
    runs = interleaved(model, ids, args.prompt, args.new, variants(args.window))
    error = gate(runs)
    if error > 1e-4:
        raise SystemExit(f"gate failed: dense logits differ from the baseline by {error:.2e}")
    env = environment()
    print(f"CPU: {cpu_line(env)}, {env['threads']} threads, torch {env['torch']}")
    print(f"gate: dense vs {BASELINE}, max |logits diff| / max |logits| = {error:.2e}")
    print(f"{'variant':20s} {'ms/token':>9s} {'ratio':>6s} {'ms/layer over':>14s}")
    for row in rows(runs, model.config.num_hidden_layers, args.warmup):
        print(
            f"{row['variant']:20s} {row['ms_per_token']:9.1f} {row['ratio']:6.2f} "
            f"{row['ms_per_layer_over_baseline']:14.2f}"
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                record = {**row, "prompt": args.prompt, "window": args.window, "gate": error}
                fh.write(json.dumps({**record, **env}) + "\n")


if __name__ == "__main__":
    main()
