"""quant/ranges.py: activation range methods and the mse clip range."""

from __future__ import annotations

import numpy as np
import pytest

from pfld_export.errors import UsageError
from pfld_export.quant.ranges import DEFAULT_RANGES, mse_range, range_rule


def test_mse_ranges_shrink_min_max_and_still_hold_zero() -> None:
    v = np.random.default_rng(0).laplace(0, 1, 20000)  # heavy tails, as activations have
    lo, hi = mse_range(v, float(v.min()), float(v.max()))
    assert lo <= 0 <= hi and hi < 0.95 * v.max() and lo > 0.95 * v.min()  # rare tails clipped: levels serve the bulk
    tight = np.random.default_rng(1).uniform(-1, 1, 20000)
    assert mse_range(tight, -1.0, 1.0)[1] > 0.9  # nothing to gain from clipping a uniform tensor


@pytest.mark.parametrize("method, rule", [("minmax", None), ("mse", -1.0), ("percentile:99.99", 99.99), ("percentile:100", 100.0)])
def test_range_methods_parse_to_their_rule(method: str, rule: float | None) -> None:
    assert range_rule(method) == rule


@pytest.mark.parametrize("method", ["percentile:50", "percentile:101", "percentile:", "max", "mse "])
def test_unknown_range_methods_are_refused_naming_the_choices(method: str) -> None:
    with pytest.raises(UsageError, match="use minmax, mse or percentile:P"):
        range_rule(method)


def test_default_ranges_are_all_understood() -> None:
    assert DEFAULT_RANGES == ("minmax", "mse")
    assert [range_rule(m) for m in DEFAULT_RANGES] == [None, -1.0]
