"""Calibrated TFLite graphs: the converter's int8 in two steps, driven separately.

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
gives the same ranges in a few seconds, and lets the range method (ranges.py) choose something
else (a percentile) where that helps. The converter records each range as-is (min/max including
0); we do the same for `minmax`, so plain int8 here equals the converter's int8 byte for byte up
to calibration data.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ConversionError, UsageError
from ..preprocess import Preprocess
from .ranges import mse_range, range_rule

Progress = Callable[[str], None]
IO_DTYPES = ("float32", "int8")
# Ops that move or reshape data: quantizing them alone costs nothing (they share their input's
# scale), floating them alone buys nothing; they only ever ride along with their neighbours.
PASSTHROUGH_OPS = frozenset({"PAD", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE"})
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

    from ..export.tflite import Captured

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
    from ..export.tflite import concrete_function, offline_workdir, onnx_to_keras, ONNX2TF_SAMPLES

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

    from ..export.tflite import Captured, converter_for

    for m in methods:
        range_rule(m)  # an unknown method is refused before the conversion, not after
    if len(inputs) < 1:
        raise UsageError("calibration needs at least one input crop")
    conv = converter_for(func, keras_model)
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
    return calibrate_blob(blob, inputs, methods, list_ops(blob, labels))


def calibrate_blob(blob: bytes, inputs: np.ndarray, methods: Sequence[str], ops: list[OpInfo]) -> dict[str, Calibrated]:
    """The range step of `calibrate_all` on a flatbuffer that already carries the converter's
    statistics (its own, or a copy of it with other weights): one float run over `inputs`
    measures every tensor, each of `methods` turns that into ranges. `ops`: `list_ops` of it."""
    pcts = [range_rule(m) for m in methods]
    out = {}
    for m, ranges in zip(methods, measure_ranges_all(blob, inputs, pcts)):
        out[m] = Calibrated(blob=write_ranges(blob, ranges), ops=ops, method=m, faces=len(inputs), ranges=ranges)
    return out


def debug_interpreter(blob: bytes, keep_all: bool = False) -> Any:
    """A TFLite interpreter on `blob` without delegates, every tensor readable with `keep_all`."""
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


def measure_ranges(blob: bytes, inputs: np.ndarray, percentile: float | None) -> dict[str, tuple[float, float]]:
    """Min/max (or percentiles) of every float tensor over `inputs`, by tensor name."""
    return measure_ranges_all(blob, inputs, [percentile])[0]


def measure_ranges_all(blob: bytes, inputs: np.ndarray, rules: Sequence[float | None]) -> list[dict[str, tuple[float, float]]]:
    """`measure_ranges` for several rules (None minmax, -1 mse, else a percentile) from one run."""
    interp = debug_interpreter(blob, keep_all=True)
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


def flatbuffer_object(blob: bytes) -> Any:
    """A .tflite flatbuffer as the schema's object API (tensors, buffers, ops), to edit in place."""
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))


def flatbuffer_bytes(model: Any) -> bytes:
    """`flatbuffer_object`'s inverse: the edited model as .tflite bytes."""
    from tensorflow.lite.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def write_ranges(blob: bytes, ranges: dict[str, tuple[float, float]]) -> bytes:
    """Replace the min/max statistics the calibrator recorded with `ranges` (same tensors)."""
    model = flatbuffer_object(blob)
    for sg in model.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if q is None or q.min is None or len(q.min) == 0:
                continue
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            if name in ranges:
                q.min, q.max = [float(ranges[name][0])], [float(ranges[name][1])]
    return flatbuffer_bytes(model)


def list_ops(blob: bytes, labels: Sequence[str] | None = None) -> list[OpInfo]:
    """Ops of a (float, calibrated) flatbuffer in execution order, labelled.

    Conv-like ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) take `labels` in order when the
    counts match (PFLD's convs form one chain, so execution order is forward order); other ops
    are labelled by what produced their first input.
    """
    interp = debug_interpreter(blob)
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


def float_op_count(blob: bytes) -> dict[str, int]:
    """Compute ops that run in float in a quantized model (by op type); QUANTIZE/DEQUANTIZE
    at the model's borders and around float islands are not counted."""
    interp = debug_interpreter(blob)
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
