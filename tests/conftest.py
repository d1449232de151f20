"""Shared test helpers. Tests that need ../shared/fixtures skip with a reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

# Before any test module imports onnxruntime (third-party imports sort first): the package
# switches ORT's telemetry off at import, and ORT reads that setting only once.
import pfld_export  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def fixture_path(*parts: str) -> Path:
    """Path inside ../shared/fixtures, or skip the test (a user's fresh clone has no such folder)."""
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real-data fixture {p} is absent (../shared/fixtures exists only on project machines)")
    return p


@pytest.fixture
def fixtures_dir() -> Path:
    return fixture_path()
