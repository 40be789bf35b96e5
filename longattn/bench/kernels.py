"""``longattn bench kernels``: the block-sparse kernels against dense causal SDPA and compiled Flex.

Per case (random causal block layouts at a fraction of the causal blocks, sliding window 1024,
StreamingLLM(4, 1024)): the correctness gate on sampled query rows first, then median ms of ours
(the native C++ kernel, ``impl="sparse_cpp"``), of the plain-PyTorch gather + SDPA kernel
(``impl="sparse"``), of dense causal SDPA and of compiled Flex on the same BlockIndex (its compile
time apart). Every kernel timed is gated the same way (sampled rows against the float64 oracle);
no timing is reported for a red gate. Speedups, the fraction of the ideal speedup (causal blocks / visited blocks), GFLOP/s
of the visited blocks, peak extra memory. JSONL, a table, and a PNG of speedup vs density.

``--efficiency``: the bfloat16 grid of the kernel's target (8K and 32K, random 25 % and 10 % causal
block layouts, 8 heads d=64 and 32 q / 8 kv heads d=128) and its table: the fraction of the ideal
speedup (dense bf16 SDPA time x density) reached, next to the CPU and the bf16 path it ran
(``block_sparse.bf16_path()``: oneDNN bf16 brgemm, or the float32 micro-kernel on widened tiles).
"""

from __future__ import annotations

import time

import torch

from longattn.api import block_index, make_call
from longattn.bench.common import (
    JsonlWriter,
    cpu_line,
    environment,
    format_table,
    median_ms,
    peak_extra_mib,
)
from longattn.bench.methods import gate
from longattn.kernels import block_sparse
from longattn.kernels.flex import flex_block_attention
from longattn.kernels.sdpa import sdpa_attention
from longattn.kernels.sparse import sparse_attention
from longattn.method import from_string
from longattn.methods import StaticBlocks
from longattn.testing import make_qkv

QUICK = {
    "lengths": [8192, 32768],
    "dtypes": ["float32", "bfloat16"],
    "heads": [(8, 8)],
    "dims": [64],
}
FULL = {
    "lengths": [4096, 8192, 16384, 32768, 65536],
    "dtypes": ["float32", "bfloat16"],
    "heads": [(8, 8), (32, 8)],
    "dims": [64, 128],
}
EFFICIENCY = {
    "lengths": [8192, 32768],
    "dtypes": ["bfloat16"],
    "shapes": [(8, 8, 64), (32, 8, 128)],  # (H, Hkv, D)
    "cases": ["random 25%", "random 10%"],
}
TARGET_OF_IDEAL = 0.85  # the bf16 kernel's target fraction of the ideal speedup
DENSITIES = (0.05, 0.10, 0.25)


def cases(length: int, n_heads: int, block: int = 128):
    """(label, method) pairs: per-head random causal layouts, a window, sinks + window."""
    n = length // block
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for density in DENSITIES:
        gen = torch.Generator().manual_seed(int(density * 1000))
        layout = (torch.rand(n_heads, n, n, generator=gen) < density) & causal
        layout |= torch.eye(n, dtype=torch.bool)
        yield f"random {density:.0%}", StaticBlocks(layout, block_size=block)
    yield "sliding_window 1024", from_string("sliding_window:window=1024")
    yield "streaming_llm 4+1024", from_string("streaming_llm:sinks=4,window=1024")


def _kernels(call, index, method):
    """(ours, the plain-PyTorch sparse kernel, why the C++ kernel cannot run or None): ours is the
    C++ kernel where it can run, else the PyTorch one (both called directly: what the record says)."""
    q, k, v = call.q, call.k, call.v
    reason = block_sparse.unavailable(q.dtype, q.device, q.shape[-1], call.scale)

    def native():
        return block_sparse.block_sparse_attention(
            q, k, v, index, scale=call.scale, mask_fn=method.mask,
            bounds_fn=method.block_bounds, causal=method.is_causal,
        )  # fmt: skip

    def sparse():
        return sparse_attention(q, k, v, index, scale=call.scale, mask_fn=method.mask)

    return (sparse if reason else native), sparse, reason


def run_case(label, method, q, k, v, base_ms, repeats, with_flex, rows) -> dict:
    call = make_call(q, k, v, method)
    index = block_index(call)
    b, h, h_kv, t, _, d = call.shape
    ours, sparse, native_reason = _kernels(call, index, method)
    err, used = gate(call, ours().out, rows)
    visited = index.visited * (h if index.kv_blocks.shape[1] == 1 else 1) * b
    n = index.n_q_blocks
    rec = {
        "bench": "kernels",
        "case": label,
        "impl": "sparse" if native_reason else "sparse_cpp",
        "T": t,
        "H": h,
        "Hkv": h_kv,
        "D": d,
        "dtype": str(q.dtype).replace("torch.", ""),
        "density": visited / (b * h * n * (n + 1) / 2),
        "error": err,
        "bound_used": used,
        "gate": used <= 1,
    }
    if native_reason:
        rec["decode_cpp_unavailable"] = native_reason
    elif q.dtype == torch.bfloat16:
        rec["bf16_path"] = block_sparse.bf16_path()
    if not rec["gate"]:
        return rec
    rec["ms"] = median_ms(ours, repeats=repeats)
    rec["sdpa_ms"] = base_ms
    rec["speedup"] = base_ms / rec["ms"]
    rec["ideal"] = 1 / rec["density"]
    rec["of_ideal"] = rec["speedup"] / rec["ideal"]
    rec["gflops"] = 4 * visited * index.block_size**2 * d / rec["ms"] / 1e6
    rec["peak_extra_mib"] = peak_extra_mib(ours)
    if not native_reason:
        rec.update(time_other(sparse, "sparse", call, rows, repeats))
        if "sparse_ms" in rec:
            rec["vs_sparse"] = rec["sparse_ms"] / rec["ms"]
    if with_flex:
        rec.update(time_flex(call, index, rows, repeats))
        if "flex_ms" in rec:
            rec["vs_flex"] = rec["flex_ms"] / rec["ms"]
    return rec


def time_other(kernel, name: str, call, rows: torch.Tensor, repeats: int) -> dict:
    """Another kernel on the same call: gated like ours, timed only behind a green gate."""
    err, used = gate(call, kernel().out, rows)
    rec = {f"{name}_error": err, f"{name}_bound_used": used, f"{name}_gate": used <= 1}
    if rec[f"{name}_gate"]:
        rec[f"{name}_ms"] = median_ms(kernel, repeats=repeats)
    return rec


def time_flex(call, index, rows: torch.Tensor, repeats: int) -> dict:
    """Compiled Flex on the same BlockIndex: its compile time (the first call), the gate on that
    call's output (sampled rows against the float64 oracle), then the median time; no timing for a
    red gate."""

    def flex():
        return flex_block_attention(
            call.q, call.k, call.v, index, scale=call.scale, mask_fn=call.method.mask
        )

    start = time.perf_counter()
    out = flex().out
    rec = {"flex_compile_s": time.perf_counter() - start, "flex_impl": "flex"}
    rec["flex_error"], rec["flex_bound_used"] = gate(call, out, rows)
    rec["flex_gate"] = rec["flex_bound_used"] <= 1
    if rec["flex_gate"]:
        rec["flex_ms"] = median_ms(flex, warmup=0, repeats=repeats)
    return rec


def _shapes(grid) -> list[tuple[int, int, int]]:
    """(H, Hkv, D) of the grid: its "shapes", else every heads x dims pair."""
    if grid.get("shapes"):
        return [tuple(s) for s in grid["shapes"]]
    return [(h, h_kv, d) for h, h_kv in grid["heads"] for d in grid["dims"]]


def run_kernels_bench(grid, repeats, with_flex, out_path, log=print) -> list[dict]:
    writer, env, records = JsonlWriter(out_path), environment(), []
    for dtype_name in grid["dtypes"]:
        for length in grid["lengths"]:
            for n_heads, n_kv, dim in _shapes(grid):
                dtype = getattr(torch, dtype_name)
                q, k, v = make_qkv(1, n_heads, n_kv, length, length, dim, dtype=dtype)
                rows = torch.randperm(length, generator=torch.Generator().manual_seed(0))[:64]
                rows = rows.sort().values
                scale = dim**-0.5
                base = median_ms(
                    lambda q=q, k=k, v=v, s=scale: sdpa_attention(q, k, v, causal=True, scale=s),
                    warmup=1,
                    repeats=repeats,
                )
                for label, method in cases(length, n_heads):
                    if grid.get("cases") and not any(c in label for c in grid["cases"]):
                        continue
                    rec = run_case(label, method, q, k, v, base, repeats, with_flex, rows)
                    rec.update(env)
                    records.append(rec)
                    writer.write(rec)
                    log(format_table([rec], COLUMNS).splitlines()[-1])
    return records


EFFICIENCY_COLUMNS = [
    ("case", "case"),
    ("T", "T"),
    ("H", "H"),
    ("Hkv", "Hkv"),
    ("D", "D"),
    ("density", "density"),
    ("impl", "impl"),
    ("bf16_path", "bf16 path"),
    ("ms", "ms"),
    ("sdpa_ms", "bf16 sdpa ms"),
    ("speedup", "vs sdpa"),
    ("ideal", "1/dens"),
    ("of_ideal", "of ideal"),
    ("target_met", f">= {TARGET_OF_IDEAL}"),
]


def efficiency_table(records: list[dict]) -> str | None:
    """The bfloat16 random-layout rows: fraction of the ideal speedup against bf16 SDPA, and
    whether it meets the target (None when the run has no such row)."""
    rows = [
        {**r, "target_met": r["of_ideal"] >= TARGET_OF_IDEAL}
        for r in records
        if r["dtype"] == "bfloat16" and r["case"].startswith("random") and "of_ideal" in r
    ]
    return format_table(rows, EFFICIENCY_COLUMNS) if rows else None


COLUMNS = [
    ("case", "case"),
    ("T", "T"),
    ("H", "H"),
    ("Hkv", "Hkv"),
    ("D", "D"),
    ("dtype", "dtype"),
    ("density", "density"),
    ("gate", "gate"),
    ("error", "error"),
    ("impl", "impl"),
    ("ms", "ms"),
    ("sdpa_ms", "sdpa ms"),
    ("speedup", "vs sdpa"),
    ("ideal", "1/dens"),
    ("of_ideal", "of ideal"),
    ("gflops", "GFLOP/s"),
    ("sparse_ms", "sparse ms"),
    ("vs_sparse", "vs sparse"),
    ("flex_gate", "flex gate"),
    ("flex_ms", "flex ms"),
    ("vs_flex", "vs flex"),
    ("flex_compile_s", "compile s"),
    ("peak_extra_mib", "peak MiB"),
]


def plot(records: list[dict], path: str) -> str | None:
    """Speedup over dense causal SDPA against density (PNG); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["T"], r["dtype"]) for r in records if "speedup" in r})
    for t, dt in keys:
        pts = sorted(
            (r["density"], r["speedup"])
            for r in records
            if (r["T"], r["dtype"]) == (t, dt) and "speedup" in r
        )
        ax.plot(*zip(*pts), "o-", label=f"ours T={t} {dt}")
        flex = sorted(
            (r["density"], r["sdpa_ms"] / r["flex_ms"])
            for r in records
            if (r["T"], r["dtype"]) == (t, dt) and "flex_ms" in r
        )
        if flex:
            ax.plot(*zip(*flex), "x--", label=f"flex T={t} {dt}")
    grid = [0.02 + i / 100 for i in range(40)]
    ax.plot(grid, [1 / x for x in grid], ":", color="gray", label="1/density")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="density of visited causal blocks (fraction)",
        ylabel="speedup vs causal SDPA (x, same run)",
        title="Block-sparse attention on CPU: speedup vs density",
    )
    # plain labels at 1-2-5 steps: default minor-tick labels on a short log axis run into each other
    for axis, ticks in ((ax.xaxis, [0.02, 0.05, 0.1, 0.2, 0.5]), (ax.yaxis, [1, 2, 5, 10, 20, 50])):
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_cli(args) -> int:
    grid = dict(QUICK if args.quick else FULL)
    if getattr(args, "efficiency", False):
        grid = dict(EFFICIENCY, lengths=[8192] if args.quick else EFFICIENCY["lengths"])
    if args.length:
        grid["lengths"] = [args.length]
    if getattr(args, "dtypes", None):
        grid["dtypes"] = args.dtypes.split(",")
    if getattr(args, "cases", None):
        grid["cases"] = args.cases.split(",")
    if getattr(args, "shapes", None):
        from longattn.bench.prefill import SHAPES

        grid["shapes"] = [SHAPES[name.strip()] for name in args.shapes.split(",")]
    out = args.out or "results/bench_kernels.jsonl"
    print(
        f"longattn bench kernels ({'quick' if args.quick else 'full'}"
        f"{', efficiency' if getattr(args, 'efficiency', False) else ''}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\nCPU: {cpu_line()}"
    )
    records = run_kernels_bench(grid, 3, not args.no_flex, out)
    print(format_table(records, COLUMNS))
    table = efficiency_table(records)
    if table:
        print(
            f"\nbfloat16 block-sparse vs bfloat16 causal SDPA (ideal = SDPA time x density), "
            f"{torch.get_num_threads()} threads, CPU: {cpu_line()}\n{table}"
        )
    png = plot(records, out.rsplit(".", 1)[0] + ".png")
    print(f"JSONL: {out}" + (f"\nplot: {png}" if png else ""))
    red = [r for r in records if not r["gate"] or r.get("flex_gate") is False]
    return 1 if red else 0
