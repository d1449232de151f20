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


def _mse_over_every_value(v: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The mse clip range summed value by value: what the histogram in mse_range stands for."""
    errors = {}
    for f in np.geomspace(1.0, 0.25, 24):
        a, b = lo * f, hi * f
        scale = (b - a) / 255.0
        q = np.clip(np.round((v - a) / scale), 0, 255) * scale + a
        errors[(a, b)] = float(np.mean((q - v) ** 2))
    return min(errors, key=errors.get)


@pytest.mark.parametrize("seed", range(6))
def test_mse_range_picks_what_summing_every_value_picks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Post-ReLU tensors (one-sided, heavy tail) and pre-activation ones (two-sided, skewed).
    v = rng.laplace(0, 1, 50_000) * rng.uniform(0.1, 3) + rng.uniform(-0.5, 0.5)
    if seed % 2:
        v = np.maximum(v, 0.0)
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    assert mse_range(v, lo, hi) == pytest.approx(_mse_over_every_value(v, lo, hi))


def test_values_outside_the_given_range_still_count_as_clipped() -> None:
    bulk = np.random.default_rng(3).laplace(0, 1, 50_000)
    v = np.concatenate([bulk, np.full(150, 12.0)])  # a cluster past the range: shrinking it costs more
    lo, hi = float(bulk.min()), 10.0
    assert mse_range(v, lo, hi) == pytest.approx(_mse_over_every_value(v, lo, hi))
    assert mse_range(v, lo, hi)[1] == pytest.approx(hi)  # nothing is gained by clipping harder


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
