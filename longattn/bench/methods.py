"""``longattn bench --quick``: every registered method on one synthetic problem, against dense SDPA.

Per method: the correctness gate (sampled query rows against the float64 oracle, with the bound of
``longattn.testing``), the density of visited (query, key) pairs, and the median time of
``attention(..., impl="auto")`` as a ratio to dense SDPA timed in the same run. A decode-time select
method is gated but not timed here: on a prefill it is dense attention by definition (``longattn
bench decode`` times it where it acts). ``impl`` is the implementation that ran.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable

import torch

from longattn import linear
from longattn.api import attention, choose_impl, make_call, visible_mask
from longattn.bench.common import (
    JsonlWriter,
    cpu_line,
    environment,
    format_table,
    impl_that_runs,
    median_ms,
    peak_extra_mib,
)
from longattn.kernels.sdpa import sdpa_attention
from longattn.kernels.tiled import tiled_attention
from longattn.method import from_string, registry
from longattn.prefill import visible_rows
from longattn.testing import make_qkv, reference_bound

# Benchmark parameters per registered method, as functions of the sequence length. A method missing
# here is benchmarked with its defaults.
BENCH_SPECS: dict[str, Callable[[int], list[str]]] = {
    "dense": lambda t: ["dense", "dense:causal=false"],
    "sliding_window": lambda t: [
        "sliding_window:window=1024",
        "sliding_window:window=512,dilation=2",
    ],
    "streaming_llm": lambda t: ["streaming_llm:sinks=4,window=1024"],
    "strided": lambda t: ["strided:stride=128", "strided:stride=128,mode=fixed,summary=8"],
    "power": lambda t: ["power:block_size=128,window=2"],
    "neighborhood2d": lambda t: [f"neighborhood2d:height={max(t // 128, 13)},width=128,kernel=13"],
    "per_head_window": lambda t: ["per_head_window:windows=256/512/1024/2048,sinks=4"],
}


def density(call, chunk: int = 256, index=None) -> float:
    """Fraction of (query, key) pairs the method lets attend, over all heads (exact, chunked); a
    plan method's from the ``index`` it ran and its token columns."""
    visible = 0
    b, h, _, tq, tk, _ = call.shape
    for q0 in range(0, tq, chunk):
        if index is not None:
            rows = torch.arange(q0, min(q0 + chunk, tq))
            m = visible_rows(index, rows, call.q_pos, call.kv_pos, call.derived.get("plan_columns"))
            visible += int(m.expand(b, h, m.shape[2], tk).sum())
            continue
        part = make_call(
            call.q[:, :, q0 : q0 + chunk],
            call.k,
            call.v,
            call.method,
            call.scale,
            call.q_pos[:, q0 : q0 + chunk],
            call.kv_pos,
        )
        m = visible_mask(part)
        visible += int(m.expand(b, h, m.shape[2], tk).sum())
    return visible / (b * h * tq * tk)


def gate(call, out: torch.Tensor, rows: torch.Tensor, index=None) -> tuple[float, float]:
    """(max error, share of the bound used) of ``out`` on the sampled query ``rows`` against the
    float64 oracle; the bound is ``longattn.testing.reference_bound``, element by element, so the
    gate passes when the share is <= 1. A plan method's oracle attends the blocks of the ``index``
    the call ran and the plan's token columns (a plan of the sampled rows alone would be another
    plan)."""
    q_rows = call.q[:, :, rows]
    if index is not None:
        columns = call.derived.get("plan_columns")  # a vertical-slash plan's token columns
        visible = visible_rows(index, rows, call.q_pos, call.kv_pos, columns)
    else:
        kwargs = {"q_positions": call.q_pos[:, rows], "kv_positions": call.kv_pos,
                  "scale": call.scale}  # fmt: skip
        call64 = make_call(*(t.double() for t in (q_rows, call.k, call.v)), call.method, **kwargs)
        visible = visible_mask(call64)
    bound = reference_bound(q_rows, call.k, call.v, visible, call.scale)
    diff = (out[:, :, rows].double() - bound.ref.out).abs()
    used = torch.where(diff == 0, 0.0, diff / bound.out).nan_to_num(torch.inf)
    return diff.max().item(), used.max().item()


def run_methods_bench(
    length: int = 8192,
    n_heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    out_path: str | None = None,
    repeats: int = 3,
    gate_rows: int = 128,
    log: Callable[[str], None] = print,
) -> list[dict]:
    writer = JsonlWriter(out_path)
    env = environment()
    q, k, v = make_qkv(1, n_heads, n_heads, length, length, head_dim, dtype=dtype, seed=0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(length, generator=gen)[:gate_rows].sort().values
    scale = head_dim**-0.5
    baselines = {
        causal: median_ms(
            lambda c=causal: sdpa_attention(q, k, v, causal=c, scale=scale), repeats=repeats
        )
        for causal in (True, False)
    }
    records = []
    for name in registry():
        for spec in BENCH_SPECS.get(name, lambda t, n=name: [n])(length):
            method = from_string(spec)  # the call may run another rule (a select prefill: dense)
            if method.hook in linear.HOOKS:
                rec = linear_record(q, k, v, method, baselines, repeats, env)
                records.append(rec)
                writer.write(rec)
                log(f"  {spec}: impl={rec['impl']} gate={'ok' if rec['gate'] else 'FAILED'}")
                continue
            call = make_call(q, k, v, method)
            impl = choose_impl(call)
            res = impl.run(call)
            index = call.derived.get("block_index") if call.method.hook == "plan" else None
            err, used = gate(call, res.out, rows, index)
            rec = {
                "bench": "methods",
                "method": method.name,
                "params": method.describe(),
                "impl": impl_that_runs(call),
                "T": length,
                "H": n_heads,
                "D": head_dim,
                "dtype": str(dtype).replace("torch.", ""),
                "density": density(call, index=index),
                "error": err,
                "bound_used": used,
                "gate": used <= 1,
                **env,
            }
            if method.hook == "select":  # a prefill timing would be dense attention's
                rec["note"] = "dense in prefill by definition: timed by `longattn bench decode`"
            elif rec["gate"]:
                # a plan's estimate is part of its cost: each timed run plans anew (a fresh call)
                fresh = call.method.hook == "plan"

                def run(i=impl, c=call, f=fresh):
                    return i.run(dataclasses.replace(c) if f else c)

                rec.update(_timing(run, call, baselines, repeats))
            records.append(rec)
            writer.write(rec)
            log(f"  {spec}: impl={rec['impl']} gate={'ok' if rec['gate'] else 'FAILED'}")
    return records


LINEAR_GATE_TOKENS = 512


def linear_record(q, k, v, method, baselines: dict[bool, float], repeats: int, env: dict) -> dict:
    """A linear method: gated against its own float64 oracle and derived bound
    (``assert_linear_method_close``) on a call over the first ``LINEAR_GATE_TOKENS`` tokens (the
    oracle is quadratic), timed on the whole call against SDPA; error vs softmax is
    ``longattn bench linear-error``'s, speed vs length ``longattn bench linear``'s."""
    from longattn.testing import assert_linear_method_close

    n = min(q.shape[2], LINEAR_GATE_TOKENS)
    part = [t[:, :, :n] for t in (q, k, v)]
    impl = "forward" if method.hook == "forward" else "linear"
    try:
        err, gate_ok = (
            assert_linear_method_close(attention(*part, method=method), *part, method),
            True,
        )
    except AssertionError:
        err, gate_ok = float("nan"), False
    rec = {"bench": "methods", "method": method.name, "params": method.describe(), "impl": impl,
           "T": q.shape[2], "H": q.shape[1], "D": q.shape[3],
           "dtype": str(q.dtype).replace("torch.", ""), "density": None, "error": err,
           "gate": gate_ok, **env}  # fmt: skip
    if gate_ok:
        base = baselines[method.is_causal]
        ms = median_ms(lambda: attention(q, k, v, method=method), repeats=repeats)
        rec.update(ms=ms, baseline="sdpa_causal" if method.is_causal else "sdpa",
                   baseline_ms=base, speedup=base / ms)  # fmt: skip
    return rec


def _timing(run: Callable, call, baselines: dict[bool, float], repeats: int) -> dict:
    """Median time of a gated call, as a ratio to dense SDPA (causal or not, as the method)."""
    base = baselines[call.method.is_causal]
    ms = median_ms(run, repeats=repeats)
    return {
        "ms": ms,
        "baseline": "sdpa_causal" if call.method.is_causal else "sdpa",
        "baseline_ms": base,
        "speedup": base / ms,
        "peak_extra_mib": peak_extra_mib(run),
    }


def tiled_memory_check(length: int = 32768, n_heads: int = 8, head_dim: int = 64) -> dict:
    """Peak extra memory of the exact tiled executor, causal fp32 (the O(T) memory claim)."""
    q, k, v = make_qkv(1, n_heads, n_heads, length, length, head_dim, seed=1)
    pos = torch.arange(length).view(1, -1)

    def run():
        return tiled_attention(
            q,
            k,
            v,
            scale=head_dim**-0.5,
            q_pos=pos,
            kv_pos=pos,
            mask_fn=lambda b, h, qp, kp: kp <= qp,
            bounds_fn=lambda h, ql, qh, kl, kh: (kl <= qh, kh <= ql),
        )

    output_mib = q.numel() * 4 / 2**20
    return {
        "bench": "tiled_memory",
        "impl": "tiled",  # tiled_attention called directly
        "T": length,
        "H": n_heads,
        "D": head_dim,
        "dtype": "float32",
        "peak_extra_mib": peak_extra_mib(run),
        "output_mib": output_mib,
        "dense_scores_mib": n_heads * length * length * 4 / 2**20,
    }


METHOD_COLUMNS = [
    ("params", "method"),
    ("impl", "impl"),
    ("density", "density"),
    ("error", "max err"),
    ("bound_used", "of bound"),
    ("gate", "gate"),
    ("ms", "ms"),
    ("baseline_ms", "sdpa ms"),
    ("speedup", "speedup"),
    ("peak_extra_mib", "peak MiB"),
    ("note", "note"),
]


def methods_table(records: list[dict]) -> str:
    return format_table(records, METHOD_COLUMNS)


def run_cli(args) -> int:
    """``longattn bench [methods]``: the table for every registered method and the memory check."""
    length = args.length or 8192
    print(
        f"longattn bench: every registered method, T={length}, H={args.heads}, D={args.dim}, "
        f"{args.dtype}, {torch.get_num_threads()} threads\nCPU: {cpu_line()}"
    )
    records = run_methods_bench(
        length,
        args.heads,
        args.dim,
        getattr(torch, args.dtype),
        args.out,
        repeats=3 if args.quick else 7,
    )
    print(methods_table(records))
    mem_len = args.memory_length
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
            fh.write(json.dumps(dict(mem, **environment())) + "\n")
        print(f"\nJSONL: {args.out}")
    failed = [r["params"] for r in records if not r["gate"]]
    if failed:
        print(f"correctness gate FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
