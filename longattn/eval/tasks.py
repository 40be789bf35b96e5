"""Synthetic long-context tasks built to an exact token length, deterministic by seed.

Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300), needle in a haystack at a chosen depth,
and RULER-style multi-key / multi-value needles and variable tracking (Hsieh et al. 2024,
arXiv:2404.06654). Our own generators: no dataset is downloaded. Every prompt is the model's chat
template (plain text when it has none) with the answer's first words already written, so that a small
instruct model only has to continue them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from longattn.eval import text

TASKS = ("passkey", "needle", "multikey", "multivalue", "vartrack")
GENERATION_TASKS = TASKS
KEY_WORDS = (
    "apple", "river", "falcon", "copper", "meadow", "violet", "harbor", "lantern", "glacier",
    "saffron", "thunder", "orchid", "pepper", "marble", "willow", "canyon",
)  # fmt: skip
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
MARKER = "\x00HAYSTACK\x00"


@dataclass(frozen=True)
class Sample:
    """One prompt: ``input_ids`` has exactly ``length`` tokens; every string of ``answers`` is expected."""

    task: str
    length: int
    seed: int
    input_ids: list[int]
    answers: tuple[str, ...]
    depth: float | None = None
    max_new_tokens: int = 12
    meta: dict = field(default_factory=dict)


def _encode(tokenizer, s: str) -> list[int]:
    return list(tokenizer(s, add_special_tokens=False).input_ids)


def _frame(tokenizer, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": MARKER}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(MARKER)
    else:
        head, tail = "", "\nAnswer: "
    bos = [tokenizer.bos_token_id] if not head and tokenizer.bos_token_id is not None else []
    return bos + _encode(tokenizer, head), _encode(
        tokenizer, "\n" + question + tail + answer_prefix
    )


def _filler_sentences(task: str, rng: random.Random) -> list[str]:
    if task == "passkey":
        return [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(100_000)]
    paras = text.paragraphs("pydoc")
    start = rng.randrange(len(paras))
    return paras[start:] + paras[:start]


def _haystack(
    tokenizer,
    sentences: Sequence[str],
    n_tokens: int,
    needles: Sequence[tuple[float, list[int]]],
) -> list[int]:
    """``n_tokens`` of filler sentences with each needle inserted at its depth (a sentence boundary)."""
    budget = n_tokens - sum(len(ids) for _, ids in needles)
    if budget < 0:
        raise ValueError(f"length too small for the needles ({n_tokens} tokens of haystack)")
    filler: list[int] = []
    bounds = [0]
    for sentence in sentences:
        if len(filler) >= budget:
            break
        filler += _encode(tokenizer, " " + sentence)
        bounds.append(len(filler))
    filler = filler[:budget]
    bounds = [b for b in bounds if b <= budget]
    out, last = [], 0
    for depth, ids in sorted(needles, key=lambda item: item[0]):
        at = max(b for b in bounds if b <= max(last, round(depth * budget)))
        at = max(at, last)
        out += filler[last:at] + ids
        last = at
    return out + filler[last:]


def _build(tokenizer, length, intro, question, answer_prefix, task, rng, needles):
    head, tail = _frame(tokenizer, question, answer_prefix)
    intro_ids = _encode(tokenizer, intro)
    n_hay = length - len(head) - len(intro_ids) - len(tail)
    if n_hay < 16:
        raise ValueError(f"length {length} is too short for task {task!r}")
    encoded = [(d, _encode(tokenizer, " " + s)) for d, s in needles]
    hay = _haystack(tokenizer, _filler_sentences(task, rng), n_hay, encoded)
    ids = head + intro_ids + hay + tail
    assert len(ids) == length, (len(ids), length)  # internal invariant, not user input
    return ids


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey(tokenizer, length: int, seed: int, depth: float | None = None) -> Sample:
    """Find a 5-digit pass key hidden in repeated filler sentences."""
    rng = random.Random(f"passkey-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    intro = (
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize it."
    )
    ids = _build(
        tokenizer, length, intro, "What is the pass key?", "The pass key is", "passkey", rng,
        [(depth, needle)],
    )  # fmt: skip
    return Sample("passkey", length, seed, ids, (key,), depth)


def needle(tokenizer, length: int, seed: int, depth: float | None = None) -> Sample:
    """A 'special magic number' sentence hidden at ``depth`` in Python documentation text."""
    rng = random.Random(f"needle-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    key, value = rng.choice(KEY_WORDS), _number(rng, 7)
    needle_text = f"The special magic number for {key} is: {value}."
    question = f"What is the special magic number for {key}?"
    intro = "Read the document below and remember the special magic number in it."
    ids = _build(
        tokenizer, length, intro, question, f"The special magic number for {key} is:", "needle",
        rng, [(depth, needle_text)],
    )  # fmt: skip
    return Sample("needle", length, seed, ids, (value,), depth)


def multikey(tokenizer, length: int, seed: int, n_keys: int = 4) -> Sample:
    """RULER multi-key needle: several key/number pairs, one asked; the others are distractors."""
    rng = random.Random(f"multikey-{length}-{seed}")
    keys = rng.sample(KEY_WORDS, n_keys)
    values = [_number(rng, 7) for _ in keys]
    needles = [
        (rng.random(), f"The special magic number for {k} is: {v}.") for k, v in zip(keys, values)
    ]
    ask = rng.randrange(n_keys)
    question = f"What is the special magic number for {keys[ask]}?"
    intro = "Read the document below and remember the special magic numbers in it."
    ids = _build(
        tokenizer, length, intro, question, f"The special magic number for {keys[ask]} is:",
        "multikey", rng, needles,
    )  # fmt: skip
    return Sample("multikey", length, seed, ids, (values[ask],), needles[ask][0])


def multivalue(tokenizer, length: int, seed: int, n_values: int = 3) -> Sample:
    """RULER multi-value needle: one key with several numbers; all of them must be recalled."""
    rng = random.Random(f"multivalue-{length}-{seed}")
    key = rng.choice(KEY_WORDS)
    values = [_number(rng, 7) for _ in range(n_values)]
    needles = [
        (rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values
    ]
    question = f"What are all the special magic numbers for {key}?"
    intro = "Read the document below and remember the special magic numbers in it."
    ids = _build(
        tokenizer, length, intro, question, f"The special magic numbers for {key} are:",
        "multivalue", rng, needles,
    )  # fmt: skip
    return Sample("multivalue", length, seed, ids, tuple(values), None, max_new_tokens=32)


def vartrack(tokenizer, length: int, seed: int, hops: int = 3) -> Sample:
    """RULER variable tracking: a chain of assignments; name every variable holding the value."""
    rng = random.Random(f"vartrack-{length}-{seed}")
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops)]
    value = _number(rng, 5)
    lines = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)
    ]
    depths = sorted(rng.random() for _ in lines)
    question = f"Which variables are assigned the value {value}? Answer with the variable names."
    intro = "Memorize and track the chain of variable assignments hidden in the text below."
    ids = _build(
        tokenizer, length, intro, question, f"The variables assigned the value {value} are:",
        "vartrack", rng, list(zip(depths, lines)),
    )  # fmt: skip
    return Sample("vartrack", length, seed, ids, tuple(names), None, max_new_tokens=24)


GENERATORS = {
    "passkey": passkey,
    "needle": needle,
    "multikey": multikey,
    "multivalue": multivalue,
    "vartrack": vartrack,
}


def make(task: str, tokenizer, length: int, seed: int, depth: float | None = None) -> Sample:
    """One sample of ``task``; ``depth`` applies to passkey and needle."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(GENERATORS)}")
    if task in ("passkey", "needle"):
        return GENERATORS[task](tokenizer, length, seed, depth)
    return GENERATORS[task](tokenizer, length, seed)


def score(generated: str, answers: Sequence[str]) -> float:
    """Fraction of the expected answers that appear in the generated text."""
    return sum(a in generated for a in answers) / len(answers)


def text_window(tokenizer, corpus: str, length: int, seed: int) -> list[int]:
    """``length`` tokens of a real corpus starting at a seed-chosen paragraph (for perplexity)."""
    rng = random.Random(f"ppl-{corpus}-{length}-{seed}")
    paras = text.paragraphs(corpus)
    start = rng.randrange(len(paras))
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    i = start
    while len(ids) < length:
        ids += _encode(tokenizer, paras[i % len(paras)] + "\n\n")
        i += 1
    return ids[:length]


NGRAM = 32  # two windows sharing a run of this many tokens count as overlapping


def disjoint_windows(
    tokenizer, corpus: str, length: int, count: int, avoid: Sequence[Sequence[int]] = (), seed=0
) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of a real corpus (``text_window`` with seeds
    ``seed``, ``seed + 1``, ...), skipping any that shares a run of ``NGRAM`` tokens with a window
    taken before or with ``avoid``: training and held-out text never overlap."""
    seen = set().union(*(ngrams(ids) for ids in avoid))
    found: list[list[int]] = []
    for offset in range(50 * count + 50):
        ids = text_window(tokenizer, corpus, length, seed + offset)
        grams = ngrams(ids)
        if not grams & seen:
            found.append(ids)
            seen |= grams
            if len(found) == count:
                return found
    raise ValueError(
        f"corpus {corpus!r} has no {count} disjoint windows of {length} tokens "
        f"(found {len(found)}); use fewer or shorter windows"
    )


def ngrams(ids: Sequence[int]) -> set[tuple[int, ...]]:
    """Every run of ``NGRAM`` consecutive tokens of ``ids``."""
    return {tuple(ids[i : i + NGRAM]) for i in range(max(len(ids) - NGRAM + 1, 0))}
