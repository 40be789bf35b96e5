"""The C++ kernel loader: clear errors, builds keyed by everything they depend on (source, every
csrc header, compiler and version, flags, torch, Python, the CPU), nothing built at import."""

import pathlib

import pytest

from longattn.kernels import extension


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="no_such_kernel"):
        extension.load("no_such_kernel")


def test_missing_compiler_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    (tmp_path / "k.cpp").write_text("int x;\n")
    monkeypatch.setattr(extension, "CSRC", tmp_path)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = extension.unavailable("k")
    assert reason is not None and "compiler" in reason


def test_build_dir_follows_the_source(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "CSRC", tmp_path)
    monkeypatch.setenv(extension.DIR_ENV, str(tmp_path / "build"))
    (tmp_path / "k.cpp").write_text("int x;\n")
    first = extension.build_dir("k")
    (tmp_path / "k.cpp").write_text("int y;\n")
    assert extension.build_dir("k") != first
    assert first.parent == tmp_path / "build"


def _fake_csrc(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "CSRC", tmp_path)
    (tmp_path / "k.cpp").write_text('#include "h.h"\nint x = H;\n')
    (tmp_path / "h.h").write_text("#define H 1\n")


def test_build_key_follows_every_header(monkeypatch, tmp_path):
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    (tmp_path / "h.h").write_text("#define H 2\n")
    assert extension.build_key("k") != first


def test_build_key_follows_the_compiler_version(monkeypatch, tmp_path):
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    monkeypatch.setattr(extension, "_version_text", lambda path: "c++ (Other) 99.0\n")
    assert extension.build_key("k") != first


def test_build_key_follows_the_compiler_path(monkeypatch, tmp_path):
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    monkeypatch.setattr(extension, "_compiler", lambda: "/opt/other/bin/c++")
    assert extension.build_key("k") != first


def test_build_key_follows_the_cpu(monkeypatch, tmp_path):
    """Another CPU (the same model name, one flag fewer) must never load this one's build."""
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    here = extension.cpu_id()
    assert "flags" in here or "Features" in here  # /proc/cpuinfo was read
    monkeypatch.setattr(extension, "cpu_id", lambda: here.replace(" avx2", ""))
    if " avx2" in here:
        assert extension.build_key("k") != first
    monkeypatch.setattr(extension, "cpu_id", lambda: here + " amx_bf16")
    assert extension.build_key("k") != first


def test_build_key_follows_the_flags_and_torch(monkeypatch, tmp_path):
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    monkeypatch.setattr(extension, "FLAGS", [*extension.FLAGS, "-DX"])
    second = extension.build_key("k")
    assert second != first
    monkeypatch.setattr(extension.torch, "__version__", "0.0.1")
    assert extension.build_key("k") not in (first, second)


def test_the_key_is_stable_and_ignores_other_kernels(monkeypatch, tmp_path):
    _fake_csrc(monkeypatch, tmp_path)
    first = extension.build_key("k")
    (tmp_path / "other.cpp").write_text("int z;\n")
    assert extension.build_key("k") == first
    assert extension.build_key("other") != first


@pytest.mark.parametrize(
    "version, outside",
    [("2.13.0+cpu", False), ("2.13.1", False), ("2.14.0", True), ("2.6.0", True)],
)
def test_torch_outside_the_tested_range_is_named(monkeypatch, version, outside):
    monkeypatch.setattr(extension.torch, "__version__", version)
    reason = extension.torch_outside_tested_range()
    assert (reason is not None) == outside
    if outside:
        assert version in reason and ">=2.13,<2.14" in reason


def test_a_failed_build_under_an_untested_torch_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "CSRC", tmp_path)
    monkeypatch.setenv(extension.DIR_ENV, str(tmp_path / "build"))
    monkeypatch.setattr(extension.torch, "__version__", "2.99.0")
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    reason = extension.unavailable("broken")
    assert reason is not None and "broken" in reason and "2.99.0" in reason
    extension._errors.pop("broken", None)


def test_the_tested_range_matches_pyproject():
    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    (lo_major, lo_minor), (hi_major, hi_minor) = extension.TESTED_TORCH
    assert f'"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"' in text


@pytest.mark.skipif(extension._compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("name", ["block_sparse", "decode"])
def test_each_kernel_takes_the_vector_path_this_cpu_has(name):
    """-march=native must select simd.h's AVX-512 path where the CPU has it, else AVX2 + FMA, so a
    CPU never silently runs the portable loops (what AVX2-only CPUs used to get)."""
    flags = set(extension.cpu_id().split())
    module = extension.load(name)
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    assert module.avx512 == avx512
    assert module.avx2 == (not avx512 and {"avx2", "fma"} <= flags)


TINY = """#include <torch/extension.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def test_a_build_left_by_a_killed_process_blocks_nothing(monkeypatch, tmp_path):
    """A killed build leaves torch's lock file behind, which made every later process wait forever:
    builds happen in a private folder moved into place whole, and a finished one loads lock-free."""
    monkeypatch.setattr(extension, "CSRC", tmp_path / "src")
    monkeypatch.setenv(extension.DIR_ENV, str(tmp_path / "build"))
    monkeypatch.setattr(extension, "_modules", {})
    monkeypatch.setattr(extension, "_errors", {})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.cpp").write_text(TINY)
    final = extension.build_dir("tiny")
    killed = final.with_name(final.name + ".build-1-1")
    killed.mkdir(parents=True)
    (killed / "lock").touch()  # what a killed torch build leaves
    assert extension.load("tiny").answer() == 42
    assert (final / "longattn_tiny.so").is_file() and not (final / "lock").exists()
    (final / "lock").touch()  # even a stale lock in the finished folder is not waited on
    monkeypatch.setattr(extension, "_modules", {})
    assert extension.load("tiny").answer() == 42
