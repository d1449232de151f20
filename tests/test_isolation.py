"""The suite's own guarantees (tests/conftest.py): fixtures skip or fail as CI asks, data caches stay
out of the user's home, and the network is off."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from . import conftest
from .conftest import fixture_path


def test_missing_fixture_skips_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(conftest.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no-such-dir/gone\.pts is absent"):
        fixture_path("no-such-dir", "gone.pts")


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_missing_fixture_fails_naming_it_when_required(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(conftest.REQUIRE_ENV, value)
    with pytest.raises(pytest.fail.Exception, match=r"no-such-dir/gone\.pts is missing and PFLD_REQUIRE_FIXTURES=1"):
        fixture_path("no-such-dir", "gone.pts")


def test_present_fixture_is_returned_even_when_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.pts").write_text("x")
    monkeypatch.setattr(conftest, "FIXTURES", tmp_path)
    monkeypatch.setenv(conftest.REQUIRE_ENV, "1")
    assert fixture_path("a.pts") == tmp_path / "a.pts"


def test_synthetic_data_is_cached_outside_the_home(isolated_cache: Path) -> None:
    from pfld_export.data.specs import cache_root, load_spec

    data = load_spec("synthetic:2:5")
    assert cache_root() == isolated_cache
    assert all(isolated_cache in Path(r.image_path).parents for r in data.records)
    assert Path.home() / ".cache" / "pfld-export" not in Path(data.records[0].image_path).parents


def test_network_is_off(no_network: list[str]) -> None:
    for attempt in (lambda: socket.create_connection(("192.0.2.1", 80), timeout=1),
                    lambda: socket.getaddrinfo("pypi.org", 443),
                    lambda: urllib.request.urlopen("http://192.0.2.1/", timeout=1)):
        with pytest.raises(OSError):
            attempt()
    assert len(no_network) == 3
    no_network.clear()  # expected here; any other test that tries fails at teardown
