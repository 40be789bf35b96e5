"""A sweep of unusual inputs across the public surface, each case classified by its outcome.

Outcomes: ``ok`` (returned, and equal to the float64 oracle where one exists), ``clear_error``
(``ValueError`` / ``TypeError`` / ``FileNotFoundError``, or CLI exit 2, whose message names the
offending value), ``unclear_error`` (such an error that names none of it), ``silent_wrong`` (returned a
result the oracle disagrees with), ``crash`` (any other exception, a raw internal message, a CLI exit
other than 0 / 2, a signal or a hang) and ``state_changed`` (a call that raised but left the cache not
bit-identical). ``run_sweep`` runs the cases in child processes, so that a segfault or a hang is one
case's outcome instead of the end of the sweep. Used by ``tests/test_sweep.py`` and
``benchmarks/sweep.py``; the cases are ``longattn.eval.sweep_cases.all_cases()``. It sits on top
of the library (it drives the CLI too), so it lives in ``eval/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longattn.api import attention
from longattn.cache import KVCache
from longattn.testing import assert_attention_close
from longattn.types import AttnOutput, DecodeSelection

OUTCOMES = ("ok", "clear_error", "unclear_error", "silent_wrong", "crash", "state_changed")
FAILING = ("unclear_error", "silent_wrong", "crash", "state_changed")
CLEAR_TYPES = (ValueError, TypeError, FileNotFoundError)
# messages of Python's own errors: a library error that says these did not check its input
RAW_MESSAGES = (
    "not enough values to unpack",
    "too many values to unpack",
    "object is not callable",
    "has no attribute",
    "unsupported operand",
    "object is not subscriptable",
    "object is not iterable",
    "positional argument",
    "unexpected keyword argument",
    "must be real number",
    "division by zero",
    "can't multiply",
    "expected scalar type",
)
PREFIX = "@@sweep "
# seconds a child may take to build the C++ kernels before its first case
BUILD_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Case:
    """One unusual input. ``setup()`` builds its inputs (a dict; key ``"cache"`` is snapshotted),
    ``call(ctx)`` runs it, ``check(ctx, result)`` returns why a returned result is wrong (None: it is
    right; no ``check``: any return is ok). An error is clear if its message contains one of
    ``names`` (case-insensitive; empty: any message)."""

    area: str
    name: str
    setup: Callable[[], dict]
    call: Callable[[dict], Any]
    check: Callable[[dict, Any], str | None] | None = None
    names: tuple[str, ...] = ()
    repro: str = ""


def classify(case: Case) -> tuple[str, str]:
    """Run ``case`` in this process: (outcome, detail)."""
    ctx = case.setup()
    cache = ctx.get("cache")
    before = snapshot(cache) if cache is not None else None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = case.call(ctx)
    except SystemExit as exc:
        return _exit_outcome(case, exc.code, str(exc))
    except Exception as exc:  # noqa: BLE001 -- classifying every failure is the point
        if before is not None and not same_state(before, snapshot(cache)):
            return "state_changed", f"{type(exc).__name__}: {exc}"
        return _error_outcome(case, exc)
    if isinstance(result, CliResult):
        return _exit_outcome(case, result.code, result.err)
    if case.check is None:
        return "ok", ""
    try:
        why = case.check(ctx, result)
    except Exception as exc:  # noqa: BLE001 -- the oracle refuses what the call accepted
        why = f"returned, but the oracle cannot check it: {type(exc).__name__}: {exc}"
    return ("ok", "") if why is None else ("silent_wrong", why)


def _error_outcome(case: Case, exc: Exception) -> tuple[str, str]:
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, CLEAR_TYPES) or any(raw in str(exc) for raw in RAW_MESSAGES):
        return "crash", text
    if case.names and not any(n.lower() in str(exc).lower() for n in case.names):
        return "unclear_error", f"{text} (names none of {list(case.names)})"
    return "clear_error", text


def _exit_outcome(case: Case, code: Any, err: str) -> tuple[str, str]:
    line = err.strip().splitlines()[-1] if err.strip() else ""
    if code in (0, None):
        return "ok", line
    if code != 2:
        return "crash", f"exit {code!r}: {line}"
    if case.names and not any(n.lower() in err.lower() for n in case.names):
        return "unclear_error", f"exit 2: {line} (names none of {list(case.names)})"
    return "clear_error", f"exit 2: {line}"


@dataclass(frozen=True)
class CliResult:
    code: Any
    err: str


def run_cli(argv: list[str]) -> CliResult:
    """``longattn.cli.main(argv)`` with its exit code and standard error captured."""
    from longattn.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
            err.write(str(exc.code))
    return CliResult(code, err.getvalue())


# ---------------------------------------------------------------- cache snapshots


def _bits(t: torch.Tensor) -> tuple:
    """A tensor's exact contents (NaN equal to itself): dtype, shape and raw bytes."""
    flat = t.detach().reshape(-1).clone(memory_format=torch.contiguous_format)
    return (t.dtype, tuple(t.shape), flat.view(torch.uint8).tolist() if flat.numel() else [])


def snapshot(cache: KVCache) -> list:
    """Everything a refused call must leave unchanged, per layer (page metadata brought up to
    date first, so that a lazy refresh is not mistaken for a change)."""
    state = []
    for layer in range(cache.n_layers):
        entry = cache._layers[layer]
        if entry is None:
            state.append(None)
            continue
        cache._sync(entry)
        tensors = [cache.keys(layer), cache.values(layer), cache.head_positions(layer)]
        tensors += [cache.head_lengths(layer), entry.keys, entry.values, entry.pos]
        tensors += [entry.page_bounds, entry.page_sum, entry.page_count, *entry.stats.values()]
        counters = (cache.n_seen(layer), cache.seq_len(layer), cache.capacity(layer), entry.dense,
                    entry.uniform, entry.bounded)  # fmt: skip
        state.append((counters, [_bits(t) for t in tensors]))
    return state


def same_state(a: list, b: list) -> bool:
    return a == b


# ---------------------------------------------------------------- oracle comparison


def compare(result: Any, q, k, v, kwargs: dict) -> str | None:
    """Why ``result`` of ``attention(q, k, v, **kwargs)`` disagrees with the float64 oracle within the
    contract's bound (None: it agrees)."""
    if not isinstance(result, AttnOutput):
        return f"returned {type(result).__name__}, not AttnOutput"
    keys = ("scale", "q_positions", "kv_positions")
    okw = {key: kwargs[key] for key in keys if kwargs.get(key) is not None}
    if isinstance(result.state, DecodeSelection):
        okw["selection"] = result.state
    try:
        assert_attention_close(result, q, k, v, kwargs.get("method"), **okw)
    except AssertionError as exc:
        return str(exc)
    except (ValueError, TypeError) as exc:  # the call accepted what the oracle refuses
        return f"accepted inputs the oracle refuses: {exc}"
    return None


def attention_check(ctx: dict, result: Any) -> str | None:
    """Compare with the oracle on ``ctx["expect"]`` (clean inputs) or the call's own inputs."""
    q, k, v = ctx.get("expect", (ctx["q"], ctx["k"], ctx["v"]))
    return compare(result, q, k, v, ctx.get("oracle_kwargs", ctx["kwargs"]))


def call_attention(ctx: dict) -> Any:
    return attention(ctx["q"], ctx["k"], ctx["v"], **ctx["kwargs"])


# ---------------------------------------------------------------- isolated runs


def _child(start: int, stop: int) -> None:
    """Child process: classify cases ``start`` to ``stop``, one protocol line before and after each."""
    from longattn.eval.sweep_cases import all_cases
    from longattn.kernels import extension

    torch.set_num_threads(1)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    for name in ("decode", "block_sparse"):  # a first build takes minutes: not one case's time
        extension.unavailable(name)
    out.write(f"{PREFIX}ready\n")
    for i, case in enumerate(all_cases()[start:stop], start):
        out.write(f"{PREFIX}start {i}\n")
        try:
            outcome, detail = classify(case)
        except Exception as exc:  # noqa: BLE001 -- a case whose setup fails is a sweep bug
            outcome, detail = "crash", f"setup: {type(exc).__name__}: {exc}"
        out.write(PREFIX + json.dumps({"i": i, "outcome": outcome, "detail": detail[:500]}) + "\n")


def run_sweep(timeout: float = 120.0, workers: int = 2) -> list[dict]:
    """Classify every case in ``workers`` child processes (contiguous shares of the list); a case
    that kills its child (signal) or runs past ``timeout`` seconds is a ``crash`` and that share
    resumes after it."""
    from longattn.eval.sweep_cases import all_cases

    cases = all_cases()
    results: dict[int, dict] = {}
    bounds = [len(cases) * w // workers for w in range(workers + 1)]
    threads = [
        threading.Thread(target=_run_share, args=(lo, hi, timeout, results))
        for lo, hi in zip(bounds, bounds[1:])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [
        {"area": c.area, "name": c.name, "repro": c.repro, **results.get(i, _missing(i))}
        for i, c in enumerate(cases)
    ]


def _run_share(start: int, stop: int, timeout: float, results: dict) -> None:
    while start < stop:
        last, why = _run_child(start, stop, timeout, results)
        if last is None or last in results:
            return
        results[last] = {"i": last, "outcome": "crash", "detail": why}
        start = last + 1


def _missing(i: int) -> dict:
    return {"i": i, "outcome": "crash", "detail": "not run: the sweep's child stopped early"}


def _run_child(start: int, stop: int, timeout: float, results: dict) -> tuple[int | None, str]:
    """Run one child from ``start``; returns (the case it was in when it stopped, why)."""
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = f"from longattn.eval.sweep import _child; _child({start}, {stop})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    current, buf, started = None, b"", False
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], timeout if started else BUILD_TIMEOUT)
        if not ready:
            proc.kill()
            proc.wait()
            return current, f"no answer within {timeout:.0f} s (hang)"
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:
            rc = proc.wait()
            return (None, "") if current is None else (current, f"child died (exit {rc})")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in (x.decode(errors="replace") for x in lines):
            if not line.startswith(PREFIX):
                continue
            body = line[len(PREFIX) :]
            started = True
            if body == "ready":
                continue
            if body.startswith("start "):
                current = int(body.split()[1])
            else:
                record = json.loads(body)
                results[record["i"]] = record
                current = None


# ---------------------------------------------------------------- cases: the KVCache API


def _filled(batch=2, dtype=torch.float32) -> dict:
    from longattn.cache import KVCache

    cache = KVCache(2, page_size=4)
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(batch, 2, 10, 8, generator=gen).to(dtype) for _ in range(2))
    cache.append(0, k, v)
    return {"cache": cache, "k": k, "v": v}


def _cache_case(desc: str, action, names=(), check=None) -> Case:
    return Case("cache", f"{desc} | {action.__doc__ or ''}".strip(" |"), _filled,
                action, check, tuple(names), desc)  # fmt: skip


def _kv(shape=(2, 2, 3, 8), dtype=torch.float32):
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


_t = torch.tensor
# what is done to a cache holding 10 tokens in layer 0 of 2 (B=2, Hkv=2, D=8, page 4)
CACHE_CALLS = {
    "k 3-D": lambda c: c["cache"].append(0, *(x[0] for x in _kv())),
    "k/v shapes differ": lambda c: c["cache"].append(0, _kv()[0], _kv((2, 2, 4, 8))[1]),
    "float64 into float32": lambda c: c["cache"].append(0, *_kv(dtype=torch.float64)),
    "int keys": lambda c: c["cache"].append(0, *_kv(dtype=torch.int32)),
    "Hkv=3": lambda c: c["cache"].append(0, *_kv((2, 3, 3, 8))),
    "D=4": lambda c: c["cache"].append(0, *_kv((2, 2, 3, 4))),
    "B=1": lambda c: c["cache"].append(0, *_kv((1, 2, 3, 8))),
    "float positions": lambda c: c["cache"].append(0, *_kv(), positions=torch.arange(3.0)),
    "bool positions": lambda c: c["cache"].append(0, *_kv(), positions=_t([True] * 3)),
    "list positions": lambda c: c["cache"].append(0, *_kv(), positions=[10, 11, 12]),
    "decreasing positions": lambda c: c["cache"].append(0, *_kv(), positions=_t([12, 11, 10])),
    "positions at -2": lambda c: c["cache"].append(0, *_kv(), positions=_t([-2, 10, 11])),
    "positions already held": lambda c: c["cache"].append(0, *_kv(), positions=_t([3, 11, 12])),
    "positions of 2": lambda c: c["cache"].append(0, *_kv(), positions=_t([10, 11])),
    "layer 2 of 2": lambda c: c["cache"].append(2, *_kv()),
    "layer -1": lambda c: c["cache"].append(-1, *_kv()),
    "layer '0'": lambda c: c["cache"].append("0", *_kv()),
    "layer True": lambda c: c["cache"].append(True, *_kv()),
    "evict float keep": lambda c: c["cache"].evict(0, torch.ones(2, 10)),
    "evict keep [2, 9]": lambda c: c["cache"].evict(0, torch.ones(2, 9, dtype=torch.bool)),
    "evict keep list": lambda c: c["cache"].evict(0, [[True] * 10] * 2),
    "evict all": lambda c: c["cache"].evict(0, torch.zeros(2, 10, dtype=torch.bool)),
    "evict empty layer": lambda c: c["cache"].evict(1, torch.ones(2, 0, dtype=torch.bool)),
    "drop missing 99": lambda c: c["cache"].drop_positions(0, _t([1, 99])),
    "drop float": lambda c: c["cache"].drop_positions(0, _t([1.0])),
    "drop 3-D": lambda c: c["cache"].drop_positions(0, _t([[[1]]])),
    "drop -1": lambda c: c["cache"].drop_positions(0, _t([-1])),
    "drop from empty layer": lambda c: c["cache"].drop_positions(1, _t([0])),
    "drop [0, 5]": lambda c: c["cache"].drop_positions(0, _t([0, 5])),
    "reserve -5": lambda c: c["cache"].reserve(0, -5),
    "reserve 0": lambda c: c["cache"].reserve(0, 0),
    "reserve '100'": lambda c: c["cache"].reserve(0, "100"),
    "reserve 100.5": lambda c: c["cache"].reserve(0, 100.5),
    "reserve 2**50": lambda c: c["cache"].reserve(0, 2**50),
    "reserve empty layer": lambda c: c["cache"].reserve(1, 64),
    "positions(2)": lambda c: c["cache"].positions(2),
    "keys of empty layer": lambda c: c["cache"].keys(1),
    "seq_len('0')": lambda c: c["cache"].seq_len("0"),
    "row_lengths(1.0)": lambda c: c["cache"].row_lengths(1.0),
}


def cache_api_cases() -> list[Case]:
    from longattn.cache import KVCache

    ctor = [dict(n_layers=0), dict(n_layers=-1), dict(n_layers=1.5), dict(n_layers=True),
            dict(n_layers="2"), dict(n_layers=1, page_size=0), dict(n_layers=1, page_size=3.5),
            dict(n_layers=1, initial_capacity=17), dict(n_layers=1, initial_capacity=0)]  # fmt: skip
    cases = [
        Case("cache", f"KVCache(**{kw})", dict, lambda ctx, kw=kw: KVCache(**kw), None,
             tuple(str(x) for x in kw.values()), f"KVCache(**{kw})")
        for kw in ctor
    ]  # fmt: skip
    names = ("layer", "positions", "keep", "capacity", "shape", "dtype", "k ", "tensor", "reserve",
             "hold", "B=", "Hkv", "int", "empty", "99", "-2", "increasing", "-5")  # fmt: skip
    return cases + [_cache_case(desc, act, names) for desc, act in CACHE_CALLS.items()]
