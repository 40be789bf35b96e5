"""The native-kernel loader: clear errors, builds keyed by source, nothing built at import."""

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
