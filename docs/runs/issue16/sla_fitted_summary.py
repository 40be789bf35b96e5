"""Tables of SLA with and without its fitted linear-part map (``longattn calibrate sla``) from
the runs in ``sla_fitted_2k/`` and ``sla_fitted_8k/`` (``hybrid_ppl.py --continuation``, held-out
windows that share no run of 32 tokens with the fit's text) and, when given, the calibration
file's own held-out output errors per layer.

    python docs/runs/issue16/sla_fitted_summary.py [results/sla_smollm2.safetensors]
"""

import json
import math
import pathlib
import sys

HERE = pathlib.Path(__file__).parent


def geo_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f} %"


def runs_table(folder: pathlib.Path) -> None:
    files = sorted(folder.glob("seed*.json"))
    if not files:
        return
    runs = [json.loads(f.read_text()) for f in files]
    head = runs[0]
    print(f"\n### {head['length']} tokens, windows (seeds) {[r['seed'] for r in runs]}, "
          f"{head['threads']} thread(s), {head['cpu']}\n")  # fmt: skip
    print("| method | prompt ppl vs sdpa per window | geo. mean | continuation ppl vs sdpa per "
          "window | geo. mean | forward time vs sdpa per window |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    methods = [row["method"] for row in head["rows"] if row["method"] != "sdpa"]
    for method in methods:
        rows = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
        ppl = [r["ppl_vs_sdpa"] for r in rows]
        cont = [r["cont_ppl_vs_sdpa"] for r in rows]
        time = [r["time_vs_sdpa"] for r in rows]
        label = method.replace(",calibration=results/sla_smollm2.safetensors", " + fitted map")
        print(f"| {label} | {', '.join(pct(x) for x in ppl)} | {pct(geo_mean(ppl))} | "
              f"{', '.join(pct(x) for x in cont)} | {pct(geo_mean(cont))} | "
              f"{', '.join(f'{x:.2f}' for x in time)} |")  # fmt: skip


def calibration_table(path: str) -> None:
    from longattn.calibration import load

    params = load(path).params
    plain, fitted = params["heldout_error_training_free"], params["heldout_error_fitted"]
    print(f"\n### The fit's own held-out window: output error per layer ({path})\n")
    print(f"settings: { {k: v for k, v in params.items() if not k.startswith('heldout_error')} }\n")
    print("| layer | training-free | fitted map | ratio |")
    print("|---|---|---|---|")
    for layer, (a, b) in enumerate(zip(plain, fitted)):
        print(f"| {layer} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    ratio = sum(fitted) / sum(plain)
    print(
        f"| mean | {sum(plain) / len(plain):.4f} | {sum(fitted) / len(fitted):.4f} | {ratio:.3f} |"
    )


if __name__ == "__main__":
    runs_table(HERE / "sla_fitted_2k")
    runs_table(HERE / "sla_fitted_8k")
    if len(sys.argv) > 1:
        calibration_table(sys.argv[1])
