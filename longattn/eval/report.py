"""The run's report: one table of accuracy x density x speedup x memory per method (Markdown + HTML).

Methods are grouped by KV budget: the number of keys the last query of the longest sequence may see
(for a static pattern, its visible keys; for a budgeted decode method, its budget). Only methods in
the same group are a like-for-like comparison. Density is stated with its kind (``metrics.PAIRS``,
``KV_READ``, ``KV_KEPT``).

A decode-time select method is dense in prefill by definition: its row shows no prefill perplexity
and no prefill speedup (``n/a``, with the reason in a footnote), and its perplexity over the last
tokens and its fidelity come from decode steps with the selection on.
"""

from __future__ import annotations

import html
import json
import pathlib
import statistics
from collections import defaultdict

from longattn.eval import metrics, tasks
from longattn.eval.runner import BASELINE, CASES_FILE
from longattn.method import from_string

# what every record of cases.jsonl carries (failed cases too): the report and plots read these
REQUIRED = {"case": str, "method": str, "task": str, "length": int, "sample": int,
            "kv_budget": (int, type(None)), "density": (int, float), "density_kind": str}  # fmt: skip
# fields a task's successful records carry besides those
TASK_FIELDS = {"needle": {"depth": (int, float)},
               "fidelity": {"layer_error": list, "mass_recall": list}}  # fmt: skip


def load_records(folder: pathlib.Path) -> list[dict]:
    """The records of ``folder/cases.jsonl``, each checked for the fields the report reads.

    A last line cut short by an interrupted write (no final newline) is skipped; any other line
    that is not a JSON object with the ``REQUIRED`` fields is a ``ValueError`` naming the file, the
    line and the field."""
    path = pathlib.Path(folder) / CASES_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CASES_FILE} in {folder}: run `longattn eval --out {folder}`")
    content = path.read_text()
    lines = content.splitlines()
    if lines and not content.endswith("\n"):
        lines = lines[:-1]  # a write cut short
    records = [_parse_record(path, number, line) for number, line in enumerate(lines, 1)]
    records = [r for r in records if r is not None]
    if not records:
        raise ValueError(f"{path} holds no cases: run `longattn eval --out {folder}` (or --resume)")
    return records


def _parse_record(path: pathlib.Path, number: int, line: str) -> dict | None:
    """One line of cases.jsonl as a checked record (None for a blank line)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {number}: not JSON ({exc.msg}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: expected a JSON object, got {line[:80]!r}")
    needed = dict(REQUIRED)
    if not record.get("error"):
        needed.update(TASK_FIELDS.get(record.get("task"), {}))
    for name, kind in needed.items():
        if name not in record:
            raise ValueError(f"{path}, line {number}: missing field {name!r}")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            raise ValueError(
                f"{path}, line {number}: field {name!r} has the wrong type: {record[name]!r}"
            )
    if record["method"] != BASELINE:
        try:
            from_string(record["method"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}, line {number}: field 'method': {exc}") from None
    return record


def short_label(method: str) -> str:
    """A method's string without the parameters left at their defaults (for tables and legends)."""
    if method == BASELINE:
        return f"{BASELINE} (baseline)"
    m = from_string(method)
    defaults = type(m)().describe().partition(":")[2].split(",")
    changed = [p for p in m.describe().partition(":")[2].split(",") if p and p not in defaults]
    return m.name + (":" + ",".join(changed) if changed else "")


# a figure a method has no honest value for in the phase measured (footnote 1 of the report)
NA = "n/a"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def speedups(records: list[dict]) -> dict[tuple[str, int], float]:
    """(method, length) -> median over matched cases of baseline prefill time / method prefill time
    (no entry for a select method, whose prefill is dense by definition)."""
    base = {
        (r["task"], r["length"], r["sample"]): r["prefill_ms"]
        for r in records
        if r["method"] == BASELINE and r.get("prefill_ms")
    }
    ratios: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if is_select(r["method"]):  # its prefill is dense attention: no speedup under its name
            continue
        matched = base.get((r["task"], r["length"], r["sample"]))
        if matched and r.get("prefill_ms"):
            ratios[r["method"], r["length"]].append(matched / r["prefill_ms"])
    return {key: statistics.median(v) for key, v in ratios.items()}


def summarise(records: list[dict]) -> tuple[list[dict], list[int], list[str]]:
    """One summary row per method (baseline first, then by KV budget); the lengths; the tasks."""
    ok = [r for r in records if not r.get("error")]
    lengths = sorted({r["length"] for r in records})
    present = {r["task"] for r in records}
    task_names = [t for t in (*tasks.TASKS, "ppl", "fidelity") if t in present]
    speed = speedups(ok)
    longest = lengths[-1] if lengths else None
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in ok if r["method"] == method]
        at_long = [r for r in records if r["method"] == method and r["length"] == longest]
        row = {"method": method, "select": is_select(method)}
        row["kv_budget"] = at_long[0]["kv_budget"] if at_long else None
        row["density"] = at_long[0]["density"] if at_long else None
        row["density_kind"] = at_long[0]["density_kind"] if at_long else None
        row["plan_ms"] = at_long[0].get("plan_ms") if at_long else None
        for task in tasks.TASKS:
            row[f"acc_{task}"] = _mean(r.get("score") for r in mine if r["task"] == task)
            for length in lengths:
                row[f"acc_{task}_{length}"] = _mean(
                    r.get("score") for r in mine if r["task"] == task and r["length"] == length
                )
        for length in lengths:
            at = [r for r in mine if r["length"] == length]
            row[f"ppl_{length}"] = NA if row["select"] else _mean(r.get("ppl") for r in at)
            row[f"ppl_tail_{length}"] = _tail_ppl(at, row["select"])
            row[f"speedup_{length}"] = NA if row["select"] else speed.get((method, length))
        row.update(_long_figures([r for r in mine if r["length"] == longest], row["select"]))
        errors = [r["error"] for r in records if r["method"] == method and r.get("error")]
        row["errors"] = len(errors)
        row["first_error"] = errors[0] if errors else None
        rows.append(row)
    rows.sort(key=lambda r: (r["method"] != BASELINE, -(r["kv_budget"] or 0), r["method"]))
    return rows, lengths, task_names


def is_select(method: str) -> bool:
    """A decode-time select method: dense in prefill by definition."""
    return method != BASELINE and from_string(method).hook == "select"


def _tail_ppl(records: list[dict], select: bool) -> float | None:
    """Mean perplexity over the last tokens; for a select method only a decode measurement counts."""
    return _mean(
        r.get("ppl_tail")
        for r in records
        if r["task"] == "ppl" and (not select or r.get("ppl_tail_phase") == "decode")
    )


def measured_fidelity(records: list[dict]) -> list[dict]:
    """The fidelity records that measure their method: for a select method only decode-phase ones
    (a prefill fidelity, from runs before decode fidelity, is dense attention's)."""
    return [
        r
        for r in records
        if r["task"] == "fidelity"
        and not r.get("error")
        and (not is_select(r["method"]) or r.get("fidelity_phase") == "decode")
    ]


def _long_figures(long_ok: list[dict], select: bool) -> dict:
    """Fidelity, decode speed and memory of one method's successful cases at the longest length."""
    fid = measured_fidelity(long_ok)
    out = {
        "fid_error": _mean(r.get("error_mean") for r in fid),
        "fid_recall": _mean(r.get("recall_mean") for r in fid),
        "decode_tok_s": _mean(r.get("decode_tok_s") for r in long_ok),
    }
    for key, name in (("kv_bytes", "kv_mib"), ("kv_capacity_bytes", "kv_capacity_mib")):
        kv = _mean(r.get(key) for r in long_ok)
        out[name] = kv / 2**20 if kv is not None else None
    gen_rss = [r.get("peak_rss_mib") for r in long_ok if r["task"] in tasks.TASKS]
    other_rss = [r.get("peak_rss_mib") for r in long_ok if r["task"] == "ppl"]
    out["peak_rss_mib"] = max(filter(None, gen_rss or other_rss), default=None)
    return out


def _fmt(value, kind: str = "") -> str:
    if value is NA:
        return "n/a¹"
    if value is None or value != value:  # None or NaN
        return "–"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(rows: list[dict], lengths: list[int], task_names: list[str]) -> tuple[list, list]:
    """Header and cells of the main table (shared by Markdown and HTML)."""
    gen = [t for t in task_names if t in tasks.TASKS]
    longest = lengths[-1] if lengths else 0
    header = ["method", "KV budget (tokens)", f"density @{longest}"]
    planned = any(r.get("plan_ms") is not None for r in rows)
    if planned:
        header.append(f"plan estimate ms⁴ @{longest}")
    header += [f"{t} acc @{n}" for t in gen for n in lengths]
    if "ppl" in task_names:
        header += [f"ppl (prefill) @{n}" for n in lengths]
        header += [f"ppl last tokens² @{n}" for n in lengths]
    if "fidelity" in task_names:
        header += [f"output error³ @{longest}", f"mass recall³ @{longest}"]
    header += [f"prefill speedup @{n}" for n in lengths]
    header += [f"decode tok/s @{longest}", f"KV MiB used @{longest}"]
    header += [f"KV MiB capacity @{longest}", f"peak RSS MiB @{longest}"]
    body = []
    for r in rows:
        cells = [short_label(r["method"]), _fmt(r["kv_budget"])]
        cells.append(f"{_fmt(r['density'], 'pct')} {r['density_kind'] or ''}".strip())
        if planned:
            cells.append(_fmt(r.get("plan_ms")))
        cells += [_fmt(r[f"acc_{t}_{n}"], "pct") for t in gen for n in lengths]
        if "ppl" in task_names:
            cells += [_fmt(r[f"ppl_{n}"]) for n in lengths]
            cells += [_fmt(r[f"ppl_tail_{n}"]) for n in lengths]
        if "fidelity" in task_names:
            cells += [_fmt(r["fid_error"]), _fmt(r["fid_recall"], "pct")]
        cells += [_fmt(r[f"speedup_{n}"], "x") for n in lengths]
        cells += [_fmt(r["decode_tok_s"]), _fmt(r["kv_mib"]), _fmt(r["kv_capacity_mib"])]
        cells.append(_fmt(r["peak_rss_mib"]))
        body.append(cells)
    return header, body


def needle_grid(records: list[dict]) -> dict[str, dict[tuple[float, int], float]]:
    """method -> {(depth, length): mean needle score}."""
    cells: dict[str, dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["task"] == "needle" and not r.get("error") and r.get("score") is not None:
            cells[r["method"]][r["depth"], r["length"]].append(r["score"])
    return {m: {k: sum(v) / len(v) for k, v in g.items()} for m, g in cells.items()}


def notes(records: list[dict]) -> list[str]:
    """The report's notes and footnotes, with the decode token and step counts of these records."""
    tail = sorted({r["ppl_tail_tokens"] for r in records if r.get("ppl_tail_tokens")})
    steps = sorted({r["fidelity_steps"] for r in records if r.get("fidelity_steps")})
    return [
        f"`{BASELINE}` is the model's own attention (transformers `sdpa`, its own dynamic cache): "
        "the baseline every speedup is measured against, in the same run, on the same prompts.",
        "Accuracy: fraction of the expected answers found in the greedy continuation (passkey, "
        "needle, multikey: one answer; multivalue, vartrack: all of them); a select method acts in "
        "the greedy decode steps only. ppl (prefill): next-token perplexity of real text with the "
        "method in the prefill.",
        f"Density: `{metrics.PAIRS}` = fraction of causal (query, key) pairs a static pattern "
        f"visits (the same in prefill and decode); `{metrics.KV_READ}` = fraction of the KV cache "
        "a select method reads per decode step in a selecting layer (a layer it keeps dense, such "
        f"as Quest's first `dense_layers`, reads all of it); `{metrics.KV_KEPT}` = fraction of the "
        f"cache a budgeted method keeps; `{metrics.PLANNED}` = fraction of the causal key blocks a "
        "dynamic sparse prefill (plan) method visits, realised on the corpus text at that length "
        "(q/k captured from a dense pass), averaged over layers and heads; "
        f"`{metrics.EXACT_BLOCKS}` = fraction of the causal key blocks SLA attends exactly (its "
        "marginal blocks are estimated, the rest skipped). KV budget = keys the last query of the longest sequence "
        "may see; rows are sorted by it, and only rows with the same budget are a budget-matched "
        "comparison.",
        "¹ n/a: a decode-time select method is dense attention in prefill by definition, so a "
        "prefill perplexity or prefill speedup under its name would be dense attention's figure; "
        "it is measured in decode instead (² and ³, decode tok/s).",
        f"² ppl last tokens: perplexity of the last {_counts(tail)} tokens of each text. A select "
        "method scores them by teacher-forced decode through the cache (the prefix prefilled, then "
        "one token per step with its selection on); every other row takes the same tokens from its "
        "prefill logits, which equal teacher-forced decode for dense attention and static patterns.",
        "³ Fidelity on q/k/v captured from a dense pass over real text; output error = relative L2 "
        "error of each layer's attention output against dense, averaged over layers; mass recall = "
        "share of the dense attention mass attended. A static pattern: every query of the prefill "
        "(recall over the last 256 queries). A plan method: its planned blocks' share of the exact "
        "block mass (`PrefillView.block_mass`), over every query block. A select method: the last "
        f"{_counts(steps)} positions replayed as decode steps through a cache, every layer in "
        "order (`longattn.eval.fidelity.decode_fidelity`).",
        "Speedup = median over matched prompts of baseline prefill time / method prefill time "
        "(one timed pass each; CPU timings are noisy, ±5 % or more). Decode tok/s: greedy decode "
        "after the prefill. KV MiB used: key/value bytes in the used slots of the cache the run "
        "used at the end (for a method, the cache `longattn.integrations.hf.use` yields); KV MiB "
        "capacity: the bytes its storage really holds (allocated slots, positions, page metadata, "
        "key projections; for the baseline, its tensors' storage). Peak RSS: the most extra "
        "resident memory at the peak of a prefill + decode case (the generation tasks; ppl cases, "
        "whose full-length logits dominate, only where there is no generation task).",
        "⁴ plan estimate ms: a plan method's `longattn.prefill.plan_index` (its estimate and the "
        "block index) summed over layers, on the same captured q/k as its density; part of its "
        "prefill time.",
    ]


def _counts(values: list[int]) -> str:
    return "/".join(str(v) for v in values) if values else "N"


def _markdown_table(header: list, body: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _errors(rows: list[dict]) -> list[str]:
    return [
        f"`{short_label(r['method'])}`: {r['errors']} case(s) not run — {r['first_error']}"
        for r in rows
        if r["errors"]
    ]


def _run_info(folder: pathlib.Path) -> dict:
    path = folder / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_markdown(folder: pathlib.Path, plots: list[str]) -> pathlib.Path:
    """``folder/report.md`` from the folder's JSONL; returns its path."""
    records = load_records(folder)
    rows, lengths, task_names = summarise(records)
    header, body = table(rows, lengths, task_names)
    info = _run_info(folder)
    config = info.get("config", {})
    parts = [
        "# longattn eval report",
        f"Model `{config.get('model', records[0].get('model') if records else '?')}`; lengths "
        f"{lengths}; tasks {task_names}; {config.get('samples', '?')} sample(s) per task; torch "
        f"{info.get('torch', '?')}, git {info.get('git_sha', '?')}, {info.get('threads', '?')} threads.",
        _markdown_table(header, body),
        "\n".join(f"- {n}" for n in notes(records)),
    ]
    errors = _errors(rows)
    if errors:
        parts += ["## Cases not run", "\n".join(f"- {e}" for e in errors)]
    if plots:
        parts += ["## Plots", "\n\n".join(f"![{p}]({p})" for p in plots)]
    path = folder / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def write_html(folder: pathlib.Path, plots: list[str]) -> pathlib.Path:
    """``folder/report.html``: the same table and notes, with the plots inline."""
    records = load_records(folder)
    rows, lengths, task_names = summarise(records)
    header, body = table(rows, lengths, task_names)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in body)
    items = "".join(f"<li>{esc(n)}</li>" for n in notes(records) + _errors(rows))
    imgs = "".join(f'<h3>{esc(p)}</h3><img src="{esc(p)}" style="max-width:100%">' for p in plots)
    page = (
        "<!doctype html><meta charset='utf-8'><title>longattn eval report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}</style>"
        f"<h1>longattn eval report</h1><table><tr>{head}</tr>{trs}</table>"
        f"<ul>{items}</ul>{imgs}"
    )
    path = folder / "report.html"
    path.write_text(page)
    return path
