"""The ``longattn`` command: ``bench`` and ``docs``."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _bench(args: argparse.Namespace) -> int:
    from longattn.bench.methods import methods_table, run_methods_bench, tiled_memory_check

    length = args.length or 8192
    print(
        f"longattn bench: every registered method, T={length}, H={args.heads}, D={args.dim}, "
        f"{args.dtype}, {torch.get_num_threads()} threads"
    )
    records = run_methods_bench(
        length, args.heads, args.dim, DTYPES[args.dtype], args.out, repeats=3 if args.quick else 7
    )
    print(methods_table(records))
    mem_len = 32768
    print(
        f"\ntiled executor peak extra memory, T={mem_len}, causal fp32, H={args.heads}, D={args.dim}:"
    )
    mem = tiled_memory_check(mem_len, args.heads, args.dim)
    print(
        f"  {mem['peak_extra_mib']:.0f} MiB (output itself {mem['output_mib']:.0f} MiB; "
        f"dense scores would be {mem['dense_scores_mib']:.0f} MiB)"
    )
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(mem) + "\n")
        print(f"\nJSONL: {args.out}")
    failed = [r["params"] for r in records if not r["gate"]]
    if failed:
        print(f"correctness gate FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


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
    bench = sub.add_parser("bench", help="speed and error of every method against dense SDPA")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (the demo preset)")
    bench.add_argument("--length", type=int, default=None, help="sequence length (default 8192)")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--dim", type=int, default=64)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--out", default=None, help="JSONL file to append results to")
    bench.set_defaults(func=_bench)
    docs = sub.add_parser("docs", help="generate the method reference (docs/methods.md)")
    docs.add_argument("--out", default=None)
    docs.set_defaults(func=_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "length", None) is not None and args.length <= 0:
        raise SystemExit(f"longattn: --length must be > 0, got {args.length}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
