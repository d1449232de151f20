"""House rules that code review alone lets slip: checked on the package's own source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

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


def test_tests_use_public_names_and_share_helpers_through_conftest() -> None:
    tests = sorted(Path(__file__).parent.glob("*.py"))
    private = [hit for f in tests for hit in _private_imports(f) if " from pfld_export" in hit]
    assert private == [], "tests use the package's public names:\n" + "\n".join(private)
    siblings = [f"{f.name}:{n.lineno}" for f in tests for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[-1].startswith("test_")]
    assert siblings == [], "shared test helpers go to conftest.py, not imported from another test file:\n" + "\n".join(siblings)


def test_the_check_sees_a_function_level_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from .io import atomic_path\n\n\ndef f():\n    from .io import _temp_beside\n    return _temp_beside\n")
    assert _private_imports(probe) == ["probe.py:5 from .io import _temp_beside"]


MAX_LINES = 80
LONG_REASON = "Long because:"


def _long_functions(path: Path, rel: str, limit: int = MAX_LINES) -> list[str]:
    """Functions and methods over `limit` lines (def line to last line) whose docstring does not
    say why, as `rel:line name (N lines)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit and LONG_REASON not in (ast.get_docstring(node) or ""):
                found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_functions_are_short_or_say_why() -> None:
    offenders = [hit for f in sorted(PACKAGE.rglob("*.py")) for hit in _long_functions(f, f.relative_to(PACKAGE.parent).as_posix())]
    assert offenders == [], (f"functions over {MAX_LINES} lines: split them, or say why not in the docstring "
                             f"(a line starting {LONG_REASON!r})\n" + "\n".join(offenders))


def test_the_length_check_counts_lines_and_reads_the_reason(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    probe = tmp_path / "probe.py"
    probe.write_text(f"def long():\n{body}\n\ndef explained():\n    \"\"\"{LONG_REASON} one table.\"\"\"\n{body}\n"
                     f"def short():\n    return 1\n")
    hits = _long_functions(probe, "probe.py")
    assert len(hits) == 1 and hits[0].endswith(f"long ({MAX_LINES + 1} lines)"), hits


ROOT = PACKAGE.parent
# Words about how the code came to be (work sessions, review passes, issue numbers) have no place in
# the product; the code, comments and documents say what the code does.
HISTORY_WORDS = re.compile(r"issue [0-9]|later stage|third pass|second pass|closing note|session|brief", re.IGNORECASE)
# The technical uses of those words, removed before the check: ONNX Runtime's classes and session
# objects, benchmark_model's "Initialized session" line, logcat's "brief" format, and bench.host's
# sessions (one opened model at one thread count), which bench.host and the benchmark notes explain;
# runtime.py holds the ONNX Runtime sessions and speaks of them in its prose.
TECHNICAL_WORDS = re.compile(
    r"InferenceSession|SessionOptions|Initialized session|_INIT_SESSION|_LOGCAT_BRIEF|logcat brief"
    r"|\b_?(?:Local|Remote)Session\b|\bort_session\b|\b(?:self\.)?sess(?:ion)?s?(?=\.\w|\[|\s*[:=]|\))")
SESSION_TERM = {"pfld_export/runtime.py", "pfld_export/bench/host.py", "benchmarks/README.md"}  # a defined term there


def _product_files() -> list[Path]:
    files = [p for p in sorted(PACKAGE.rglob("*")) if p.is_file() and p.suffix in (".py", ".md", ".txt", ".json", ".sh")]
    files += [ROOT / n for n in ("Makefile", "README.md", "DESIGN.md", "CONTRIBUTING.md")]
    files += sorted((ROOT / "benchmarks").glob("*.md"))
    files += [p for p in sorted((ROOT / ".ci").rglob("*")) if p.is_file()]
    return [p for p in files if p.exists()]


def _history_words(path: Path, rel: str) -> list[str]:
    hits = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = TECHNICAL_WORDS.sub("", line)
        if rel in SESSION_TERM:
            text = re.sub(r"\bsessions?\b", "", text, flags=re.IGNORECASE)
        if HISTORY_WORDS.search(text):
            hits.append(f"{rel}:{n}: {line.strip()[:120]}")
    return hits


def test_product_words_only() -> None:
    files = _product_files()
    assert len(files) > 40 and any(p.name == "Makefile" for p in files)
    hits = [h for p in files for h in _history_words(p, p.relative_to(ROOT).as_posix())]
    assert hits == [], "say what the code does, not how it came to be:\n" + "\n".join(hits)


def test_the_word_check_keeps_technical_uses_and_finds_history(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('sess = ort.InferenceSession(p, ort.SessionOptions())\nself.session.run(x)\n'
                     '# fixed in a later stage of the work\n"""As the brief says."""\n')
    assert [h.split(":")[1] for h in _history_words(probe, "probe.py")] == ["3", "4"]


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


def test_the_quant_package_lists_its_modules_leaves_first() -> None:
    """quant/__init__.py's module list is the import order a reader can rely on: each module
    imports only modules listed above it, and every module is listed."""
    doc = (PACKAGE / "quant" / "__init__.py").read_text(encoding="utf-8")
    listed = [m.group(1) for m in re.finditer(r"^    (\w+)\s{2,}\S", doc, re.MULTILINE)]
    files = sorted(p.stem for p in (PACKAGE / "quant").glob("*.py") if p.stem != "__init__")
    assert sorted(listed) == files
    graph = _import_graph(PACKAGE)
    late = [f"{m} imports {t.rsplit('.', 1)[1]}" for i, m in enumerate(listed)
            for t in graph[f"pfld_export.quant.{m}"] if t.startswith("pfld_export.quant.") and t.rsplit(".", 1)[1] not in listed[:i]]
    assert late == [], "quant/__init__.py lists modules leaves first; move these below what they import:\n" + "\n".join(late)


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
