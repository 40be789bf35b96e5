"""``longattn bench decode``: one decode step over a long KV cache, ours vs SDPA, in one run.

For each KV length, head shape and dtype: the median step time of our dense decode path and of each
select method (``attention(q, k_new, v_new, method=..., cache=...)``, one token appended per step), the
selection alone, ``SDPA(enable_gqa=True)`` and SDPA with the query group folded into the query length.
Efficiency is reported as GB/s of all bytes a step reads (the selected K/V and what the selection
reads: page bounds, page sums, low-rank keys, every key in a TidalDecode selecting layer), next to
the machine's copy bandwidth measured in the same run. TidalDecode is timed on both its layer kinds
(the layer that selects, the layer that reuses). Every timed row is gated: a real step before and
one after its timing, at the timed length and budget, against the method's float64 oracle over what
the cache holds, with the step's own selection; no timing is reported for a red gate. ``impl`` is
the implementation that ran the step.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from longattn import KVCache, attention, from_string
from longattn.bench.common import (
    ImplLog,
    JsonlWriter,
    cpu_line,
    environment,
    format_table,
    median_ms,
)
from longattn.cache_pages import metadata_dtype
from longattn.testing import assert_attention_close

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
METHODS = ["quest", "loki", "double_sparsity", "infllm", "tidal_decode"]
COLUMNS = [
    ("kv_len", "T"),
    ("shape", "heads"),
    ("dtype", "dtype"),
    ("budget", "budget"),
    ("name", "what"),
    ("impl", "impl"),
    ("gate", "gate"),
    ("ms", "step ms"),
    ("select_ms", "select ms"),
    ("read_mb", "MB read"),
    ("gbps", "GB/s read"),
    ("vs_best_sdpa", "x best SDPA"),
]


class CopyProbe:
    """Times one large ``copy_`` (bytes read + written) between preallocated tensors: the machine's
    copy bandwidth, measurable right next to the timing it is compared with."""

    def __init__(self, n_bytes: int = 1 << 29) -> None:
        self.n_bytes = n_bytes
        self.src = torch.ones(n_bytes // 4)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in

    def gbps(self) -> float:
        start = time.perf_counter()
        self.dst.copy_(self.src)
        return 2 * self.n_bytes / (time.perf_counter() - start) / 1e9


def paired_dense(step, probe: CopyProbe, kv_bytes: int, repeats: int) -> tuple[float, float]:
    """Dense decode steps each timed right after a copy-bandwidth probe, so slow phases of a shared
    machine hit both alike. Returns (median copy GB/s, median of the per-pair ratios of KV read
    bandwidth to copy bandwidth)."""
    step()
    copies, ratios = [], []
    for _ in range(repeats):
        copy = probe.gbps()
        start = time.perf_counter()
        step()
        ms = (time.perf_counter() - start) * 1e3
        copies.append(copy)
        ratios.append(kv_bytes / ms / 1e6 / copy)
    return statistics.median(copies), statistics.median(ratios)


def _method(name: str, budget: int):
    if name == "tidal_decode":  # layer 0 selects, layer 1 reuses its selection
        return from_string(f"tidal_decode:budget={budget},select_layers=0")
    if name == "quest":  # a selecting layer (its default keeps layers 0 and 1 dense)
        return from_string(f"quest:budget={budget},dense_layers=0")
    if name == "infllm":
        return from_string(f"infllm:budget={budget},sinks=64,window=256,block_size=64")
    return from_string(f"{name}:budget={budget}")


def timed_layers(name: str) -> list[tuple[str, int]]:
    """(row label, cache layer) of every layer kind a method has. TidalDecode's reusing layer comes
    first: it must find the selection its selecting layer made on the same cache contents."""
    if name == "tidal_decode":
        return [("tidal_decode (reusing layer)", 1), ("tidal_decode (selecting layer)", 0)]
    return [(name, 0)]


def gated_step(step, q: torch.Tensor, cache: KVCache, layer: int, method) -> tuple:
    """Run one real step and check its output against the float64 oracle of ``method`` over what
    the cache holds then, with the step's own selection; ``(result, the implementation that ran it
    as the dispatch log names it, failure or None)``."""
    with ImplLog() as seen:
        result = step()
    impl = ", ".join(seen.chosen)
    try:
        assert_attention_close(result, q, cache.keys(layer), cache.values(layer), method)
    except AssertionError as exc:
        return result, impl, str(exc)
    return result, impl, None


def bytes_read(method, view, selection, elem: int) -> int:
    """Bytes one decode step reads: the selected keys and values (every key without a selection)
    plus what the selection itself reads: Quest's page bounds, InfLLM's page key sums, the low-rank
    keys of Loki and Double Sparsity, every key in a TidalDecode selecting layer."""
    batch, n_kv, t, dim = view.keys.shape
    if selection is None:
        kv = 2 * batch * n_kv * t * dim * elem
    else:
        kv = 2 * int((selection.slots() >= 0).sum()) * dim * elem
    name = method.name
    if name == "quest":
        meta = view.page_bounds.numel() * view.page_bounds.element_size()
    elif name == "infllm":
        meta = view.page_sum.numel() * view.page_sum.element_size()
    elif name in ("loki", "double_sparsity"):
        rank = method.rank if name == "loki" else method.channels
        meta = batch * n_kv * t * rank * metadata_dtype(view.keys.dtype).itemsize
    elif name == "tidal_decode" and view.layer in method.select_layers:
        meta = batch * n_kv * t * dim * elem
    else:
        meta = 0
    return kv + meta


def time_row(label, method, layer, q, kv_new, cache, repeats) -> dict:
    """Gate, time and gate again one (method, layer) decode step; no timing for a red gate."""
    k_new, v_new = kv_new

    def step():
        return attention(q, k_new, v_new, method=method, cache=cache, layer=layer)

    row = {"name": label, "layer": layer}
    result, row["impl"], failure = gated_step(step, q, cache, layer, method)
    if failure is None:
        row["ms"] = median_ms(step, repeats=repeats, warmup=2)
        result, _, failure = gated_step(step, q, cache, layer, method)  # another step, grown cache
    row["gate"] = failure is None
    if failure is not None:
        row.pop("ms", None)
        row["gate_error"] = failure
        return row
    scale = q.shape[-1] ** -0.5
    view = cache.select_view(layer, torch.tensor([[cache.n_seen(layer) - 1]]), scale)
    if method.hook == "select":
        row["select_ms"] = median_ms(lambda: method.select(q, view), repeats=repeats)
    row["read_bytes"] = bytes_read(method, view, result.state, q.element_size())
    row["gbps"] = row["read_bytes"] / row["ms"] / 1e6
    return row


def time_reusing_layer(label, method, q, kv_new, cache: KVCache, repeats) -> dict:
    """TidalDecode's layer 1 reusing the selection layer 0 made: layer 1 is first brought to layer
    0's tokens (same slots, same positions), so that every selected slot exists there; a step that
    selected by itself instead would replace the saved selection, which turns the gate red."""
    k_new, v_new = kv_new
    gap = cache.seq_len(0) - cache.seq_len(1)
    if gap > 0:  # the rows timed on layer 0 appended these tokens there
        cache.append(1, k_new.expand(-1, -1, gap, -1), v_new.expand(-1, -1, gap, -1))
    attention(q, k_new, v_new, method=method, cache=cache, layer=0)
    saved = cache.state.get("tidal_decode")
    row = time_row(label, method, 1, q, kv_new, cache, repeats)
    if row["gate"] and (saved is None or cache.state.get("tidal_decode") is not saved):
        row.update(gate=False, gate_error="the reusing layer made a selection of its own")
        for key in ("ms", "gbps", "select_ms"):
            row.pop(key, None)
    return row


def _baselines(q, k, v, repeats) -> list[dict]:
    """SDPA with ``enable_gqa`` and with the query group folded into the query length."""
    n_kv = k.shape[1]
    q_fold = q.view(1, n_kv, q.shape[1] // n_kv, q.shape[-1])
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for name, fn in (
        ("sdpa enable_gqa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        ("sdpa folded", lambda: F.scaled_dot_product_attention(q_fold, k, v)),
    ):
        ms = median_ms(fn, repeats=repeats)
        rows.append({"name": name, "impl": "torch sdpa", "ms": ms, "gate": None,
                     "read_bytes": kv_bytes, "gbps": kv_bytes / ms / 1e6})  # fmt: skip
    return rows


def _cache(k: torch.Tensor, v: torch.Tensor, room: int) -> KVCache:
    """Two layers holding all but the last token, with ``room`` more slots reserved now (growing
    inside a timed step would time a copy)."""
    cache = KVCache(2)
    for layer in (0, 1):
        cache.append(layer, k[:, :, :-1], v[:, :, :-1])
        cache.reserve(layer, k.shape[2] + room)
    return cache


def bench_config(
    kv_len, shape_name, dtype, budgets, methods, repeats, writer, probe: CopyProbe
) -> list[dict]:
    n_heads, n_kv, dim = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
    q = torch.randn(1, n_heads, 1, dim, generator=gen).to(dtype)
    kv_new = (k[:, :, -1:], v[:, :, -1:])
    n_rows = 1 + sum(len(timed_layers(m)) for m in methods) * len(budgets)
    cache = _cache(k, v, (repeats + 6) * n_rows + 2 * repeats + 64)
    base = {"kv_len": kv_len, "shape": f"{n_heads}/{n_kv}/d{dim}", "dtype": str(dtype)[6:]}
    rows = _baselines(q, k, v, repeats)
    dense = time_row("ours dense", from_string("dense"), 0, q, kv_new, cache, repeats)
    if dense["gate"]:
        # step time as for every other row (back to back); the bandwidth fraction from cold steps,
        # each right after a copy probe (which also evicts a KV that would fit in the caches)
        step = lambda: attention(q, *kv_new, cache=cache, layer=0)  # noqa: E731
        dense["copy_gbps"], dense["of_copy"] = paired_dense(
            step, probe, dense["read_bytes"], repeats
        )
    rows.append(dense)
    for budget in budgets:
        for name in methods:
            method = _method(name, budget)
            for label, layer in timed_layers(name):
                if name == "tidal_decode" and layer == 1:
                    row = time_reusing_layer(label, method, q, kv_new, cache, repeats)
                else:
                    row = time_row(label, method, layer, q, kv_new, cache, repeats)
                rows.append(dict(row, budget=budget))
    best = min(rows[0]["ms"], rows[1]["ms"])
    for row in rows:
        row.update(base, baseline_ms=best)
        if "ms" in row:
            row["vs_best_sdpa"] = best / row["ms"]
        writer.write(dict(row, **environment()))
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Speedup over the best SDPA variant per configuration: one row of panels per head shape and
    dtype, one column per KV length, log scale, with the SDPA line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = sorted({(r["shape"], r["dtype"]) for r in rows})
    lengths = sorted({r["kv_len"] for r in rows})
    fig, axes = plt.subplots(
        len(groups),
        len(lengths),
        figsize=(4.8 * len(lengths), 3.6 * len(groups)),
        squeeze=False,
    )
    for i, (shape, dtype) in enumerate(groups):
        for j, kv_len in enumerate(lengths):
            ax = axes[i][j]
            sel = [
                r
                for r in rows
                if (r["shape"], r["dtype"], r["kv_len"]) == (shape, dtype, kv_len)
                and not r["name"].startswith("sdpa")
            ]
            labels = [r["name"] + (f" {r['budget']}" if r.get("budget") else "") for r in sel]
            ax.bar(range(len(sel)), [r["vs_best_sdpa"] for r in sel], color="tab:blue")
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="best SDPA")
            ax.set_xticks(range(len(sel)), labels, rotation=75, fontsize=6)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_ylabel("speedup over best SDPA (x)", fontsize=8)
            ax.set_title(f"decode step, KV {kv_len} tokens, {shape} heads, {dtype}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    quick = args.quick
    lengths = [args.length] if args.length else ([131072] if quick else [8192, 32768, 131072])
    dtypes = [torch.float32, torch.bfloat16]
    budgets = [1024] if quick else [512, 1024, 2048]
    repeats = 5 if quick else 9
    out = pathlib.Path(args.out or "results/bench_decode.jsonl")
    writer = JsonlWriter(out)
    probe = CopyProbe()
    copy_gbps = statistics.median(probe.gbps() for _ in range(7))
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"copy bandwidth at the start: {copy_gbps:.1f} GB/s (read + write)")
    writer.write(dict(environment(), name="copy bandwidth", gbps=copy_gbps))
    rows = []
    for shape_name in SHAPES:
        for dtype in dtypes:
            for kv_len in lengths:
                rows += bench_config(
                    kv_len, shape_name, dtype, budgets, METHODS, repeats, writer, probe
                )
    for row in rows:
        row["read_mb"] = row["read_bytes"] / 1e6 if row.get("gbps") else None
    print(format_table(rows, COLUMNS + [("copy_gbps", "copy GB/s"), ("of_copy", "of copy BW")]))
    print(
        "of copy BW: median over dense steps of (KV bytes read / step time) / (copy bandwidth "
        "timed just before that step); those steps start cold, the step ms column is back to back"
    )
    red = [f"{r['name']} T={r['kv_len']} {r['dtype']}: {r['gate_error']}" for r in rows
           if r["gate"] is False]  # fmt: skip
    plot([r for r in rows if "ms" in r], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if red:
        print("correctness gate FAILED (not timed):\n  " + "\n  ".join(red), file=sys.stderr)
    return 1 if red else 0


if __name__ == "__main__":  # pragma: no cover
    start = time.time()
    run_cli(argparse.Namespace(quick=True, length=None, out=None))
    print(f"{time.time() - start:.0f} s")
