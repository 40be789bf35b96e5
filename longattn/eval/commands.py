"""``longattn eval``, ``longattn plot`` and ``longattn analyze``: argument handling and presets."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

# a preset fills every option the command line leaves unset
PRESETS: dict[str, dict] = {
    "demo": {
        "model": "smollm2-135m",
        "methods": "dense,streaming_llm:sinks=4,window=252,sliding_window:window=256",
        "tasks": "passkey,needle,ppl,fidelity",
        "lengths": "1k,2k",
        "samples": 3,
        "depths": "0.1,0.5,0.9",
        "new_tokens": 8,
        "ppl_samples": 1,
    },
}
DEFAULTS = {
    "model": "smollm2-135m",
    "methods": "dense",
    "tasks": "passkey,needle,ppl,fidelity",
    "lengths": "1k,2k",
    "samples": 4,
    "depths": "0,0.25,0.5,0.75,1",
    "new_tokens": 12,
    "corpus": "pydoc",
    "seed": 0,
    "ppl_samples": None,
}
# optional methods a preset adds when their module is present (the decode methods land separately)
PRESET_EXTRAS = {"demo": {"quest": "quest:budget=256"}}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: a usage error (exit 2) names a value that is not > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an int > 0, got {text!r}")
    return value


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (demo)")
    p.add_argument("--model", help="smollm2-135m (embedded), a local HF folder or a .gguf file")
    p.add_argument(
        "--methods", help="comma-separated method strings, e.g. dense,streaming_llm:window=512"
    )
    p.add_argument("--tasks", help="passkey,needle,multikey,multivalue,vartrack,ppl,fidelity")
    p.add_argument("--lengths", help="comma-separated token counts, e.g. 1k,2k,4k")
    p.add_argument("--samples", type=positive_int, help="samples per task and length")
    p.add_argument(
        "--ppl-samples", dest="ppl_samples", type=positive_int, help="texts per length for ppl"
    )
    p.add_argument("--depths", help="needle depths in [0, 1], cycled over the needle samples")
    p.add_argument(
        "--new-tokens", dest="new_tokens", type=positive_int, help="greedy tokens to decode"
    )
    p.add_argument("--corpus", help="real text for ppl and fidelity: pydoc, licenses or kjv")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="results folder (JSONL, report, plots)")
    p.add_argument("--force", action="store_true", help="overwrite an existing results folder")
    p.add_argument("--resume", action="store_true", help="continue a run, redoing no finished case")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--budgets",
        help="the eviction eval: comma-separated kept fractions, e.g. 0.5,0.25,0.1; every method "
        "is an eviction method run at each budget from one shared prefill per prompt "
        "(longattn/eval/evict.py); tasks passkey, needle, ppl; without --methods: dense and "
        "every eviction method that one prefill can serve, at its defaults",
    )


def config_from_args(args: argparse.Namespace):
    """An ``EvalConfig`` from the arguments, the preset and the defaults (in that order)."""
    from longattn.eval.runner import EvalConfig, parse_length, split_methods
    from longattn.method import registry

    preset = PRESETS.get(args.preset or "", {})
    value = {k: getattr(args, k, None) for k in DEFAULTS}
    value = {k: v if v is not None else preset.get(k, DEFAULTS[k]) for k, v in value.items()}
    methods = split_methods(value["methods"])
    if args.methods is None:
        extras = PRESET_EXTRAS.get(args.preset or "", {})
        methods += [spec for name, spec in extras.items() if name in registry()]
    return EvalConfig(
        model=value["model"],
        methods=methods,
        tasks=[t.strip() for t in value["tasks"].split(",") if t.strip()],
        lengths=[parse_length(n) for n in str(value["lengths"]).split(",") if n.strip()],
        out=pathlib.Path(args.out),
        samples=int(value["samples"]),
        depths=[_depth(d) for d in str(value["depths"]).split(",") if d.strip()],
        seed=int(value["seed"]),
        new_tokens=int(value["new_tokens"]),
        corpus=value["corpus"],
        ppl_samples=value["ppl_samples"],
    )


def _depth(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"bad needle depth {text!r}: use a number in [0, 1]") from None


def _fail(command: str, exc: Exception) -> int:
    print(f"longattn {command}: error: {exc}", file=sys.stderr)
    return 2


def run_eval_command(args: argparse.Namespace) -> int:
    from longattn.eval.plots import render_all
    from longattn.eval.runner import run_eval

    start = time.perf_counter()
    if getattr(args, "budgets", None):
        return run_evict_command(args)
    try:
        config = config_from_args(args)
        counts = run_eval(config, force=args.force, resume=args.resume, show_progress=args.progress)
    except USER_ERRORS as exc:
        return _fail("eval", exc)
    path = render_all(config.out)
    print(
        f"{counts['run']} case(s) run, {counts['skipped']} already done, {counts['failed']} "
        f"failed, in {time.perf_counter() - start:.0f} s"
    )
    _print_report(path)
    return 0


def run_evict_command(args: argparse.Namespace) -> int:
    """``longattn eval --budgets ...``: the eviction eval (``longattn.eval.evict``)."""
    from longattn.eval.evict import default_specs, run_evict_eval, window_of

    start = time.perf_counter()

    def show(record: dict) -> None:
        if args.progress:
            outcome = record.get("error") or record.get("score", record.get("ppl"))
            print(f"{record['case']}: {outcome}", flush=True)

    try:
        config = config_from_args(args)
        if args.methods is None:
            config = dataclasses.replace(config, methods=default_specs(window_of(config)))
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        counts = run_evict_eval(
            config, budgets, force=args.force, resume=args.resume, progress=show
        )
    except USER_ERRORS as exc:
        return _fail("eval", exc)
    print(f"{counts['prompts']} prompt(s), {counts['failed']} failed case(s), "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
    print((config.out / "report.md").read_text())
    return 0


def _print_report(path: pathlib.Path) -> None:
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"\nreport: {path}\n        {path.with_suffix('.html')}\nplots:  {path.parent / 'plots'}")


def run_plot_command(args: argparse.Namespace) -> int:
    from longattn.eval.plots import render_all

    try:
        path = render_all(pathlib.Path(args.folder))
    except USER_ERRORS as exc:
        return _fail("plot", exc)
    _print_report(path)
    return 0


def run_analyze_command(args: argparse.Namespace) -> int:
    from longattn.eval.analyze import run_analysis

    try:
        path = run_analysis(
            args.model, parse_length_arg(args.text_length), pathlib.Path(args.out), args.corpus,
            args.force, args.window,
        )  # fmt: skip
    except USER_ERRORS as exc:
        return _fail("analyze", exc)
    print(f"analysis: {path}\nplots:    {path.parent}")
    return 0


def parse_length_arg(text: str) -> int:
    from longattn.eval.runner import parse_length

    return parse_length(text)


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", dest="text_length", default="1k", help="tokens of real text (1k)")
    p.add_argument("--corpus", default="pydoc", help="pydoc, licenses or kjv")
    p.add_argument("--window", type=positive_int, default=64, help="locality window (tokens)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")


def add_calibrate_commands(sub) -> None:
    """``longattn calibrate duo|razor|minference|qfilters|sla``: calibrations on a real model,
    offline."""
    cal = sub.add_parser("calibrate", help="calibrate a method on a real model (safetensors file)")
    which = cal.add_subparsers(dest="calibration", required=True)
    duo = which.add_parser(
        "duo", help="DuoAttention gates on synthetic passkeys (resumable: rerun to continue)"
    )
    duo.add_argument("--steps", type=positive_int, default=40, help="optimiser steps (40)")
    duo.add_argument(
        "--length", type=positive_int, default=1024, help="longest sample in tokens (1024)"
    )
    duo.add_argument("--sinks", type=int, default=64, help="streaming heads' sink tokens (64)")
    duo.add_argument("--recent", type=positive_int, default=256, help="their recent window (256)")
    duo.add_argument("--lr", type=float, default=0.04, help="peak learning rate (0.04)")
    duo.add_argument("--reg", type=float, default=0.05, help="weight of the L1 penalty (0.05)")
    duo.add_argument("--no-progress", dest="progress", action="store_false")
    duo.set_defaults(func=run_calibrate_command)
    razor = which.add_parser("razor", help="RazorAttention echo / induction head scores")
    razor.add_argument(
        "--length", type=positive_int, default=256, help="random tokens per repeat (256)"
    )
    razor.add_argument("--repeats", type=positive_int, default=4, help="repeats (4)")
    razor.set_defaults(func=run_calibrate_command)
    mi = which.add_parser(
        "minference", help="MInference per-head pattern search (resumable: rerun to continue)"
    )
    mi.add_argument("--length", type=positive_int, default=2048, help="calibration tokens (2048)")
    mi.add_argument("--corpus", default="pydoc", help="pydoc, licenses or kjv (pydoc)")
    mi.add_argument("--target", type=float, default=0.2, help="target density per head (0.2)")
    mi.add_argument("--block-size", type=positive_int, default=64, help="index block (64)")
    mi.add_argument("--last-q", type=positive_int, default=64, help="estimating queries (64)")
    mi.add_argument("--no-progress", dest="progress", action="store_false")
    mi.set_defaults(func=run_calibrate_command)
    qf = which.add_parser("qfilters", help="Q-Filters directions from real queries")
    qf.add_argument("--length", type=positive_int, default=2048, help="calibration tokens (2048)")
    qf.add_argument("--corpus", default="licenses", help="pydoc, licenses or kjv (licenses)")
    qf.set_defaults(func=run_calibrate_command)
    sla = which.add_parser(
        "sla", help="SLA's linear part: a map of its marginal output fitted to softmax attention"
    )
    sla.add_argument("--length", type=positive_int, default=2048, help="tokens per window (2048)")
    sla.add_argument("--corpus", default="pydoc", help="pydoc, licenses or kjv (pydoc)")
    sla.add_argument("--windows", type=positive_int, default=4, help="training windows (4)")
    sla.add_argument("--heldout", type=positive_int, default=1, help="held-out windows (1)")
    sla.add_argument("--ridge", type=float, default=1.0, help="pull towards the identity (1.0)")
    sla.add_argument("--critical", type=float, default=0.1, help="SLA's critical share (0.1)")
    sla.add_argument("--marginal", type=float, default=0.9, help="SLA's marginal share (0.9)")
    sla.add_argument("--block-size", type=positive_int, default=64, help="SLA's block (64)")
    sla.add_argument("--no-progress", dest="progress", action="store_false")
    sla.set_defaults(func=run_calibrate_command)
    for p in (duo, razor, mi, qf, sla):
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True, help="the calibration file to write (.safetensors)")


def run_calibrate_command(args: argparse.Namespace) -> int:
    from longattn.eval import calibrate

    out = pathlib.Path(args.out)
    try:
        if args.calibration == "duo":
            path, seconds = calibrate.run_duo(
                args.model, out, args.steps, args.length, sinks=args.sinks, recent=args.recent,
                lr=args.lr, reg=args.reg, seed=args.seed, progress=args.progress,
            )  # fmt: skip
        elif args.calibration == "minference":
            from longattn.eval.pattern_search import SearchSettings, run_minference

            settings = SearchSettings(
                model=args.model, corpus=args.corpus, length=args.length, target=args.target,
                block_size=args.block_size, last_q=args.last_q,
            )  # fmt: skip
            path, seconds = run_minference(settings, out, progress=args.progress)
        elif args.calibration == "sla":
            from longattn.eval import sla_fit

            settings = sla_fit.SlaFitSettings(
                model=args.model, corpus=args.corpus, length=args.length, windows=args.windows,
                heldout=args.heldout, ridge=args.ridge, block_size=args.block_size,
                critical=args.critical, marginal=args.marginal, seed=args.seed,
            )  # fmt: skip
            path, seconds, cal = sla_fit.run(settings, out, progress=args.progress)
            for name in ("heldout_error_training_free", "heldout_error_fitted"):
                errors = cal.params[name]
                print(f"{name}: mean {sum(errors) / len(errors):.4f} over {len(errors)} layers")
        elif args.calibration == "qfilters":
            path, seconds = calibrate.run_qfilters(args.model, out, args.length, args.corpus)
        else:
            path, seconds = calibrate.run_razor(
                args.model, out, args.length, args.repeats, args.seed
            )
    except USER_ERRORS as exc:
        return _fail("calibrate", exc)
    print(f"wrote {path} in {seconds:.0f} s")
    return 0
