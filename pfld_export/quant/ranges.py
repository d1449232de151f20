"""Activation range methods: how the min/max an int8 tensor is scaled to is chosen.

    minmax         the converter's own rule: the observed min/max (always holding 0)
    mse            min/max shrunk by the one factor with the least int8 rounding + clipping error
    percentile:P   the P-th / (100-P)-th percentile of the tensor's values (e.g. percentile:99.99)
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import UsageError

RANGE_METHODS = ("minmax", "mse", "percentile:P")
# Each candidate of the int8 fit is calibrated with each of these (benchmarks/int8_fidelity.md).
DEFAULT_RANGES: tuple[str, ...] = ("minmax", "mse")
_PERCENTILE = re.compile(r"percentile:(\d+(?:\.\d+)?)")
_MSE_SHRINK = np.geomspace(1.0, 0.25, 24)  # candidate clip ranges, as fractions of min/max
# Bins of the mse histogram: the narrowest int8 step (min/max shrunk to 1/4) spans 64 bins.
_MSE_BINS = 1 << 14


def range_rule(method: str) -> float | None:
    """A range method's rule: None for minmax, -1 for mse, else the percentile."""
    if method == "minmax":
        return None
    if method == "mse":
        return -1.0
    m = _PERCENTILE.fullmatch(method)
    if not m or not 50.0 < float(m.group(1)) <= 100.0:
        raise UsageError(f"range method {method!r} is not understood; use minmax, mse or percentile:P with 50 < P <= 100 (e.g. percentile:99.99)")
    return float(m.group(1))


def mse_range(v: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The clip range (min/max shrunk by one common factor) with the least int8 rounding +
    clipping error over the sampled values `v`: what an outlier costs against what the
    256 levels gain.

    The error is summed over a histogram of `v` (_MSE_BINS bins on [lo, hi], widened to any value
    outside it; each value at its
    bin's centre plus the bin's own variance): every value still counts, tails included, and
    each of the 24 clip ranges costs one pass over the bins instead of one over the values
    (0.5 M values per tensor for a 1X PFLD on 123 crops: 26 s of a conversion).
    """
    v = np.asarray(v, np.float64)
    if not hi > lo or v.size == 0:
        return lo, hi
    # The bins span every value: one outside [lo, hi] still costs its clipping error.
    counts, edges = np.histogram(v, bins=_MSE_BINS, range=(min(lo, float(v.min())), max(hi, float(v.max()))))
    keep = counts > 0
    c, w = ((edges[:-1] + edges[1:]) / 2)[keep], counts[keep].astype(np.float64)
    n = float(w.sum())
    within = (edges[1] - edges[0]) ** 2 / 12.0  # mean squared distance of a value to its bin's centre
    best, err = (lo, hi), np.inf
    for f in _MSE_SHRINK:
        a, b = lo * f, hi * f
        scale = max(b - a, 1e-12) / 255.0
        q = np.clip(np.round((c - a) / scale), 0, 255) * scale + a
        e = float(np.dot(w, (q - c) ** 2)) / n + within
        if e < err:
            best, err = (a, b), e
    return best
