"""Where and on how many threads torch runs: the --device and --threads checks every command shares.

    check_device("auto"); resolve_device("auto") -> torch.device("cuda" or "cpu")
    auto_threads() -> 1 on small or busy machines, else None (torch's default)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported where a device is resolved: the TFLite-only commands never load it
    import torch

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def check_device(device: str) -> None:
    """--device is one of DEVICES (whether CUDA is there is `resolve_device`'s question)."""
    if device not in DEVICES:
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA if present, else CPU; "cuda" without CUDA is a usage error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible to torch; use --device cpu (or auto)")
    return torch.device(device)


def auto_threads() -> int | None:
    """1 on machines with at most 2 cores or already half busy (1-minute load average >= half the
    cores); else None (torch's default, one per core).

    Measured on the project's 2-core machine (benchmarks/training.md): one 0.25X training step on
    32 faces took 0.36 s with 1 thread and 6-7 s with 2 while a single other process ran (18x),
    and 1.2 s vs 5-11 s under heavy load; idle, 2 threads gain at most ~1.7x. OpenMP threads
    wait for each other at every op, so one preempted thread stalls both.
    """
    cores = os.cpu_count() or 1
    if cores <= 2:
        return 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    return 1 if load >= cores / 2 else None


def check_threads(threads: int | None, flag: str = "--threads") -> int | None:
    """The one check of a thread count, for every command: None (the runtime's default) or >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"{flag} must be positive (a whole number of 1 or more), got {threads!r}; e.g. {flag} 1, "
                         "or leave it out for the runtime's default")
    return threads
