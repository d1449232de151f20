"""Per-layer int8 sensitivity: how far the landmarks move when each op alone is quantized.

    sensitivity(cfg, export.pipeline.sensitivity_inputs(cfg)) -> SensitivityReport

The caller loads the source and its crops (the pipeline side does that for the CLI), so the sweep
itself only converts, calibrates and measures. Measured on the real thing: the model is converted
and calibrated once (`graph.calibrate`), then for every op the converter's selective
quantization (`denylisted_nodes`) builds an int8 model
in which *only that op* is int8 (its input quantized, its weights int8, its output int8, then
dequantized) and everything else is float; the landmark shift of that model against the
float source on held-out real crops is the op's sensitivity. Optionally (`leave_one_out`) the
opposite is measured too: the full int8 model with only that op kept float, i.e. how much
floating it would buy back, which is what mixed precision spends.

Both run the real int8 TFLite kernels, so they include everything the converter does
(BN folding, ReLU fusion, per-channel weight rounding, bias in int32, the shared scale that
CONCATENATION imposes on its inputs). The sum of the parts does not add up to the whole: errors
of different layers partly cancel and partly compound.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from ..export.calibrate import DEFAULT_COUNT, DEFAULT_VAL_COUNT, CalibrationSet
from ..export.validate import ShiftStats, shift_stats
from ..io import FileSet, atomic_path, file_set, model_stem, writable_dir
from ..preprocess import Preprocess
from .graph import Calibrated, calibrate, keras_function, predict_blob

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class SensitivityConfig:
    """What `pfld-export sensitivity` takes."""

    model: Path  # checkpoint or .onnx
    out_dir: Path = Path("out/sensitivity")
    calib: str | None = None  # folder of face photos or dataset spec; None: synthetic
    images: str | None = None  # held-out faces for the shifts; None: held out of --calib
    calib_count: int = DEFAULT_COUNT
    val_count: int = DEFAULT_VAL_COUNT
    io_dtype: str = "float32"  # int8 for full-int8 (quantized input/output)
    range_method: str = "minmax"
    leave_one_out: bool = False
    equalize: bool = False  # measure the equalised network (equalize.py) instead of the original
    top: int = 20  # rows in the chart
    seed: int = 0
    detector: Any | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UsageError(f"--top {self.top} must be at least 1")


@dataclass
class SensitivityInputs:
    """What the sweep measures on: a loaded source (stage 0 settled) and its calibration and
    held-out crops; `export.pipeline.sensitivity_inputs` builds it."""

    path: Path  # the checkpoint or .onnx
    kind: str  # checkpoint | onnx
    loaded: Any | None  # checkpoint.LoadedModel for checkpoints
    preprocess: Preprocess
    reference: Any  # float predictor of the source
    calib: CalibrationSet
    val: CalibrationSet  # held-out crops the shifts are measured on


@dataclass
class LayerSensitivity:
    """One op: what it is and what quantizing it costs."""

    rank: int
    index: int  # position in the TFLite graph
    op: str
    label: str
    tensor: str
    shape: tuple[int, ...]
    range: tuple[float, float]  # calibrated activation range of its output
    alone: ShiftStats  # only this op int8
    float_gain_px: float | None = None  # full-int8 mean shift minus the shift with only this op float


@dataclass
class SensitivityReport:
    """Ranked layers plus the whole-model figures they are read against."""

    model: str
    calibration: str
    validation: str
    range_method: str
    io_dtype: str
    equalized: bool
    full_int8: ShiftStats  # every op int8
    layers: list[LayerSensitivity]
    skipped: list[str]  # data-movement ops not measured on their own
    json_path: Path
    png_path: Path
    notes: list[str] = field(default_factory=list)


def conv_labels(loaded: Any) -> list[str]:
    """PyTorch names of the conv/FC layers in forward order (what TFLite fuses into one op)."""
    from ..model import conv_units

    return [unit.label for unit in conv_units(loaded.model)]


def sensitivity(cfg: SensitivityConfig, src: SensitivityInputs, progress: Progress | None = None) -> SensitivityReport:
    """Convert `src` once, then measure each quantizable op alone (and optionally left out)."""
    from ..export.onnx import OnnxConfig, import_onnx, to_onnx

    out = writable_dir(Path(cfg.out_dir))
    calib, val = src.calib, src.val
    labels = conv_labels(src.loaded) if src.loaded is not None else None
    loaded = src.loaded
    if cfg.equalize:
        if loaded is None:
            raise UsageError("--equalize needs a PyTorch checkpoint (it rewrites float weights); drop it for an .onnx")
        from .equalize import equalize

        loaded = dataclasses.replace(loaded, model=equalize(loaded.inference_model(), src.preprocess.apply_nchw(calib.crops)).model.pfld)
    ref = src.reference.predict(val.crops)
    with tempfile.TemporaryDirectory(prefix="pfld-sens-") as tmp:
        ocfg = OnnxConfig(path=Path(tmp) / f"{model_stem(src.path)}.onnx", source=str(src.path))
        art = to_onnx(loaded, ocfg) if src.kind == "checkpoint" else import_onnx(src.path, src.preprocess, ocfg)
        inputs = calib.inputs(src.preprocess)
        keras_model, func = keras_function(art, inputs)
        cal = calibrate(keras_model, func, inputs, cfg.range_method, labels)
    report = measure_layers(cal, ref, val.crops, src.preprocess, cfg.io_dtype, cfg.leave_one_out, progress)
    report.model, report.calibration, report.validation = str(src.path), calib.description, val.description
    report.equalized = cfg.equalize
    report.json_path, report.png_path = out / "sensitivity.json", out / "sensitivity.png"
    from ..report import to_jsonable

    with file_set() as files:  # sensitivity.json and its chart appear together or not at all
        plot_sensitivity(report, report.png_path, cfg.top, files)
        files.write_json(report.json_path, to_jsonable(report))
    return report


def measure_layers(cal: Calibrated, reference_points: np.ndarray, crops: np.ndarray, preprocess: Any,
                   io_dtype: str = "float32", leave_one_out: bool = False, progress: Progress | None = None) -> SensitivityReport:
    """The sweep itself, on an already calibrated model (tests and the int8 fitter call this directly)."""
    ops = cal.quantizable
    all_tensors = [o.tensor for o in cal.ops]
    total = len(ops) * (2 if leave_one_out else 1) + 1

    def shift_of(float_ops: list[str]) -> ShiftStats:
        return shift_stats(reference_points, predict_blob(cal.quantize(float_ops, io_dtype), preprocess, crops))

    full = shift_of([])
    done = 1
    if progress:
        progress(done, total, "full int8")
    rows = []
    for o in ops:
        alone = shift_of([t for t in all_tensors if t != o.tensor])
        done += 1
        if progress:
            progress(done, total, o.label)
        gain = None
        if leave_one_out:
            gain = full.mean_px - shift_of([o.tensor]).mean_px
            done += 1
            if progress:
                progress(done, total, f"{o.label} (float)")
        rows.append(LayerSensitivity(rank=0, index=o.index, op=o.op, label=o.label, tensor=o.tensor, shape=o.shape,
                                     range=cal.ranges.get(o.tensor, (float("nan"), float("nan"))), alone=alone, float_gain_px=gain))
    rows.sort(key=lambda r: -r.alone.mean_px)
    for i, r in enumerate(rows, 1):
        r.rank = i
    skipped = [o.label for o in cal.ops if o not in ops]
    notes = [f"{len(skipped)} data-movement ops ({', '.join(sorted({o.op for o in cal.ops if o not in ops}))}) share their "
             "input's scale and were not measured alone"] if skipped else []
    return SensitivityReport(model="", calibration="", validation="", range_method=cal.method, io_dtype=io_dtype, equalized=False,
                             full_int8=full, layers=rows, skipped=skipped, json_path=Path(), png_path=Path(), notes=notes)


def ranking(report: SensitivityReport) -> list[str]:
    """Tensor names, most sensitive first: by float gain when measured, else by shift alone."""
    key = (lambda r: -(r.float_gain_px or 0.0)) if all(r.float_gain_px is not None for r in report.layers) else (lambda r: -r.alone.mean_px)
    return [r.tensor for r in sorted(report.layers, key=key)]


def plot_sensitivity(report: SensitivityReport, path: Path, top: int = 20, files: FileSet | None = None) -> Path:
    """Horizontal bar chart of the `top` most sensitive ops (mean and p99 shift), written atomically
    (with `files`: as part of that result set)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = report.layers[:top][::-1]
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(rows) + 1.6))
    try:
        y = np.arange(len(rows))
        ax.barh(y + 0.2, [r.alone.p99_px for r in rows], height=0.4, color="#f4a582", label="p99 shift")
        ax.barh(y - 0.2, [r.alone.mean_px for r in rows], height=0.4, color="#2166ac", label="mean shift")
        ax.axvline(report.full_int8.mean_px, color="#b2182b", ls="--", lw=1, label=f"all int8: mean {report.full_int8.mean_px:.2f} px")
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r.label} ({r.op.lower()})" for r in rows], fontsize=7)
        ax.set_xlabel("landmark shift vs float, px at 112 (only this op int8)")
        ax.set_title(f"int8 sensitivity per op: {Path(report.model).name}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        if files is not None:
            fig.savefig(files.path(path), dpi=110)
        else:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
