"""A model of causal ring attention's time per call from measured per-block compute and link
bandwidth, checked against ``bench ring``'s 2- and 4-rank runs and projected to 8-64 ranks at 1M
tokens (``docs/distributed.md`` derives it).

Per rank, with n = T / W tokens, ``full`` the time of one n x n block with every pair visible,
``diag`` that of an n x n causal diagonal block and ``m`` one shard's transfer (``2 B Hkv n D``
elements over the link): the ring computes one block per step while the next shard travels, so

* contiguous (the last rank is the busiest): ``diag + (W - 1) max(full, m)``
* striped (every block is a shifted causal diagonal): ``diag + (W - 1) max(diag, m)``
* zig-zag (off-diagonal blocks are two full quarter blocks): ``diag + (W - 1) max(full / 2, m)``

With more ranks than cores (this machine: 2), balanced layouts share the cores for the whole call:
compute scales by ``W / cores``. Block times scale as n^2 (all quadratic in n), transfers as n.
"""

from __future__ import annotations

import json
import pathlib

from longattn.bench.common import format_table


def predict_ms(layout: str, world: int, full_ms: float, diag_ms: float, step_ms: float,
               cores: int | None = None) -> float:  # fmt: skip
    """Predicted ms per call (see the module doc); ``cores`` None: a core per rank."""
    share = 1.0 if cores is None or world <= cores else world / cores
    full, diag = full_ms * share, diag_ms * share
    per_step = {"contiguous": full, "striped": diag, "zigzag": full / 2}[layout]
    return diag + (world - 1) * max(per_step, step_ms)


def step_bytes(length: int, world: int, kv_heads: int, dim: int, itemsize: int) -> float:
    return 2 * kv_heads * (length / world) * dim * itemsize


def check_rows(records: list[dict], cores: int) -> list[dict]:
    """Measured vs predicted ms per call for each multi-rank record (block times, link bandwidth
    and cores from the same run)."""
    rows = []
    for rec in records:
        if rec["world"] < 2 or rec.get("block_full_ms") is None:
            continue
        step = step_bytes(rec["T"], rec["world"], rec["kv_heads"], rec["dim"], 4)
        step_ms = 1e3 * step / (rec["link_gb_s"] * 1e9)
        pred = predict_ms(rec["layout"], rec["world"], rec["block_full_ms"], rec["block_diag_ms"],
                          step_ms, cores)  # fmt: skip
        rows.append({"world": rec["world"], "layout": rec["layout"], "measured_ms":
                     rec["ms_per_call"], "predicted_ms": pred,
                     "ratio": rec["ms_per_call"] / pred, "step_ms": step_ms,
                     "full_ms": rec["block_full_ms"], "diag_ms": rec["block_diag_ms"]})  # fmt: skip
    return rows


def projection_rows(base: dict, link_gb_s: float, length: int = 1 << 20) -> list[dict]:
    """8-64 ranks at ``length`` tokens, a core per rank, blocks scaled as n^2 from ``base`` (a
    record's block times at its n) and transfers at ``link_gb_s``."""
    n0 = base["T"] / base["world"]
    rows = []
    for world in (8, 16, 32, 64):
        n = length / world
        full = base["block_full_ms"] * (n / n0) ** 2
        diag = base["block_diag_ms"] * (n / n0) ** 2
        step_ms = 1e3 * step_bytes(length, world, base["kv_heads"], base["dim"], 4) / (
            link_gb_s * 1e9)  # fmt: skip
        row = {"world": world, "tokens_per_rank": int(n), "full_block_s": full / 1e3,
               "transfer_ms": step_ms}  # fmt: skip
        for layout in ("contiguous", "striped", "zigzag"):
            row[f"{layout}_s"] = predict_ms(layout, world, full, diag, step_ms) / 1e3
        row["hidden"] = "yes" if step_ms <= diag / 2 else "no"
        rows.append(row)
    return rows


def report(path: str | pathlib.Path, cores: int = 2) -> str:
    """Markdown of a ``bench ring`` JSONL: measured table, model check, projection."""
    records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
    measured = format_table(records, [
        ("world", "ranks"), ("layout", "layout"), ("ms_per_call", "ms/call"),
        ("compute_imbalance", "compute max/min"), ("pair_imbalance", "pairs max/min"),
        ("transfer_ms", "transfers ms"), ("exposed_comm_ms", "exposed ms"),
        ("hidden_share", "hidden"), ("link_gb_s", "link GB/s"), ("sdpa_ms", "1-proc SDPA ms"),
        ("tiled_ms", "1-proc tiled ms")])  # fmt: skip
    check = format_table(check_rows(records, cores), [
        ("world", "ranks"), ("layout", "layout"), ("measured_ms", "measured ms"),
        ("predicted_ms", "model ms"), ("ratio", "measured/model"), ("full_ms", "full block ms"),
        ("diag_ms", "diag block ms"), ("step_ms", "transfer/step ms")])  # fmt: skip
    multi = [r for r in records if r["world"] > 1 and r.get("link_gb_s")]
    text = ["## Measured", "", "```", measured, "```", "", "## Model vs measured", "", "```",
            check, "```", ""]  # fmt: skip
    if multi:
        base = max(multi, key=lambda r: r["world"])
        link = min(r["link_gb_s"] for r in multi)
        proj = format_table(projection_rows(base, link), [
            ("world", "ranks"), ("tokens_per_rank", "tokens/rank"),
            ("full_block_s", "full block s"), ("transfer_ms", "transfer/step ms"),
            ("contiguous_s", "contiguous s"), ("striped_s", "striped s"),
            ("zigzag_s", "zig-zag s"), ("hidden", "transfer hidden")])  # fmt: skip
        text += [f"## Projection: 1M tokens, a core per rank, link {link:.3g} GB/s (the slowest "
                 f"measured), blocks from the {base['world']}-rank run scaled as n^2", "", "```",
                 proj, "```", ""]  # fmt: skip
    return "\n".join(text)
