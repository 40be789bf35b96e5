"""The ``longattn`` command: ``bench``, ``docs``, ``eval``, ``plot`` and ``analyze``."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# bench suites: name -> "module:function"; each function takes the parsed arguments, returns an exit code
BENCH_SUITES = {
    "methods": "longattn.bench.methods:run_cli",
    "decode": "longattn.bench.decode:run_cli",
    "fidelity": "longattn.eval.fidelity:run_cli",
    "kernels": "longattn.bench.kernels:run_cli",
}


def _bench(args: argparse.Namespace) -> int:
    module, _, func = BENCH_SUITES[args.suite].partition(":")
    return getattr(importlib.import_module(module), func)(args)


def _docs(args: argparse.Namespace) -> int:
    from longattn.docgen import methods_markdown

    text = methods_markdown()
    if args.out:
        pathlib.Path(args.out).write_text(text)
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
        "block-sparse kernel against causal SDPA and compiled Flex",
    )
    bench.add_argument("--quick", action="store_true", help="fewer repeats (the demo preset)")
    bench.add_argument("--length", type=int, default=None, help="sequence length (default 8192)")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--dim", type=int, default=64)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--out", default=None, help="JSONL file to append results to")
    bench.add_argument(
        "--memory-length",
        type=int,
        default=32768,
        help="length of the tiled executor's peak-memory check (methods suite)",
    )
    bench.add_argument("--no-flex", action="store_true", help="kernels suite: skip compiled Flex")
    bench.add_argument(
        "--dtypes", default=None, help="kernels suite: comma-separated dtypes (default both)"
    )
    bench.add_argument(
        "--cases",
        default=None,
        help="kernels suite: comma-separated case labels to run (substring match, e.g. '10%%,window')",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "length", None) is not None and args.length <= 0:
        raise SystemExit(f"longattn: --length must be > 0, got {args.length}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
