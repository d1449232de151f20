"""Int8Budget: what an int8 model may cost against its float source, in one place.

`convert --max-shift / --max-shift-p99 / --max-nme-increase / --max-float-ops / --max-slowdown`
and the size budget fill it; the int8 fitter, the mixed-precision search and the budget checks
on held-out faces all read this one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from ..export.validate import ShiftStats

# --max-shift-p99 left out: the 99th-percentile shift may be this many times the mean budget.
P99_PER_MEAN = 4.0
DEFAULT_MAX_FLOAT_OPS = 16
DEFAULT_MAX_SLOWDOWN = 1.15


@dataclass(frozen=True)
class Int8Budget:
    """Limits an int8 model must meet; None: not limited."""

    max_shift_px: float | None = None  # mean landmark shift, px at 112; None: no shift budget
    max_p99_px: float | None = None  # 99th-percentile shift; None with a mean budget: P99_PER_MEAN x it
    max_nme_increase: float | None = None  # NME increase over the float source (needs annotated faces)
    max_float_ops: int = DEFAULT_MAX_FLOAT_OPS  # the mixed search gives up beyond this many float ops
    max_bytes: int | None = None  # float weights are 4x int8: a float unit past this size is skipped
    max_slowdown: float | None = DEFAULT_MAX_SLOWDOWN  # latency vs the all-int8 model (XNNPACK, 1 thread)

    def __post_init__(self) -> None:
        if self.max_shift_px is not None and self.max_shift_px <= 0:
            raise UsageError(f"--max-shift {self.max_shift_px} must be a positive number of pixels")
        if self.max_p99_px is not None and self.max_p99_px <= 0:
            raise UsageError(f"--max-shift-p99 {self.max_p99_px} must be a positive number of pixels")
        if self.max_nme_increase is not None and self.max_nme_increase < 0:
            raise UsageError(f"--max-nme-increase {self.max_nme_increase} must be >= 0")
        if self.max_p99_px is not None and self.max_shift_px is None:
            raise UsageError("--max-shift-p99 needs --max-shift (the mean budget) as well")
        if self.max_float_ops < 0:
            raise UsageError(f"--max-float-ops {self.max_float_ops} must be >= 0")
        if self.max_slowdown is not None and self.max_slowdown < 1.0:
            raise UsageError(f"--max-slowdown {self.max_slowdown} must be >= 1 (a ratio to the all-int8 model's latency)")

    @property
    def given(self) -> bool:
        """Whether a landmark budget (shift or NME) was asked for: checks fail rather than warn."""
        return self.max_shift_px is not None or self.max_nme_increase is not None

    @property
    def p99_px(self) -> float | None:
        """The p99 shift budget in force: the asked one, else P99_PER_MEAN x the mean budget."""
        if self.max_p99_px is not None:
            return self.max_p99_px
        return P99_PER_MEAN * self.max_shift_px if self.max_shift_px is not None else None

    def meets(self, s: ShiftStats) -> bool:
        """Whether shifts `s` hold the shift budget (mean and p99)."""
        p99 = self.p99_px
        return self.max_shift_px is not None and s.mean_px <= self.max_shift_px and (p99 is None or s.p99_px <= p99)

    def score(self, s: ShiftStats) -> float:
        """How far over the shift budget (<= 1 means within): the worse of the two ratios."""
        if self.max_shift_px is None:
            raise UsageError("scoring against a shift budget needs --max-shift")
        r = s.mean_px / self.max_shift_px
        p99 = self.p99_px
        return max(r, s.p99_px / p99) if p99 else r
