"""Build and load the library's C++ CPU kernels (``kernels/csrc/*.cpp``), once per machine.

Each kernel is one C++ source file (plus the headers of ``csrc/``) compiled as a torch extension on
first use with the system C++ compiler (``-O3 -march=native -fopenmp``) and cached under
``$LONGATTN_NATIVE_DIR`` (default ``~/.cache/longattn/native``) in a folder keyed by everything the
binary depends on (``build_key``): its source and every header of ``csrc/``, the compiler's
resolved path and its ``--version`` text, the flags, the torch and Python versions, and the CPU's
model name and feature flags. ``-march=native`` makes a build specific to the CPU it was built
on, so a home directory shared between machines must never hand one machine's build to another.

Nothing is built or checked at import time: ``load(name)`` builds on its first call, and
``unavailable(name)`` says why a kernel cannot be used (no compiler, a build error; for a torch
outside the tested range it says so) without raising, so the dispatcher can state the reason.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

CSRC = pathlib.Path(__file__).parent / "csrc"
DIR_ENV = "LONGATTN_NATIVE_DIR"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
# The torch releases the kernels are tested on, [low, high): they use ATen internals
# (cpublas::brgemm, the parallel and BFloat16 headers) that change between releases.
# pyproject.toml declares the same range.
TESTED_TORCH = ((2, 13), (2, 14))

_said: set[str] = set()
_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}
_lock = threading.Lock()


def cpu_id() -> str:
    """The CPU's model name and feature flags (``/proc/cpuinfo``): ``-march=native``'s target."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86, then ARM
    found: dict[str, str] = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in keys and key not in found:
            found[key] = line
    return "\n".join(found.get(k, "") for k in keys)


def _compiler() -> str | None:
    """The compiler torch's builder runs: ``$CXX``, else ``c++``."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


@functools.lru_cache(maxsize=8)
def _version_text(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown version ({exc})"
    return done.stdout + done.stderr


def compiler_id() -> str:
    """The compiler's resolved path (``c++`` is usually a link) and its ``--version`` output."""
    path = _compiler()
    if path is None:
        return "no compiler"
    resolved = str(pathlib.Path(path).resolve())
    return f"{resolved}\n{_version_text(resolved)}"


def build_key(name: str) -> str:
    """A hash of everything the compiled ``name`` depends on (see the module docstring)."""
    parts = [name.encode()]
    # its source and every header of csrc/ (a header may include another; hashing them all cannot
    # miss one); the other kernels' sources are not part of this build
    inputs = [CSRC / f"{name}.cpp", *sorted(CSRC.glob("*.h"))]
    for path in inputs:
        parts += [path.name.encode(), path.read_bytes()]
    parts += [
        compiler_id().encode(),
        " ".join(FLAGS).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        cpu_id().encode(),
    ]
    digest = hashlib.sha256()
    for part in parts:  # length-prefixed: no two lists of parts hash alike
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:20]


def build_dir(name: str) -> pathlib.Path:
    """Where ``name`` is built: ``$LONGATTN_NATIVE_DIR/{name}-{build_key(name)}``."""
    root = pathlib.Path(os.environ.get(DIR_ENV, pathlib.Path.home() / ".cache/longattn/native"))
    return root / f"{name}-{build_key(name)}"


def torch_outside_tested_range() -> str | None:
    """A sentence naming the running torch when it is outside ``TESTED_TORCH`` (None inside)."""
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_TORCH
    tested = f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
    try:
        version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return f"torch {torch.__version__} (version not understood; kernels tested on {tested})"
    if (lo_major, lo_minor) <= version < (hi_major, hi_minor):
        return None
    return (
        f"torch {torch.__version__} is outside the range the kernels are tested on ({tested}); "
        "they use ATen internals that change between releases"
    )


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
            raise ValueError(f"no C++ kernel named {name!r} (looked for {CSRC / name}.cpp)")
        if _compiler() is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        from torch.utils import cpp_extension

        path = build_dir(name)
        try:
            module = _import_built(name, path) or _build(name, path, cpp_extension)
        except Exception as exc:  # a compiler or linker error: keep the reason, do not retry
            _errors[name] = _build_error(name, exc)
            raise RuntimeError(_errors[name]) from exc
        _modules[name] = module
        return module


def _import_built(name: str, path: pathlib.Path) -> ModuleType | None:
    """The finished build in ``path`` imported directly (no build lock), or None if there is none."""
    library = path / f"longattn_{name}.so"
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"longattn_{name}", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, path: pathlib.Path, cpp_extension: ModuleType) -> ModuleType:
    """Build in a folder of this process's own, then move it to ``path`` in one rename: a build
    killed half-way leaves no lock or partial library that another process would wait on or load
    (torch's build lock is never released by a killed process)."""
    private = path.with_name(f"{path.name}.build-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(parents=True)
    with _ninja_on_path():
        module = cpp_extension.load(
            name=f"longattn_{name}",
            sources=[str(CSRC / f"{name}.cpp")],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(private),
            verbose=False,
        )
    try:
        private.rename(path)
    except OSError:  # another process finished first: its build is the same
        shutil.rmtree(private, ignore_errors=True)
    return module


def _build_error(name: str, exc: Exception) -> str:
    reason = f"building C++ kernel {name!r} failed: {str(exc)[-2000:]}"
    untested = torch_outside_tested_range()
    return f"{reason}\n(likely cause: {untested})" if untested else reason


def unavailable(name: str) -> str | None:
    """Why ``load(name)`` cannot give the kernel (None: it can); builds it if needed."""
    try:
        load(name)
    except RuntimeError as exc:
        return str(exc)
    return None


def fell_back(reason: str | None, what: str) -> bool:
    """Whether a kernel cannot run (``reason``, from its ``unavailable``, is not None); the first
    time a reason is given, it is logged at debug level as ``what`` done another way."""
    if reason is None:
        return False
    if reason not in _said:
        _said.add(reason)
        logging.getLogger("longattn").debug("%s: %s", what, reason)
    return True
