"""``longattn calibrate duo|razor|qfilters``: the retrieval-head calibrations of DuoAttention and
RazorAttention and the Q-Filters directions on a real model, written as ``longattn.calibration``
files.

DuoAttention (Xiao et al. 2024, arXiv:2410.10819): per-KV-head gates optimised on synthetic
multi-passkey retrieval (real text as haystack, passkeys of random words at random depths, then the
questions and answers) against the full-attention model's last hidden states on the answer part.
RazorAttention (Tang et al. 2024, arXiv:2407.15891): echo and induction scores of every head on a
repeated random-token sequence, one forward pass.
Q-Filters (Godey et al. 2025, arXiv:2503.02812): per KV head, the leading right singular vector of
its queries on real text (one forward pass), signed against the mean query.
"""

from __future__ import annotations

import pathlib
import random
import time
from dataclasses import dataclass

import torch

from longattn.eval import tasks

# calibrations of the embedded SmolLM2-135M shipped with the package, made by `longattn calibrate
# duo|razor` (settings and wall times: data/README.md): method name -> file
DATA = pathlib.Path(__file__).resolve().parent / "data"
SHIPPED = {
    "duo_attention": DATA / "duo_smollm2.safetensors",
    "razor_attention": DATA / "razor_smollm2.safetensors",
    "qfilters": DATA / "qfilters_smollm2.safetensors",
}

# the paper's passkey alphabet and prompts (shortened passkeys for a small model and short context)
PASSKEY_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)  # fmt: skip
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: {words}."
QUESTION = "\nBased on the content of the book, what is the {ordinal} passkey to the vault?\n"
ANSWER = "Passkey: {words}\n"


@dataclass(frozen=True)
class PasskeyData:
    """Deterministic multi-passkey samples: ``batch(step)`` -> (input_ids [1, T], mask [1, T]).

    Lengths cycle over ``n_lengths`` values evenly spaced in [length / 2, length] (the paper samples
    context lengths from a range too); the mask marks the questions and answers after the text."""

    tokenizer: object
    length: int = 1024
    n_keys: int = 4
    n_words: int = 6
    seed: int = 0
    n_lengths: int = 4

    def length_at(self, step: int) -> int:
        if self.n_lengths == 1:
            return self.length
        low = self.length // 2
        return low + (self.length - low) * (step % self.n_lengths) // (self.n_lengths - 1)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"duo-passkeys-{self.seed}-{step}")
        keys = [
            " ".join(rng.choice(PASSKEY_WORDS) for _ in range(self.n_words))
            for _ in range(self.n_keys)
        ]
        encode = lambda s: tasks._encode(self.tokenizer, s)  # noqa: E731
        needles = [
            (0.05 + 0.9 * rng.random(), encode(" " + NEEDLE.format(ordinal=o, words=k)))
            for o, k in zip(ORDINALS, keys)
        ]
        qa: list[int] = []
        for ordinal, words in zip(ORDINALS, keys):
            qa += encode(QUESTION.format(ordinal=ordinal) + ANSWER.format(words=words))
        bos = self.tokenizer.bos_token_id
        head = ([bos] if bos is not None else []) + encode("This is a long book: <book>")
        tail = encode(" </book>\n")
        n_hay = self.length_at(step) - len(head) - len(tail) - len(qa)
        if n_hay < 64:
            raise ValueError(
                f"length {self.length_at(step)} is too short for {self.n_keys} passkeys"
            )
        hay = tasks._haystack(
            self.tokenizer, tasks._filler_sentences("needle", rng), n_hay, needles
        )
        ids = head + hay + tail + qa
        mask = [False] * (len(ids) - len(qa)) + [True] * len(qa)
        return torch.tensor([ids]), torch.tensor([mask])


def run_duo(
    model_name: str,
    out: pathlib.Path,
    steps: int,
    length: int,
    *,
    sinks: int = 64,
    recent: int = 256,
    lr: float = 0.04,
    reg: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> tuple[pathlib.Path, float]:
    """Calibrate DuoAttention's gates; write ``out`` (and ``<out>.checkpoint`` while it runs).
    Returns the path and the seconds this call spent."""
    from longattn.calibration import Calibration, rank_heads
    from longattn.eval.models import load
    from longattn.integrations.hf_gates import GateTraining, train_gates

    start, cpu_start = time.perf_counter(), time.process_time()
    settings = GateTraining(steps=steps, sinks=sinks, recent=recent, lr=lr, reg=reg)
    model, tokenizer = load(model_name)
    data = PasskeyData(tokenizer, length=length, seed=seed)
    checkpoint = out.with_name(out.name + ".checkpoint")
    tag = {"model": model_name, "length": length, "seed": seed}
    with _progress(progress, steps, "duo gates") as report:
        gates = train_gates(model, data, settings, checkpoint, tag=tag, on_step=report)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = {**settings.identity(), "steps": steps, "length": length, "seed": seed}
    # this call's cost (a resumed run counts only its own part); CPU seconds add up all threads
    params |= {
        "wall_s": round(time.perf_counter() - start),
        "cpu_s": round(time.process_time() - cpu_start),
    }
    cal = Calibration(
        "duo_attention", model_name, config.num_hidden_layers, config.num_key_value_heads,
        head_dim, {"gates": gates, "rank": rank_heads(gates)}, params,
    )  # fmt: skip
    return cal.save(out), time.perf_counter() - start


class _progress:
    """A rich progress bar fed by ``train_gates``' ``on_step`` (a no-op without ``progress``)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:  # one plain line per step (logs)

            def line(step: int, losses: dict[str, float]) -> None:
                info = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
                print(f"{self.label} {step}/{self.total} {info}", flush=True)

            return line
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, info="")

        def report(step: int, losses: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.3g}" for k, v in losses.items())
            self.bar.update(self.task, completed=step, info=info)

        return report

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def razor_sequence(vocab_size: int, period: int, repeats: int, seed: int, bos: int | None):
    """[1, T] ids: ``period`` random tokens repeated ``repeats`` times (after BOS when given)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(100, vocab_size, (period,), generator=gen)
    ids = block.repeat(repeats)
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids[None]


def run_razor(
    model_name: str, out: pathlib.Path, period: int = 256, repeats: int = 4, seed: int = 0
) -> tuple[pathlib.Path, float]:
    """Echo and induction scores of every head of the model; write ``out``."""
    from longattn.calibration import calibrate_razor_attention
    from longattn.eval.models import load
    from longattn.integrations.hf import capture_qkv

    start = time.perf_counter()
    model, tokenizer = load(model_name)
    ids = razor_sequence(model.config.vocab_size, period, repeats, seed, tokenizer.bos_token_id)
    captured = capture_qkv(model, ids)
    first = 0 if tokenizer.bos_token_id is None else 1
    cal = calibrate_razor_attention(captured, period, first, model_name)
    return cal.save(out), time.perf_counter() - start


def run_qfilters(
    model_name: str, out: pathlib.Path, length: int = 2048, corpus: str = "licenses"
) -> tuple[pathlib.Path, float]:
    """Q-Filters directions of every layer from the queries of ``length`` tokens of ``corpus``
    (one forward pass); write ``out``."""
    from longattn.calibration import calibrate_qfilters
    from longattn.eval.models import load
    from longattn.eval.text import leading_ids
    from longattn.integrations.hf import capture_qkv

    start = time.perf_counter()
    model, tokenizer = load(model_name)
    captured = capture_qkv(model, leading_ids(tokenizer, length, (corpus,)))
    cal = calibrate_qfilters(captured, model_name)
    return cal.save(out), time.perf_counter() - start
