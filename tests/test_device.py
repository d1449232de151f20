"""device.py: the --device and --threads checks every command shares, and the thread default."""

from __future__ import annotations

import os

import pytest
import torch

from pfld_export.device import DEVICES, auto_threads, check_device, check_threads, resolve_device
from pfld_export.errors import UsageError


def test_check_device_takes_the_three_names_only() -> None:
    for name in DEVICES:
        check_device(name)
    with pytest.raises(UsageError, match=r"--device must be auto, cpu or cuda, got 'tpu'"):
        check_device("tpu")


def test_resolve_device_follows_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device is visible to torch; use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_check_threads_refuses_anything_but_a_positive_whole_number(bad: object) -> None:
    with pytest.raises(UsageError, match=r"--jobs must be positive \(a whole number of 1 or more\)"):
        check_threads(bad, "--jobs")  # type: ignore[arg-type]


def test_check_threads_passes_none_and_counts_through() -> None:
    assert check_threads(None) is None
    assert check_threads(3) == 3


@pytest.mark.parametrize("cores,load,want", [(1, 0.0, 1), (2, 0.0, 1), (8, 0.5, None), (8, 4.0, 1), (8, 7.0, 1)])
def test_auto_threads_is_one_on_small_or_busy_machines(monkeypatch: pytest.MonkeyPatch, cores: int, load: float,
                                                       want: int | None) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert auto_threads() == want


def test_auto_threads_without_a_load_average_keeps_torchs_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert auto_threads() is None
