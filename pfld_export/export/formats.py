"""FORMATS: the one registry of TFLite export formats.

Every consumer reads this table: the CLI's `--formats` choices, the converter settings in
`tflite.py`, the I/O and budget checks in `validate.py`, the report and the docs. Adding a
format is adding a row here; nothing else branches on a format's name.

Budgets are landmark shifts in pixels of the 112x112 crop, measured against the float source
(PyTorch, or the source ONNX) on held-out real crops, plus the NME increase allowed when
`--eval-data` is given. They were set from measurements recorded in benchmarks/conversion.md
(a 0.25X model fitted on synthetic faces and the GhostOne fixture, held-out real faces from
../shared/fixtures/unlabeled), with headroom.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from ..errors import UsageError


@dataclass(frozen=True)
class Budget:
    """What a format may cost in accuracy, against the float source on the same crops."""

    shift_mean_px: float  # mean per-point landmark shift, px at 112
    shift_max_px: float  # worst single point over all held-out faces, px at 112
    nme_increase: float  # NME(format) - NME(source) on --eval-data (inter-ocular, a fraction)
    # What a calibrated format should reach (mean / 99th-percentile shift, px at 112). Missing it
    # is reported as a warning with the figure, not a failure: the bounds above catch a broken
    # conversion, the goal tells a user how far their int8 model is from one that keeps the
    # landmarks. An explicit --max-shift replaces it with a hard budget.
    goal_mean_px: float | None = None
    goal_p99_px: float | None = None


@dataclass(frozen=True)
class ExportFormat:
    """One TFLite variant: converter settings, I/O dtype and budgets."""

    name: str
    summary: str
    file_suffix: str  # <name><suffix>.tflite
    optimize: bool  # converter.optimizations = [Optimize.DEFAULT] (turns on weight quantization)
    supported_types: tuple[str, ...]  # converter.target_spec.supported_types (tf dtype names)
    calibrated: bool  # needs a representative dataset (activation ranges from real crops)
    ops_set: str  # tf.lite.OpsSet member: TFLITE_BUILTINS or TFLITE_BUILTINS_INT8 (never SELECT_TF_OPS)
    io_dtype: str  # dtype of the model's input and output tensors (numpy name)
    weights: str  # how weights are stored, for people
    budget: Budget
    per_channel: bool = True  # per-channel weight scales (per-tensor loses ~2x accuracy on depthwise convs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Budgets: the worst trained-model measurement in benchmarks/conversion.md (0.25X fitted on
# synthetic faces, the GhostOne fixture; held-out real faces of ../shared/fixtures/unlabeled)
# with ~1.8x headroom, rounded. int8 I/O adds only the input rounding (1/255 steps: exactly the
# uint8 pixels for x/255 preprocessing) and half an output step (~0.2 px), so full-int8 shares
# int8's budget. A barely trained network misses the int8 budget (its features are mostly
# noise that quantization noise swamps): that is a finding about the model, not the converter.
FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            name="fp32", summary="float32 weights and activations: the reference TFLite",
            file_suffix="_fp32", optimize=False, supported_types=(), calibrated=False,
            ops_set="TFLITE_BUILTINS", io_dtype="float32", weights="float32",
            budget=Budget(shift_mean_px=0.01, shift_max_px=0.05, nme_increase=0.0005),  # measured <= 0.0002 max
        ),
        ExportFormat(
            name="fp16", summary="float16 weights (half the size), float32 compute on CPU, fp16 on GPU delegates",
            file_suffix="_fp16", optimize=True, supported_types=("float16",), calibrated=False,
            ops_set="TFLITE_BUILTINS", io_dtype="float32", weights="float16",
            budget=Budget(shift_mean_px=0.1, shift_max_px=1.0, nme_increase=0.002),  # measured <= 0.036 / 0.16
        ),
        ExportFormat(
            name="dynamic", summary="int8 weights, float activations (dynamic-range quantization; no calibration)",
            file_suffix="_dynamic", optimize=True, supported_types=(), calibrated=False,
            ops_set="TFLITE_BUILTINS", io_dtype="float32", weights="int8",
            budget=Budget(shift_mean_px=1.5, shift_max_px=8.0, nme_increase=0.005),  # measured <= 0.53 / 2.4
        ),
        ExportFormat(
            name="int8", summary="int8 weights and activations (calibrated), float32 input/output",
            file_suffix="_int8", optimize=True, supported_types=(), calibrated=True,
            ops_set="TFLITE_BUILTINS_INT8", io_dtype="float32", weights="int8",
            budget=Budget(shift_mean_px=3.0, shift_max_px=16.0, nme_increase=0.01,  # measured <= 1.70 / 8.6
                          goal_mean_px=0.25, goal_p99_px=1.0),
        ),
        ExportFormat(
            name="full-int8", summary="int8 everywhere including input/output (scale/zero point in the sidecar)",
            file_suffix="_full_int8", optimize=True, supported_types=(), calibrated=True,
            ops_set="TFLITE_BUILTINS_INT8", io_dtype="int8", weights="int8",
            # The int8 output tensor adds a rounding floor (~half a step): a looser goal.
            budget=Budget(shift_mean_px=3.0, shift_max_px=16.0, nme_increase=0.01,  # measured <= 1.70 / 8.6
                          goal_mean_px=0.30, goal_p99_px=1.2),
        ),
    )
}

# `--int8`: both integer variants plus fp32 as the reference they are read against.
INT8_PRESET: tuple[str, ...] = ("fp32", "int8", "full-int8")
DEFAULT_FORMATS: tuple[str, ...] = ("fp32", "fp16")


def get_format(name: str) -> ExportFormat:
    """Look a format up by name; unknown names list the valid ones."""
    key = name.strip().lower().replace("_", "-")
    if key not in FORMATS:
        raise UsageError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[key]


def select_formats(names: str | Iterable[str] | None, int8: bool = False) -> tuple[ExportFormat, ...]:
    """`--formats a,b` plus `--int8`, deduplicated, in registry order.

    Nothing asked gives DEFAULT_FORMATS; `--int8` alone gives INT8_PRESET.
    """
    if isinstance(names, str):
        wanted = [n for n in re.split(r"[,\s]+", names) if n]
        if not wanted:
            raise UsageError(f"--formats {names!r} names no format; choose from {', '.join(FORMATS)}")
    else:
        wanted = list(names or [])
    chosen = {get_format(n).name for n in wanted}
    if int8:
        chosen.update(INT8_PRESET)
    if not chosen:
        chosen.update(DEFAULT_FORMATS)
    return tuple(f for f in FORMATS.values() if f.name in chosen)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str | int) -> int:
    """'2MB' -> 2_000_000 (decimal units, as the paper's '2.1 MB'); KiB/MiB are binary."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise UsageError(f"size {text!r} is not understood; write e.g. 2MB, 1.4MB, 200KB or 1500000")
        n = int(round(float(m.group(1)) * _SIZE_UNITS[unit]))
    if n < 1:
        # No model fits in zero bytes: refuse now, not after minutes of conversion.
        raise UsageError(f"size budget {text!r} is {n} bytes; give a positive size, e.g. 2MB")
    return n


def format_size(n: int) -> str:
    """Bytes in the same decimal units `parse_size` reads (so budgets and sizes compare by eye)."""
    if n >= 1000**2:
        return f"{n / 1000**2:.2f} MB"
    if n >= 1000:
        return f"{n / 1000:.1f} KB"
    return f"{n} B"
