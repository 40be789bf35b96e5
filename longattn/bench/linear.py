"""``longattn bench linear``: the linear-attention engine against causal SDPA in the same run.

Prefill: ``linear_attention`` (impl "auto": the C++ chunkwise kernel where it runs) over feature
maps of size F = d (the feature map itself is not timed: this measures the engine) from 1K to 128K
tokens, against causal ``F.scaled_dot_product_attention`` up to ``--sdpa-max`` tokens (quadratic:
beyond it the table shows the largest measured SDPA time scaled by (T / T_max)^2, marked as
extrapolated). Efficiency: the kernel's executed FLOPs (full C x C tiles: ``2 H T (C F + C Dv +
2 F Dv)``) per second against the machine's GEMM rate measured in the same run, both a large
``torch.mm`` and ``torch.bmm`` of the chunk shapes. Decode: one token with a carried state (O(1)
per step; through ``linear_attention`` and through ``linear_recurrent``) against SDPA of one query
over a dense cache of T keys.
A correctness gate (the engine within ``linear_bound`` at 1K) runs first; a red gate is not timed.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from longattn.bench.common import JsonlWriter, cpu_line, environment, format_table, median_ms
from longattn.kernels.linear import LinearState, linear_attention, linear_recurrent

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (1024, 4096, 8192)
DECODE_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_DECODE = (8192,)
CHUNK = 64
GATE_LENGTH = 1024

PREFILL_COLUMNS = [
    ("T", "T"),
    ("dtype", "dtype"),
    ("impl", "impl"),
    ("linear_ms", "linear ms"),
    ("sdpa_ms", "sdpa ms"),
    ("speedup", "x sdpa"),
    ("gflops", "GFLOP/s"),
    ("of_gemm", "of GEMM"),
    ("of_chunk_gemm", "of chunk GEMM"),
]
DECODE_COLUMNS = [
    ("T", "T"),
    ("dtype", "dtype"),
    ("linear_ms", "linear step ms"),
    ("recurrent_ms", "recurrent ms"),
    ("dense_ms", "dense step ms"),
    ("speedup", "x dense"),
    ("state_kib", "state KiB"),
    ("cache_mib", "cache MiB"),
]


def gemm_rates(dtype: torch.dtype, feat: int, chunk: int = CHUNK) -> dict[str, float]:
    """GFLOP/s of a large ``torch.mm`` (2048^3; bfloat16 512^3) and of ``torch.bmm`` on 512 chunk-shaped tiles
    ([C, F] @ [F, C]), into preallocated outputs, in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    size = 2048 if dtype == torch.float32 else 512  # bf16 GEMM can be very slow without bf16 units
    a = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty_like(a)
    large = 2 * size**3 / median_ms(lambda: torch.mm(a, a, out=out), repeats=5) / 1e6
    n = 512 if dtype == torch.float32 else 32
    x = torch.randn(n, chunk, feat, generator=gen).to(dtype)
    y = torch.randn(n, feat, chunk, generator=gen).to(dtype)
    z = torch.empty(n, chunk, chunk, dtype=dtype)
    tiles = 2 * n * chunk * feat * chunk / median_ms(lambda: torch.bmm(x, y, out=z)) / 1e6
    return {"gemm_gflops": large, "chunk_gemm_gflops": tiles}


def features(length: int, heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Non-negative feature-mapped q, k (elu + 1) and v [1, heads, T, dim]; seeded."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, heads, length, dim)
    q = (F.elu(torch.randn(shape, generator=gen)) + 1) / dim**0.5
    k = F.elu(torch.randn(shape, generator=gen)) + 1
    v = torch.randn(shape, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def gate(dtype: torch.dtype, heads: int, dim: int, length: int = GATE_LENGTH) -> dict:
    """The engine (as timed) within the float64 bound at ``length``: max error and of-bound."""
    from longattn.testing import linear_bound

    q, k, v = features(length, heads, dim, dtype, seed=1)
    bound = linear_bound(q, k, v)
    out, _ = linear_attention(q, k, v, chunk_size=CHUNK)
    diff = (out.double() - bound.ref).abs()
    ratio = (diff / bound.out).max().item()
    return {"gate": bool(ratio <= 1), "gate_max_err": diff.max().item(), "gate_of_bound": ratio}


def prefill_record(length, dtype, heads, dim, sdpa_max, rates, repeats) -> dict:
    q, k, v = features(length, heads, dim, dtype)
    warm = 1 if length <= 8192 else 0
    lin = median_ms(lambda: linear_attention(q, k, v, chunk_size=CHUNK), warmup=warm,
                    repeats=repeats)  # fmt: skip
    flops = 2 * heads * length * (CHUNK * dim + CHUNK * dim + 2 * dim * dim)
    gflops = flops / lin / 1e6
    rec = {
        "bench": "linear_prefill", "T": length, "dtype": str(dtype).replace("torch.", ""),
        "heads": heads, "dim": dim, "chunk": CHUNK, "linear_ms": lin, "flops": flops,
        "gflops": gflops, "of_gemm": gflops / rates["gemm_gflops"],
        "of_chunk_gemm": gflops / rates["chunk_gemm_gflops"], **rates,
        "impl": "native" if _native_runs(q, k, v) else "torch", "sdpa_ms": None,
    }  # fmt: skip
    if length <= sdpa_max:
        qr, kr, vr = (torch.randn(1, heads, length, dim).to(dtype) for _ in range(3))
        # quadratic: one timed run beyond 16K (a 32K causal call takes minutes on one core)
        rec["sdpa_repeats"] = repeats if length <= 8192 else 3 if length <= 16384 else 1
        rec["sdpa_ms"] = median_ms(
            lambda: F.scaled_dot_product_attention(qr, kr, vr, is_causal=True),
            warmup=warm, repeats=rec["sdpa_repeats"],
        )  # fmt: skip
        rec["speedup"] = rec["sdpa_ms"] / lin
    return rec


def _native_runs(q, k, v) -> bool:
    try:
        linear_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], impl="native")
    except ValueError:
        return False
    return True


def scaling_record(small: int, large: int, dtype, heads, dim, repeats) -> dict:
    """The large / small time ratio with the two lengths timed in turn within each repeat, so a
    slow phase of a shared machine hits both alike (the ratio is the issue's target)."""
    inputs = {n: features(n, heads, dim, dtype) for n in (small, large)}
    times: dict[int, list[float]] = {small: [], large: []}
    for q, k, v in inputs.values():
        linear_attention(q, k, v, chunk_size=CHUNK)  # warm-up
    for _ in range(repeats):
        for n, (q, k, v) in inputs.items():
            start = time.perf_counter()
            linear_attention(q, k, v, chunk_size=CHUNK)
            times[n].append((time.perf_counter() - start) * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"bench": "linear_scaling", "dtype": str(dtype).replace("torch.", ""), "T": large,
            "T_small": small, "small_ms": med[small], "large_ms": med[large],
            "ratio": med[large] / med[small], "ideal_ratio": large / small}  # fmt: skip


def extrapolate(records: list[dict]) -> None:
    """Fill SDPA beyond the largest measured T of each dtype by T^2 scaling (marked as such)."""
    prefill = [r for r in records if r["bench"] == "linear_prefill"]
    for dtype in {r["dtype"] for r in prefill}:
        rows = [r for r in prefill if r["dtype"] == dtype]
        measured = [r for r in rows if r["sdpa_ms"] is not None]
        if not measured:
            continue
        top = max(measured, key=lambda r: r["T"])
        for r in rows:
            if r["sdpa_ms"] is None:
                r["sdpa_extrapolated_ms"] = top["sdpa_ms"] * (r["T"] / top["T"]) ** 2
                r["speedup_extrapolated"] = r["sdpa_extrapolated_ms"] / r["linear_ms"]


def decode_record(length, dtype, heads, dim, repeats) -> dict:
    """One decode step: the linear state (O(1)) against one query over a dense cache of T keys."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = features(1, heads, dim, dtype, seed=3)
    state = LinearState(torch.rand(1, heads, dim, dim, generator=gen), torch.rand(1, heads, dim))
    lin = median_ms(lambda: linear_attention(q, k, v, state=state), warmup=3, repeats=repeats * 4)
    rec = median_ms(lambda: linear_recurrent(q, k, v, state=state), warmup=3, repeats=repeats * 4)
    keys = torch.randn(1, heads, length, dim, generator=gen).to(dtype)
    values = torch.randn(1, heads, length, dim, generator=gen).to(dtype)
    dense = median_ms(lambda: F.scaled_dot_product_attention(q, keys, values), warmup=2,
                      repeats=repeats * 4)  # fmt: skip
    return {
        "bench": "linear_decode", "T": length, "dtype": str(dtype).replace("torch.", ""),
        "heads": heads, "dim": dim, "linear_ms": lin, "recurrent_ms": rec, "dense_ms": dense,
        "speedup": dense / lin,
        "state_kib": (state.kv.numel() + state.k_sum.numel()) * 4 / 1024,
        "cache_mib": 2 * keys.numel() * keys.element_size() / 2**20,
    }  # fmt: skip


def plot(records: list[dict], path: pathlib.Path) -> None:
    """Log-log: prefill time vs T (linear, SDPA measured and extrapolated) and decode step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype, color in (("float32", "tab:blue"), ("bfloat16", "tab:orange")):
        pre = sorted((r for r in records if r["bench"] == "linear_prefill" and r["dtype"] == dtype),
                     key=lambda r: r["T"])  # fmt: skip
        if pre:
            left.plot([r["T"] for r in pre], [r["linear_ms"] for r in pre], "o-", color=color,
                      label=f"linear {dtype}")  # fmt: skip
            sd = [r for r in pre if r["sdpa_ms"] is not None]
            left.plot([r["T"] for r in sd], [r["sdpa_ms"] for r in sd], "s--", color=color,
                      alpha=0.6, label=f"causal SDPA {dtype}")  # fmt: skip
            ex = [r for r in pre if r.get("sdpa_extrapolated_ms")]
            if ex and sd:
                xs, ys = [sd[-1]["T"]] + [r["T"] for r in ex], [sd[-1]["sdpa_ms"]]
                left.plot(xs, ys + [r["sdpa_extrapolated_ms"] for r in ex], ":", color=color,
                          alpha=0.6, label=f"SDPA {dtype} extrapolated (T^2)")  # fmt: skip
        dec = sorted((r for r in records if r["bench"] == "linear_decode" and r["dtype"] == dtype),
                     key=lambda r: r["T"])  # fmt: skip
        if dec:
            right.plot([r["T"] for r in dec], [r["linear_ms"] for r in dec], "o-", color=color,
                       label=f"linear state {dtype}")  # fmt: skip
            right.plot([r["T"] for r in dec], [r["dense_ms"] for r in dec], "s--", color=color,
                       alpha=0.6, label=f"dense cache {dtype}")  # fmt: skip
    for ax, title in ((left, "prefill (causal)"), (right, "decode step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary(records: list[dict]) -> list[str]:
    """The issue's targets read off the records: 128K / 8K time ratio, speedup at the top T."""
    lines = []
    pre = [r for r in records if r["bench"] == "linear_prefill"]
    for r in (r for r in records if r["bench"] == "linear_scaling"):
        lines.append(f"{r['dtype']}: time {r['T'] // 1024}K / {r['T_small'] // 1024}K = "
                     f"{r['ratio']:.1f} timed in turn (linear: {r['ideal_ratio']:.0f})")  # fmt: skip
    for dtype in sorted({r["dtype"] for r in pre}):
        by_t = {r["T"]: r for r in pre if r["dtype"] == dtype}
        if 8192 in by_t and max(by_t) > 8192:
            top = max(by_t)
            lines.append(f"{dtype}: time {top // 1024}K / 8K = "
                         f"{by_t[top]['linear_ms'] / by_t[8192]['linear_ms']:.1f} (linear: "
                         f"{top / 8192:.0f}; the sweep's medians)")  # fmt: skip
        top = by_t[max(by_t)]
        if top.get("speedup"):
            lines.append(f"{dtype}: at T={top['T']} {top['speedup']:.0f}x causal SDPA (measured)")
        elif top.get("speedup_extrapolated"):
            lines.append(f"{dtype}: at T={top['T']} {top['speedup_extrapolated']:.0f}x causal "
                         f"SDPA (SDPA extrapolated by T^2 from its largest measured T)")  # fmt: skip
    return lines


def run_cli(args: argparse.Namespace) -> int:
    heads, dim = args.heads, args.dim
    dtypes = [getattr(torch, d.strip()) for d in (args.dtypes or "float32,bfloat16").split(",")]
    lengths = _lengths(args)
    decode_lengths = QUICK_DECODE if args.quick else DECODE_LENGTHS
    sdpa_max = args.sdpa_max if not args.quick else min(args.sdpa_max, 8192)
    repeats = 3 if args.quick else 5
    out = pathlib.Path(args.out or "results/bench_linear.jsonl")
    writer = JsonlWriter(out)
    env = environment()
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
          flush=True)  # fmt: skip
    records, red = [], []
    for dtype in dtypes:
        checked = gate(dtype, heads, dim)
        print(f"  gate {dtype}: {checked}", flush=True)
        if not checked["gate"]:
            red.append(f"{dtype} (of bound {checked['gate_of_bound']:.3g})")
            continue
        rates = gemm_rates(torch.float32, dim)  # the engine accumulates in float32
        rates["bf16_gemm_gflops"] = gemm_rates(torch.bfloat16, dim)["gemm_gflops"]
        for length in lengths:
            rec = {**prefill_record(length, dtype, heads, dim, sdpa_max, rates, repeats), **checked}
            records.append(rec)
            print(f"  prefill T={length} {dtype}: linear {rec['linear_ms']:.1f} ms, sdpa "
                  f"{rec['sdpa_ms'] if rec['sdpa_ms'] is None else round(rec['sdpa_ms'], 1)} ms",
                  flush=True)  # fmt: skip
        if 8192 in lengths and max(lengths) > 8192:
            records.append(scaling_record(8192, max(lengths), dtype, heads, dim, repeats))
        for length in decode_lengths:
            records.append({**decode_record(length, dtype, heads, dim, repeats), **checked})
    extrapolate(records)
    for rec in records:
        writer.write({**rec, **env})
    pre = [_shown(r) for r in records if r["bench"] == "linear_prefill"]
    print(format_table(pre, PREFILL_COLUMNS))
    print(format_table([r for r in records if r["bench"] == "linear_decode"], DECODE_COLUMNS))
    print("\n".join(summary(records)))
    print(f"GEMM rates (same run, GFLOP/s): {_rates_line(pre)}; '~': SDPA extrapolated by T^2 "
          f"beyond T={sdpa_max} (not measured); of GEMM: the kernel's executed FLOPs (full C x C "
          f"tiles, C={CHUNK}) per second / the large fp32 torch.mm rate; of chunk GEMM: / "
          f"torch.bmm on [C, F] @ [F, C] tiles")  # fmt: skip
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if red:
        print("correctness gate FAILED (not timed): " + ", ".join(red), file=sys.stderr)
    return 1 if red else 0


def _shown(rec: dict) -> dict:
    """A prefill record for the table: extrapolated SDPA figures marked with '~'."""
    if not rec.get("speedup_extrapolated"):
        return rec
    return {**rec, "sdpa_ms": f"~{rec['sdpa_extrapolated_ms']:.0f}",
            "speedup": f"~{rec['speedup_extrapolated']:.0f}"}  # fmt: skip


def _rates_line(pre: list[dict]) -> str:
    if not pre:
        return "-"
    r = pre[0]
    return (f"fp32 mm {r['gemm_gflops']:.1f}, fp32 chunk bmm {r['chunk_gemm_gflops']:.1f}, "
            f"bf16 mm {r['bf16_gemm_gflops']:.1f}")  # fmt: skip


def _lengths(args: argparse.Namespace) -> list[int]:
    if getattr(args, "lengths", None):
        return [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.length:
        return [args.length]
    return list(QUICK_LENGTHS if args.quick else LENGTHS)
