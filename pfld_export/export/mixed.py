"""Selective int8 quantization of a calibrated TFLite model, and automatic mixed precision.

The TFLite converter quantizes in two steps, and this module drives them separately:

1. calibration: `converter._experimental_calibrate_only = True` gives the *float* flatbuffer
   with a min/max range recorded on every activation tensor;
2. quantization: `mlir_quantize(calibrated, denylisted_nodes=[...])` turns it into int8, keeping
   the denylisted ops (named by their output tensor) in float with QUANTIZE / DEQUANTIZE at
   their borders. This is the converter's own selective quantization, so a model built here is
   exactly what `convert` ships, and it runs with the real int8 kernels (XNNPACK).

Step 2 takes under a second, so one calibration serves every experiment (the per-layer
sensitivity sweep, the mixed-precision search). We also fill the ranges ourselves: the
converter's calibrator runs the reference kernels and takes ~40 s for 200 crops of a 0.5X model
on 2 cores; running the float model once with every tensor kept and taking min/max ourselves
gives the same ranges in a few seconds, and lets `RangeMethod` choose something else (a
percentile) where that helps. The converter records each range as-is (min/max including 0);
we do the same for `minmax`, so plain int8 here equals the converter's int8 byte for byte up
to calibration data.

Mixed precision (`search_mixed`): float ops are added in order of a ranking (the sensitivity
sweep's, or the per-op "quantized alone" shift) until the shift budget holds on the search
crops, then each float op is tried back in int8 and kept there if the budget still holds.
Search crops are the calibration crops: held-out validation crops stay untouched for the
figure that is reported.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ConversionError, UsageError
from ..preprocess import Preprocess
from .validate import ShiftStats, shift_stats

Progress = Callable[[str], None]
IO_DTYPES = ("float32", "int8")
# Ops that move or reshape data: quantizing them alone costs nothing (they share their input's
# scale), floating them alone buys nothing; they only ever ride along with their neighbours.
PASSTHROUGH_OPS = frozenset({"PAD", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE"})
_PERCENTILE = re.compile(r"percentile:(\d+(?:\.\d+)?)")
_SAMPLE_PER_TENSOR = 4096  # values kept per tensor per crop for percentile ranges


@dataclass(frozen=True)
class OpInfo:
    """One op of the float graph: its position, type, output tensor (the denylist key), a
    readable label (the PyTorch layer when known) and its output shape."""

    index: int
    op: str
    tensor: str
    label: str
    shape: tuple[int, ...]
    inputs: tuple[str, ...] = ()  # names of the tensors it reads (activations and constants)


@dataclass
class Calibrated:
    """A float TFLite flatbuffer carrying an activation range on every tensor, and its ops."""

    blob: bytes
    ops: list[OpInfo]
    method: str
    faces: int
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> (lo, hi)

    def quantize(self, float_ops: Iterable[str] = (), io_dtype: str = "float32") -> bytes:
        """int8 model with the ops whose output tensors are in `float_ops` kept in float."""
        return quantize_calibrated(self.blob, float_ops, io_dtype)

    def op(self, tensor: str) -> OpInfo:
        for o in self.ops:
            if o.tensor == tensor:
                return o
        raise UsageError(f"no op writes tensor {tensor!r}; choose one of the model's op outputs")

    def unit(self, tensor: str) -> list[str]:
        """The op writing `tensor` plus every op reading it (through data-movement ops): what
        must be float for that activation to never be int8. Floating one op alone only removes
        its weight rounding, because its output is re-quantized for the next int8 op."""
        out = [tensor]
        todo = [tensor]
        while todo:
            t = todo.pop()
            for o in self.ops:
                if t in o.inputs and o.tensor not in out:
                    out.append(o.tensor)
                    if o.op in PASSTHROUGH_OPS:
                        todo.append(o.tensor)
        return out

    @property
    def quantizable(self) -> list[OpInfo]:
        """Ops whose quantization can matter on their own (data-movement ops left out)."""
        return [o for o in self.ops if o.op not in PASSTHROUGH_OPS]


def quantize_calibrated(blob: bytes, float_ops: Iterable[str] = (), io_dtype: str = "float32") -> bytes:
    """The converter's quantization step on a calibrated flatbuffer (see the module docstring)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert

    from .tflite import Captured

    if io_dtype not in IO_DTYPES:
        raise UsageError(f"I/O dtype {io_dtype!r} is not supported here; choose {' or '.join(IO_DTYPES)}")
    dt = tf.dtypes.as_dtype(io_dtype)
    deny = sorted(set(float_ops))
    try:
        with Captured():  # the quantizer prints its settings from C++
            out = tfl_convert.mlir_quantize(blob, input_data_type=dt, output_data_type=dt, denylisted_nodes=deny or None)
    except Exception as e:  # the MLIR quantizer raises RuntimeError / ConverterError
        raise ConversionError(f"int8 quantization failed ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    return bytes(out)


def keras_function(onnx_artifact: Any, samples: np.ndarray) -> tuple[Any, Any]:
    """onnx2tf's in-memory Keras model and the concrete function the converter takes
    (exactly as `tflite.to_tflite` builds them, offline)."""
    from .tflite import concrete_function, offline_workdir, onnx_to_keras, ONNX2TF_SAMPLES

    with offline_workdir(samples[:ONNX2TF_SAMPLES]) as work:
        keras_model = onnx_to_keras(onnx_artifact, work)
    return keras_model, concrete_function(keras_model)


def calibrate(keras_model: Any, func: Any, inputs: np.ndarray, method: str = "minmax",
              labels: Sequence[str] | None = None) -> Calibrated:
    """Calibrated float flatbuffer with activation ranges from `inputs` (float32 NHWC).

    `method`: "minmax" (the converter's own rule), "mse" (per tensor, the min/max shrunk by the
    factor with the least squared int8 error over sampled values) or "percentile:P" (e.g.
    percentile:99.99, ranges at the P-th / (100-P)-th percentile of each tensor's values). `labels`: names of the
    model's conv/FC layers in forward order (PyTorch names), used to label ops.
    """
    return calibrate_all(keras_model, func, inputs, (method,), labels)[method]


def calibrate_all(keras_model: Any, func: Any, inputs: np.ndarray, methods: Sequence[str],
                  labels: Sequence[str] | None = None) -> dict[str, Calibrated]:
    """`calibrate` for several range methods at once: one converter pass places the statistics
    and one run over `inputs` records every tensor, so each extra method costs only its range
    rule (the float run dominates: it is what a second method used to repeat)."""
    import tensorflow as tf

    from .tflite import Captured

    pcts = [_range_method(m) for m in methods]
    if len(inputs) < 1:
        raise UsageError("calibration needs at least one input crop")
    conv = tf.lite.TFLiteConverter.from_concrete_functions([func], keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # The converter only needs to see the graph run once to place its statistics; the ranges
    # themselves are measured below over all inputs (much faster than its calibrator).
    conv.representative_dataset = lambda: ([inputs[i : i + 1]] for i in range(min(2, len(inputs))))
    conv._experimental_calibrate_only = True
    try:
        with Captured():
            blob = bytes(conv.convert())
    except Exception as e:
        raise ConversionError(f"TFLite calibration failed ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    ops = list_ops(blob, labels)
    out = {}
    for m, ranges in zip(methods, _measure_ranges_all(blob, inputs, pcts)):
        out[m] = Calibrated(blob=_write_ranges(blob, ranges), ops=ops, method=m, faces=len(inputs), ranges=ranges)
    return out


RANGE_METHODS = ("minmax", "mse", "percentile:P")
_MSE_SHRINK = np.geomspace(1.0, 0.25, 24)  # candidate clip ranges, as fractions of min/max


def _range_method(method: str) -> float | None:
    """None for minmax, -1 for mse, else the percentile."""
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


def _interpreter(blob: bytes, keep_all: bool = False) -> Any:
    from ..runtime import tflite_interpreter_class

    cls = tflite_interpreter_class()
    kw: dict[str, Any] = {"experimental_preserve_all_tensors": True} if keep_all else {}
    # No XNNPACK here: a delegate hides the intermediate tensors we read and adds DELEGATE nodes
    # to the op list. (Timed and validated runs use the normal Predictor, with XNNPACK.)
    resolver = _no_delegate_resolver(cls)
    if resolver is not None:
        kw["experimental_op_resolver_type"] = resolver
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # preserve_all_tensors warns that it is for debugging: it is
        interp = cls(model_content=blob, num_threads=1, **kw)
    interp.allocate_tensors()
    return interp


def _no_delegate_resolver(cls: Any) -> Any:
    import importlib

    mod = importlib.import_module(cls.__module__)
    kind = getattr(mod, "OpResolverType", None)
    return getattr(kind, "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None) if kind is not None else None


def _measure_ranges(blob: bytes, inputs: np.ndarray, percentile: float | None) -> dict[str, tuple[float, float]]:
    """Min/max (or percentiles) of every float tensor over `inputs`, by tensor name."""
    return _measure_ranges_all(blob, inputs, [percentile])[0]


def _measure_ranges_all(blob: bytes, inputs: np.ndarray, rules: Sequence[float | None]) -> list[dict[str, tuple[float, float]]]:
    """`_measure_ranges` for several rules (None minmax, -1 mse, else a percentile) from one run."""
    interp = _interpreter(blob, keep_all=True)
    inp = interp.get_input_details()[0]["index"]
    tensors = [(t["index"], t["name"]) for t in interp.get_tensor_details() if np.dtype(t["dtype"]) == np.float32]
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    samples: dict[int, list[np.ndarray]] = {}
    sample = any(r is not None for r in rules)
    rng = np.random.default_rng(0)  # subsampling for percentiles only; fixed so ranges are reproducible
    for k in range(len(inputs)):
        interp.set_tensor(inp, np.ascontiguousarray(inputs[k : k + 1], np.float32))
        interp.invoke()
        for idx, _name in tensors:
            try:
                a = interp.get_tensor(idx)
            except ValueError:  # constants the interpreter keeps no buffer for
                continue
            if a.size == 0:
                continue
            lo[idx] = min(lo.get(idx, np.inf), float(a.min()))
            hi[idx] = max(hi.get(idx, -np.inf), float(a.max()))
            if sample:
                flat = a.ravel()
                if flat.size > _SAMPLE_PER_TENSOR:
                    flat = flat[rng.choice(flat.size, _SAMPLE_PER_TENSOR, replace=False)]
                samples.setdefault(idx, []).append(flat.astype(np.float32))
    outs: list[dict[str, tuple[float, float]]] = [{} for _ in rules]
    for idx, name in tensors:
        if idx not in lo:
            continue
        a0, b0 = min(lo[idx], 0.0), max(hi[idx], 0.0)  # int8 ranges always hold 0 (zero point)
        v = np.concatenate(samples[idx]) if idx in samples else None
        for out, rule in zip(outs, rules):
            a, b = a0, b0
            if rule is not None and v is not None:
                if rule < 0:
                    a, b = mse_range(v, a0, b0)
                else:
                    a, b = min(float(np.percentile(v, 100.0 - rule)), 0.0), max(float(np.percentile(v, rule)), 0.0)
            out[name] = (a, b)
    return outs


def _write_ranges(blob: bytes, ranges: dict[str, tuple[float, float]]) -> bytes:
    """Replace the min/max statistics the calibrator recorded with `ranges` (same tensors)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    for sg in model.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if q is None or q.min is None or len(q.min) == 0:
                continue
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            if name in ranges:
                q.min, q.max = [float(ranges[name][0])], [float(ranges[name][1])]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def list_ops(blob: bytes, labels: Sequence[str] | None = None) -> list[OpInfo]:
    """Ops of a (float, calibrated) flatbuffer in execution order, labelled.

    Conv-like ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) take `labels` in order when the
    counts match (PFLD's convs form one chain, so execution order is forward order); other ops
    are labelled by what produced their first input.
    """
    interp = _interpreter(blob)
    det = {t["index"]: t for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()  # no public op list; the TFLite debugger uses the same call
    convs = [o for o in ops if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    use_labels = labels is not None and len(labels) == len(convs)
    base_of_tensor: dict[int, tuple[int, str]] = {}  # tensor -> (producer position, nearest conv label)
    out = []
    k = 0
    for pos, o in enumerate(ops):
        t = int(o["outputs"][0])
        if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            label = labels[k] if use_labels and labels is not None else f"{o['op_name'].lower()} #{k}"
            base = label
            k += 1
        else:
            # Named after the conv behind its most recently computed input: a residual ADD
            # after its block's projection, the concat after conv8.
            srcs = [base_of_tensor[int(i)] for i in o["inputs"] if int(i) in base_of_tensor]
            base = max(srcs)[1] if srcs else "input"
            label = f"{o['op_name'].lower()} after {base}"
        base_of_tensor[t] = (pos, base)
        out.append(OpInfo(index=int(o["index"]), op=o["op_name"], tensor=det[t]["name"], label=label,
                          shape=tuple(int(v) for v in det[t]["shape"]),
                          inputs=tuple(det[int(i)]["name"] for i in o["inputs"] if int(i) >= 0)))
    return out


def predict_blob(blob: bytes, preprocess: Preprocess, crops: np.ndarray) -> np.ndarray:
    """Landmarks [N, P, 2] of an in-memory .tflite through the one TFLite Predictor."""
    from ..runtime import open_predictor

    with tempfile.TemporaryDirectory(prefix="pfld-mixed-") as tmp:
        path = Path(tmp) / "candidate.tflite"
        path.write_bytes(blob)  # a scratch file the predictor reads once; never a deliverable
        return open_predictor(path, preprocess=preprocess).predict(crops)


@dataclass
class MixedConfig:
    """Budget for the search and how far it may go."""

    max_shift_px: float  # mean landmark shift on the search crops
    max_p99_px: float | None = None  # 99th percentile of per-point shift; None: not checked
    max_float_ops: int = 16  # give up beyond this many float ops (the model is no longer int8)
    io_dtype: str = "float32"
    prune: bool = True  # after meeting the budget, try each float op back in int8
    max_bytes: int | None = None  # float weights are 4x int8: a unit that pushes the file past this is skipped
    max_slowdown: float | None = None  # latency vs the all-int8 model (XNNPACK, 1 thread); a unit past it is skipped

    def __post_init__(self) -> None:
        if self.max_shift_px <= 0:
            raise UsageError(f"--max-shift {self.max_shift_px} must be a positive number of pixels")
        if self.max_p99_px is not None and self.max_p99_px <= 0:
            raise UsageError(f"--max-shift-p99 {self.max_p99_px} must be a positive number of pixels")
        if self.max_float_ops < 0:
            raise UsageError(f"--max-float-ops {self.max_float_ops} must be >= 0")
        if self.max_slowdown is not None and self.max_slowdown < 1.0:
            raise UsageError(f"--max-slowdown {self.max_slowdown} must be >= 1 (a ratio to the all-int8 model's latency)")


@dataclass
class MixedStep:
    """One candidate the search tried."""

    float_ops: list[str]  # labels
    shift: ShiftStats
    met: bool


@dataclass
class MixedResult:
    """The chosen model, which ops stayed float, and every step of the search."""

    blob: bytes
    float_ops: list[OpInfo]
    shift: ShiftStats  # on the search crops
    met: bool
    steps: list[MixedStep] = field(default_factory=list)


def _meets(s: ShiftStats, cfg: MixedConfig) -> bool:
    return s.mean_px <= cfg.max_shift_px and (cfg.max_p99_px is None or s.p99_px <= cfg.max_p99_px)


def _score(s: ShiftStats, cfg: MixedConfig) -> float:
    """How far over budget (<= 1 means within): the worse of the two ratios."""
    r = s.mean_px / cfg.max_shift_px
    return max(r, s.p99_px / cfg.max_p99_px) if cfg.max_p99_px else r


def search_mixed(
    cal: Calibrated, ranking: Sequence[str], reference_points: np.ndarray, crops: np.ndarray, preprocess: Preprocess,
    cfg: MixedConfig, progress: Progress | None = None,
) -> MixedResult:
    """Fewest float ops (greedy along `ranking`, most sensitive first, then pruned) for which
    the int8 model's shift against `reference_points` on `crops` meets `cfg`.

    Returns the best candidate found, with `met` False when even `cfg.max_float_ops` float ops
    do not meet the budget (the caller decides whether that is an error).
    """
    by_tensor = {o.tensor: o for o in cal.ops}
    unknown = [t for t in ranking if t not in by_tensor]
    if unknown:
        raise UsageError(f"ranking names {len(unknown)} tensors the model does not have (e.g. {unknown[0]!r})")
    steps: list[MixedStep] = []

    def trial(float_set: list[str]) -> tuple[bytes, ShiftStats]:
        blob = cal.quantize(float_set, cfg.io_dtype)
        s = shift_stats(reference_points, predict_blob(blob, preprocess, crops))
        steps.append(MixedStep([by_tensor[t].label for t in float_set], s, _meets(s, cfg)))
        if progress:
            progress(f"{len(float_set)} float ops: mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px")
        return blob, s

    chosen: list[str] = []
    blob, s = trial(chosen)
    best = (blob, list(chosen), s)
    all_int8 = blob
    for t in ranking:
        if _meets(s, cfg):
            break
        # Float the op and its readers, so its output activation stays float (see Calibrated.unit).
        grown = chosen + [u for u in cal.unit(t) if u not in chosen]
        if len(grown) == len(chosen):
            continue
        if len(grown) > cfg.max_float_ops:
            break
        b2, s2 = trial(grown)
        if cfg.max_bytes is not None and len(b2) > cfg.max_bytes:
            continue  # e.g. conv8's 200k weights in float32: over the size budget, try the next unit
        if cfg.max_slowdown is not None and latency_ratio(b2, all_int8, crops[:1], preprocess, runs=30)[0] > cfg.max_slowdown:
            continue  # float convs on 56x56 maps cost more than they buy back; try a cheaper unit
        chosen, blob, s = grown, b2, s2
        if _score(s, cfg) < _score(best[2], cfg):
            best = (blob, list(chosen), s)
    met = _meets(best[2], cfg)
    if met and cfg.prune:
        blob, chosen, s = best
        for t in list(chosen):  # most sensitive first: the ones most likely needed are tried first
            trial_set = [c for c in chosen if c != t]
            b2, s2 = trial(trial_set)
            if _meets(s2, cfg):
                blob, chosen, s = b2, trial_set, s2
        best = (blob, chosen, s)
    return MixedResult(blob=best[0], float_ops=[by_tensor[t] for t in best[1]], shift=best[2], met=met, steps=steps)


def float_op_count(blob: bytes) -> dict[str, int]:
    """Compute ops that run in float in a quantized model (by op type); QUANTIZE/DEQUANTIZE
    at the model's borders and around float islands are not counted."""
    interp = _interpreter(blob)
    det = {t["index"]: t for t in interp.get_tensor_details()}
    out: dict[str, int] = {}
    for o in interp._get_ops_details():
        if o["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if np.dtype(det[int(o["outputs"][0])]["dtype"]) == np.float32:
            out[o["op_name"]] = out.get(o["op_name"], 0) + 1
    return out


def latency_ratio(candidate: bytes, baseline: bytes, crop: np.ndarray, preprocess: Preprocess, runs: int = 50,
                  repeats: int = 5, warmup: int = 5) -> tuple[float, float, float]:
    """(candidate / baseline median latency ratio, candidate ms, baseline ms): XNNPACK, 1 thread,
    the two models interleaved round by round, median over `repeats` of per-round medians.

    In-process timing for a search decision and a report line, not a benchmark: the committed
    figures come from `pfld-export bench` / benchmarks/.
    """
    from ..runtime import open_predictor

    with tempfile.TemporaryDirectory(prefix="pfld-lat-") as tmp:
        preds = []
        for name, blob in (("candidate", candidate), ("baseline", baseline)):
            p = Path(tmp) / f"{name}.tflite"
            p.write_bytes(blob)
            preds.append(open_predictor(p, preprocess=preprocess, threads=1))
        times: list[list[float]] = [[], []]
        ratios = []
        for r in range(repeats):
            meds = [0.0, 0.0]
            for j in ((0, 1) if r % 2 == 0 else (1, 0)):
                with preds[j].invoker(crop) as call:  # type: ignore[attr-defined]
                    for _ in range(warmup):
                        call()
                    t = []
                    for _ in range(runs):
                        t0 = time.perf_counter_ns()
                        call()
                        t.append(time.perf_counter_ns() - t0)
                meds[j] = float(np.median(t)) / 1e6
                times[j].append(meds[j])
            ratios.append(meds[0] / meds[1])
    return float(np.median(ratios)), float(np.median(times[0])), float(np.median(times[1]))


def default_environment() -> None:
    """Keep TensorFlow's C++ info lines off the user's terminal (the CLI calls this)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --- the int8 fitter `convert` calls -----------------------------------------------------------

# Fixes to the float weights tried before any op is left in float, in order. Each was kept
# because it measured better than plain int8 (benchmarks/int8_fidelity.md); `plain` is always a
# candidate, and the best candidate on the search crops wins.
WEIGHT_FIXES: tuple[str, ...] = ("equalize", "equalize+bias")
INT8_METHODS: tuple[str, ...] = ("plain",) + WEIGHT_FIXES + ("mixed",)
DEFAULT_METHODS: tuple[str, ...] = ("plain", "equalize", "equalize+bias", "mixed")
# `convert --int8` with no int8 flag: the candidates that measured best, best first, so the
# time cap cuts the least useful one (benchmarks/int8_fidelity.md); every one is calibrated
# with each of DEFAULT_RANGES and the best on the search crops is shipped.
DEFAULT_RECIPE: tuple[str, ...] = ("plain", "equalize+bias", "equalize")
DEFAULT_RANGES: tuple[str, ...] = ("minmax", "mse")
# Weight-fix candidates started after this many seconds of the fit's CPU time are skipped (and
# named). CPU, not wall time: on a shared machine (measured at load 5-17 on 2 cores) the wall
# clock ran 3-8x the CPU time and a 60 s wall cap cut the best candidate in 3 of 4 conversions;
# on an idle machine the two are within the converter's thread count of each other.
DEFAULT_MAX_SECONDS = 60.0
RANKING_CROPS = 64  # crops for the per-op ranking that orders the mixed-precision search


@dataclass
class Int8Config:
    """How `convert` builds its calibrated (int8, full-int8) formats, and the budget they must meet."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    max_shift_px: float | None = None  # mean shift budget (px at 112); None: no search, best candidate wins
    max_p99_px: float | None = None
    max_float_ops: int = 16
    max_bytes: int | None = None  # size budget the mixed search respects
    max_slowdown: float | None = None  # latency budget of the mixed search, vs all-int8
    range_methods: tuple[str, ...] = DEFAULT_RANGES  # each weight variant is calibrated with each
    equalize_alpha: float = 0.5
    measure_latency: bool = True
    max_seconds: float | None = None  # no weight-fix candidate starts after this much CPU time of the fit (plain always runs)
    recipe: str = "methods"  # "default" when convert chose the methods (no --int8-method / budget)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in INT8_METHODS]
        if bad:
            raise UsageError(f"int8 method(s) {bad} unknown; choose from {', '.join(INT8_METHODS)}")
        if self.max_shift_px is not None and self.max_shift_px <= 0:
            raise UsageError(f"--max-shift {self.max_shift_px} must be a positive number of pixels")
        if self.max_p99_px is not None and self.max_p99_px <= 0:
            raise UsageError(f"--max-shift-p99 {self.max_p99_px} must be a positive number of pixels")
        if not self.range_methods:
            raise UsageError("int8 fitting needs at least one activation range method (minmax, mse, percentile:P)")
        for m in self.range_methods:
            _range_method(m)


@dataclass
class Int8Candidate:
    """One way of building the int8 model and what it measured on the search crops."""

    method: str
    shift: ShiftStats
    float_ops: list[str] = field(default_factory=list)  # labels of ops left in float


@dataclass
class Int8Fit:
    """What `fit_int8` chose for the calibrated formats (the model bytes are in `blobs`)."""

    method: str
    float_ops: list[str]  # labels of ops kept float (empty: fully int8)
    float_op_types: dict[str, int]
    candidates: list[Int8Candidate]
    met: bool | None  # None when no budget was given
    search: str  # what the candidates were measured on
    equalized: list[str] = field(default_factory=list)  # tensors equalise rescaled
    latency_vs_plain: dict[str, float] = field(default_factory=dict)  # format -> median latency ratio
    plain_bytes: dict[str, int] = field(default_factory=dict)
    recipe: str = "methods"  # "default": convert's own choice of methods; "methods": --int8-method / a budget
    skipped: list[str] = field(default_factory=list)  # candidates the time cap left out
    residual: list[str] = field(default_factory=list)  # formats whose float output adds the mean shape back
    seconds: float = 0.0  # wall time of the fit
    cpu_seconds: float = 0.0  # CPU time of the fit (what the cap counts)
    _blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # underscore: kept out of report.json
    _plain: dict[str, bytes] = field(default_factory=dict, repr=False)  # plain int8 per format, for the comparison
    _uncalibrated: dict[str, bytes] = field(default_factory=dict, repr=False)  # e.g. fp32 from the same Keras model

    def plain_blob(self, name: str) -> bytes | None:
        """Plain int8 model bytes of format `name` (None when the fit kept no plain model)."""
        return self._plain.get(name)

    @property
    def uncalibrated(self) -> dict[str, bytes]:
        """Formats without calibration (fp32...) converted from the plain Keras model the fit built."""
        return self._uncalibrated

    @property
    def blobs(self) -> dict[str, bytes]:
        """Format name -> model bytes."""
        return self._blobs

    def sidecar(self) -> dict[str, dict[str, Any]]:
        """Extra sidecar keys per format: how its int8 model was built."""
        info = {"float_ops": list(self.float_ops), "equalized": bool(self.equalized) and "equalize" in self.method}
        # An int8-I/O format has no float output to add the mean shape to: it ships the candidate without it.
        return {name: {"int8": {"method": self.method if name in self.residual else self.method.removesuffix("+residual"),
                                "mean_shape_residual": name in self.residual, **info}} for name in self._blobs}


def fit_int8(
    loaded: Any | None, onnx_artifact: Any, calib: Any, io_dtypes: dict[str, str], reference: Any, cfg: Int8Config,
    progress: Progress | None = None, also: Sequence[Any] = (),
) -> Int8Fit:
    """Build each calibrated format (name -> I/O dtype in `io_dtypes`) the best way `cfg` allows.

    Candidates: plain int8 of `onnx_artifact`; for a checkpoint (`loaded`), the weight fixes in
    `cfg.methods`, each re-exported; every one calibrated on the same crops with each of
    `cfg.range_methods`; the best by search-crop shift is kept. With a budget that the best
    still misses and "mixed" in `cfg.methods`, the fewest float ops that meet it are searched
    (`search_mixed`). `also`: uncalibrated ExportFormats (fp32...) to convert from the plain
    Keras model on the way, so the caller need not run onnx2tf once more. `cfg.max_seconds`
    caps the fit's CPU time (see DEFAULT_MAX_SECONDS): a weight-fix candidate is not started after it (named in `skipped`).
    Nothing is written here.
    """
    from .tflite import convert_one, compact_tflite

    t0, c0 = time.perf_counter(), time.process_time()
    say = progress or (lambda _m: None)
    pre = onnx_artifact.preprocess
    inputs = calib.inputs(pre)
    ref = reference.predict(calib.crops)
    labels = _labels(loaded)
    uncalibrated: dict[str, bytes] = {}

    def calibrated(name: str, art: Any, formats: Sequence[Any] = ()) -> dict[str, Calibrated]:
        """One Keras conversion, one calibration run for every range method: "name" for minmax, "name/mse"..."""
        keras_model, func = keras_function(art, inputs)
        for fmt in formats:
            uncalibrated[fmt.name] = compact_tflite(convert_one(func, keras_model, fmt, inputs))
        got = calibrate_all(keras_model, func, inputs, cfg.range_methods, labels)
        return {name if r == "minmax" else f"{name}/{r}": c for r, c in got.items()}

    say("calibrating plain int8")
    cals: dict[str, Calibrated] = calibrated("plain", onnx_artifact, [f for f in also if not f.calibrated])
    plain = cals.get("plain") or next(iter(cals.values()))  # minmax if asked for, else the first range method
    learned = learned_qat_ranges(loaded)
    if learned:
        say("writing the ranges QAT learned into the int8 model")
        cals["qat-ranges"] = with_site_ranges(plain, learned)
    equalized: list[str] = []
    fixes = [m for m in cfg.methods if m in WEIGHT_FIXES]  # in the asked order: the cap cuts from the end
    skipped: list[str] = []
    if learned and fixes:
        # Learned ranges belong to the checkpoint's own activations: equalising again rescales
        # channels under them (measured on a ranges-only 1X checkpoint: 0.61 px vs 0.35 on the
        # search crops). Bias correction alone keeps them; a --qat-equalize checkpoint is
        # equalised already, so re-equalising it is not tried at all.
        equalized_qat = bool(loaded.meta.provenance["qat"].get("equalized"))  # learned ranges come from a QAT checkpoint
        fixes = ([] if equalized_qat else [m for m in WEIGHT_FIXES if m in fixes]) + (["bias"] if "equalize+bias" in fixes else [])
    if fixes and loaded is None:
        say("weight fixes skipped: an ONNX source has no PyTorch weights to rewrite")
        fixes = []
    elif fixes and not _rewritable(loaded):
        if "equalize+bias" in fixes and _bias_correctable(loaded):
            # ReLU6 clips, so channel scales do not commute with it: no equalisation. Bias
            # correction only moves biases by the measured effect of weight rounding: it applies.
            say("equalisation skipped (ReLU6 does not commute with channel scales); bias correction alone tried")
            fixes = ["bias"]
        else:
            # Equalisation and bias correction index into PFLD-pytorch's own anatomy; another
            # layout or a user's class gets the generic methods only.
            say("weight fixes skipped: equalise / bias correction are written for PFLD-pytorch's anatomy, "
                "not this network's; the generic methods remain")
            fixes = []
    if fixes:
        variants = _fixed_weights(loaded, calib.crops, pre, fixes, cfg.equalize_alpha)
        for k, m in enumerate(fixes):
            if cfg.max_seconds is not None and time.process_time() - c0 > cfg.max_seconds:
                skipped = fixes[k:]
                say(f"time cap {cfg.max_seconds:.0f} s of CPU reached: {', '.join(skipped)} not tried")
                break
            fixed, names = next(variants)
            say(f"calibrating {m}")
            equalized = equalized or names
            with tempfile.TemporaryDirectory(prefix="pfld-fix-") as tmp:
                from .onnx import OnnxConfig, to_onnx

                art = to_onnx(fixed, OnnxConfig(path=Path(tmp) / "fixed.onnx", source=onnx_artifact.source))
                got = calibrated(m, art)
            cals.update(got)
            if learned and m == "bias":
                # QAT's ranges on the bias-corrected weights too: no conversion, only the scales
                # differ. Measured on a ranges-only 0.25X checkpoint: chosen, 0.457 px held-out
                # against 0.463 (qat-ranges) and 0.489 (best PTQ).
                cals[f"{m}/qat-ranges"] = with_site_ranges(got.get(m) or next(iter(got.values())), learned)
    first_io = next(iter(io_dtypes.values()), "float32")
    if first_io == "float32":
        # Each candidate also with the mean-shape residual head (the float-I/O formats add the
        # mean back in float; an int8-I/O format is quantized from the candidate as it is).
        from ..quant.residual import residual_variants

        cals.update(residual_variants(cals, inputs, say))
    candidates = []
    for m, cal in cals.items():
        s = shift_stats(ref, predict_blob(cal.quantize((), first_io), pre, calib.crops))
        candidates.append(Int8Candidate(m, s))
        say(f"{m}: mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px on the search crops")
    budget = MixedConfig(max_shift_px=cfg.max_shift_px, max_p99_px=cfg.max_p99_px, max_float_ops=cfg.max_float_ops,
                         io_dtype=first_io, max_bytes=cfg.max_bytes, max_slowdown=cfg.max_slowdown) if cfg.max_shift_px is not None else None
    rank_key = (lambda c: _score(c.shift, budget)) if budget else (lambda c: c.shift.mean_px)
    best = min(candidates, key=rank_key)
    cal = cals[best.method]
    float_ops: list[OpInfo] = []
    met = None if budget is None else _meets(best.shift, budget)
    if budget is not None and not met and "mixed" in cfg.methods:
        from .sensitivity import measure_layers, ranking

        # Bias correction changes the float network on purpose, so floating ops of that variant
        # can never get below its float drift (measured: 0.46 px with 60 float ops on the
        # 17-point fixture); the best float-preserving variant is searched as well.
        bases = [best.method]
        exact = [c for c in candidates if not _bias_corrected(c.method)]
        if _bias_corrected(best.method) and exact:
            bases.append(min(exact, key=rank_key).method)
        k = min(len(calib.crops), RANKING_CROPS)
        for base in bases:
            say(f"ranking ops of {base} for mixed precision")
            sens = measure_layers(cals[base], ref[:k], calib.crops[:k], pre, first_io)
            res = search_mixed(cals[base], ranking(sens), ref, calib.crops, pre, budget, progress=say)
            cand = Int8Candidate(f"{base}+mixed", res.shift, [o.label for o in res.float_ops])
            candidates.append(cand)
            if _score(res.shift, budget) < _score(best.shift, budget):
                best, cal, float_ops, met = cand, cals[base], res.float_ops, res.met
            if met:
                break
    deny = [o.tensor for o in float_ops]
    blobs = {name: compact_tflite(cal.quantize(deny, io)) for name, io in io_dtypes.items()}
    fit = Int8Fit(_blobs=blobs, method=best.method, float_ops=[o.label for o in float_ops],
                  float_op_types=float_op_count(next(iter(blobs.values()))) if blobs else {}, candidates=candidates,
                  met=met, search=f"{len(calib.crops)} calibration crops vs the float source", equalized=equalized,
                  recipe=cfg.recipe, skipped=skipped, _uncalibrated=uncalibrated,
                  residual=[n for n, io in io_dtypes.items() if io == "float32" and best.method.endswith("+residual")])
    for name, io in io_dtypes.items():
        base = compact_tflite(plain.quantize((), io))
        fit._plain[name] = base
        fit.plain_bytes[name] = len(base)
        if cfg.measure_latency and best.method != "plain":
            fit.latency_vs_plain[name] = latency_ratio(blobs[name], base, calib.crops[:1], pre)[0]
    fit.seconds = round(time.perf_counter() - t0, 3)
    fit.cpu_seconds = round(time.process_time() - c0, 3)
    return fit


def _bias_correctable(loaded: Any) -> bool:
    """A built-in PFLD whose layout bias correction knows (any activation)."""
    from ..model import bias_correctable

    config = getattr(getattr(loaded, "meta", None), "model", None)
    return config is not None and bias_correctable(config) and getattr(loaded.meta, "source_format", "") != "model-class"


def _rewritable(loaded: Any) -> bool:
    """Whether the PFLD-specific weight rewrites apply: a built-in PFLD of the standard anatomy."""
    config = getattr(getattr(loaded, "meta", None), "model", None)
    return bool(getattr(config, "standard", False)) and getattr(loaded.meta, "source_format", "") != "model-class"


def _bias_corrected(method: str) -> bool:
    """Whether a candidate's weights were bias-corrected ("equalize+bias/mse", "bias/qat-ranges"...):
    the part before the range method names the weight fix."""
    return method.removesuffix("+residual").split("/")[0].endswith("bias")


def learned_qat_ranges(loaded: Any | None) -> dict[str, tuple[float, float]] | None:
    """Activation ranges a `train --qat --qat-ranges learned` checkpoint carries (site -> range)."""
    info = loaded.meta.provenance.get("qat") if loaded is not None else None
    if not info or info.get("range_method") != "learned" or not info.get("ranges"):
        return None
    return {k: (float(v[0]), float(v[1])) for k, v in info["ranges"].items()}


def with_site_ranges(cal: Calibrated, site_ranges: dict[str, tuple[float, float]]) -> Calibrated:
    """`cal` with the activation ranges of every op that maps to a QAT site replaced (the
    converter then quantizes with exactly the scales QAT trained against)."""
    from ..qat import site_of_label

    ranges = dict(cal.ranges)
    for o in cal.ops:  # execution order, so a PAD sees its producer's new range
        site = site_of_label(o.op, o.label)
        if site in site_ranges:
            lo, hi = site_ranges[site]
            ranges[o.tensor] = (min(lo, 0.0), max(hi, 0.0))
        elif o.op in PASSTHROUGH_OPS and o.inputs and o.inputs[0] in ranges:
            ranges[o.tensor] = ranges[o.inputs[0]]  # data movement keeps its input's scale
    blob = _write_ranges(cal.blob, ranges)
    return Calibrated(blob=blob, ops=cal.ops, method="qat-ranges", faces=cal.faces, ranges=ranges)


def _labels(loaded: Any | None) -> list[str] | None:
    if loaded is None:
        return None
    from .sensitivity import conv_labels

    return conv_labels(loaded)


def _fixed_weights(loaded: Any, crops: np.ndarray, pre: Preprocess, methods: Sequence[str], alpha: float) -> Iterator[tuple[Any, list[str]]]:
    """Copies of `loaded` with equalised (and, for equalize+bias, also bias-corrected) float
    weights, one per method in order; the equalisation is computed once and shared. "bias" is
    bias correction of the weights as they are (for checkpoints whose ranges were learned)."""
    import dataclasses

    import torch

    from .equalize import EqualizeConfig, bias_correct, equalize

    x = pre.apply_nchw(crops)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards: one thread avoids oversubscribing shared cores
    try:
        eq = equalize(loaded.inference_model(), x, EqualizeConfig(alpha=alpha)) if any(m.startswith("equalize") for m in methods) else None
        names = [t.name for t in eq.tensors] if eq is not None else []
        for m in methods:
            base = eq.model if eq is not None and m.startswith("equalize") else loaded.inference_model()
            net = bias_correct(base, x).model if m.endswith("bias") else base
            yield dataclasses.replace(loaded, model=net.pfld), names
    finally:
        torch.set_num_threads(prev)


def int8_config_for(cfg: Any, formats: Sequence[Any]) -> Int8Config | None:
    """The Int8Config a ConvertConfig asks for, or None for the converter's plain int8.

    Budgets need an int8 format to apply to and --max-nme-increase needs --eval-data: both are
    refused up front, before minutes of conversion.
    """
    calibrated = [f for f in formats if f.calibrated]
    budget = cfg.max_shift is not None or cfg.max_nme_increase is not None
    if budget and not calibrated:
        raise UsageError("--max-shift / --max-nme-increase apply to int8 formats; add --int8 (or --formats int8,full-int8)")
    if cfg.max_nme_increase is not None and not cfg.eval_data:
        raise UsageError("--max-nme-increase needs annotated faces to measure NME on; add --eval-data wflw:DIR or 300w:DIR")
    if cfg.max_nme_increase is not None and cfg.max_nme_increase < 0:
        raise UsageError(f"--max-nme-increase {cfg.max_nme_increase} must be >= 0")
    if cfg.max_shift_p99 is not None and cfg.max_shift is None:
        raise UsageError("--max-shift-p99 needs --max-shift (the mean budget) as well")
    if not calibrated:
        return None
    methods = cfg.int8_methods
    recipe, cap = "methods", None
    if methods is None:
        methods = DEFAULT_METHODS if budget else DEFAULT_RECIPE
        recipe, cap = ("methods", None) if budget else ("default", DEFAULT_MAX_SECONDS)
    asked_cap = getattr(cfg, "int8_max_seconds", None)
    if asked_cap is not None:
        if asked_cap < 0:
            raise UsageError(f"--int8-max-seconds {asked_cap} must be >= 0 (0: no cap)")
        cap = asked_cap or None
    elif tuple(methods) == ("plain",) and not budget:
        return None  # the converter's own plain int8, for comparison with the default
    p99 = cfg.max_shift_p99 if cfg.max_shift_p99 is not None else (4.0 * cfg.max_shift if cfg.max_shift is not None else None)
    from .formats import parse_size

    return Int8Config(methods=tuple(methods), max_shift_px=cfg.max_shift, max_p99_px=p99, max_float_ops=cfg.max_float_ops,
                      max_bytes=parse_size(cfg.size_budget), max_slowdown=cfg.max_slowdown, max_seconds=cap, recipe=recipe)


def add_budget_checks(rows: Sequence[Any], formats: dict[str, Any], cfg: Any, fit: Int8Fit | None) -> None:
    """Append --max-shift / --max-nme-increase checks (held-out figures) to the calibrated
    formats' validation rows; a failed check names the best figure reached and what was tried.
    An explicit --max-shift replaces the format's goal (a warning) by the user's hard budget."""
    from .validate import Check

    how = _how(fit)
    for row in rows:
        if not formats[row.format].calibrated:
            continue
        if cfg.max_shift is not None:
            row.checks = [c for c in row.checks if c.name != "goal"]
        if cfg.max_shift is not None:
            p99_budget = cfg.max_shift_p99 if cfg.max_shift_p99 is not None else 4.0 * cfg.max_shift
            s = row.shift
            ok = s is not None and s.mean_px <= cfg.max_shift and s.p99_px <= p99_budget
            got = "not measured" if s is None else f"best reached mean {s.mean_px:.3f} px, p99 {s.p99_px:.3f} px on {s.faces} held-out faces"
            fix = "" if ok else ("; allow more float ops (--max-float-ops), raise --max-shift, or fine-tune for int8 with "
                                 "`pfld-export train --qat --qat-ranges learned --qat-equalize --init CKPT --data PHOTOS` and convert "
                                 "that with --reference CKPT; a model you train yourself can train int8-robust with `pfld-export train --int8-noise 8` "
                                 "(measured gains and their NME cost: benchmarks/int8_fidelity.md)")
            row.checks.append(Check("max-shift", ok, f"{got} (budget mean {cfg.max_shift} px, p99 {p99_budget:g} px) with {how}{fix}",
                                    figure=f"{got}; budget mean {cfg.max_shift} px, p99 {p99_budget:g} px",
                                    fix="allow more float ops (--max-float-ops) or raise --max-shift; more ways in the FAIL line above"))
        if cfg.max_nme_increase is not None:
            inc = row.nme_increase
            ok = inc is not None and inc <= cfg.max_nme_increase
            got = "NME not measured" if inc is None else f"best reached NME +{inc:.4f}"
            fix = "" if ok else "; allow more float ops (--max-float-ops) or raise --max-nme-increase (see benchmarks/int8_fidelity.md)"
            row.checks.append(Check("max-nme-increase", ok, f"{got} (budget +{cfg.max_nme_increase}) with {how}{fix}",
                                    figure=f"{got}; budget +{cfg.max_nme_increase}",
                                    fix="allow more float ops (--max-float-ops) or raise --max-nme-increase"))
        row.settle()


def _how(fit: Int8Fit | None) -> str:
    if fit is None:
        return "plain int8"
    tried = ", ".join(f"{c.method} {c.shift.mean_px:.2f}" for c in fit.candidates)
    floats = f", {len(fit.float_ops)} ops float" if fit.float_ops else ", all ops int8"
    return f"{fit.method}{floats} (tried on search crops, mean px: {tried})"
