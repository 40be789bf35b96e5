"""The real model under ``longattn.hf.use(model, Dense())`` against its own ``sdpa``, in the same run.

Prefill: one forward over ``--prefill`` tokens (last-token logits only), without a cache and into
the cache that ``use()`` yields (transformers' ``DynamicCache`` for sdpa). Decode: ``--new`` greedy
single-token steps after a ``--prompt``-token prefill, timing the steps only. Runs alternate between
the two implementations; medians are reported. The gate: last-token logits agree to 1e-4 and the
greedy tokens are identical, else no timing is reported.

    PYTHONPATH=. python benchmarks/hf_use.py [--prefill 4096] [--prompt 2048] [--new 64] [--rounds 3]
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
from longattn.bench.common import ImplLog, cpu_line, environment, format_table
from longattn.eval.models import load
from longattn.eval.text import leading_ids
from longattn.methods import Dense


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache=None) -> tuple[float, torch.Tensor]:
    """Seconds for one forward over ``ids`` (into ``cache``, or with no cache at all)."""
    start = time.perf_counter()
    if cache is None:
        logits = model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    else:
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return time.perf_counter() - start, logits


@torch.no_grad()
def decode(model, ids: torch.Tensor, n_new: int, cache) -> tuple[float, list[int]]:
    """Seconds for ``n_new`` greedy single-token steps after prefilling ``ids`` into ``cache``."""
    next_id = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
    out = [int(next_id)]
    start = time.perf_counter()
    for _ in range(n_new - 1):
        logits = model(next_id[:, None], past_key_values=cache).logits[:, -1]
        next_id = logits.argmax(-1)
        out.append(int(next_id))
    return time.perf_counter() - start, out


def implementations(log: ImplLog) -> str:
    """What ran longattn's attention in a phase (its decode step includes the prompt's prefill):
    the implementations ``impl="auto"`` chose, with counts; a call that names no auto choice is
    ``integrations.hf``'s explicit ``impl="sdpa"`` for dense prefill without a cache."""
    if not log.chosen:
        return "sdpa (explicit)"
    return ", ".join(f"{name} x{count}" for name, count in log.chosen.items())


def run(model, tokenizer, n_prefill: int, n_prompt: int, n_new: int, rounds: int) -> list[dict]:
    from transformers import DynamicCache

    long_ids, prompt_ids = leading_ids(tokenizer, n_prefill), leading_ids(tokenizer, n_prompt)
    times: dict[tuple[str, str], list[float]] = {}
    logits, greedy = {}, {}
    warm = long_ids[:, :256]
    with hf.use(model, Dense()):
        prefill(model, warm)
    prefill(model, warm)
    ran: dict[str, ImplLog] = {phase: ImplLog() for phase in ("prefill", "prefill+cache", "decode")}
    for _ in range(rounds):
        for impl in ("longattn", "sdpa"):
            block = hf.use(model, Dense()) if impl == "longattn" else None
            with block if block else contextlib.nullcontext(), ran["prefill"]:
                t_pre, logits[impl] = prefill(model, long_ids)
            for phase, ids in (("prefill+cache", long_ids), ("decode", prompt_ids)):
                # a fresh cache per phase: use()'s own, or transformers' DynamicCache for sdpa
                block = hf.use(model, Dense()) if impl == "longattn" else None
                with block if block else contextlib.nullcontext() as cache, ran[phase]:
                    cache = cache if block else DynamicCache(config=model.config)
                    if phase == "decode":
                        t_dec, greedy[impl] = decode(model, ids, n_new, cache)
                    else:
                        t_pc, logits[impl + "+cache"] = prefill(model, ids, cache)
            times.setdefault(("prefill", impl), []).append(t_pre)
            times.setdefault(("prefill+cache", impl), []).append(t_pc)
            times.setdefault(("decode", impl), []).append(t_dec)
    max_diff = max(
        (logits[f"longattn{c}"] - logits[f"sdpa{c}"]).abs().max().item() for c in ("", "+cache")
    )
    same_tokens = greedy["longattn"] == greedy["sdpa"]
    if max_diff > 1e-4 or not same_tokens:
        raise SystemExit(f"gate failed: logits max diff {max_diff:.2e}, same tokens {same_tokens}")
    sizes = {"prefill": (n_prefill, n_prefill), "prefill+cache": (n_prefill, n_prefill),
             "decode": (n_prompt, n_new - 1)}  # fmt: skip
    return [_row(phase, sizes[phase], times, ran[phase], max_diff) for phase in sizes]


def _row(phase: str, sizes: tuple[int, int], times: dict, ran: ImplLog, max_diff: float) -> dict:
    """One phase's JSONL record: medians of ours and of the baseline from the same rounds."""
    ours = statistics.median(times[(phase, "longattn")])
    base = statistics.median(times[(phase, "sdpa")])
    return {
        "bench": "hf_use",
        "phase": phase,
        "context": sizes[0],
        "tokens": sizes[1],
        "ms": ours * 1e3,
        "baseline": "hf_sdpa",
        "baseline_ms": base * 1e3,
        "ratio": ours / base,
        "runs": times[(phase, "longattn")],
        "baseline_runs": times[(phase, "sdpa")],
        "logits_max_diff": max_diff,
        "impl": implementations(ran),
        **environment(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = load(args.model)
    model.set_attn_implementation("sdpa")
    rows = run(model, tokenizer, args.prefill, args.prompt, args.new, args.rounds)
    columns = [
        ("phase", "phase"),
        ("context", "context"),
        ("tokens", "tokens"),
        ("ms", "longattn ms"),
        ("baseline_ms", "sdpa ms"),
        ("ratio", "ratio"),
        ("impl", "longattn impl"),
    ]
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(format_table(rows, columns))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
