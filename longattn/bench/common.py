"""Timing, memory, environment stamps, JSONL output and terminal tables shared by the benchmarks."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def median_ms(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, budget_s: float = 20.0
) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` calls.

    Stops early (with at least 3 timed runs) once ``budget_s`` seconds of timed runs have passed.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
        if len(times) >= 3 and spent > budget_s:
            break
    return statistics.median(times)


def _rss_kib(field: str) -> int | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory added while ``fn()`` runs, in MiB (Linux; None elsewhere).

    Frees cached heap pages first (``malloc_trim``) and resets the kernel's high-water mark
    (``/proc/self/clear_refs``), so the figure is the peak of this call alone.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    result = fn()
    peak = _rss_kib("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def git_sha() -> str | None:
    try:
        root = pathlib.Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# instruction-set extensions that change which kernels win (bf16 above all): recorded with every figure
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, family/model numbers and which of ``CPU_FLAGS`` it has (Linux)."""
    try:
        first = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor
    except OSError:
        return {"cpu": None, "cpu_model": None, "cpu_flags": None}
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name"),
        "cpu_model": f"family {fields.get('cpu family')} model {fields.get('model')}",
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
    }


def cpu_line(info: dict[str, Any] | None = None) -> str:
    """``"AMD EPYC family 25 model 1 (avx2, fma; no AVX-512, no AMX)"``: the CPU as tables print it."""
    info = info or cpu_info()
    flags = info.get("cpu_flags") or []
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512"
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    name = f"{info.get('cpu')} {info.get('cpu_model')}"
    return f"{name} ({', '.join(flags)}; {avx512}, {amx})"


def environment() -> dict[str, Any]:
    """Stamp for every JSONL record: versions, threads, machine (CPU model and vector extensions)."""
    return {
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        **cpu_info(),
    }


class JsonlWriter:
    """Appends one JSON object per line; creates the parent folder."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = pathlib.Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` is a list of (key, header); floats get 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    table = [[h for _, h in columns]] + [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def impl_that_runs(call, impl: str = "auto") -> str:
    """The name of the implementation that computes ``call`` (recorded in every benchmark record).
    A call states the rule it runs (a select method's prefill is a dense call,
    ``longattn.call.phase_method``), so dispatch's choice is what runs."""
    from longattn.api import choose_impl

    return choose_impl(call, impl).name


def cache_step(q, k, v, *, method, cache, layer: int):
    """One ``attention()`` step through ``cache``; ``(result, the implementation that ran it)``, as
    the library's dispatch log names it."""
    from longattn.api import attention

    with ImplLog() as seen:
        result = attention(q, k, v, method=method, cache=cache, layer=layer)
    return result, ", ".join(seen.chosen)


class ImplLog(logging.Handler):
    """Collects the implementations ``impl="auto"`` chose while it is attached (``with ImplLog() as
    seen``), from the library's debug log: for code that calls ``attention()`` out of reach of the
    benchmark (a model under ``integrations.hf.use``). Explicitly named implementations are not
    logged: they either run or raise. The debug records it turns on stop here; every record the
    logger would have passed on before is still passed to the parent's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.chosen: dict[str, int] = {}
        self._logger = logging.getLogger("longattn")
        self._saved = (logging.NOTSET, True, logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("impl=auto chose") and record.args:
            name = str(record.args[0])
            self.chosen[name] = self.chosen.get(name, 0) + 1
        _, propagate, effective = self._saved
        if propagate and record.levelno >= effective and self._logger.parent is not None:
            self._logger.parent.handle(record)

    def __enter__(self) -> ImplLog:
        logger = self._logger
        self._saved = (logger.level, logger.propagate, logger.getEffectiveLevel())
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]
