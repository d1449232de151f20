"""Landmark accuracy: NME, cumulative error distribution (CED), AUC and failure rate, CED plots.

NME of a face = mean over points of ||pred - gt|| / d, with d from the ground truth:

* ``inter-ocular``: distance between the outer eye corners (WFLW 60/72, iBUG 36/45), the
  WFLW / PFLD convention;
* ``inter-pupil``: distance between the pupils (WFLW 96/97); layouts without pupils (iBUG 68)
  use the centres of each eye's points instead;
* ``box``: diagonal of the ground-truth landmark bounding box.

Custom layouts carry no eye semantics, so they fall back to ``box``; `resolve_norm` says which
normalisation was really used, and why, so reports can print it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from .errors import DataError, UsageError
from .io import FileSet, atomic_path
from .layouts import PointLayout

Norm = Literal["inter-ocular", "inter-pupil", "box"]
NORMS: tuple[str, ...] = ("inter-ocular", "inter-pupil", "box")


def resolve_norm(layout: PointLayout, norm: str = "inter-ocular") -> tuple[str, str]:
    """(normalisation actually used, human-readable description including any fallback)."""
    if norm not in NORMS:
        raise UsageError(f"unknown NME normalisation {norm!r}; use one of {', '.join(NORMS)}")
    if norm == "inter-ocular":
        if layout.eye_corners is not None:
            return "inter-ocular", f"inter-ocular (outer eye corners {layout.eye_corners[0]}/{layout.eye_corners[1]})"
        return "box", f"box diagonal (layout {layout.name} has no eye corners, so inter-ocular is impossible)"
    if norm == "inter-pupil":
        if layout.pupils is not None:
            return "inter-pupil", f"inter-pupil (points {layout.pupils[0]}/{layout.pupils[1]})"
        if layout.eyes is not None:
            return "inter-pupil", f"inter-pupil (layout {layout.name} has no pupils: centres of each eye's points)"
        return "box", f"box diagonal (layout {layout.name} has no pupils or eyes)"
    return "box", "box diagonal (ground-truth landmark bounding box)"


def _as_batch(a: np.ndarray, layout: PointLayout, what: str) -> np.ndarray:
    x = np.asarray(a, np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != 2 or x.shape[1] != layout.num_points:
        raise DataError(f"{what} must be shaped [N, {layout.num_points}, 2] for layout {layout.name}, got {np.shape(a)}")
    return x


def normalizers(gt: np.ndarray, layout: PointLayout, norm: str = "inter-ocular") -> np.ndarray:
    """Per-face normalising distance d [N] (see the module docstring)."""
    g = _as_batch(gt, layout, "ground truth")
    used, _ = resolve_norm(layout, norm)
    if used == "inter-ocular":
        a, b = layout.eye_corners  # type: ignore[misc]
        d = np.linalg.norm(g[:, a] - g[:, b], axis=-1)
    elif used == "inter-pupil":
        if layout.pupils is not None:
            a, b = layout.pupils
            d = np.linalg.norm(g[:, a] - g[:, b], axis=-1)
        else:
            r, l_ = layout.eyes  # type: ignore[misc]
            d = np.linalg.norm(g[:, list(r)].mean(1) - g[:, list(l_)].mean(1), axis=-1)
    else:
        d = np.linalg.norm(g.max(1) - g.min(1), axis=-1)
    return d


def nme(pred: np.ndarray, gt: np.ndarray, layout: PointLayout, norm: str = "inter-ocular") -> np.ndarray:
    """Normalised mean error per face, float64 [N]. `pred` and `gt` are [N, P, 2] (or [P, 2])
    in the same pixel frame. Zero or non-finite normalisers are a DataError naming the face."""
    p = _as_batch(pred, layout, "predictions")
    g = _as_batch(gt, layout, "ground truth")
    if p.shape != g.shape:
        raise DataError(f"predictions {p.shape} and ground truth {g.shape} differ in shape")
    if not np.all(np.isfinite(g)):
        raise DataError("ground truth contains NaN or infinity; fix or drop those annotations")
    d = normalizers(g, layout, norm)
    bad = np.flatnonzero(~(d > 0))
    if bad.size:
        raise DataError(f"face {int(bad[0])} has a zero {resolve_norm(layout, norm)[0]} distance; "
                        "its annotation is degenerate (drop it or use --norm box)")
    err = np.linalg.norm(p - g, axis=-1).mean(1)
    return err / d


def ced(errors: Sequence[float] | np.ndarray, threshold: float = 0.1, steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: (x = `steps`+1 error levels in [0, threshold], fraction of
    faces with error <= x). Non-finite errors count as failures (never below any level)."""
    e = _errors(errors)
    if threshold <= 0 or steps < 1:
        raise UsageError(f"CED needs threshold > 0 and steps >= 1, got {threshold}, {steps}")
    x = np.linspace(0.0, threshold, steps + 1)
    finite = np.sort(e[np.isfinite(e)])
    y = np.searchsorted(finite, x, side="right") / float(len(e))
    return x, y


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule, written out (no scipy; numpy renamed its helper between versions)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def auc(errors: Sequence[float] | np.ndarray, threshold: float = 0.1, steps: int = 10000) -> float:
    """Area under the CED up to `threshold`, divided by `threshold` (1 = every face perfect)."""
    x, y = ced(errors, threshold, steps)
    return _trapezoid(y, x) / threshold


def failure_rate(errors: Sequence[float] | np.ndarray, threshold: float = 0.1) -> float:
    """Fraction of faces with error above `threshold` (non-finite errors are failures)."""
    e = _errors(errors)
    return float(np.mean(~(e <= threshold)))


def _errors(errors: Sequence[float] | np.ndarray) -> np.ndarray:
    e = np.asarray(errors, np.float64).reshape(-1)
    if e.size == 0:
        raise DataError("no errors to summarise (no faces were evaluated)")
    return e


def plot_ced(
    curves: Mapping[str, Sequence[float] | np.ndarray],
    path: str | os.PathLike[str],
    threshold: float = 0.1,
    title: str = "Cumulative error distribution",
    xlabel: str = "NME",
    files: FileSet | None = None,
) -> Path:
    """Write a CED plot (one curve per name, legend with AUC and failure rate) as PNG, atomically.

    With `files`, the plot joins that result set (it appears only when the whole set does).
    """
    if not curves:
        raise UsageError("plot_ced needs at least one curve")
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, errs in curves.items():
        x, y = ced(errs, threshold)
        ax.plot(x, y, label=f"{name}  (AUC {auc(errs, threshold):.3f}, FR {100 * failure_rate(errs, threshold):.1f}%)")
    ax.set_xlim(0, threshold)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of faces")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    if files is not None:
        fig.savefig(files.path(path, suffix=".png"), format="png")
        return Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
