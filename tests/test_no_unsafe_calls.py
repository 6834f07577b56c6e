"""Nothing from a peer, a file or the database is ever unpickled or evaluated.

Scans the package's syntax trees (not its text), so comments and docstrings
that mention these names do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fs_bittorrent"

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "cloudpickle",
                     "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# attribute calls that unpickle or run code: (object name, attribute)
FORBIDDEN_ATTRS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                   ("yaml", "full_load"), ("numpy", "load"), ("np", "load"),
                   ("pickle", "loads"), ("pickle", "load")}


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in FORBIDDEN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                found.append(f"{f.id}(...)")
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and (f.value.id, f.attr) in FORBIDDEN_ATTRS:
                found.append(f"{f.value.id}.{f.attr}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append("allow_pickle=...")
    return [f"{path.relative_to(PACKAGE.parent)}:{o}" for o in found]


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_the_whole_package():
    names = {p.name for p in package_files()}
    assert {"session.py", "codec.py", "sqlite_store.py", "manager.py", "dataplane.py"} <= names


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_pickle_eval_or_exec(path):
    assert offences(path) == []


def test_the_scanner_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom marshal import loads\nimport torch\n"
                   "x = eval('1')\ntorch.load('f')\nimport numpy as np\n"
                   "np.load('f', allow_pickle=True)\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        found = offences(bad)
    finally:
        PACKAGE = saved
    assert len(found) == 6, found
