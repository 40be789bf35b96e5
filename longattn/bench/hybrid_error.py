"""``longattn bench hybrid-error``: each sparse + low-rank hybrid against its two parts alone at the
same budget, as output error vs softmax on q/k/v captured from the real model.

Per layer of SmolLM2-135M on real text (``--length`` tokens, default 2048; ``--layers``), the
relative error ``|out - softmax|_F / |softmax|_F`` of causal prefill against causal softmax in
float64 on the same q/k/v, for:

- ``scatterbrain`` (n_features F, LSH buckets / rounds) vs ``performer`` with the same F and draw
  (the low-rank part alone) vs exact softmax restricted to the same LSH support (the sparse part
  alone; a query whose support is empty outputs zeros); ``density``: the support's share of the
  causal pairs;
- ``sea`` (top-k from a Performer estimate with F features) vs the estimator alone (``performer``
  with that F as the attention) and, for context only, exact softmax on the exact top-k (an
  oracle, not in the ratio);
- ``combiner`` (region r; fixed, logsparse or axial) vs its direct part alone (softmax inside each
  query's region);
- ``window_linear`` (window W, Taylor d') vs the window alone and ``taylor`` (same d', no window).

``vs best part``: the hybrid's mean error over the better part's (the issue's target for
Scatterbrain is <= 0.5). A control runs Scatterbrain's cases on synthetic q/k with moderate
norms (``control_qkv``). JSON (every record with its per-layer errors) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from longattn import attention, methods
from longattn.bench.common import cpu_line, environment
from longattn.bench.linear_error import softmax_reference
from longattn.methods.scatterbrain import grouped

DEFAULT_LAYERS = (2, 10, 18, 26)
SCATTERBRAIN = [  # Scatterbrain's fields per budget
    dict(n_features=32, n_buckets=8), dict(n_features=32, n_buckets=4, n_rounds=2),
    dict(n_features=128, n_buckets=8), dict(n_features=128, n_buckets=4, n_rounds=2),
    dict(n_features=32, sparse="topk_blocks", block_size=64, n_blocks=2),
    dict(n_features=128, sparse="topk_blocks", block_size=64, n_blocks=2),
    dict(n_features=128, sparse="topk_blocks", block_size=64, n_blocks=8),
]  # fmt: skip
SEA_BUDGETS = [(32, 64), (32, 256)]  # (F, top-k)
COMBINER = [
    (64, "fixed"),
    (256, "fixed"),
    (64, "logsparse"),
    (64, "axial"),
]  # (region, factorization)
WINDOWS = [64, 256]  # Taylor d' = 16 (BASED)


def masked_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """Softmax attention in float64 restricted to ``keep`` [B, Hkv, G, Tq, Tk] (or one broadcast
    to it); a row with no kept key outputs zeros."""
    n_kv = k.shape[1]
    scores = grouped(q.double(), n_kv) @ k.double().unsqueeze(2).transpose(-1, -2)
    scores = (scores * q.shape[-1] ** -0.5).masked_fill(~keep, -torch.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: NaN -> 0
    out = weights @ v.double().unsqueeze(2)
    return out.reshape(*q.shape[:3], v.shape[-1])


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def _run(method, q, k, v, layer) -> torch.Tensor:
    return attention(q, k, v, method=method, layer=layer).out


def scatterbrain_row(q, k, v, layer, ref, **fields) -> dict:
    hybrid = methods.Scatterbrain(**fields)
    support = hybrid.support(q.double(), k.double(), 0) & causal(q.shape[2])
    low_rank = methods.Performer(features=hybrid.n_features, seed=hybrid.seed)
    return {
        "hybrid": rel_error(_run(hybrid, q, k, v, layer), ref),
        "low_rank": rel_error(_run(low_rank, q, k, v, layer), ref),
        "sparse": rel_error(masked_softmax(q, k, v, support), ref),
        "density": float(support.sum() / (causal(q.shape[2]).sum() * support[..., 0, 0].numel())),
    }


def sea_row(q, k, v, layer, ref, features, top_k) -> dict:
    hybrid = methods.SEA(top_k=top_k, n_features=features)
    scores = grouped(q.double(), k.shape[1]) @ k.double().unsqueeze(2).transpose(-1, -2)
    scores = scores.masked_fill(~causal(q.shape[2]), -torch.inf)
    best = scores.topk(min(top_k, q.shape[2]), dim=-1).indices
    oracle = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
    estimator = methods.Performer(features=features, seed=hybrid.seed)
    return {
        "hybrid": rel_error(_run(hybrid, q, k, v, layer), ref),
        "low_rank": rel_error(_run(estimator, q, k, v, layer), ref),
        "oracle": rel_error(masked_softmax(q, k, v, oracle & causal(q.shape[2])), ref),
    }


def combiner_row(q, k, v, layer, ref, region, factorization) -> dict:
    pos = torch.arange(q.shape[2])
    local = (pos[:, None] // region == pos[None, :] // region) & causal(q.shape[2])
    return {
        "hybrid": rel_error(_run(methods.Combiner(region, factorization), q, k, v, layer), ref),
        "sparse": rel_error(masked_softmax(q, k, v, local), ref),
    }


def window_row(q, k, v, layer, ref, window) -> dict:
    pos = torch.arange(q.shape[2])
    local = (pos[:, None] - pos[None, :] < window) & causal(q.shape[2])
    linear = methods.Taylor(window=0, features=16)
    return {
        "hybrid": rel_error(_run(methods.WindowPlusLinear(window=window), q, k, v, layer), ref),
        "low_rank": rel_error(_run(linear, q, k, v, layer), ref),
        "sparse": rel_error(masked_softmax(q, k, v, local), ref),
    }


def cases() -> list[tuple[str, str, object, dict]]:
    """(family, budget label, row function, its keyword arguments) of the whole run."""
    out = []
    for kw in SCATTERBRAIN:
        label = ", ".join(f"{key}={value}" for key, value in kw.items())
        out.append(("scatterbrain", label, scatterbrain_row, kw))
    for f, top in SEA_BUDGETS:
        out.append(("sea", f"F={f}, top_k={top}", sea_row, dict(features=f, top_k=top)))
    for region, kind in COMBINER:
        label = f"region={region}" + ("" if kind == "fixed" else f", {kind}")
        out.append(("combiner", label, combiner_row, dict(region=region, factorization=kind)))
    for window in WINDOWS:
        out.append(("window_linear", f"window={window}, d'=16", window_row, dict(window=window)))
    return out


def control_qkv(length: int, seed: int = 0) -> dict:
    """One synthetic layer shaped as the model's (9 query / 3 KV heads, d=64): q and k with
    i.i.d. N(0, 0.5^2) entries (moderate norms, where random features estimate softmax well),
    v standard normal."""
    gen = torch.Generator().manual_seed(seed)
    q = 0.5 * torch.randn(1, 9, length, 64, generator=gen)
    k = 0.5 * torch.randn(1, 3, length, 64, generator=gen)
    return {0: (q, k, torch.randn(1, 3, length, 64, generator=gen))}


def measure(captured: dict, families: tuple[str, ...] | None = None) -> list[dict]:
    """One record per case (of ``families``, default all): per-layer errors of the hybrid and
    its parts, their means, the hybrid over the better part."""
    refs = {layer: softmax_reference(*captured[layer]) for layer in captured}
    records = []
    for family, budget, row, kwargs in cases():
        if families is not None and family not in families:
            continue
        start, per_layer = time.perf_counter(), []
        for layer in sorted(captured):
            q, k, v = captured[layer]
            per_layer.append(row(q, k, v, layer, refs[layer], **kwargs))
        rec = {"family": family, "budget": budget, "layers": sorted(captured)}
        for key in per_layer[0]:
            rec[f"{key}_layers"] = [p[key] for p in per_layer]
            rec[key] = statistics.mean(rec[f"{key}_layers"])
        parts = [rec[key] for key in ("low_rank", "sparse") if key in rec]
        rec["vs_best_part"] = rec["hybrid"] / min(parts)
        rec["seconds"] = time.perf_counter() - start
        records.append(rec)
        print(f"{family} {budget}: hybrid {rec['hybrid']:.3g}, vs best part "
              f"{rec['vs_best_part']:.3g} ({rec['seconds']:.0f} s)", flush=True)  # fmt: skip
    return records


def markdown(records: list[dict], header: dict) -> str:
    lines = [
        "# Hybrid vs its parts: output error vs softmax on captured SmolLM2-135M q/k/v",
        "",
        f"- command: `{header['command']}`",
        f"- model {header['model']}, T={header['T']}, layers {header['layers']}, pydoc text",
        f"- CPU: {header['cpu_line']}; torch {header['torch']}; {header['threads']} thread(s)",
        "- error: |out - softmax|_F / |softmax|_F, mean over the layers (per-layer in the JSON);",
        "  low-rank / sparse: the hybrid's two parts alone at the same budget (see the bench's",
        "  docstring, `longattn/bench/hybrid_error.py`); vs best part = hybrid / min(parts); SEA's",
        "  exact top-k (the oracle at the same k) is context, not one of its parts",
        "",
    ]
    lines += table(records) + ["", "## Control: synthetic q/k with moderate norms", "",
        "Scatterbrain's cases on one synthetic layer (`control_qkv`: q, k ~ N(0, 0.5^2), the",
        "model's head shapes, same T), the regime where random features estimate softmax well:",
        ""] + table(header["control"])  # fmt: skip
    return "\n".join(lines) + "\n"


def table(records: list[dict]) -> list[str]:
    lines = [
        "| hybrid | budget | hybrid err | low-rank alone | sparse alone | support density "
        "| exact top-k (oracle) | vs best part |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    for r in records:
        cells = [r["family"], r["budget"], fmt(r["hybrid"]), fmt(r.get("low_rank")),
                 fmt(r.get("sparse")), fmt(r.get("density")), fmt(r.get("oracle")),
                 fmt(r["vs_best_part"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_cli(args: argparse.Namespace) -> int:
    from longattn.eval import models, tasks
    from longattn.integrations.hf import capture_qkv

    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(DEFAULT_LAYERS)
    length = args.length or 2048
    out = pathlib.Path(args.out or "results/hybrid_error.json")
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", length, 0)])
    captured = capture_qkv(model, ids, layers=layers)
    records = measure(captured)
    print("control (synthetic q/k):", flush=True)
    control = measure(control_qkv(length), families=("scatterbrain",))
    header = {"control": control, "command": f"longattn bench hybrid-error --length {length} --layers "
              f"{','.join(map(str, layers))}", "model": "smollm2-135m", "T": length,
              "layers": layers, **environment(), "cpu_line": cpu_line()}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
    table = markdown(records, header)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
