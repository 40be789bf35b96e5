"""House rules that can be read from the source: the dependency rule, file size, pure import, docs."""

import ast
import pathlib
import subprocess
import sys

import pytest

from longattn.docgen import methods_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "longattn"


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _files(sub=""):
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("path", _files("methods"), ids=lambda p: p.name)
def test_methods_import_only_the_method_base(path):
    allowed = ("longattn.method", "longattn.types", "longattn.methods")
    bad = [m for m in _imports(path) if m.startswith("longattn") and not m.startswith(allowed)]
    assert not bad, f"{path.name} imports {bad}: methods may use only method.py and types.py"


@pytest.mark.parametrize("path", _files("kernels"), ids=lambda p: p.name)
def test_kernels_know_nothing_about_methods(path):
    bad = [
        m
        for m in _imports(path)
        if m.startswith("longattn") and not m.startswith(("longattn.types", "longattn.kernels"))
    ]
    assert not bad, f"{path.name} imports {bad}: kernels may use only types.py and other kernels"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_only_the_integrations_import_transformers(path):
    if path.relative_to(PKG).parts[0] == "integrations":
        return
    assert not [m for m in _imports(path) if m.split(".")[0] == "transformers"]


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_nothing_below_the_top_imports_eval_or_cli(path):
    rel = path.relative_to(PKG)
    if rel.parts[0] in ("eval", "bench") or rel.name in ("cli.py",):
        return
    bad = [
        m
        for m in _imports(path)
        if m.startswith(("longattn.eval", "longattn.cli", "longattn.bench"))
    ]
    assert not bad, f"{rel} imports {bad}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_files_stay_small(path):
    if "kernels" in path.parts:
        return
    assert len(path.read_text().splitlines()) <= 600


def test_import_is_pure():
    """Importing longattn loads no heavy optional library and configures no logging."""
    code = (
        "import sys, logging; import longattn; "
        "heavy = [m for m in ('transformers', 'matplotlib', 'rich') if m in sys.modules]; "
        "assert not heavy, heavy; assert not logging.getLogger().handlers; "
        "assert not logging.getLogger('longattn').handlers"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_methods_doc_is_current():
    doc = (ROOT / "docs" / "methods.md").read_text()
    assert doc == methods_markdown(), "docs/methods.md is stale: run `make docs`"
