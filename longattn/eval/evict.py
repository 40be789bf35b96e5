"""The eviction eval (``longattn eval --budgets 0.5,0.25,0.1``): eviction methods (``Evict``) on a
real model at several budgets, measured where they act (at decode), from ONE prefill per prompt.

An eviction method's prefill is dense causal attention that keeps every key; it compresses at the
first decode step (``when="prefill"``). So every method's prefill is the same computation, up to
what the library records for the scorer: the observation window (the last ``window`` queries) and
the accumulated attention (H2O, Attendre). Each prompt is therefore prefilled ONCE, through a
``LongattnCache``, under ``SharedPrefill`` (an ``Evict`` that records both, over ``window`` queries),
and each (method, budget) runs its compression and decode on a deep copy of that ``KVCache``, its
observation window cut to the method's own (the last ``method.window`` of the recorded queries, what
a prefill of its own would have kept). This equals running each method from scratch
(tests/test_eval_evict.py checks it on a tiny model); a method whose window exceeds the shared one,
or that compresses during the prefill (``when="chunk"``), is refused. The ``dense`` row decodes over
a copy of the full cache, from the same prompts.

Tasks: ``passkey`` and ``needle`` (greedy answer, scored as in ``eval.tasks``) and ``ppl``: the last
``decode_tokens`` tokens of a real text (at most half of it) scored by teacher-forced decode through
the compressed cache, ``MAX_DECODE_QUERIES`` tokens per decode call (the first call compresses; for
``when="prefill"`` later calls only append, so this equals one token per call up to rounding; a
``when="decode"`` method is fed one token per call so its schedule is unchanged).

Per case: the score, the KV bytes the cache holds after the answer (``capacity_nbytes``, and used
``nbytes``), ``first_step_ms`` (the first decode step: compression + one step), decode tokens/s over
the later steps, ``peak_rss_mib`` (peak resident memory added while the case ran: the copy of the
full prefilled cache, compression and decode) and ``held_rss_mib`` (resident memory the case's cache
still adds after decode, freed pages returned to the system): the memory a compressed cache
really keeps.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from longattn.bench.common import JsonlWriter, _rss_kib, environment, peak_extra_mib
from longattn.cache import KVCache
from longattn.compress import _key as evict_key
from longattn.kernels.decode import MAX_DECODE_QUERIES
from longattn.method import Evict, Method, from_string
from longattn.methods.dense import Dense

SHARED_WINDOW = 32  # the observation window recorded by the shared prefill (Evict's default)
EVICT_TASKS = ("passkey", "needle", "ppl")
CASES_FILE = "cases.jsonl"


@dataclass(frozen=True)
class SharedPrefill(Evict):
    """The prefill every eviction method shares: dense causal attention over every key, with the
    observation window and the accumulated attention recorded. It is never decoded with, so it
    never scores."""

    needs: ClassVar[frozenset[str]] = frozenset({"queries", "accumulated"})

    def score(self, view):
        raise RuntimeError("SharedPrefill only prefills: decode with an eviction method")


@dataclass
class Prefilled:
    """A prompt prefilled once: the cache (every key, window, statistics) and the last logits."""

    kv: KVCache
    logits: torch.Tensor  # [V] the logits after the last prompt token
    prefill_ms: float
    window: int


def check_shareable(method: Method, window: int = SHARED_WINDOW) -> None:
    """Refuse a method whose from-scratch run would differ from the shared prefill's."""
    if isinstance(method, Dense):
        return
    if not isinstance(method, Evict):
        raise ValueError(
            f"the eviction eval takes eviction methods and dense, got {method.describe()}"
        )
    if method.when == "chunk":
        raise ValueError(f"{method.describe()} compresses during the prefill (when='chunk')")
    if method.window > window:
        raise ValueError(
            f"{method.describe()} has window={method.window} > the shared prefill's {window}"
        )


def window_of(config) -> int:
    """The observation window the shared prefill records (``config.window``, or Evict's default)."""
    return int(getattr(config, "window", SHARED_WINDOW))


def _use(model, method: Method):
    from longattn.integrations.hf import use

    return use(model, method)


@torch.no_grad()
def shared_prefill(model, input_ids: torch.Tensor, window: int = SHARED_WINDOW) -> Prefilled:
    """Prefill ``input_ids`` [1, T] once under ``SharedPrefill(window=window)``."""
    from longattn.integrations.hf import with_cache

    with _use(model, SharedPrefill(window=window)) as cache:
        start = time.perf_counter()
        out = model(
            input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1
        )
        ms = (time.perf_counter() - start) * 1e3
    return Prefilled(cache.kv, out.logits[0, -1].clone(), ms, window)


def _fit_window(kv: KVCache, method: Evict) -> None:
    """Cut each layer's recorded observation window to the method's own ``window`` queries."""
    for layer in range(kv.n_layers):
        tracked = kv.state.get(evict_key(layer))
        if tracked is not None:
            kv.state[evict_key(layer)] = tracked._replace(
                queries=tracked.queries[:, :, -method.window :].clone(),
                q_pos=tracked.q_pos[:, -method.window :].clone(),
            )


@contextlib.contextmanager
def resumed(model, method: Method, prefilled: Prefilled):
    """A ``use(model, method)`` block whose cache continues a copy of ``prefilled``'s cache."""
    check_shareable(method, prefilled.window)
    with _use(model, method) as cache:
        cache.kv = copy.deepcopy(prefilled.kv)
        if not isinstance(method, Evict) or "accumulated" not in method.needs:
            cache.kv.clear_stats()  # the method keeps none: its capacity holds none
        if isinstance(method, Evict):
            _fit_window(cache.kv, method)
        for layer in cache.layers:
            layer.is_initialized = True
        yield cache


def _memory(cache) -> dict:
    return {"kv_bytes": cache.kv.nbytes(), "kv_capacity_bytes": cache.kv.capacity_nbytes()}


def _resident_kib() -> int:
    """Resident memory now, after returning freed heap pages to the system."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss_kib("VmRSS") or 0


@torch.no_grad()
def answer(
    model, method: Method, prefilled: Prefilled, new_tokens: int, base_kib: int, eos=None
) -> dict:
    """Greedy ``new_tokens`` after the prompt (the first from the prefill's logits), stopping after
    ``eos``; each decode step timed, the first apart (it compresses)."""
    from longattn.integrations.hf import with_cache

    token = prefilled.logits.argmax(-1).view(1, 1)
    tokens, steps = [int(token)], []
    with resumed(model, method, prefilled) as cache:
        for _ in range(new_tokens - 1):
            if eos is not None and tokens[-1] == eos:
                break
            start = time.perf_counter()
            out = model(input_ids=token, **with_cache(model, cache), use_cache=True)
            steps.append(time.perf_counter() - start)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        held = (_resident_kib() - base_kib) / 1024
        result = {"tokens": tokens, "held_rss_mib": held, **_memory(cache)}
    result["first_step_ms"] = steps[0] * 1e3 if steps else None
    later = steps[1:]
    result["decode_tok_s"] = len(later) / sum(later) if later else None
    return result


@torch.no_grad()
def forced(model, method: Method, prefilled: Prefilled, tail: torch.Tensor, base_kib: int) -> dict:
    """Perplexity of ``tail`` [1, n] (the tokens after the prompt) by teacher-forced decode through
    the method's cache, up to ``MAX_DECODE_QUERIES`` tokens per decode call."""
    from longattn.integrations.hf import with_cache

    chunk = 1 if getattr(method, "when", "") == "decode" else MAX_DECODE_QUERIES
    n = tail.shape[1]
    logits = [prefilled.logits.view(1, -1)]  # predicts tail[0]
    with resumed(model, method, prefilled) as cache:
        start = time.perf_counter()
        for lo in range(0, n - 1, chunk):
            out = model(input_ids=tail[:, lo : min(lo + chunk, n - 1)], **with_cache(model, cache),
                        use_cache=True)  # fmt: skip
            logits.append(out.logits[0])
        seconds = time.perf_counter() - start
        held = (_resident_kib() - base_kib) / 1024
        result = {"held_rss_mib": held, **_memory(cache)}
    nll = torch.nn.functional.cross_entropy(torch.cat(logits).float(), tail[0], reduction="none")
    return {**result, "ppl": float(nll.mean().exp()), "nll": nll.tolist(), "ppl_tokens": n,
            "forced_tok_s": (n - 1) / seconds if n > 1 else None}  # fmt: skip


def default_specs(window: int = SHARED_WINDOW) -> list[str]:
    """What ``longattn eval --budgets`` runs without ``--methods``: dense, then every eviction
    method that needs no calibration file (``bench.evict.eviction_specs``: ThinK with SnapKV
    scoring its tokens) and that the shared prefill can serve. Left out: methods with a
    calibration file (QFilters: ``--methods qfilters:calibration=<file>``) and methods that
    compress during the prefill (DuoAttention, RazorAttention: their own runs)."""
    from longattn.bench.evict import eviction_specs

    specs = ["dense"]
    for spec in eviction_specs():
        try:
            check_shareable(from_string(spec), window)
        except ValueError:
            continue
        specs.append(spec)
    return specs


def method_grid(
    specs: list[str], budgets: list[float], window: int = SHARED_WINDOW
) -> list[Method]:
    """``dense`` first, then every eviction method at every budget (its ``budget`` replaced)."""
    out: list[Method] = [Dense()]
    for spec in specs:
        base = from_string(spec)
        if isinstance(base, Dense):
            continue
        for budget in budgets:
            method = dataclasses.replace(base, budget=budget) if isinstance(base, Evict) else base
            check_shareable(method, window)
            out.append(method)
    return out


def _label(method: Method) -> str:
    return "dense" if isinstance(method, Dense) else method.describe()


def _prompt(session, task: str, length: int, sample: int, depth) -> tuple[torch.Tensor, dict]:
    """(the prompt ids [1, T'], what the cases of this prompt need: answers, tail)."""
    from longattn.eval import tasks

    config = session.config
    seed = config.seed * 100_003 + sample
    if task == "ppl":
        ids = torch.tensor([tasks.text_window(session.tokenizer, config.corpus, length, seed)])
        tail = min(config.decode_tokens, length // 2)
        return ids[:, : length - tail], {"tail": ids[:, length - tail :]}
    made = tasks.make(task, session.tokenizer, length, seed, depth)
    new = max(config.new_tokens, made.max_new_tokens)
    return torch.tensor([made.input_ids]), {"answers": list(made.answers), "new": new}


def _run_case(session, method: Method, prefilled: Prefilled, task: str, need: dict) -> dict:
    from longattn.eval import tasks

    holder: dict = {}
    base = _resident_kib()
    if task == "ppl":
        fn: Callable[[], dict] = lambda: forced(  # noqa: E731
            session.model, method, prefilled, need["tail"], base
        )
    else:
        eos = session.tokenizer.eos_token_id
        fn = lambda: answer(session.model, method, prefilled, need["new"], base, eos)  # noqa: E731
    peak = peak_extra_mib(lambda: holder.update(fn()))
    record = {"peak_rss_mib": peak, **holder}
    if task != "ppl":
        eos = session.tokenizer.eos_token_id
        tokens = record.pop("tokens")
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        text = session.tokenizer.decode(tokens, skip_special_tokens=True)
        record.update(generated=text, answers=need["answers"],
                      score=tasks.score(text, need["answers"]), new_tokens=need["new"])  # fmt: skip
    return record


class EvictSession:
    """The loaded model, the tokenizer and the run's settings (``runner.EvalConfig``)."""

    def __init__(self, config, model, tokenizer):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.env = environment()


def prompt_cases(session, methods: list[Method], done: set[str]):
    """Yield (task, length, sample, depth, the methods still to run on that prompt), sample by
    sample over every task (in the order given) and length, so that a run stopped early has
    every cell alike, the first tasks first."""
    config = session.config
    n_ppl = config.ppl_samples or config.samples
    for sample in range(max(config.samples, n_ppl)):
        for task in config.tasks:
            for length in config.lengths:
                if sample >= (n_ppl if task == "ppl" else config.samples):
                    continue
                depth = config.depths[sample % len(config.depths)] if task == "needle" else None
                todo = [m for m in methods if f"{_label(m)}|{task}|{length}|{sample}" not in done]
                if todo:
                    yield task, length, sample, depth, todo


def run_prompt(session, task, length, sample, depth, methods, writer, progress=None) -> int:
    """Prefill one prompt once and run every method of ``methods`` on a copy; failed cases."""
    ids, need = _prompt(session, task, length, sample, depth)
    prefilled = shared_prefill(session.model, ids, window_of(session.config))
    failed = 0
    for method in methods:
        label = _label(method)
        record = {"case": f"{label}|{task}|{length}|{sample}", "method": label,
                  "name": method.name or "dense", "budget": getattr(method, "budget", None),
                  "task": task, "length": length, "sample": sample, "depth": depth,
                  "prefill_ms": prefilled.prefill_ms, "model": session.config.model}  # fmt: skip
        if isinstance(method, Dense):
            record["budget"] = None
        try:
            record.update(_run_case(session, method, prefilled, task, need))
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            failed += 1
        writer.write({**record, **session.env})
        if progress is not None:
            progress(record)
    return failed


def run_evict_eval(config, budgets: list[float], *, force=False, resume=False, loader=None,
                   progress: Callable | None = None) -> dict:  # fmt: skip
    """Run (or resume) the eviction eval of ``config`` (a ``runner.EvalConfig`` whose methods are
    eviction methods) at ``budgets``; writes cases.jsonl, run.json and report.md in ``config.out``."""
    from longattn.eval import runner
    from longattn.eval.evict_report import write_report

    bad = [t for t in config.tasks if t not in EVICT_TASKS]
    if bad:
        raise ValueError(f"the eviction eval runs {', '.join(EVICT_TASKS)}; got {bad}")
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"budgets must lie in (0, 1], got {budgets}")
    methods = method_grid(config.methods, budgets, window_of(config))
    runner.check_out(config.out, force, resume)
    if loader is None:
        from longattn.eval.models import load as loader
    model, tokenizer = loader(config.model)
    runner.check_lengths(config.lengths, getattr(model.config, "max_position_embeddings", None))
    runner.prepare_out(config.out, force)
    start = time.perf_counter()
    info = {"config": {**vars(config), "out": str(config.out)}, "budgets": budgets,
            "shared_window": window_of(config), **environment()}  # fmt: skip
    (config.out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    path = config.out / CASES_FILE
    runner.drop_torn_lines(path)
    done = runner.finished(path)
    session, writer = EvictSession(config, model, tokenizer), JsonlWriter(path)
    counts = {"prompts": 0, "failed": 0}
    for task, length, sample, depth, todo in prompt_cases(session, methods, done):
        counts["failed"] += run_prompt(session, task, length, sample, depth, todo, writer, progress)
        counts["prompts"] += 1
    info["elapsed_s"] = round(time.perf_counter() - start, 1)
    (config.out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    write_report(config.out)
    return counts


def load_cases(folder: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (folder / CASES_FILE).read_text().splitlines() if line]
