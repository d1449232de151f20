"""House rules that code review alone lets slip: checked on the package's own source."""

from __future__ import annotations

import ast
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


def test_the_check_sees_a_function_level_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from .io import atomic_path\n\n\ndef f():\n    from .io import _temp_beside\n    return _temp_beside\n")
    assert _private_imports(probe) == ["probe.py:5 from .io import _temp_beside"]
