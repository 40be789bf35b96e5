"""The native-kernel loader: clear errors, builds keyed by source, nothing built at import."""

import pytest

from longattn.kernels import native


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="no_such_kernel"):
        native.load("no_such_kernel")


def test_missing_compiler_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    (tmp_path / "k.cpp").write_text("int x;\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = native.unavailable("k")
    assert reason is not None and "compiler" in reason


def test_build_dir_follows_the_source(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "CSRC", tmp_path)
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path / "build"))
    (tmp_path / "k.cpp").write_text("int x;\n")
    first = native.build_dir("k")
    (tmp_path / "k.cpp").write_text("int y;\n")
    assert native.build_dir("k") != first
    assert first.parent == tmp_path / "build"
