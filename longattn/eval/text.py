"""Long real text available offline: stdlib Python docs, Debian license texts, the KJV when installed."""

from __future__ import annotations

import functools
import pathlib
import shutil
import subprocess

LICENSES = pathlib.Path("/usr/share/common-licenses")
CORPORA = ("pydoc", "licenses", "kjv")


def _pydoc() -> str:
    from pydoc_data.topics import topics  # stdlib: ~465k characters of the Python reference

    return "\n\n".join(topics[key] for key in sorted(topics))


def _licenses() -> str:
    if not LICENSES.is_dir():
        raise FileNotFoundError(f"corpus 'licenses' needs {LICENSES} (Debian's common-licenses)")
    seen: set[pathlib.Path] = set()
    texts = []
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts.append(real.read_text(errors="replace"))
    return "\n\n".join(texts)


def _kjv() -> str:
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            "corpus 'kjv' needs the Debian package bible-kjv (apt-get install bible-kjv)"
        )
    out = subprocess.run(
        ["bible", "-f", "Genesis1:1-50:26"], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout


@functools.cache
def corpus(name: str) -> str:
    """The whole text of one offline corpus (``pydoc``, ``licenses`` or ``kjv``)."""
    loaders = {"pydoc": _pydoc, "licenses": _licenses, "kjv": _kjv}
    if name not in loaders:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return loaders[name]()


def available() -> list[str]:
    """The corpora this machine can provide."""
    found = []
    for name in CORPORA:
        try:
            corpus(name)
        except (FileNotFoundError, subprocess.SubprocessError):
            continue
        found.append(name)
    return found


def paragraphs(name: str) -> list[str]:
    """Non-empty paragraphs of a corpus, whitespace-normalised (used as haystack filler)."""
    parts = (" ".join(p.split()) for p in corpus(name).split("\n\n"))
    return [p for p in parts if len(p) > 40]


def leading_ids(tokenizer, n_tokens: int, names: tuple[str, ...] = ("pydoc", "licenses")):
    """[1, n_tokens] token ids of the start of the corpora ``names`` taken in turn (the Python docs,
    continued with the license texts if they run out), for benchmarks that need one long text."""
    import torch

    ids: list[int] = []
    for name in names:
        ids += tokenizer(corpus(name), return_tensors="pt").input_ids[0].tolist()
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens])[None]
    raise ValueError(f"only {len(ids)} tokens of offline text, asked for {n_tokens}")
