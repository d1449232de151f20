"""io.py: atomic writes land whole, leave nothing behind on failure, and get normal permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pfld_export.io import atomic_path, atomic_write_bytes


def test_written_file_gets_umask_permissions_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "m.tflite", b"abc")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"abc"
    assert (p.stat().st_mode & 0o777) == 0o644  # readable by the app that bundles it, like cp would make it


def test_failed_write_leaves_neither_file_nor_temp(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []
