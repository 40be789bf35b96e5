"""The ``longattn`` command: ``bench``, ``docs``, ``eval``, ``plot``, ``analyze``, ``calibrate`` and
``distill``."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import torch

from longattn.eval.commands import positive_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# bench suites: name -> "module:function"; each function takes the parsed arguments, returns an exit code
BENCH_SUITES = {
    "methods": "longattn.bench.methods:run_cli",
    "decode": "longattn.bench.decode:run_cli",
    "evict": "longattn.bench.evict:run_cli",
    "fidelity": "longattn.eval.fidelity:run_cli",
    "kernels": "longattn.bench.kernels:run_cli",
    "linear": "longattn.bench.linear:run_cli",
    "prefill": "longattn.bench.prefill:run_cli",
    "linear-error": "longattn.bench.linear_error:run_cli",
    "sla-error": "longattn.bench.sla_error:run_cli",
    "infini-memory": "longattn.bench.infini_memory:run_cli",
    "ring": "longattn.bench.ring:run_cli",
    "hybrid-error": "longattn.bench.hybrid_error:run_cli",
}


# the block size of `bench kernels`' layouts: its lengths must be whole blocks
KERNELS_BLOCK = 128


def _bench_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a bench command line that argparse cannot see (None: nothing)."""
    if args.dtypes is not None:
        bad = [d for d in args.dtypes.split(",") if d.strip() not in DTYPES]
        if bad:
            return f"--dtypes: unknown dtype(s) {bad}; known: {', '.join(sorted(DTYPES))}"
    if args.suite == "kernels" and args.length is not None and args.length % KERNELS_BLOCK:
        return f"bench kernels --length must be a multiple of {KERNELS_BLOCK}, got {args.length}"
    if args.lengths is not None:
        bad = [x for x in args.lengths.split(",") if not x.strip().isdigit() or int(x) <= 0]
        if bad:
            return f"--lengths: not positive integers: {bad}"
    if args.shapes is not None:
        from longattn.bench.prefill import SHAPES

        bad = [s for s in args.shapes.split(",") if s.strip() not in SHAPES]
        if bad:
            return f"--shapes: unknown {bad}; known: {', '.join(SHAPES)}"
    return None


def _bench(args: argparse.Namespace) -> int:
    module, _, func = BENCH_SUITES[args.suite].partition(":")
    return getattr(importlib.import_module(module), func)(args)


def _docs(args: argparse.Namespace) -> int:
    from longattn.docgen import methods_markdown

    text = methods_markdown()
    if args.out:
        try:
            pathlib.Path(args.out).write_text(text)
        except OSError as exc:
            print(
                f"longattn docs: error: cannot write {args.out!r}: {exc.strerror}", file=sys.stderr
            )
            return 2
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="speed and error against baselines timed in the same run")
    bench.add_argument(
        "suite",
        nargs="?",
        default="methods",
        choices=sorted(BENCH_SUITES),
        help="methods (default): every registered method against dense SDPA; kernels: the "
        "block-sparse kernel against causal SDPA and compiled Flex; linear-error: linear "
        "methods against the real model's softmax attention, per layer; ring: ring attention "
        "under `torchrun --nproc-per-node N` (contiguous, striped, zig-zag); hybrid-error: the "
        "sparse + low-rank hybrids against their two parts alone",
    )
    bench.add_argument("--quick", action="store_true", help="fewer repeats (the demo preset)")
    bench.add_argument(
        "--length", type=positive_int, default=None, help="sequence length (default 8192)"
    )
    bench.add_argument("--heads", type=positive_int, default=8)
    bench.add_argument("--dim", type=positive_int, default=64)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--out", default=None, help="JSONL file to append results to")
    bench.add_argument(
        "--methods",
        default=None,
        help="evict suite: comma-separated eviction methods (default: every registered one "
        "without a calibration file, plus streaming_llm); prefill suite: plan methods (default: "
        "every registered one, plus block_topk at --budgets)",
    )
    bench.add_argument(
        "--budgets",
        default=None,
        help="evict suite: comma-separated kept fractions (0.5,0.25,0.1); prefill suite: "
        "block_topk budgets (0.1,0.2)",
    )
    bench.add_argument(
        "--memory-length",
        type=positive_int,
        default=32768,
        help="length of the tiled executor's peak-memory check (methods suite)",
    )
    bench.add_argument(
        "--sdpa-max",
        type=positive_int,
        default=32768,
        help="linear suite: the longest T that causal SDPA is timed at (beyond: T^2 extrapolation)",
    )
    bench.add_argument(
        "--layers",
        default=None,
        help="hybrid-error and sla-error suites: comma-separated model layers to capture "
        "(default: hybrid-error 2,10,18,26, sla-error every layer)",
    )
    bench.add_argument("--no-flex", action="store_true", help="kernels suite: skip compiled Flex")
    bench.add_argument(
        "--efficiency",
        action="store_true",
        help="kernels suite: the bf16 efficiency grid (8K and 32K, random 25%% and 10%%, 8 heads "
        "d=64 and 32/8 heads d=128; --quick: 8K only) and its of-ideal table",
    )
    bench.add_argument(
        "--dtypes", default=None, help="kernels suite: comma-separated dtypes (default both)"
    )
    bench.add_argument(
        "--cases",
        default=None,
        help="kernels suite: comma-separated case labels to run (substring match, e.g. '10%%,window')",
    )
    bench.add_argument(
        "--synthetic",
        action="store_true",
        help="prefill suite: random inputs at 32K/64K (the default without --model)",
    )
    bench.add_argument(
        "--model", default=None, help="prefill suite: a real model by name (smollm2-135m)"
    )
    bench.add_argument(
        "--lengths", default=None, help="prefill suite: comma-separated prompt lengths"
    )
    bench.add_argument(
        "--shapes",
        default=None,
        help="prefill suite: comma-separated head shapes of the synthetic mode (default "
        "32/8/d128,8/8/d64); kernels suite: the shapes of the grid (H/Hkv/dD)",
    )
    bench.set_defaults(func=_bench)
    docs = sub.add_parser("docs", help="generate the method reference (docs/methods.md)")
    docs.add_argument("--out", default=None)
    docs.set_defaults(func=_docs)
    _add_eval_commands(sub)
    return parser


def _add_eval_commands(sub) -> None:
    from longattn.eval import commands  # argparse and the presets only; heavy imports stay lazy

    ev = sub.add_parser(
        "eval", help="a method on a real model: accuracy, speed and memory, offline"
    )
    commands.add_eval_arguments(ev)
    ev.set_defaults(func=commands.run_eval_command)
    plot = sub.add_parser("plot", help="re-render the report and plots of a results folder")
    plot.add_argument("folder")
    plot.set_defaults(func=commands.run_plot_command)
    an = sub.add_parser(
        "analyze", help="per-head attention statistics of a real model (JSON + PNG)"
    )
    commands.add_analyze_arguments(an)
    an.set_defaults(func=commands.run_analyze_command)
    commands.add_calibrate_commands(sub)
    from longattn.eval import distill

    dist = sub.add_parser("distill", help="attention transfer to Hedgehog maps (resumable)")
    distill.add_arguments(dist)
    dist.set_defaults(func=distill.run_command)


def main(argv: list[str] | None = None) -> int:
    """Run the command; usage errors print one line and return 2 (argparse's own exit 2)."""
    args = build_parser().parse_args(argv)
    problem = _bench_problem(args) if args.command == "bench" else None
    if problem:
        print(f"longattn bench: error: {problem}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
