"""``longattn bench sla-error``: SLA's output error against the model's own softmax attention on
q/k/v captured from the real model, against its two parts alone at the same budget.

Per layer of SmolLM2-135M (every layer, or ``--layers``) on real text (``--length`` tokens,
default 2048) and per critical fraction (``--budgets``, default 0.05,0.1): the relative error
``|out - softmax|_F / |softmax|_F`` of causal prefill (softmax in float64 on the same q/k/v) of

- ``sparse``: the critical blocks alone (``SLA(marginal=0)``: block-sparse attention on the same
  critical set, the marginal blocks skipped);
- ``sla-elu`` / ``sla-taylor``: SLA with every other causal block marginal (``marginal = 1 -
  critical``), elu + 1 or Taylor features, one normaliser (``combine="shared"``);
- ``sla-elu-mass`` / ``sla-taylor-mass``: the same with ``combine="mass"`` (the linear part
  normalised alone, weighted by the pooled-key estimate of the marginal blocks' exp mass);
- ``sla-expansion-<n>pt``: each marginal block by its first-order expansion around the nearest
  of n k-means centres of the previous query block's queries (``feature="expansion"``,
  ``points=n``);
- ``linear-elu`` / ``linear-taylor``: linear attention alone over every key (``elu_linear``,
  ``taylor:window=0``), budget-free;

and the fraction of causal block pairs that were critical (the forced diagonal and sink blocks
included). JSONL (one record per method and budget, the per-layer list inside) and a table.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import torch

from longattn import from_string
from longattn.bench.common import JsonlWriter, cpu_line, environment, format_table
from longattn.bench.linear_error import error_stats, softmax_reference
from longattn.methods import SLA
from longattn.methods.sla import CRITICAL

COLUMNS = [
    ("label", "method"), ("critical", "critical"), ("critical_used", "critical used"),
    ("mean_err", "mean err"), ("median_err", "median"), ("max_err", "worst layer"),
    ("vs_sparse", "mean err / sparse"), ("ms", "ms / layer"),
]  # fmt: skip


EXPANSION_POINTS = (1, 4, 8)


def variants(critical: float) -> list[tuple[str, SLA]]:
    return [
        ("sparse", SLA(critical=critical, marginal=0.0)),
        ("sla-elu",
         SLA(critical=critical, marginal=1.0 - critical, feature="elu", combine="shared")),
        ("sla-taylor",
         SLA(critical=critical, marginal=1.0 - critical, feature="taylor", combine="shared")),
        ("sla-elu-mass",
         SLA(critical=critical, marginal=1.0 - critical, feature="elu", combine="mass")),
        ("sla-taylor-mass",
         SLA(critical=critical, marginal=1.0 - critical, feature="taylor", combine="mass")),
        *[
            (f"sla-expansion-{n}pt",
             SLA(critical=critical, marginal=1.0 - critical, feature="expansion", points=n))
            for n in EXPANSION_POINTS
        ],
    ]  # fmt: skip


def critical_used(method: SLA, q: torch.Tensor, k: torch.Tensor) -> float:
    """The fraction of causal (query block, key block) pairs that ``method`` computes exactly."""
    last = (k.shape[2] - 1) // method.block_size
    classes = method.classify(q, k, 0, 0, last, q.shape[-1] ** -0.5)
    n_causal = (last + 1) * (last + 2) // 2 * classes.shape[0] * classes.shape[1]
    return float((classes == CRITICAL).sum()) / n_causal


def measure(captured: dict, budgets: list[float]) -> list[dict]:
    """The records of every variant and budget on ``captured`` ({layer: (q, k, v)})."""
    refs = {layer: softmax_reference(*qkv) for layer, qkv in captured.items()}
    records = []
    for label, spec in (("linear-elu", "elu_linear"), ("linear-taylor", "taylor:window=0")):
        method = from_string(spec)
        records.append({"label": label, "params": method.describe(), "critical": 0.0,
                        **error_stats(captured, method, refs)})  # fmt: skip
    for critical in budgets:
        sparse_err = None
        for label, method in variants(critical):
            rec = {"label": label, "params": method.describe(), "critical": critical,
                   **error_stats(captured, method, refs)}  # fmt: skip
            used = [critical_used(method, q, k) for q, k, _ in captured.values()]
            rec["critical_used"] = statistics.mean(used)
            sparse_err = rec["mean_err"] if label == "sparse" else sparse_err
            rec["vs_sparse"] = rec["mean_err"] / sparse_err
            records.append(rec)
    return records


def run_cli(args: argparse.Namespace) -> int:
    from longattn.eval import models, tasks
    from longattn.integrations.hf import capture_qkv

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    length = args.length or 2048
    budgets = [float(b) for b in (args.budgets or "0.05,0.1").split(",")]
    name = getattr(args, "model", None) or "smollm2-135m"
    out = pathlib.Path(args.out or "results/bench_sla_error.jsonl")
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model, tokenizer = models.load(name)
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", length, 0)])
    layers = getattr(args, "layers", None)
    captured = capture_qkv(model, ids, [int(x) for x in layers.split(",")] if layers else None)
    writer, records = JsonlWriter(out), measure(captured, budgets)
    env = environment()
    for rec in records:
        rec.update({"bench": "sla_error", "model": name, "T": length,
                    "layers": sorted(captured), **env})  # fmt: skip
        writer.write(rec)
    print(format_table(records, COLUMNS))
    return 0
