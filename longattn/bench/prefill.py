"""``longattn bench prefill``: dynamic sparse prefill (``SparsePrefill`` plan methods) against dense.

Two modes, both gated first (no timing is reported for a red gate) and both writing JSONL, a table
on stdout and a plot:

- ``--synthetic`` (default): random q/k/v, 32 q / 8 kv heads d=128 and 8 / 8 d=64, fp32 and bf16.
  Per plan method and budget: the median attention time (a fresh call each run, so the plan's
  estimate is part of its time) against causal SDPA timed in the same run; the estimation alone
  (``longattn.prefill.plan_index`` on a fresh call); the realised block density
  (``longattn.prefill.density``) and element density (visited causal pairs over all causal pairs);
  the error on sampled query rows against the float64 oracle of the SAME index (the gate, as
  ``longattn bench methods``) and against dense attention; ``of ideal`` = speedup x element density
  (1.0: the kernel is as fast per visited pair as SDPA).
- ``--model smollm2-135m``: real text through ``longattn.integrations.hf.use(model, method)``. The
  whole-model prefill time (every layer over the prompt, the last position's logits, as
  generation's prefill) against the model's own ``sdpa`` on the same prompt, the two timed in
  turn within each repeat; the plan hook's time inside that prefill summed over layers (a timing
  subclass of the method, used only here) and ``plan_index`` on each layer's captured q/k; per
  layer, on the dense pass's captured q/k/v: density, attention recall (the planned blocks' share
  of the exact block mass, ``PrefillView.block_mass``, plus the exact mass on a plan's token
  columns), the gate and the output error against
  dense attention on sampled rows; the perplexity of the prompt's continuation, scored densely
  after a sparse prefill, against the same after a dense one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

from longattn import prefill
from longattn.api import attention, choose_impl, make_call
from longattn.bench.common import (
    JsonlWriter,
    cpu_line,
    environment,
    format_table,
    impl_that_runs,
    median_ms,
)
from longattn.bench.methods import gate
from longattn.kernels import vertical
from longattn.kernels.sdpa import sdpa_attention
from longattn.method import Method, SparsePrefill, from_string, registry
from longattn.testing import make_qkv
from longattn.types import BlockIndex

SHAPES = {"32/8/d128": (32, 8, 128), "8/8/d64": (8, 8, 64)}
LENGTHS = (32768, 65536)
QUICK_LENGTHS = (8192,)
MODEL_LENGTHS = (8192,)
TOPK_BUDGETS = (0.1, 0.2)
GATE_ROWS = 64
# rows of the float64 oracle at once: R x H x T doubles per chunk
GATE_CHUNK = 8
CONTINUATION = 128  # held-out tokens scored after the prefill
SYNTH_COLUMNS = [
    ("T", "T"), ("shape", "heads"), ("dtype", "dtype"), ("label", "method"), ("impl", "impl"),
    ("density", "blocks"), ("element_density", "pairs"), ("bound_used", "of bound"),
    ("gate", "gate"), ("rel_err_dense", "err vs dense"), ("ms", "ms"), ("estimate_ms", "est ms"),
    ("estimate_share", "est share"), ("baseline_ms", "sdpa ms"), ("speedup", "speedup"),
    ("of_ideal", "of ideal"),
]  # fmt: skip
MODEL_COLUMNS = [
    ("T", "T"), ("label", "method"), ("density", "blocks"), ("element_density", "pairs"),
    ("recall", "recall"), ("rel_err_dense", "err vs dense"), ("gate", "gate"),
    ("ms", "model ms"), ("sdpa_ms", "sdpa ms"), ("speedup", "speedup"),
    ("plan_hook_ms", "plan hook ms"), ("plan_index_ms", "plan_index ms"),
    ("estimate_share", "est share"), ("ppl", "ppl"), ("ppl_dense", "ppl dense"),
    ("ppl_delta", "ppl delta"),
]  # fmt: skip


def default_methods(budgets: tuple[float, ...] = TOPK_BUDGETS) -> list[Method]:
    """Every registered ``SparsePrefill`` method at its defaults, plus block_topk at ``budgets``
    (each distinct configuration once)."""
    methods: dict[str, Method] = {}
    for name, cls in registry().items():
        if issubclass(cls, SparsePrefill):
            method = from_string(name)
            methods.setdefault(method.describe(), method)
    for budget in budgets:
        method = from_string(f"block_topk:budget={budget}")
        methods.setdefault(method.describe(), method)
    return list(methods.values())


def parse_methods(spec: str | None, budgets: tuple[float, ...]) -> list[Method]:
    """``--methods`` (method strings, as ``longattn eval``) or the defaults; plan methods only."""
    if not spec:
        return default_methods(budgets)
    from longattn.eval.runner import split_methods

    methods = [from_string(s) for s in split_methods(spec)]
    wrong = [m.describe() for m in methods if not isinstance(m, SparsePrefill)]
    if wrong:
        raise ValueError(f"bench prefill times SparsePrefill (plan) methods, got {wrong}")
    return methods


def label(method: Method) -> str:
    """``name:field=value`` with only the fields that differ from the method's defaults."""
    default = type(method)()
    changed = [f"{f.name}={getattr(method, f.name)}" for f in dataclasses.fields(method)
               if f.init and getattr(method, f.name) != getattr(default, f.name)]  # fmt: skip
    return method.name + (":" + ",".join(changed) if changed else "")


def element_density(index: BlockIndex, columns: torch.Tensor | None = None) -> float:
    """Visited causal (query, key) pairs over all causal pairs, for queries and keys at the same
    positions 0..T-1: the blocks of ``index`` and a plan's token ``columns`` [Bi, Hi, nq, n] (-1
    unused; none inside a visited block, as ``longattn.prefill.tidy_columns`` leaves them). Exact,
    from the block counts and the columns: no ``T x T``."""
    if index.q_len != index.kv_len:
        raise ValueError(
            f"element_density needs q_len == kv_len, got {index.q_len}, {index.kv_len}"
        )
    t, block = index.q_len, index.block_size
    n = index.n_q_blocks
    lengths = torch.full((n,), block, dtype=torch.float64)
    lengths[-1] = t - (n - 1) * block
    pairs = lengths.view(-1, 1) * lengths.view(1, -1)  # [nq, nk] all pairs of a block pair
    pairs = torch.tril(pairs, -1) + torch.diag(lengths * (lengths + 1) / 2)  # causal pairs
    visited = index.layout()[0].double()  # [Bi, Hi, nq, nk]
    counted = (visited * pairs).sum((-1, -2))  # [Bi, Hi]
    if columns is not None:
        # a column c in query block [lo, hi) is seen by the block's queries at positions >= c
        lo = torch.arange(n, dtype=torch.int64).view(-1, 1) * block  # [nq, 1]
        hi = (lo + block).clamp(max=t)
        seen = (hi - torch.maximum(lo, columns)).clamp(min=0)  # [Bc, Hc, nq, n]
        counted = counted + torch.where(columns >= 0, seen, 0).sum((-1, -2)).double()
    return float((counted / (t * (t + 1) / 2)).mean())


def chunked_gate(call, out: torch.Tensor, rows: torch.Tensor, index) -> tuple[float, float]:
    """``longattn.bench.methods.gate`` on ``rows`` in chunks (its float64 oracle holds R x H x T)."""
    results = [gate(call, out, rows[i : i + GATE_CHUNK], index)
               for i in range(0, len(rows), GATE_CHUNK)]  # fmt: skip
    return max(r[0] for r in results), max(r[1] for r in results)


def relative_error(out: torch.Tensor, dense: torch.Tensor, rows: torch.Tensor) -> float:
    """||out - dense|| / ||dense|| over the sampled query rows (float64)."""
    a, b = out[:, :, rows].double(), dense[:, :, rows].double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def dense_rows(q, k, v, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, T, D] float64 causal dense attention, filled on ``rows`` only (zeros elsewhere)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    keys = torch.arange(k.shape[2])
    for i in range(0, len(rows), GATE_CHUNK):
        part = rows[i : i + GATE_CHUNK]
        logits = (q[:, :, part].double() @ k64.transpose(-1, -2)) * scale  # [B, H, R, T]
        logits = logits.masked_fill(keys.view(1, -1) > part.view(-1, 1), -math.inf)
        out[:, :, part] = torch.softmax(logits, dim=-1) @ v64
    return out


def sample_rows(length: int, n: int = GATE_ROWS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randperm(length, generator=gen)[:n].sort().values


def measure_plan(q, k, v, method: Method, rows: torch.Tensor, dense: torch.Tensor) -> dict:
    """One planned call, gated: the implementation that ran it, its densities, the gate against
    the oracle of the same index and the error against dense attention on ``rows``."""
    call = make_call(q, k, v, method)
    impl = choose_impl(call)
    res = impl.run(call)
    index = call.derived.get("block_index")
    rec = {"params": method.describe(), "label": label(method), "method": method.name,
           "impl": impl_that_runs(call)}  # fmt: skip
    if index is None:  # dense by the library's rule (short call): nothing planned
        rec.update(density=1.0, element_density=1.0, note="dense (no plan)")
        index_causal = None
    else:
        index_causal = call.derived["plan_view"].causal
        columns = call.derived.get("plan_columns")
        rec.update(density=prefill.density(index, index_causal),
                   element_density=element_density(index, columns))  # fmt: skip
    err, used = chunked_gate(call, res.out, rows, index)
    rec.update(error=err, bound_used=used, gate=used <= 1)
    rec["rel_err_dense"] = relative_error(res.out, dense, rows)
    rec["_call"], rec["_index_causal"] = call, index_causal
    return rec


def synthetic_config(length, shape, dtype, methods, repeats, writer, log) -> list[dict]:
    n_heads, n_kv, dim = SHAPES[shape]
    q, k, v = make_qkv(1, n_heads, n_kv, length, length, dim, dtype=dtype, seed=0)
    scale = dim**-0.5
    rows = sample_rows(length)
    sdpa_ms = median_ms(lambda: sdpa_attention(q, k, v, causal=True, scale=scale), repeats=repeats)
    dense = dense_rows(q, k, v, rows, scale)
    base = {"bench": "prefill_synthetic", "T": length, "shape": shape, "H": n_heads,
            "H_kv": n_kv, "D": dim, "dtype": str(dtype).replace("torch.", ""),
            "baseline": "sdpa_causal", "baseline_ms": sdpa_ms}  # fmt: skip
    records = []
    for method in methods:
        rec = measure_plan(q, k, v, method, rows, dense)
        call = rec.pop("_call")
        rec.pop("_index_causal")
        if rec["gate"]:
            impl = choose_impl(call)
            # a fresh call per run: the plan (estimate + index) is part of the timed work
            rec["ms"] = median_ms(
                lambda i=impl, m=method: i.run(make_call(q, k, v, m)), repeats=repeats
            )
            rec["estimate_ms"] = median_ms(
                lambda m=method: prefill.plan_index(make_call(q, k, v, m)), repeats=repeats
            )
            rec["estimate_share"] = rec["estimate_ms"] / rec["ms"]
            rec["speedup"] = sdpa_ms / rec["ms"]
            rec["of_ideal"] = rec["speedup"] * rec["element_density"]
        rec = {**base, **rec, **environment()}
        writer.write(rec)
        records.append(rec)
        log(f"  T={length} {shape} {base['dtype']} {rec['params']}: gate "
            f"{'ok' if rec['gate'] else 'FAILED'}")  # fmt: skip
    return records


def run_synthetic(lengths, shapes, dtypes, methods, repeats, out, log=print) -> list[dict]:
    writer = JsonlWriter(out)
    records = []
    for shape in shapes:
        for dtype in dtypes:
            for length in lengths:
                records += synthetic_config(length, shape, dtype, methods, repeats, writer, log)
    return records


def timed_plan(method: SparsePrefill) -> tuple[SparsePrefill, list[float]]:
    """A copy of ``method`` whose ``plan`` hook appends its seconds to the returned list (a
    benchmark-only subclass, never registered: the library's path is unchanged)."""
    cls = type(method)
    spent: list[float] = []

    def plan(self, view):
        start = time.perf_counter()
        layout = cls.plan(self, view)
        spent.append(time.perf_counter() - start)
        return layout

    timed_cls = type(f"Timed{cls.__name__}", (cls,), {"plan": plan, "__doc__": cls.__doc__})
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    return timed_cls(**fields), spent


def column_recall(call, columns: torch.Tensor) -> float:
    """The exact attention mass on a plan's token ``columns`` [Bi, Hi, nq, n]: per query, the
    columns' softmax weights over all its causal keys (``exp(lse_columns - lse_dense)``), averaged
    over each query block's queries, then over query blocks, rows and heads, as the block-mass
    recall it adds to (the columns lie outside the visited blocks)."""
    block = call.method.block_size
    args = (call.q, call.k, call.v, columns, block, call.scale, call.q_pos, call.kv_pos)
    col_lse = vertical.column_attention(*args)[1].double()  # [B, H, Tq]
    kwargs = {"scale": call.scale, "q_positions": call.q_pos, "kv_positions": call.kv_pos}
    dense_lse = attention(call.q, call.k, call.v, impl="tiled", **kwargs).lse.double()
    share = torch.exp(col_lse - dense_lse).nan_to_num(0.0)  # a query that sees nothing: 0
    n_q = -(-share.shape[-1] // block)
    padded = torch.nn.functional.pad(share, (0, n_q * block - share.shape[-1]))
    counts = torch.full((n_q,), float(block), dtype=torch.float64)
    counts[-1] = share.shape[-1] - (n_q - 1) * block
    return float((padded.view(*share.shape[:2], n_q, block).sum(-1) / counts).mean())


@torch.no_grad()
def layer_facts(method: Method, captured: dict, rows: torch.Tensor) -> dict:
    """Per layer, on the dense pass's q/k/v: block and element density, attention recall (planned
    blocks' share of the exact block mass, plus ``column_recall``), the gate and the error vs dense on ``rows``, and the
    time of ``plan_index`` on a fresh call; the record holds the lists and their means."""
    keys = ("density", "element_density", "recall", "rel_err_dense", "bound_used", "plan_index_ms")
    per: dict[str, list] = {key: [] for key in keys}
    for layer in sorted(captured):
        q, k, v = captured[layer]
        scale = q.shape[-1] ** -0.5
        rec = measure_plan(q, k, v, method, rows, dense_rows(q, k, v, rows, scale))
        call, causal = rec.pop("_call"), rec.pop("_index_causal")
        recall = 1.0
        if causal is not None:
            mass = call.derived["plan_view"].block_mass()  # [B, H, nq, nk]
            chosen = call.derived["block_index"].layout()[0]
            recall = float(((mass * chosen).sum(-1) / mass.sum(-1).clamp(min=1e-30)).mean())
            columns = call.derived.get("plan_columns")
            if columns is not None:  # a vertical-slash plan's token columns hold mass too
                recall += column_recall(call, columns)
        start = time.perf_counter()
        prefill.plan_index(make_call(q, k, v, method))
        per["plan_index_ms"].append((time.perf_counter() - start) * 1e3)
        for key in keys[:-1]:
            per[key].append(recall if key == "recall" else rec[key])
    facts = {f"layer_{key}": values for key, values in per.items()}
    facts.update({key: statistics.mean(values) for key, values in per.items()})
    facts["plan_index_ms"] = sum(per["plan_index_ms"])
    facts["gate"] = max(per["bound_used"]) <= 1
    return facts


@torch.no_grad()
def continuation_ppl(model, context, prompt: torch.Tensor, tail: torch.Tensor) -> float:
    """Perplexity of ``tail`` scored by the model's own dense attention after a prefill of
    ``prompt`` inside ``context`` (transformers' own cache carries the prefill's keys)."""
    from longattn.integrations.hf import returned_cache, with_cache

    with context:
        out = model(input_ids=prompt, use_cache=True)
    rest = model(input_ids=tail[:, :-1], **with_cache(model, returned_cache(out)), use_cache=True)
    logits = torch.cat([out.logits[:, -1:], rest.logits], dim=1)[0].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, tail[0]).item())


@torch.no_grad()
def run_model(model, ids: torch.Tensor, methods, repeats: int, tail: int, writer, log=print):
    """Every method on one prompt ``ids[:, :-tail]`` (continuation ``ids[:, -tail:]``) of a real
    model whose own attention is ``sdpa``; one record per method."""
    import contextlib

    from longattn.integrations.hf import capture_qkv, use

    prompt, cont = ids[:, :-tail], ids[:, -tail:]
    length = prompt.shape[1]
    rows = sample_rows(length, min(GATE_ROWS, length))
    captured = capture_qkv(model, prompt)
    ppl_dense = continuation_ppl(model, contextlib.nullcontext(), prompt, cont)
    timed = {m.describe(): timed_plan(m) for m in methods}
    runs: dict[str, Callable] = {"sdpa": lambda: prefill_pass(model, prompt)}
    for name, (method, _) in timed.items():
        runs[name] = lambda m=method: _in_use(model, m, prompt, use)
    times = _interleaved(runs, repeats)
    records = []
    for method in methods:
        name = method.describe()
        timed_method, spent = timed[name]
        spent.clear()
        _in_use(model, timed_method, prompt, use)  # one more prefill, its plan hooks timed
        rec = {"bench": "prefill_model", "T": length, "params": name, "label": label(method),
               "method": method.name,
               "ms": times[name], "sdpa_ms": times["sdpa"], "speedup": times["sdpa"] / times[name],
               "plan_hook_ms": sum(spent) * 1e3, "planned_layers": len(spent),
               "ppl_dense": ppl_dense}  # fmt: skip
        rec.update(layer_facts(method, captured, rows))
        # plan_index (estimate + index build) on each layer's captured q/k, over the model's time
        rec["estimate_share"] = rec["plan_index_ms"] / rec["ms"]
        rec["ppl"] = continuation_ppl(model, use(model, method), prompt, cont)
        rec["ppl_delta"] = rec["ppl"] / ppl_dense - 1
        if not rec["gate"]:
            for key in ("ms", "speedup", "plan_hook_ms", "estimate_share"):
                rec.pop(key)
        rec = {**rec, **environment()}
        writer.write(rec)
        records.append(rec)
        log(f"  T={length} {name}: gate {'ok' if rec['gate'] else 'FAILED'}")
    return records


def prefill_pass(model, prompt: torch.Tensor):
    """A prompt's prefill as generation runs it: every layer over the prompt, the logits of the
    last position only (``logits_to_keep=1``; the timed runs of every method do the same work)."""
    return model(input_ids=prompt, use_cache=False, logits_to_keep=1)


def _in_use(model, method, prompt, use):
    with use(model, method):
        return prefill_pass(model, prompt)


def _interleaved(runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median ms of each run, the runs taken in turn within each repeat (after one warm-up each),
    so a slow phase of a shared machine hits them alike."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def plot(records: list[dict], path: pathlib.Path) -> None:
    """Speedup against the same-run baseline per method, with the ideal (1 / element density)
    as a marker: one panel per (mode, T, heads, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(r):
        return (r["bench"], r["T"], r.get("shape", "model"), r.get("dtype", "float32"))

    groups = sorted({group(r) for r in records}, key=str)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)), 4),
                             squeeze=False)  # fmt: skip
    for ax, key in zip(axes[0], groups):
        sel = [r for r in records if group(r) == key]
        xs = range(len(sel))
        ax.bar(xs, [r.get("speedup") or 0 for r in sel], color="tab:blue", label="speedup")
        ax.scatter(xs, [1 / max(r["element_density"], 1e-9) for r in sel], color="tab:red",
                   marker="_", s=200, label="ideal 1/density")  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(list(xs), [r["label"] for r in sel], rotation=75, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("x baseline (same run)", fontsize=8)
        ax.set_title(" ".join(str(p) for p in key), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _lengths(args, default) -> list[int]:
    if getattr(args, "lengths", None):
        return [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.length:
        return [args.length]
    return list(QUICK_LENGTHS if args.quick and default is LENGTHS else default)


def _model_records(args, methods, writer) -> list[dict]:
    from longattn.eval import models, tasks

    model, tokenizer = models.load(args.model)
    model.set_attn_implementation("sdpa")
    limit = int(model.config.max_position_embeddings)
    records = []
    for length in _lengths(args, MODEL_LENGTHS):
        prompt_len = min(length, limit - CONTINUATION)
        if prompt_len < length:
            print(f"prompt {length} -> {prompt_len} tokens: the model's limit is {limit} "
                  f"positions, {CONTINUATION} of them for the scored continuation")  # fmt: skip
        ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", prompt_len + CONTINUATION, 0)])
        records += run_model(model, ids, methods, 2 if args.quick else 3, CONTINUATION, writer)
    return records


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    budgets = getattr(args, "budgets", None)
    budgets = tuple(float(b) for b in budgets.split(",") if b) if budgets else TOPK_BUDGETS
    methods = parse_methods(getattr(args, "methods", None), budgets)
    out = pathlib.Path(args.out or "results/bench_prefill.jsonl")
    writer = JsonlWriter(out)
    print(f"CPU: {cpu_line()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    records: list[dict] = []
    if getattr(args, "model", None):
        records += _model_records(args, methods, writer)
        print(format_table([r for r in records if r["bench"] == "prefill_model"], MODEL_COLUMNS))
    if getattr(args, "synthetic", False) or not getattr(args, "model", None):
        dtypes = args.dtypes.split(",") if args.dtypes else ["float32", "bfloat16"]
        shapes = args.shapes.split(",") if getattr(args, "shapes", None) else list(SHAPES)
        synth = run_synthetic(_lengths(args, LENGTHS), shapes,
                              [getattr(torch, d.strip()) for d in dtypes], methods,
                              3 if args.quick else 5, out)  # fmt: skip
        records += synth
        print(format_table(synth, SYNTH_COLUMNS))
    print("blocks: planned blocks / causal blocks; pairs: visited / causal (query, key) pairs; "
          "of bound: gate error / the oracle bound of the same index (gate <= 1); est: "
          "plan_index (estimate + index; for the model summed over layers on captured q/k) / the "
          "call's (model's) time; plan hook: the plan hook alone inside the model's prefill; of "
          "ideal: speedup x pairs")  # fmt: skip
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    red = [f"{r['params']} T={r['T']}" for r in records if not r["gate"]]
    if red:
        print("correctness gate FAILED (not timed): " + ", ".join(red), file=sys.stderr)
    return 1 if red else 0
