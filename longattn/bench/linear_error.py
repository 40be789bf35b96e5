"""``longattn bench linear-error``: how far each linear method is from the model's own softmax
attention, per layer, on q/k/v captured from the real model.

For every registered linear method (``feature_map`` and ``forward`` hooks; ``--methods`` to choose
them and their parameters) and every layer of SmolLM2-135M on real text (``--length`` tokens,
default 2048): the relative error ``|out - softmax|_F / |softmax|_F`` of causal prefill against
causal softmax attention computed in float64 on the same q/k/v, the feature dimension F the method
ran with (``feature_map`` methods: the compute and state size per head is ``F x D``), and the time
of the layer's call. JSONL (one record per method, the per-layer list inside), a table and a plot
of the per-layer error.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch

from longattn import attention, from_string, registry
from longattn.bench.common import JsonlWriter, cpu_line, environment, format_table
from longattn.linear import HOOKS
from longattn.method import Method
from longattn.types import FeatureView

COLUMNS = [
    ("label", "method"), ("features", "F"), ("mean_err", "mean err"), ("median_err", "median"),
    ("max_err", "worst layer"), ("min_err", "best layer"), ("ms", "ms / layer"),
]  # fmt: skip


def linear_methods(spec: str | None) -> list[Method]:
    """The methods to measure: ``spec`` (comma-separated method strings, ``;`` between methods
    whose parameters contain commas) or every registered linear method with its defaults."""
    if spec:
        parts = spec.split(";") if ";" in spec else spec.split(",")
        methods = [from_string(p.strip()) for p in parts if p.strip()]
    else:
        methods = [cls() for cls in registry().values() if cls().hook in HOOKS]
    bad = [m.describe() for m in methods if m.hook not in HOOKS]
    if bad:
        raise ValueError(f"bench linear-error measures linear methods only, not {bad}")
    return methods


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention in float64, GQA by grouping (no expanded copies kept)."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q64, k64, v64, is_causal=True, enable_gqa=group > 1
    )


def feature_size(method: Method, k: torch.Tensor, layer: int) -> int | None:
    """The feature dimension of a ``feature_map`` method on these keys (None for ``forward``)."""
    if method.hook != "feature_map":
        return None
    view = FeatureView("key", layer, k.shape[-1] ** -0.5, None)
    return int(method.feature_map(k[:, :, :2].float(), view).shape[-1])


def error_stats(captured: dict, method: Method, refs: dict | None = None) -> dict:
    """Per layer of ``captured`` ({layer: (q, k, v)}): relative error vs softmax (``refs``
    {layer: float64 output}, computed when None) and call time, with their summaries."""
    errors, times = [], []
    for layer in sorted(captured):
        q, k, v = captured[layer]
        start = time.perf_counter()
        out = attention(q, k, v, method=method, layer=layer).out
        times.append((time.perf_counter() - start) * 1e3)
        ref = softmax_reference(q, k, v) if refs is None else refs[layer]
        errors.append(float((out.double() - ref).norm() / ref.norm()))
    return {
        "layer_err": errors,
        "mean_err": statistics.mean(errors),
        "median_err": statistics.median(errors),
        "max_err": max(errors),
        "min_err": min(errors),
        "ms": statistics.mean(times),
    }


def layer_errors(captured: dict, method: Method) -> dict:
    """``error_stats`` and the method's feature size."""
    first = captured[min(captured)]
    return {"features": feature_size(method, first[1], min(captured)),
            **error_stats(captured, method)}  # fmt: skip


def plot(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in records:
        ax.plot(rec["layer_err"], marker=".", label=rec["label"])
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|out - softmax| / |softmax|")
    ax.set_title(f"linear methods vs softmax, {records[0]['model']} T={records[0]['T']}")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    from longattn.eval import models, tasks
    from longattn.integrations.hf import capture_qkv

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    methods = linear_methods(getattr(args, "methods", None))
    length = args.length or 2048
    name = getattr(args, "model", None) or "smollm2-135m"
    out = pathlib.Path(args.out or "results/bench_linear_error.jsonl")
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model, tokenizer = models.load(name)
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", length, 0)])
    captured = capture_qkv(model, ids)
    writer, records = JsonlWriter(out), []
    for method in methods:
        rec = {"bench": "linear_error", "model": name, "T": length, "label": method.name,
               "params": method.describe(), **layer_errors(captured, method)}  # fmt: skip
        rec.update(environment())
        writer.write(rec)
        records.append(rec)
    print(format_table(records, COLUMNS))
    if records:
        plot(records, out.with_suffix(".png"))
        print(f"plot: {out.with_suffix('.png')}")
    return 0
