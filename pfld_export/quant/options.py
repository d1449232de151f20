"""What `pfld-export qat` offers, importable without torch: the CLI builds its options from these
and `qat.QATConfig` takes its defaults from them.

    range_fields("learned") -> ("mse", True)   # QATConfig's range_method, learn_ranges
"""

from __future__ import annotations

from ..errors import UsageError

RANGE_METHODS = ("minmax", "mse")  # activation ranges QAT trains against; convert calibrates with the same
RANGE_CHOICES = ("mse", "minmax", "learned")  # --ranges: re-measured by one of RANGE_METHODS as the weights move, or learned
TRAINABLE = ("all", "affine", "ranges")
STEPS = 300
BATCH = 32
LR = 5e-5
OUT = "out/qat"


def range_fields(choice: str) -> tuple[str, bool]:
    """--ranges as QATConfig's (range_method, learn_ranges): learned ranges start from mse ranges."""
    if choice not in RANGE_CHOICES:
        raise UsageError(f"--ranges {choice!r} unknown; choose {', '.join(RANGE_CHOICES)}")
    return ("mse", True) if choice == "learned" else (choice, False)
