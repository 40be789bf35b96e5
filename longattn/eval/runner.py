"""The evaluation run: cases (method x task x length x sample), one JSONL line each, resumable.

Every case runs the model with the method switched in through ``longattn.integrations.hf.use`` and
is timed against the model's own ``sdpa`` attention (the ``hf_sdpa`` baseline) in the same run.

A decode-time select method (``method.hook == "select"``: Quest, Loki, ...) is dense in prefill by
definition, so it is measured where it acts: its perplexity by teacher-forced decode through the cache
(``score_decode``), its fidelity by the library's decode fidelity (``eval.fidelity``); no prefill
perplexity or prefill output error is recorded under its name.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from longattn.bench.common import JsonlWriter, environment, peak_extra_mib
from longattn.eval import metrics, tasks, text
from longattn.method import Method, from_string

BASELINE = "hf_sdpa"
EXTRA_TASKS = ("ppl", "fidelity")
ALL_TASKS = tasks.TASKS + EXTRA_TASKS
CASES_FILE = "cases.jsonl"
# files and folders a run writes; --force removes exactly these
OUTPUTS = (CASES_FILE, "run.json", "report.md", "report.html", "attention_maps.pt", "plots")
MAP_HEADS = ((0, 0), (3, 2), (15, 4), (29, 8))  # (layer, head) pairs whose maps are saved
MAP_SIZE = 512


@dataclass
class EvalConfig:
    model: str
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    out: pathlib.Path
    samples: int = 4
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seed: int = 0
    new_tokens: int = 12
    corpus: str = "pydoc"
    ppl_samples: int | None = None  # texts per length for ppl; None: ``samples``
    # tokens scored one at a time through the cache for a select method's perplexity (the last ones
    # of each text, at most half of it); every other method's ``ppl_tail`` is over the same tokens
    decode_tokens: int = 256
    fidelity_steps: int = 8  # decode steps replayed by a select method's fidelity


def split_methods(spec: str) -> list[str]:
    """``"dense,streaming_llm:sinks=4,window=512,quest:budget=64"`` -> one string per method."""
    out: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if "=" in token and ":" not in token and out:
            out[-1] += "," + token
        else:
            out.append(token)
    return out


def parse_length(text: str) -> int:
    """``"2k"`` -> 2048, ``"1500"`` -> 1500."""
    t = text.strip().lower()
    try:
        value = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"bad length {text!r}: use a token count such as 1500 or 2k") from None
    if value <= 0:
        raise ValueError(f"length must be > 0, got {text!r}")
    return value


def validate(config: EvalConfig) -> list[Method]:
    """Check everything that can be checked before the model loads; the parsed methods."""
    unknown = [t for t in config.tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
    if config.samples <= 0:
        raise ValueError(f"--samples must be > 0, got {config.samples}")
    if config.decode_tokens <= 0 or config.fidelity_steps <= 0:
        raise ValueError(
            f"decode_tokens and fidelity_steps must be > 0, got {config.decode_tokens} and "
            f"{config.fidelity_steps}"
        )
    if config.corpus not in text.CORPORA:
        raise ValueError(f"unknown corpus {config.corpus!r}; known: {', '.join(text.CORPORA)}")
    if {"ppl", "fidelity"} & set(config.tasks):
        text.corpus(config.corpus)  # a corpus this machine lacks is refused before the model loads
    if not config.lengths or not config.depths:
        raise ValueError("give at least one length and one needle depth")
    bad = [d for d in config.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
    return [from_string(m) for m in config.methods]


def check_lengths(lengths: list[int], max_positions: int | None) -> None:
    """Refuse lengths beyond the model's trained positions (no position extension is applied)."""
    too_long = [n for n in lengths if max_positions is not None and n > max_positions]
    if too_long:
        raise ValueError(
            f"length(s) {too_long} exceed the model's {max_positions} positions "
            "(max_position_embeddings); longattn applies no position extension"
        )


def check_out(out: pathlib.Path, force: bool, resume: bool) -> None:
    """An existing non-empty results folder needs ``resume`` or ``force``: never a silent overwrite."""
    if force and resume:
        raise ValueError("--force and --resume exclude each other")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (force or resume):
        raise FileExistsError(
            f"results folder {out} exists: pass --resume to continue it or --force to overwrite"
        )


def prepare_out(out: pathlib.Path, force: bool) -> None:
    """Create ``out``; with ``force``, first remove the files a previous run wrote there (only those)."""
    if force and out.is_dir():
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def finished(path: pathlib.Path) -> set[str]:
    """Keys of the cases already written without error (a torn last line is ignored)."""
    done: set[str] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not record.get("error"):
            done.add(record["case"])
    return done


def drop_torn_lines(path: pathlib.Path) -> None:
    """Rewrite ``path`` without the lines that are not JSON (a write cut short by an interrupted
    run), so that a resumed run appends whole lines and the report reads every line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        kept.append(line + "\n")
    path.write_text("".join(kept))


def default_use(model, method: Method):
    """``longattn.integrations.hf.use`` (looked up when needed, so that a missing one is a clear error)."""
    from longattn.integrations import hf

    use = getattr(hf, "use", None)
    if use is None:
        raise RuntimeError(
            "longattn.integrations.hf.use is not available in this build: only the hf_sdpa "
            "baseline and the fidelity task can run"
        )
    return use(model, method)


@contextlib.contextmanager
def _timer(into: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[key] = (time.perf_counter() - start) * 1e3


@torch.no_grad()
def generate(model, context, input_ids: torch.Tensor, new_tokens: int, eos: int | None) -> dict:
    """Greedy prefill + decode under ``context`` (a ``use(...)`` or the baseline); timings and KV bytes."""
    from longattn.integrations.hf import returned_cache, with_cache

    timings: dict = {}
    tokens: list[int] = []
    with context as cache:
        with _timer(timings, "prefill_ms"):
            out = model(
                input_ids=input_ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1
            )
        cache = returned_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        tokens.append(int(token))
        with _timer(timings, "decode_ms"):
            for _ in range(new_tokens - 1):
                out = model(input_ids=token, **with_cache(model, cache), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
        timings.update(_memory(cache))
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    timings["decode_tok_s"] = (
        (new_tokens - 1) / (timings["decode_ms"] / 1e3) if new_tokens > 1 else None
    )
    return {"tokens": tokens, **timings}


def _memory(cache) -> dict:
    """Used key/value bytes and the bytes the cache's storage really holds."""
    return {
        "kv_bytes": metrics.kv_bytes(cache),
        "kv_capacity_bytes": metrics.kv_capacity_bytes(cache),
    }


@torch.no_grad()
def score_text(model, context, input_ids: torch.Tensor, tail: int) -> dict:
    """Perplexity of ``input_ids`` with the method in the prefill (``ppl``), and over the last
    ``tail`` tokens alone (``ppl_tail``); prefill time and KV bytes."""
    from longattn.integrations.hf import returned_cache, with_cache

    timings: dict = {}
    with context as cache:
        with _timer(timings, "prefill_ms"):
            out = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True)
        timings.update(_memory(returned_cache(out)))
    start = input_ids.shape[1] - tail - 1  # logits at start .. T-2 predict the last tail tokens
    tail_ppl = metrics.perplexity(out.logits[:, start:], input_ids[:, start:])
    return {"ppl": metrics.perplexity(out.logits, input_ids), "ppl_tail": tail_ppl,
            "ppl_tail_phase": "prefill", "ppl_tail_tokens": tail, **timings}  # fmt: skip


@torch.no_grad()
def forward_perplexity(model, input_ids: torch.Tensor, method=None) -> tuple[float, float]:
    """(perplexity, seconds) of one forward over ``input_ids`` [1, T]: the model's own attention
    without a cache (``method`` None), else through ``hf.use(model, method)``'s cache."""
    from longattn.integrations.hf import use, with_cache

    start = time.perf_counter()
    if method is None:
        logits = model(input_ids=input_ids, use_cache=False).logits
    else:
        with use(model, method) as cache:
            logits = model(input_ids=input_ids, **with_cache(model, cache), use_cache=True).logits
    return metrics.perplexity(logits, input_ids), time.perf_counter() - start


@torch.no_grad()
def score_decode(model, context, input_ids: torch.Tensor, tail: int) -> dict:
    """Perplexity of the last ``tail`` tokens by teacher-forced decode through the cache: the prefix
    is prefilled (dense for a select method), then each token is fed alone with the method's
    selection on, and the next token's log-probability is scored."""
    from longattn.integrations.hf import returned_cache, with_cache

    timings: dict = {}
    prefix = input_ids.shape[1] - tail
    nll = []
    with context as cache:
        with _timer(timings, "prefix_prefill_ms"):
            out = model(input_ids=input_ids[:, :prefix], **with_cache(model, cache), use_cache=True,
                        logits_to_keep=1)  # fmt: skip
        cache = returned_cache(out)
        with _timer(timings, "forced_decode_ms"):
            for t in range(prefix, input_ids.shape[1]):
                logp = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts token t
                nll.append(-logp[input_ids[0, t]].item())
                if t + 1 < input_ids.shape[1]:
                    out = model(input_ids=input_ids[:, t : t + 1], **with_cache(model, cache),
                                use_cache=True)  # fmt: skip
        timings.update(_memory(cache))
    # kept apart from generation's decode tok/s, which the report compares across methods
    steps_s = timings["forced_decode_ms"] / 1e3
    timings["forced_tok_s"] = (tail - 1) / steps_s if tail > 1 else None
    return {"ppl_tail": math.exp(sum(nll) / len(nll)), "ppl_tail_phase": "decode",
            "ppl_tail_tokens": tail, **timings}  # fmt: skip


def is_select(label: str) -> bool:
    """Whether a case's method selects keys at decode time (dense in prefill by definition)."""
    return label != BASELINE and from_string(label).hook == "select"


def decode_fidelity(method: Method, captured: dict, steps: int) -> dict:
    """The library's decode fidelity (``eval.fidelity``) in the record shape of ``metrics.fidelity``:
    per layer, the output error and mass recall over the last ``steps`` positions as decode steps."""
    from longattn.eval.fidelity import decode_fidelity as replay

    rows = replay(captured, {"m": method}, steps=steps)
    return {"layer_error": [r["rel_error"] for r in rows],
            "mass_recall": [r["recall"] for r in rows], "fidelity_phase": "decode",
            "fidelity_steps": steps}  # fmt: skip


@dataclass
class Case:
    key: str
    method: str  # the method string, or BASELINE
    task: str
    length: int
    sample: int
    depth: float | None = None


def enumerate_cases(config: EvalConfig) -> list[Case]:
    """Every case of the run, in execution order (by length, then task and sample, then method)."""
    labels = [BASELINE] + [from_string(m).describe() for m in config.methods]
    cases = []
    for length in config.lengths:
        for task in config.tasks:
            n = {"fidelity": 1, "ppl": config.ppl_samples or config.samples}.get(
                task, config.samples
            )
            for sample in range(n):
                depth = config.depths[sample % len(config.depths)] if task == "needle" else None
                for label in labels:
                    if task == "fidelity" and label == BASELINE:
                        continue
                    key = f"{label}|{task}|{length}|{sample}"
                    cases.append(Case(key, label, task, length, sample, depth))
    return cases


class Session:
    """One loaded model and everything derived from it that several cases share."""

    def __init__(self, config: EvalConfig, model, tokenizer, use_fn: Callable = default_use):
        self.config, self.model, self.tokenizer, self.use_fn = config, model, tokenizer, use_fn
        self.n_heads = int(model.config.num_attention_heads)
        self.env = environment()
        self._captured: dict[int, dict] = {}
        self._density: dict[tuple[str, int], tuple[float, str, int]] = {}
        self._plan_ms: dict[tuple[str, int], float] = {}

    def method_facts(self, label: str, length: int) -> tuple[float, str, int]:
        """(density, its kind, KV budget in tokens) of a method at ``length``, memoised."""
        if (label, length) not in self._density:
            if label == BASELINE:
                self._density[label, length] = (1.0, "pairs", length)
            else:
                method = from_string(label)
                value, kind = metrics.density(method, length, self.n_heads)
                if method.hook == "plan":  # input-dependent: realised on the corpus text
                    value, self._plan_ms[label, length] = metrics.plan_facts(
                        method, self.captured(length)
                    )
                self._density[label, length] = (value, kind, metrics.kv_budget(method, length))
        return self._density[label, length]

    def context(self, label: str):
        if label == BASELINE:
            return contextlib.nullcontext(None)  # the model's own sdpa and its own DynamicCache
        return self.use_fn(self.model, from_string(label))

    def captured(self, length: int) -> dict:
        """Dense post-RoPE q/k/v of every layer on real text of ``length`` tokens (one pass, memoised)."""
        if length not in self._captured:
            from longattn.integrations.hf import capture_qkv

            self._captured.clear()  # one length at a time: a 30-layer capture is hundreds of MiB
            ids = torch.tensor([tasks.text_window(self.tokenizer, self.config.corpus, length, 0)])
            self._captured[length] = capture_qkv(self.model, ids)
        return self._captured[length]

    def run(self, case: Case) -> dict:
        density, kind, budget = self.method_facts(case.method, case.length)
        record = {
            "case": case.key, "method": case.method, "task": case.task, "length": case.length,
            "sample": case.sample, "depth": case.depth, "density": density,
            "density_kind": kind, "kv_budget": budget, "model": self.config.model,
        }  # fmt: skip
        if (case.method, case.length) in self._plan_ms:
            record["plan_ms"] = self._plan_ms[case.method, case.length]
        try:
            holder: dict = {}
            record["peak_rss_mib"] = peak_extra_mib(lambda: holder.update(self._measure(case)))
            record.update(holder)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
        record.update(self.env)
        return record

    def _measure(self, case: Case) -> dict:
        if case.task == "fidelity":
            result = self._fidelity(case)
            valid_err = [e for e in result["layer_error"] if e is not None]
            valid_rec = [r for r in result["mass_recall"] if r is not None]
            result["error_mean"] = sum(valid_err) / len(valid_err) if valid_err else None
            result["recall_mean"] = sum(valid_rec) / len(valid_rec) if valid_rec else None
            return result
        seed = self.config.seed * 100_003 + case.sample
        if case.task == "ppl":
            ids = torch.tensor(
                [tasks.text_window(self.tokenizer, self.config.corpus, case.length, seed)]
            )
            score = score_decode if is_select(case.method) else score_text
            tail = min(self.config.decode_tokens, case.length // 2)
            return score(self.model, self.context(case.method), ids, tail)
        sample = tasks.make(case.task, self.tokenizer, case.length, seed, case.depth)
        new = max(self.config.new_tokens, sample.max_new_tokens)
        ids = torch.tensor([sample.input_ids])
        eos = self.tokenizer.eos_token_id
        result = generate(self.model, self.context(case.method), ids, new, eos)
        text = self.tokenizer.decode(result.pop("tokens"), skip_special_tokens=True)
        return {**result, "generated": text, "answers": list(sample.answers),
                "score": tasks.score(text, sample.answers), "new_tokens": new}  # fmt: skip

    def _fidelity(self, case: Case) -> dict:
        """Decode fidelity for a select method; the prefill pattern's fidelity for any other."""
        method = from_string(case.method)
        if is_select(case.method):
            return decode_fidelity(method, self.captured(case.length), self.config.fidelity_steps)
        return {**metrics.fidelity(method, self.captured(case.length)), "fidelity_phase": "prefill"}

    def save_maps(self, out: pathlib.Path, length: int) -> None:
        """Dense attention maps of the ``MAP_HEADS`` on real text, for the report's overlay plot."""
        captured = self.captured(length)
        size = min(MAP_SIZE, length)
        maps = {}
        for layer, head in MAP_HEADS:
            if layer in captured and head < captured[layer][0].shape[1]:
                q, k, _ = captured[layer]
                maps[f"{layer}.{head}"] = metrics.attention_map(q, k, head, size)
        torch.save({"size": size, "maps": maps, "corpus": self.config.corpus}, out)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )


def run_eval(
    config: EvalConfig,
    *,
    force: bool = False,
    resume: bool = False,
    loader: Callable | None = None,
    use_fn: Callable = default_use,
    show_progress: bool = True,
) -> dict:
    """Run (or resume) every case of ``config``; returns counts of run, skipped and failed cases."""
    start = time.perf_counter()
    validate(config)
    check_out(config.out, force, resume)
    if loader is None:
        from longattn.eval.models import load as loader
    model, tokenizer = loader(config.model)
    check_lengths(config.lengths, getattr(model.config, "max_position_embeddings", None))
    prepare_out(config.out, force)
    run_info = {"config": {**vars(config), "out": str(config.out)}, **environment()}
    (config.out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    session = Session(config, model, tokenizer, use_fn)
    cases = enumerate_cases(config)
    drop_torn_lines(config.out / CASES_FILE)
    done = finished(config.out / CASES_FILE)
    todo = [c for c in cases if c.key not in done]
    writer = JsonlWriter(config.out / CASES_FILE)
    failed = 0
    bar = _progress(show_progress)
    with bar if bar is not None else contextlib.nullcontext():
        job = bar.add_task("eval", total=len(todo)) if bar is not None else None
        for case in todo:
            if bar is not None:
                bar.update(job, description=f"{case.method} {case.task} {case.length}")
            record = session.run(case)
            failed += bool(record.get("error"))
            writer.write(record)
            if bar is not None:
                bar.advance(job)
    maps = config.out / "attention_maps.pt"
    if "fidelity" in config.tasks and not maps.exists():
        session.save_maps(maps, min(config.lengths))
    run_info["elapsed_s"] = round(time.perf_counter() - start, 1)
    (config.out / "run.json").write_text(json.dumps(run_info, indent=2, default=str))
    return {"run": len(todo), "skipped": len(cases) - len(todo), "failed": failed}
