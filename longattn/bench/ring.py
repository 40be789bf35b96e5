"""``longattn bench ring``: ring attention under ``torchrun --nproc-per-node N`` (gloo).

Per layout (contiguous, striped, zig-zag), causal dense attention of one sequence split over the
ranks: a correctness gate at a small length (gathered to rank 0, checked against the float64 oracle
within the contract bound), then the time per call (slowest rank, median of repeats), each rank's
compute time and the compute imbalance (max / min), the imbalance in visible pairs (FLOP count), the
time blocked on transfers after computing (exposed communication), the same transfers alone and the
share of them that overlap hid, per-pair compute time and link bandwidth (the scaling model's
inputs, ``longattn.bench.ring_model``). Rank 0 also times the whole sequence in one process (SDPA
and the tiled kernel) as the baseline. Without torchrun it runs as a group of one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics

import torch
import torch.distributed as dist

from longattn.bench.common import JsonlWriter, cpu_line, environment, format_table, median_ms
from longattn.cli import DTYPES
from longattn.distributed import LAYOUTS, RingRecord, ring_attention, shard, unshard
from longattn.distributed.comm import all_gather_objects
from longattn.distributed.layout import shard_positions
from longattn.distributed.ring import ring_plan, ring_transfers
from longattn.kernels.tiled import tiled_attention
from longattn.methods.dense import Dense
from longattn.testing import assert_attention_close, make_qkv

GATE_LENGTH = 256
KV_HEADS_DIVISOR = 4  # GQA 4:1 when the head count allows it


def _group(timeout_s: float) -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _kv_heads(heads: int) -> int:
    return heads // KV_HEADS_DIVISOR if heads % KV_HEADS_DIVISOR == 0 else heads


def _gate(rank, world, layout, heads, dim, dtype) -> str | None:
    """None when the gathered ring output is within the contract bound, else the failure."""
    q, k, v = make_qkv(1, heads, _kv_heads(heads), GATE_LENGTH, head_dim=dim, dtype=dtype, seed=3)
    res = ring_attention(*(shard(x, rank, world, layout) for x in (q, k, v)), layout=layout)
    parts = all_gather_objects((res.out, res.lse), None, world)
    verdict = None
    if rank == 0:
        out = unshard([p[0] for p in parts], layout)
        lse = unshard([p[1] for p in parts], layout)
        try:
            assert_attention_close(type(res)(out, lse, None), q, k, v, Dense())
        except AssertionError as exc:
            verdict = str(exc)
    return all_gather_objects(verdict, None, world)[0]


def _timed(q, k, v, layout, repeats) -> list[RingRecord]:
    records = []
    for i in range(repeats + 1):  # the first call warms up
        if dist.is_initialized():
            dist.barrier()
        rec = RingRecord()
        ring_attention(q, k, v, layout=layout, record=rec)
        if i:
            records.append(rec)
    return records


def _transfers(k, v, layout, length, world, repeats) -> float:
    positions = [shard_positions(length, j, world, layout) for j in range(world)]
    _, hops = ring_plan(Dense(), 1, positions)
    kv = torch.stack([k, v])
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        times.append(ring_transfers(kv, positions, hops).total_s)
    return statistics.median(times)


def _layout_figures(rank, world, layout, args, dtype) -> dict:
    heads, length = args.heads, args.length
    q, k, v = (shard(x, rank, world, layout) for x in make_qkv(
        1, heads, _kv_heads(heads), length, head_dim=args.dim, dtype=dtype, seed=0))  # fmt: skip
    counted = RingRecord(count_pairs=True)
    ring_attention(q, k, v, layout=layout, record=counted)
    records = _timed(q, k, v, layout, args.repeats)
    mine = {
        "total_s": statistics.median(r.total_s for r in records),
        "compute_s": statistics.median(r.compute_s for r in records),
        "wait_s": statistics.median(r.wait_s for r in records),
        "blocks": counted.blocks, "pairs": counted.pairs, "steps": counted.steps,
        "bytes_sent": counted.bytes_sent,
        "transfer_s": _transfers(k, v, layout, length, world, args.repeats),
    }  # fmt: skip
    ranks = all_gather_objects(mine, None, world)
    compute = [r["compute_s"] for r in ranks]
    pairs = [r["pairs"] for r in ranks]
    transfer = max(r["transfer_s"] for r in ranks)
    exposed = max(r["wait_s"] for r in ranks)
    busiest = max(range(world), key=lambda r: compute[r])
    return {
        "layout": layout, "ms_per_call": 1e3 * max(r["total_s"] for r in ranks),
        "compute_ms": [round(1e3 * c, 3) for c in compute],
        "compute_imbalance": max(compute) / min(compute),
        "pair_imbalance": max(pairs) / min(pairs), "pairs": pairs,
        "blocks": [r["blocks"] for r in ranks], "steps": [r["steps"] for r in ranks],
        "transfer_ms": 1e3 * transfer, "exposed_comm_ms": 1e3 * exposed,
        "hidden_share": None if world == 1 or transfer <= 0 else min(1.0, max(0.0, 1 - exposed / transfer)),
        "ns_per_pair": 1e9 * compute[busiest] / max(pairs[busiest], 1),
        "link_gb_s": None if world == 1 or transfer <= 0
        else max(r["bytes_sent"] for r in ranks) / transfer / 1e9,
    }  # fmt: skip


def _blocks(args, dtype, world) -> dict:
    """One n x n block (n = T / world) in this process: every pair visible, and causal diagonal."""
    n = max(args.length // world, 1)
    q, k, v = make_qkv(1, args.heads, _kv_heads(args.heads), n, head_dim=args.dim, dtype=dtype,
                       seed=1)  # fmt: skip
    pos = torch.arange(n)[None]
    figures = {}
    for name, method in (("block_full_ms", Dense(causal=False)), ("block_diag_ms", Dense())):
        figures[name] = median_ms(lambda m=method: tiled_attention(
            q.float(), k, v, scale=args.dim ** -0.5, q_pos=pos, kv_pos=pos, mask_fn=m.mask,
            bounds_fn=m.block_bounds), warmup=0, repeats=3)  # fmt: skip
    return figures


def _baselines(args, dtype) -> dict:
    """The whole sequence in this one process: causal SDPA and the tiled kernel."""
    q, k, v = make_qkv(1, args.heads, _kv_heads(args.heads), args.length, head_dim=args.dim,
                       dtype=dtype, seed=0)  # fmt: skip
    group = args.heads // _kv_heads(args.heads)
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k_full, v_full, is_causal=True), repeats=args.repeats)  # fmt: skip
    pos = torch.arange(args.length)[None]
    method = Dense()
    tiled = median_ms(lambda: tiled_attention(
        q.float(), k, v, scale=args.dim ** -0.5, q_pos=pos, kv_pos=pos, mask_fn=method.mask,
        bounds_fn=method.block_bounds), repeats=args.repeats)  # fmt: skip
    return {"sdpa_ms": sdpa, "tiled_ms": tiled}


COLUMNS = [("layout", "layout"), ("ms_per_call", "ms/call"), ("compute_imbalance", "compute max/min"),
           ("pair_imbalance", "pairs max/min"), ("transfer_ms", "transfers ms"),
           ("exposed_comm_ms", "exposed ms"), ("hidden_share", "hidden"),
           ("ns_per_pair", "ns/pair"), ("link_gb_s", "link GB/s")]  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    length = args.length or (4096 if args.quick else 8192)
    args = argparse.Namespace(**{**vars(args), "length": length,
                                 "repeats": 3 if args.quick else 5})  # fmt: skip
    if args.model:  # Star Attention's error on the real model (one process)
        from longattn.bench.star_error import run

        rows = run(args, JsonlWriter(args.out))
        print(format_table(rows, [("world", "ranks"), ("context_rel_err_mean", "context mean"),
                                  ("context_rel_err_max", "context worst layer"),
                                  ("query_rel_err_max", "query worst layer")]))  # fmt: skip
        return 0
    rank, world = _group(timeout_s=600.0)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    env = {**environment(), "world": world, "command": os.environ.get("LONGATTN_COMMAND")}
    rows = []
    for layout in LAYOUTS:
        failure = _gate(rank, world, layout, args.heads, args.dim, dtype)
        if failure is not None:
            if rank == 0:
                print(f"ring {layout}: correctness gate failed, no timing: {failure}")
            continue
        rows.append(_layout_figures(rank, world, layout, args, dtype))
    base = {**_baselines(args, dtype), **_blocks(args, dtype, world)} if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        writer = JsonlWriter(args.out)
        for row in rows:
            writer.write({"bench": "ring", "T": length, "heads": args.heads,
                          "kv_heads": _kv_heads(args.heads), "dim": args.dim,
                          "dtype": args.dtype, **row, **base, **env})  # fmt: skip
        print(f"ring attention, world {world}, T={length}, {args.heads} heads "
              f"({_kv_heads(args.heads)} kv), d={args.dim}, {args.dtype}; {cpu_line()}")  # fmt: skip
        print(format_table(rows, COLUMNS))
        print(f"one process: causal SDPA {base['sdpa_ms']:.1f} ms, tiled {base['tiled_ms']:.1f} ms")
        if args.out:
            from longattn.bench.ring_model import report

            md = pathlib.Path(args.out).with_suffix(".md")
            md.write_text(f"# bench ring\n\n{cpu_line()}, torch {torch.__version__}\n\n"
                          + report(args.out))  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
