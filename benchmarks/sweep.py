"""Run the unusual-input sweep and print its counts by outcome and area, then every case that is not
``ok`` or ``clear_error`` with its reproducer.

    PYTHONPATH=. python benchmarks/sweep.py [--json results/sweep.json] [--timeout 120]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

from longattn.eval.sweep import FAILING, OUTCOMES, run_sweep


def table(results: list[dict]) -> str:
    """Counts per area (rows) and outcome (columns), with a total row."""
    areas = sorted({r["area"] for r in results})
    counts = collections.Counter((r["area"], r["outcome"]) for r in results)
    width = max(len(a) for a in areas + ["total"])
    lines = [f"{'area':<{width}} " + " ".join(f"{o:>13}" for o in OUTCOMES) + f" {'all':>5}"]
    for area in areas + ["total"]:
        row = [
            sum(counts[(a, o)] for a in areas) if area == "total" else counts[(area, o)]
            for o in OUTCOMES
        ]
        lines.append(f"{area:<{width}} " + " ".join(f"{n:>13}" for n in row) + f" {sum(row):>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write every case's outcome to this file")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case hangs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_sweep(args.timeout)
    print(f"{len(results)} cases in {time.perf_counter() - start:.0f} s\n")
    print(table(results))
    bad = [r for r in results if r["outcome"] in FAILING]
    print(f"\n{len(bad)} case(s) neither ok nor a clear error:")
    for r in bad:
        print(f"- [{r['outcome']}] ({r['area']}) {r['repro']}\n    {r['detail']}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
