"""StreamingLLM over a long real text on the embedded SmolLM2-135M (arXiv:2309.17453, section 4.1).

Feeds ``--tokens`` tokens of offline text (stdlib Python docs, then Debian's licenses if more is
needed) in ``--chunk``-token calls through ``hf.use(model, StreamingLLM(sinks, window,
positions="cache"))``, past the model's 8,192 positions, and records per ``--segment`` tokens the
perplexity, the process RSS and the cache's bytes (used and allocated). Baselines in the same run:
window-only attention (``sinks=0``, expected to collapse once the first tokens leave the window) over
the same text, Infini-attention with segments of ``--window`` tokens (a compressive memory in place of
the evicted tokens, about the same bytes; ``positions="segment"``, so it too runs past the model's
positions), and, for speed, sliding-window recompute (each new token re-encodes the last
``window`` tokens from scratch with the model's own SDPA), timed on ``--speed-tokens`` tokens against
StreamingLLM fed the same tokens one at a time (interleaved rounds, so the ratio is like for like).
Gate: before any eviction the first chunk's logits agree with the model's own forward to 1e-5
relative to the largest logit.

    PYTHONPATH=. python benchmarks/streaming.py [--tokens 65536] [--out results/streaming]

Writes ``<variant>.jsonl`` (segments, RSS samples after every chunk, speed; appended as they come,
so a stopped run keeps its finished segments), ``streaming.md`` (tables) and ``streaming.png``
(per-segment perplexity and RSS over the run) under ``--out``. ``--variants`` picks the parts, so
they can run as parallel processes (``--variants ""`` only re-renders the report).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from longattn import hf
from longattn.bench.common import cpu_line, environment
from longattn.eval.models import load
from longattn.eval.text import leading_ids
from longattn.integrations.hf import attn_implementation
from longattn.methods import InfiniAttention, StreamingLLM

PAGE = 4096  # bytes of a page as /proc/self/statm counts them (x86-64 Linux)


def rss_mib() -> float:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * PAGE / 2**20


@torch.no_grad()
def stream(model, ids: torch.Tensor, method: StreamingLLM, args, write) -> None:
    """Feed ``ids`` in chunks; ``write`` gets each finished segment's perplexity and the RSS and cache
    samples taken after every chunk (so a run stopped early keeps its finished segments)."""
    chunk, segment = args.chunk, args.segment
    nll = torch.zeros(ids.shape[1] - 1, dtype=torch.float64)
    previous = None  # the logits of the last token of the previous chunk
    start = time.perf_counter()
    with hf.use(model, method) as cache:
        for lo in range(0, ids.shape[1], chunk):
            logits = model(ids[:, lo : lo + chunk], past_key_values=cache).logits[0].double()
            if previous is not None:
                logits = torch.cat([previous[None], logits])
            first = max(lo, 1)  # the first target of this call
            targets = ids[0, first : lo + chunk + 1]
            logp = torch.log_softmax(logits[: targets.numel()], dim=-1)
            nll[first - 1 : first - 1 + targets.numel()] = -logp.gather(1, targets[:, None])[:, 0]
            previous = logits[-1]
            fed = min(lo + chunk, ids.shape[1])
            seconds = time.perf_counter() - start
            write(
                {
                    "kind": "rss",
                    "tokens": fed,
                    "rss_mib": rss_mib(),
                    "cache_nbytes": cache.nbytes(),
                    "cache_capacity_nbytes": cache.capacity_nbytes(),
                    "seconds": seconds,
                }
            )
            if fed % segment == 0 or fed == ids.shape[1]:
                i = (fed - 1) // segment
                ppl = float(nll[i * segment : fed - 1].mean().exp())
                write(
                    {
                        "kind": "segment",
                        "segment": i,
                        "first_token": i * segment,
                        "ppl": ppl,
                        "tokens_per_s": fed / seconds,
                    }
                )
                print(
                    f"  {method.describe()}: {fed} tokens, ppl {ppl:.2f}, {seconds:.0f} s",
                    flush=True,
                )


@torch.no_grad()
def gate(model, ids: torch.Tensor, method: StreamingLLM) -> float:
    """max |logits difference| from the model's own forward over a prefix shorter than the window,
    relative to max |logits| (the model's float32 angles are replaced by float64 ones: ~1e-6)."""
    own = model(ids, use_cache=False).logits
    with hf.use(model, method) as cache:
        ours = model(ids, past_key_values=cache).logits
    return float((ours - own).abs().max() / own.abs().max())


@torch.no_grad()
def speed(model, ids: torch.Tensor, method: StreamingLLM, n_tokens: int, rounds: int) -> dict:
    """tokens/s of StreamingLLM fed one token at a time vs sliding-window recompute, on the same
    ``n_tokens`` tokens after a full window, in interleaved rounds."""
    window = method.window
    per_round = n_tokens // rounds
    t_stream = t_recompute = 0.0
    with hf.use(model, method) as cache:
        model(ids[:, :window], past_key_values=cache)
        for r in range(rounds):
            lo = window + r * per_round
            start = time.perf_counter()
            for t in range(lo, lo + per_round):
                model(ids[:, t : t + 1], past_key_values=cache)
            t_stream += time.perf_counter() - start
            start = time.perf_counter()
            with attn_implementation(model, "sdpa"):  # the model's own attention, no cache
                for t in range(lo, lo + per_round):
                    model(ids[:, t + 1 - window : t + 1], use_cache=False, logits_to_keep=1)
            t_recompute += time.perf_counter() - start
    n = per_round * rounds
    return {
        "tokens": n,
        "stream_tokens_per_s": n / t_stream,
        "recompute_tokens_per_s": n / t_recompute,
        "speedup": t_recompute / t_stream,
    }


def read_runs(out: pathlib.Path) -> tuple[dict[str, dict], dict | None]:
    """Per variant its segment and RSS records (from ``<variant>.jsonl``), and the speed record."""
    runs, fast = {}, None
    for name in VARIANTS:
        path = out / f"{name}.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if name == "speed":
            fast = records[-1] if records else None
            continue
        runs[name] = {
            "segments": [r for r in records if r["kind"] == "segment"],
            "samples": [r for r in records if r["kind"] == "rss"],
        }
    return runs, fast


def plot(path: pathlib.Path, runs: dict[str, dict], limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_rss) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, run in runs.items():
        seg = run["segments"]
        mid = [s["first_token"] + 2048 for s in seg]
        ax_ppl.plot(mid, [s["ppl"] for s in seg], "o-", label=name)
        sam = run["samples"]
        ax_rss.plot([s["tokens"] for s in sam], [s["rss_mib"] for s in sam], label=f"RSS, {name}")
        ax_rss.plot(
            [s["tokens"] for s in sam],
            [s["cache_capacity_nbytes"] / 2**20 for s in sam],
            "--",
            label=f"cache capacity, {name}",
        )
    for ax in (ax_ppl, ax_rss):
        ax.axvline(limit, color="grey", lw=0.8, ls=":")
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity per segment")
    ax_ppl.legend()
    ax_rss.set_ylabel("MiB")
    ax_rss.set_xlabel("tokens fed (dotted: the model's max_position_embeddings)")
    ax_rss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(run: dict, warmup: int) -> dict:
    seg, sam = run["segments"], run["samples"]
    after = [s["rss_mib"] for s in sam if s["tokens"] >= warmup] or [sam[-1]["rss_mib"]]
    return {
        "tokens": sam[-1]["tokens"],
        "first_ppl": seg[0]["ppl"],
        "worst_ratio": max(s["ppl"] for s in seg) / seg[0]["ppl"],
        "rss_warm_mib": after[0],
        "rss_max_mib": max(after),
        "rss_growth": max(after) / after[0] - 1,
        "cache_capacity_max": max(s["cache_capacity_nbytes"] for s in sam),
        "cache_nbytes_max": max(s["cache_nbytes"] for s in sam),
        "tokens_per_s": sam[-1]["tokens"] / sam[-1]["seconds"],
    }


def markdown(runs: dict, fast: dict | None, env: dict, args) -> str:
    names = list(runs)
    sums = {n: summary(runs[n], args.segment) for n in names}
    lines = [
        f"# StreamingLLM streaming run (chunks of {args.chunk}, segments of {args.segment})",
        "",
        f"CPU: {cpu_line(env)}, {env['threads']} threads, torch {env['torch']}, git {env['git_sha']}",
        "",
        "| segment | first token | " + " | ".join(f"{n} ppl | / first" for n in names) + " |",
        "|---|---|" + "---|---|" * len(names),
    ]
    longest = max(names, key=lambda n: len(runs[n]["segments"]))
    for i, s in enumerate(runs[longest]["segments"]):
        cells = []
        for n in names:
            seg = runs[n]["segments"]
            ok = i < len(seg)
            cells += (
                [f"{seg[i]['ppl']:.2f}", f"{seg[i]['ppl'] / seg[0]['ppl']:.3f}"]
                if ok
                else ["-"] * 2
            )
        lines.append(f"| {i} | {s['first_token']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| variant | tokens | worst segment / first | RSS after warm-up MiB | max MiB | growth | "
        "cache used / capacity max MiB | tokens/s (chunked) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        m = sums[n]
        lines.append(
            f"| {n} | {m['tokens']} | {m['worst_ratio']:.3f} | {m['rss_warm_mib']:.0f} | "
            f"{m['rss_max_mib']:.0f} | {100 * m['rss_growth']:.2f} % | "
            f"{m['cache_nbytes_max'] / 2**20:.1f} / {m['cache_capacity_max'] / 2**20:.1f} | "
            f"{m['tokens_per_s']:.1f} |"
        )
    if fast:
        lines += [
            "",
            f"Speed, one token at a time, {fast['tokens']} tokens after a full window "
            f"({fast['rounds']} interleaved rounds): StreamingLLM {fast['stream_tokens_per_s']:.3f} "
            f"tokens/s, sliding-window recompute (window {fast['window']}, the model's SDPA) "
            f"{fast['recompute_tokens_per_s']:.4f} tokens/s: **{fast['speedup']:.1f}x**.",
        ]
    return "\n".join(lines) + "\n"


VARIANTS = ("streaming_llm", "window_only", "infini_attention", "speed")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--speed-rounds", type=int, default=4)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="which parts to run (separate processes may run parts in parallel); none: report only",
    )
    p.add_argument("--out", default="results/streaming")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"CPU: {cpu_line(env)}, {env['threads']} threads, torch {env['torch']}", flush=True)
    wanted = [v for v in args.variants.split(",") if v]
    if wanted:
        run_parts(wanted, args, env, out)
    runs, fast = read_runs(out)
    if not runs:
        return
    text = markdown(runs, fast, env, args)
    (out / "streaming.md").write_text(text)
    plot(out / "streaming.png", runs, MAX_POSITIONS)
    print(text)


MAX_POSITIONS = 8192  # SmolLM2-135M's max_position_embeddings (the plot's marker)


def run_parts(wanted: list[str], args, env: dict, out: pathlib.Path) -> None:
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    model, tokenizer = load("smollm2-135m")
    ids = leading_ids(tokenizer, max(args.tokens, args.window + args.speed_tokens + 1))
    streaming = StreamingLLM(sinks=args.sinks, window=args.window, positions="cache")
    error = gate(model, ids[:, : args.chunk], streaming)
    print(f"gate: max |logits - model's own| / max |logits| = {error:.2e}", flush=True)
    if error > 1e-5:
        raise SystemExit(f"gate failed ({error:.2e} > 1e-5): no figures reported")
    methods = {
        "streaming_llm": streaming,
        "window_only": StreamingLLM(sinks=0, window=args.window, positions="cache"),
        # segment-local softmax + a compressive memory: at most ``window`` held tokens plus one
        # memory matrix per head, about StreamingLLM's ``sinks + window`` tokens of memory; tokens
        # rotated at their offsets inside their segment, so the stream is unbounded
        "infini_attention": InfiniAttention(segment=args.window, positions="segment"),
    }
    for name in wanted:
        path = out / f"{name}.jsonl"
        path.unlink(missing_ok=True)
        stamp = {"variant": name, "chunk": args.chunk, "gate": error, **env}

        def write(record: dict, path=path, stamp=stamp) -> None:
            with path.open("a") as fh:
                fh.write(json.dumps({**stamp, **record}) + "\n")

        if name == "speed":
            fast = speed(model, ids, streaming, args.speed_tokens, args.speed_rounds)
            write({"kind": "speed", "window": args.window, "rounds": args.speed_rounds, **fast})
        else:
            stamp["method"] = methods[name].describe()
            stream(model, ids[:, : args.tokens], methods[name], args, write)


if __name__ == "__main__":
    main()
