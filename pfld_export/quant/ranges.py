"""Activation clip ranges for int8: the least-error range over sampled values.

    mse_range(values, lo, hi) -> (lo', hi')
"""

from __future__ import annotations

import numpy as np

_MSE_SHRINK = np.geomspace(1.0, 0.25, 24)  # candidate clip ranges, as fractions of min/max


def mse_range(v: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The clip range (min/max shrunk by one common factor) with the least int8 rounding +
    clipping error over the sampled values `v`: what an outlier costs against what the
    256 levels gain."""
    best, err = (lo, hi), np.inf
    for f in _MSE_SHRINK:
        a, b = lo * f, hi * f
        scale = max(b - a, 1e-12) / 255.0
        q = np.clip(np.round((v - a) / scale), 0, 255) * scale + a
        e = float(np.mean((q - v) ** 2))
        if e < err:
            best, err = (a, b), e
    return best
