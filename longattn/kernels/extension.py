"""Build and load the library's C++ CPU kernels (``kernels/csrc/*.cpp``), once per machine.

Each kernel is one C++ source file compiled as a torch extension on first use with the system C++
compiler (``-O3 -march=native -fopenmp``) and cached under ``$LONGATTN_NATIVE_DIR`` (default
``~/.cache/longattn/native``) in a folder keyed by the source text, the torch version, the Python
version and the CPU, so an edited source, another torch or another machine never reuses a stale
build. Nothing is built at import time: ``load(name)`` builds on its first call, and
``unavailable(name)`` says why a kernel cannot be used (no compiler, a build error) without raising,
so the dispatcher can state the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

CSRC = pathlib.Path(__file__).parent / "csrc"
DIR_ENV = "LONGATTN_NATIVE_DIR"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]

_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()


def _cpu_key() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return flags


def build_dir(name: str) -> pathlib.Path:
    """Where ``name`` is built: a folder keyed by its source, torch, Python and the CPU flags."""
    source = (CSRC / f"{name}.cpp").read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                torch.__version__.encode(),
                sys.version.encode(),
                _cpu_key().encode(),
                " ".join(FLAGS).encode(),
            ]
        )
    ).hexdigest()[:16]
    root = pathlib.Path(os.environ.get(DIR_ENV, pathlib.Path.home() / ".cache/longattn/native"))
    return root / f"{name}-{key}"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; when only the ``ninja`` wheel (a dependency) provides it, e.g.
    in a virtual environment that is not activated, put its folder on PATH for the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def load(name: str) -> ModuleType:
    """The compiled module for ``kernels/csrc/{name}.cpp`` (built on first use, then cached).

    Raises RuntimeError naming the cause when it cannot be built.
    """
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _errors:
            raise RuntimeError(_errors[name])
        if not (CSRC / f"{name}.cpp").is_file():
            raise ValueError(f"no native kernel named {name!r} (looked for {CSRC / name}.cpp)")
        if _compiler() is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        from torch.utils import cpp_extension

        path = build_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        try:
            with _ninja_on_path():
                module = cpp_extension.load(
                    name=f"longattn_{name}",
                    sources=[str(CSRC / f"{name}.cpp")],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(path),
                    verbose=False,
                )
        except Exception as exc:  # a compiler or linker error: keep the reason, do not retry
            _errors[name] = f"building native kernel {name!r} failed: {str(exc)[-2000:]}"
            raise RuntimeError(_errors[name]) from exc
        _modules[name] = module
        return module


def unavailable(name: str) -> str | None:
    """Why ``load(name)`` cannot give the kernel (None: it can); builds it if needed."""
    try:
        load(name)
    except RuntimeError as exc:
        return str(exc)
    return None
