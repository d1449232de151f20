"""ONNX -> TFLite for exactly the formats asked, offline, every file written atomically.

How: onnx2tf 1.28.8 turns the ONNX graph into a Keras model once, in memory
(`disable_model_save=True`: no SavedModel, none of its seven .tflite variants); then
`tf.lite.TFLiteConverter` runs once per requested format with that format's registry settings
and a representative dataset of real calibration crops. For a 1X model this is ~3 s per format
instead of onnx2tf's ~150 s for all variants (benchmarks/conversion.md).

No network: onnx2tf 1.x downloads a COCO sample
(`calibration_image_sample_data_20x128x128x3_float32.npy`) unless that file is in the current
directory; it uses it to check each converted op against ONNX Runtime. We run it in a temp
directory where we first wrote our own file of real face crops (onnx2tf resizes them to the
input size), so nothing is fetched and the op checks run on faces.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import flatbuffers
import numpy as np

from .. import __version__
from ..errors import ConversionError
from ..io import atomic_write_bytes, atomic_write_json
from ..runtime import sidecar_path, tflite_interpreter_class
from .calibrate import CalibrationSet
from .formats import ExportFormat
from .onnx import INPUT_NAME, OUTPUT_NAME, OnnxArtifact

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
ONNX2TF_SAMPLES = 20


@dataclass
class TfliteConfig:
    """Where the .tflite files go and what they are called: <out_dir>/<name><format suffix>.tflite."""

    out_dir: Path
    name: str
    source: str  # recorded in each sidecar


@dataclass
class TfliteArtifact:
    """One written .tflite, its sidecar, and its I/O types (quantization of int8 I/O)."""

    format: str
    path: Path
    sidecar: Path
    bytes: int
    input_dtype: str
    output_dtype: str
    input_quant: dict[str, float] | None
    output_quant: dict[str, float] | None
    seconds: float


def to_tflite(
    onnx: OnnxArtifact, formats: Sequence[ExportFormat], calib: CalibrationSet, cfg: TfliteConfig,
    progress: Callable[[str], None] | None = None, override: Mapping[str, bytes] | None = None,
    sidecar_extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[TfliteArtifact]:
    """Convert `onnx` to each of `formats`; all are converted before any file is written.

    `override`: format name -> model bytes already built elsewhere (quant.fit.fit_int8's int8
    variants); those formats are written (compacted) instead of converted. `sidecar_extra`:
    format name -> extra sidecar keys. Raises ConversionError naming the format and the
    converter's message.
    """
    if override:
        order = [f.name for f in formats]
        rest = [f for f in formats if f.name not in override]
        # The converted ones first: if one fails, nothing has been written yet.
        arts = to_tflite(onnx, rest, calib, cfg, progress, None, sidecar_extra) if rest else []
        built = [(f, compact_tflite(override[f.name]), 0.0) for f in formats if f.name in override]
        arts += _write_all(onnx, built, cfg, sidecar_extra)
        return sorted(arts, key=lambda a: order.index(a.format))
    inputs = calib.inputs(onnx.preprocess)
    with Captured():  # TensorFlow's import logs (oneDNN, absl) go straight to fd 2
        import onnx2tf  # noqa: F401
        import tensorflow  # noqa: F401
    with offline_workdir(inputs[:ONNX2TF_SAMPLES]) as work:
        keras_model = onnx_to_keras(onnx, work)
        func = concrete_function(keras_model)
        blobs: list[tuple[ExportFormat, bytes, float]] = []
        for fmt in formats:
            if progress:
                progress(fmt.name)
            t = time.perf_counter()
            blob = compact_tflite(convert_one(func, keras_model, fmt, inputs))
            blobs.append((fmt, blob, time.perf_counter() - t))
    return _write_all(onnx, blobs, cfg, sidecar_extra)


def _write_all(onnx: OnnxArtifact, blobs: Sequence[tuple[ExportFormat, bytes, float]], cfg: TfliteConfig,
               sidecar_extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[TfliteArtifact]:
    out = []
    for fmt, blob, secs in blobs:
        path = Path(cfg.out_dir) / f"{cfg.name}{fmt.file_suffix}.tflite"
        io_info = _io_info(blob)
        side = {
            "preprocess": onnx.preprocess.to_dict(), "format": fmt.name, "source": cfg.source,
            "quant": {"input": io_info["input_quant"], "output": io_info["output_quant"]},
            "weights": fmt.weights, "points": onnx.num_points, "model": onnx.model, "tool_version": __version__,
            **dict((sidecar_extra or {}).get(fmt.name, {})),
        }
        atomic_write_bytes(path, blob)
        atomic_write_json(sidecar_path(path), side)
        out.append(TfliteArtifact(format=fmt.name, path=path, sidecar=sidecar_path(path), bytes=len(blob), seconds=secs, **io_info))
    return out


@contextlib.contextmanager
def offline_workdir(samples: np.ndarray) -> Iterator[Path]:
    """A temp cwd holding onnx2tf's sample file (our crops), so onnx2tf never downloads it.

    onnx2tf looks the file up in os.getcwd(); changing the process cwd is the only hook it offers,
    so it is restored in `finally` (the conversion is not thread-safe for that reason).
    """
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="pfld-onnx2tf-") as tmp:
        np.save(Path(tmp) / ONNX2TF_SAMPLE, np.ascontiguousarray(samples, dtype=np.float32))
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def onnx_to_keras(onnx: OnnxArtifact, work: Path) -> Any:
    import onnx2tf

    log = Captured()
    try:
        # onnx2tf prints progress tables; a library must not, so keep them for error messages.
        with log:
            model = onnx2tf.convert(
                input_onnx_file_path=str(Path(onnx.path).resolve()), output_folder_path=str(work / "saved_model"),
                disable_model_save=True, not_use_onnxsim=onnx.simplified, verbosity="error",
                copy_onnx_input_output_names_to_tflite=False,
            )
    except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit(1) on some failures
        tail = [ln for ln in log.text.splitlines() if ln.strip()][-1:] or [str(e)]
        raise ConversionError(f"onnx2tf could not convert {Path(onnx.path).name} ({tail[0][:200]}); check the ONNX ops it uses") from None
    if model is None or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConversionError(f"onnx2tf produced no single-input single-output model from {Path(onnx.path).name}")
    shape = tuple(model.inputs[0].shape)
    s = onnx.preprocess.input_size
    if shape != (1, s, s, 3):
        raise ConversionError(f"onnx2tf produced input shape {shape}; expected NHWC (1, {s}, {s}, 3)")
    return model


def concrete_function(model: Any) -> Any:
    import tensorflow as tf

    spec = tf.TensorSpec(model.inputs[0].shape, tf.float32, name=INPUT_NAME)
    # A dict output names the signature output `landmarks` (a bare tensor would be `output_0`).
    fn = tf.function(lambda x: {OUTPUT_NAME: model(x)}, input_signature=[spec])
    return fn.get_concrete_function()


def converter_for(func: Any, keras_model: Any) -> Any:
    """A TFLiteConverter of `func` that tracks only `keras_model`'s variables.

    Given the Keras model itself, the converter first saves a SavedModel carrying Keras metadata
    for every layer: 9-11 s of CPU per conversion of a 1X PFLD, against 0.5-0.8 s with a plain
    tf.Module holding the same variables, and the flatbuffers are byte-identical (fp32, fp16 and
    the calibration model, measured).
    """
    import tensorflow as tf

    if keras_model is None:  # a bare function: nothing to track
        return tf.lite.TFLiteConverter.from_concrete_functions([func])
    holder = tf.Module()
    holder.model_variables = list(keras_model.variables)  # tracked, so the saved function finds them
    return tf.lite.TFLiteConverter.from_concrete_functions([func], holder)


def convert_one(func: Any, keras_model: Any, fmt: ExportFormat, inputs: np.ndarray) -> bytes:
    """One TFLiteConverter run with the registry's settings for `fmt`."""
    import tensorflow as tf

    conv = converter_for(func, keras_model)
    conv.target_spec.supported_ops = [getattr(tf.lite.OpsSet, fmt.ops_set)]
    conv.optimizations = [tf.lite.Optimize.DEFAULT] if fmt.optimize else []
    conv.target_spec.supported_types = [tf.dtypes.as_dtype(t) for t in fmt.supported_types]
    conv.inference_input_type = tf.dtypes.as_dtype(fmt.io_dtype)
    conv.inference_output_type = tf.dtypes.as_dtype(fmt.io_dtype)
    conv._experimental_disable_per_channel = not fmt.per_channel  # per-channel is the default; say so
    if fmt.calibrated:
        conv.representative_dataset = lambda: ([inputs[i : i + 1]] for i in range(len(inputs)))
    try:
        with Captured():  # the MLIR converter logs from C++ straight to the process's stdout
            return bytes(conv.convert())
    except Exception as e:  # the MLIR converter raises ConverterError/RuntimeError/ValueError
        msg = str(e).strip().splitlines()
        raise ConversionError(f"TFLite conversion to {fmt.name} failed ({(msg[0] if msg else type(e).__name__)[:200]})") from None


class _DedupBuilder(flatbuffers.Builder):
    """A flatbuffer builder that writes each distinct numpy vector once and shares it.

    Flatbuffers allow several tables to point at one vector. The TFLite converter writes one
    int64 zero-point vector per quantized tensor even though per-channel symmetric weights and
    their int32 biases have all-zero zero points, and the schema requires as many as there are
    scales: 8 bytes per channel, ~159 KB of a 1X full-int8 model (benchmarks/conversion.md).
    """

    __slots__ = ("_seen",)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._seen: dict[tuple[str, tuple[int, ...], bytes], int] = {}

    def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (flatbuffers' name)
        key = (x.dtype.str, tuple(x.shape), x.tobytes())
        if key not in self._seen:
            self._seen[key] = super().CreateNumpyVector(x)
        return self._seen[key]


def compact_tflite(blob: bytes) -> bytes:
    """Same model, fewer bytes: identical vectors stored once, fused tensor names shortened.

    Names like `model_4/tf.nn.relu_3/Relu;model_4/tf.math.add_3/Add;...` (one part per fused op)
    keep their first part. The result is checked to give bit-identical outputs on two inputs;
    otherwise the original is returned unchanged.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    for sg in model.subgraphs:
        for t in sg.tensors:
            if t.name:
                name = t.name.decode() if isinstance(t.name, bytes) else t.name
                t.name = name.split(";", 1)[0].encode()
    builder = _DedupBuilder(len(blob))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    small = bytes(builder.Output())
    return small if len(small) < len(blob) and _same_outputs(blob, small) else blob


def _same_outputs(a: bytes, b: bytes) -> bool:
    outs = []
    for blob in (a, b):
        interp = tflite_interpreter_class()(model_content=blob)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0], interp.get_output_details()[0]
        rng = np.random.default_rng(0)  # local generator: the check is deterministic
        res = []
        for _ in range(2):
            if np.dtype(i["dtype"]).kind == "f":
                x = rng.random(tuple(i["shape"]), dtype=np.float32)
            else:
                info = np.iinfo(i["dtype"])
                x = rng.integers(info.min, info.max, size=tuple(i["shape"]), endpoint=True).astype(i["dtype"])
            interp.set_tensor(i["index"], x)
            interp.invoke()
            res.append(interp.get_tensor(o["index"]).copy())
        outs.append(np.stack(res))
    return bool(np.array_equal(outs[0], outs[1]))


def _io_info(blob: bytes) -> dict[str, Any]:
    """Input/output dtypes and, for integer I/O, the scale and zero point a caller must apply."""
    interp = tflite_interpreter_class()(model_content=blob)
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]

    def quant(d: dict[str, Any]) -> dict[str, float] | None:
        if np.dtype(d["dtype"]).kind not in "iu":
            return None
        scale, zp = d["quantization"]
        return {"scale": float(scale), "zero_point": int(zp)}

    return {"input_dtype": np.dtype(i["dtype"]).name, "output_dtype": np.dtype(o["dtype"]).name,
            "input_quant": quant(i), "output_quant": quant(o)}


class Captured:
    """Capture Python *and* native (C++) stdout/stderr while converters run; `.text` afterwards.

    TensorFlow's converter and onnx2tf write to file descriptors 1/2 directly, which
    `contextlib.redirect_stdout` cannot catch; the library must not print, and the text is kept
    for error messages.
    """

    def __init__(self) -> None:
        self.text = ""
        self._file: Any = None
        self._saved: tuple[int, int] | None = None
        self._py: Any = None

    def __enter__(self) -> "Captured":
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = (os.dup(1), os.dup(2))
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        self._buf = io.StringIO()
        self._py = contextlib.ExitStack()
        self._py.enter_context(contextlib.redirect_stdout(self._buf))
        self._py.enter_context(contextlib.redirect_stderr(self._buf))
        return self

    def __exit__(self, *exc: object) -> None:
        self._py.close()
        for target, fd in zip((1, 2), self._saved or ()):
            os.dup2(fd, target)
            os.close(fd)
        self._file.seek(0)
        self.text = self._buf.getvalue() + self._file.read().decode("utf-8", "replace")
        self._file.close()
