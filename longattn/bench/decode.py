"""``longattn bench decode``: one decode step over a long KV cache, ours vs SDPA, in one run.

For each KV length, head shape and dtype: the median step time of our dense decode path and of each
select method (``attention(q, k_new, v_new, method=..., cache=...)``, one token appended per step), the
selection alone, ``SDPA(enable_gqa=True)`` and SDPA with the query group folded into the query length.
Efficiency is reported as GB/s of K/V bytes read, next to the machine's copy bandwidth measured in the
same run. A correctness gate (every method against its float64 reference at 4K tokens, same heads)
runs first; no timing is reported for a red gate.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

from longattn import KVCache, attention, from_string
from longattn.bench.common import JsonlWriter, environment, format_table, median_ms
from longattn.testing import assert_attention_close, make_qkv

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
METHODS = ["quest", "loki", "double_sparsity", "infllm", "tidal_decode"]
COLUMNS = [
    ("kv_len", "T"),
    ("shape", "heads"),
    ("dtype", "dtype"),
    ("budget", "budget"),
    ("name", "what"),
    ("ms", "step ms"),
    ("select_ms", "select ms"),
    ("gbps", "KV GB/s"),
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
    if name == "tidal_decode":  # timed on a reusing layer: layer 1 after selection layer 0
        return from_string(f"tidal_decode:budget={budget},select_layers=0")
    if name == "quest":  # a selecting layer (its default keeps layers 0 and 1 dense)
        return from_string(f"quest:budget={budget},dense_layers=0")
    if name == "infllm":
        return from_string(f"infllm:budget={budget},sinks=64,window=256,block_size=64")
    return from_string(f"{name}:budget={budget}")


def gate(shape: tuple[int, int, int], dtype: torch.dtype, budget: int) -> None:
    """Every benchmarked method (and dense) matches its float64 reference at 4K tokens."""
    n_heads, n_kv, dim = shape
    q, k, v = make_qkv(1, n_heads, n_kv, 1, 4096, dim, dtype=dtype, seed=7)
    for name in ["dense"] + METHODS:
        method = from_string("dense") if name == "dense" else _method(name, budget)
        cache = KVCache(2)
        cache.append(0, k[:, :, :-1], v[:, :, :-1])
        cache.append(1, k[:, :, :-1], v[:, :, :-1])
        attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=0)
        res = attention(q, k[:, :, -1:], v[:, :, -1:], method=method, cache=cache, layer=1)
        assert_attention_close(res, q, k, v, method)


def bench_config(
    kv_len, shape_name, dtype, budgets, methods, repeats, writer, probe: CopyProbe
) -> list[dict]:
    n_heads, n_kv, dim = SHAPES[shape_name]
    group = n_heads // n_kv
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(1, n_kv, kv_len, dim, generator=gen).to(dtype)
    q = torch.randn(1, n_heads, 1, dim, generator=gen).to(dtype)
    kv_bytes = 2 * k.numel() * k.element_size()
    cache = KVCache(2)
    for layer in (0, 1):
        cache.append(layer, k[:, :, :-1], v[:, :, :-1])
        cache.reserve(layer, kv_len + 4 * (repeats + 4) + 64)
    k_new, v_new = k[:, :, -1:], v[:, :, -1:]
    base = {"kv_len": kv_len, "shape": f"{n_heads}/{n_kv}/d{dim}", "dtype": str(dtype)[6:]}
    rows = []

    def record(name, ms, budget=None, select_ms=None, read_bytes=kv_bytes):
        row = dict(base, name=name, ms=ms, budget=budget, select_ms=select_ms)
        row["gbps"] = read_bytes / ms / 1e6
        rows.append(row)

    q_fold = q.view(1, n_kv, group, dim)
    sdpa_gqa = median_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeats=repeats
    )
    sdpa_fold = median_ms(lambda: F.scaled_dot_product_attention(q_fold, k, v), repeats=repeats)
    record("sdpa enable_gqa", sdpa_gqa)
    record("sdpa folded", sdpa_fold)

    def dense_step():
        return attention(q, k_new, v_new, cache=cache, layer=0)

    # step time as for every other row (back to back); the bandwidth fraction from cold steps,
    # each right after a copy probe (which also evicts a KV that would fit in the caches)
    record("ours dense", median_ms(dense_step, repeats=repeats, warmup=2))
    copy_gbps, of_copy = paired_dense(dense_step, probe, kv_bytes, repeats)
    rows[-1].update(copy_gbps=copy_gbps, of_copy=of_copy)
    for budget in budgets:
        for name in methods:
            method = _method(name, budget)
            layer = 1 if name == "tidal_decode" else 0
            if name == "tidal_decode":
                attention(q, k_new, v_new, method=method, cache=cache, layer=0)

            def step(method=method, layer=layer):
                return attention(q, k_new, v_new, method=method, cache=cache, layer=layer)

            ms = median_ms(step, repeats=repeats, warmup=2)
            view = cache.select_view(layer, torch.tensor([[cache.n_seen(layer)]]), dim**-0.5)
            sel_ms = median_ms(lambda m=method, vw=view: m.select(q, vw), repeats=repeats)
            read = 2 * budget * n_kv * dim * k.element_size()
            record(name, ms, budget, sel_ms, read)
    best = min(sdpa_gqa, sdpa_fold)
    for row in rows:
        row["vs_best_sdpa"] = best / row["ms"]
        writer.write(dict(row, **environment(), baseline_ms=best))
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
            labels = [r["name"] + (f" {r['budget']}" if r["budget"] else "") for r in sel]
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
    print(f"copy bandwidth at the start: {copy_gbps:.1f} GB/s (read + write)")
    writer.write(dict(environment(), name="copy bandwidth", gbps=copy_gbps))
    rows = []
    for shape_name in SHAPES:
        for dtype in dtypes:
            gate(SHAPES[shape_name], dtype, 1024)
            for kv_len in lengths:
                rows += bench_config(
                    kv_len, shape_name, dtype, budgets, METHODS, repeats, writer, probe
                )
    print(format_table(rows, COLUMNS + [("copy_gbps", "copy GB/s"), ("of_copy", "of copy BW")]))
    print(
        "of copy BW: median over dense steps of (KV bytes read / step time) / (copy bandwidth "
        "timed just before that step); those steps start cold, the step ms column is back to back"
    )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    start = time.time()
    run_cli(argparse.Namespace(quick=True, length=None, out=None))
    print(f"{time.time() - start:.0f} s")
