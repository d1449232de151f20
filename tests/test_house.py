"""House rules that code review alone lets slip: checked on the package's own source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pfld_export"


def _private_imports(path: Path) -> list[str]:
    """`from X import _name` anywhere in the file (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the walk found the package
    offenders = [hit for f in files for hit in _private_imports(f)]
    assert offenders == [], "a name used by another module is part of its API: drop the underscore\n" + "\n".join(offenders)


def test_the_check_sees_a_function_level_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from .io import atomic_path\n\n\ndef f():\n    from .io import _temp_beside\n    return _temp_beside\n")
    assert _private_imports(probe) == ["probe.py:5 from .io import _temp_beside"]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports, anywhere in the file (function-level
    imports included; relative imports resolved; `from pkg import module` counts as the module)."""
    files = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


@pytest.mark.xfail(reason="runtime <-> stage0 and qat <-> train are untangled on other branches", strict=False)
def test_no_import_cycle_in_the_package() -> None:
    graph = _import_graph(PACKAGE)
    assert len(graph) > 30 and "pfld_export.quant.fit" in graph["pfld_export.export.pipeline"]  # the walk resolved imports
    cycles = _import_cycles(graph)
    assert cycles == [], "modules must import toward the leaves; circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_quant_package_imports_only_toward_its_leaves() -> None:
    graph = _import_graph(PACKAGE)
    quant = {m: {t for t in ts if t.startswith("pfld_export.quant.")} for m, ts in graph.items() if m.startswith("pfld_export.quant.")}
    assert _import_cycles(quant) == []
    assert not any(t.startswith(("pfld_export.export.pipeline", "pfld_export.cli")) for m in quant for t in graph[m])


def test_the_cycle_check_sees_a_function_level_two_module_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "probe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    return g\n")
    (pkg / "c.py").write_text("import probe.a\n")
    graph = _import_graph(pkg)
    assert graph["probe.c"] == {"probe.a"} and graph["probe.sub.b"] == {"probe.a"}
    assert _import_cycles(graph) == [["probe.a", "probe.sub.b"]]
