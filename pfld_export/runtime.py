"""One `Predictor` for every backend: PyTorch checkpoint, ONNX, TFLite (float or int8 I/O).

    predict(crops: uint8 BGR [N, 112, 112, 3]) -> landmarks float32 [N, P, 2] in crop pixels

Evaluation, fidelity, calibration checks, benchmarks and `predict` use only this interface;
this module is the only place that knows which backend it is talking to.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .device import check_threads
from .errors import ModelFileError, UsageError
from .layouts import get_layout
from .preprocess import Preprocess

ONNX_META_PREPROCESS = "pfld_export.preprocess"
ONNX_META_MODEL = "pfld_export.model"
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")
MIN_POINTS = 3  # fewer points cannot place a face (the smallest real layout, 5-point, is above it)
# A probe face's landmarks must lie within this many crop widths of the crop: a landmark model's
# outputs are crop fractions, so anything far outside is not landmarks (or the preprocessing is
# badly wrong). Generous, so that untrained test models still pass.
PLAUSIBLE_CROPS = 10.0


@runtime_checkable
class Predictor(Protocol):
    """Anything that turns 112x112 BGR crops into landmarks in crop pixels."""

    name: str
    backend: str
    preprocess: Preprocess
    num_points: int

    def predict(self, crops: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    # Optional (not part of the runtime check, so other Predictors stay valid without it):
    # `invoker(crop)` is a context manager yielding a zero-argument call that runs only the
    # network on one face already preprocessed and fed; `bench.host` times that call.


def _to_points(raw: np.ndarray, size: int) -> np.ndarray:
    raw = np.asarray(raw, np.float32).reshape(raw.shape[0], -1)
    if raw.shape[1] % 2:
        raise UsageError(f"model output has {raw.shape[1]} values per face, not 2 x points")
    return raw.reshape(raw.shape[0], -1, 2) * np.float32(size)


def _check_crops(crops: np.ndarray, pre: Preprocess) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    s = pre.input_size
    if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
        raise UsageError(f"expected uint8 BGR crops shaped [N, {s}, {s}, 3], got {crops.shape}")
    return crops


@dataclass
class TorchPredictor:
    """A PyTorch checkpoint through `checkpoint.load_checkpoint` (float reference)."""

    path: Path
    preprocess: Preprocess
    module: Any  # torch.nn.Module returning [N, 2P]
    num_points: int
    threads: int | None = None
    name: str = ""
    backend: str = "torch"

    def predict(self, crops: np.ndarray) -> np.ndarray:
        import torch

        crops = _check_crops(crops, self.preprocess)
        prev = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                out = self.module(torch.from_numpy(self.preprocess.apply_nchw(crops))).numpy()
        finally:
            torch.set_num_threads(prev)
        return _to_points(out, self.preprocess.input_size)

    @contextmanager
    def invoker(self, crop: np.ndarray) -> Iterator[Callable[[], Any]]:
        """Yield a call running only the module on one preprocessed face (for benchmarks)."""
        import torch

        x = torch.from_numpy(self.preprocess.apply_nchw(_check_crops(crop, self.preprocess)[:1]))
        prev = torch.get_num_threads()
        # Thread count is process state in torch: set it for the whole timed block, not per call.
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                yield lambda: self.module(x)
        finally:
            torch.set_num_threads(prev)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "path": str(self.path), "bytes": _size(self.path),
                "dtype": "float32", "points": self.num_points}


@dataclass
class OnnxPredictor:
    """An ONNX model through ONNX Runtime (CPU). NCHW or NHWC input, detected from its shape."""

    path: Path
    preprocess: Preprocess
    session: Any
    input_name: str
    output_name: str
    nhwc: bool
    num_points: int
    name: str = ""
    backend: str = "onnx"

    def predict(self, crops: np.ndarray) -> np.ndarray:
        crops = _check_crops(crops, self.preprocess)
        x = self.preprocess.apply(crops) if self.nhwc else self.preprocess.apply_nchw(crops)
        # Exported graphs have a static batch of 1: feed faces one at a time.
        outs = [self.session.run([self.output_name], {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
        return _to_points(np.concatenate(outs, 0), self.preprocess.input_size)

    @contextmanager
    def invoker(self, crop: np.ndarray) -> Iterator[Callable[[], Any]]:
        """Yield a call running only the session on one preprocessed face (for benchmarks)."""
        crop = _check_crops(crop, self.preprocess)[:1]
        x = self.preprocess.apply(crop) if self.nhwc else self.preprocess.apply_nchw(crop)
        feed, outs = {self.input_name: x}, [self.output_name]
        yield lambda: self.session.run(outs, feed)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "path": str(self.path), "bytes": _size(self.path),
                "dtype": "float32", "points": self.num_points}


@dataclass
class QuantParams:
    scale: float
    zero_point: int
    dtype: str


@dataclass
class TFLitePredictor:
    """A `.tflite` through ai-edge-litert (XNNPACK), handling int8/uint8 I/O with the tensors' own
    scale and zero point."""

    path: Path
    preprocess: Preprocess
    interpreter: Any
    num_points: int
    input_quant: QuantParams | None = None
    output_quant: QuantParams | None = None
    nhwc: bool = True
    name: str = ""
    backend: str = "tflite"
    _in_index: int = field(default=0, repr=False)
    _out_index: int = field(default=0, repr=False)
    _in_dtype: Any = field(default=np.float32, repr=False)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        crops = _check_crops(crops, self.preprocess)
        x = self.preprocess.apply(crops) if self.nhwc else self.preprocess.apply_nchw(crops)
        outs = []
        for i in range(len(x)):
            xi = x[i : i + 1]
            if self.input_quant is not None:
                q = self.input_quant
                info = np.iinfo(self._in_dtype)
                xi = np.clip(np.round(xi / q.scale + q.zero_point), info.min, info.max).astype(self._in_dtype)
            self.interpreter.set_tensor(self._in_index, xi)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self._out_index)
            if self.output_quant is not None:
                y = (y.astype(np.float32) - self.output_quant.zero_point) * np.float32(self.output_quant.scale)
            outs.append(np.asarray(y, np.float32).reshape(1, -1))
        return _to_points(np.concatenate(outs, 0), self.preprocess.input_size)

    def invoke_once(self) -> None:
        """One inference on whatever is in the input tensor (for benchmarks)."""
        self.interpreter.invoke()

    @contextmanager
    def invoker(self, crop: np.ndarray) -> Iterator[Callable[[], Any]]:
        """Feed one preprocessed (and, for int8 I/O, quantized) face; yield the bare `invoke`."""
        crop = _check_crops(crop, self.preprocess)[:1]
        x = self.preprocess.apply(crop) if self.nhwc else self.preprocess.apply_nchw(crop)
        if self.input_quant is not None:
            q, info = self.input_quant, np.iinfo(self._in_dtype)
            x = np.clip(np.round(x / q.scale + q.zero_point), info.min, info.max).astype(self._in_dtype)
        self.interpreter.set_tensor(self._in_index, x)
        yield self.interpreter.invoke

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "backend": self.backend, "path": str(self.path),
                             "bytes": _size(self.path), "dtype": str(np.dtype(self._in_dtype)), "points": self.num_points}
        if self.input_quant:
            d["input_quant"] = vars(self.input_quant)
        if self.output_quant:
            d["output_quant"] = vars(self.output_quant)
        return d


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tflite_interpreter_class() -> Callable[..., Any]:
    """ai-edge-litert (maintained), then tflite_runtime, then tf.lite."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        pass
    import tensorflow as tf

    return tf.lite.Interpreter


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """`model.tflite` -> `model.json`: the preprocessing record that travels with a .tflite."""
    return Path(model_path).with_suffix(".json")


def read_sidecar(model_path: Path) -> dict[str, Any] | None:
    p = sidecar_path(model_path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"sidecar {p} is not valid JSON ({e}); delete it or re-run convert") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_onnx(path: Path, load_external_data: bool = False) -> Any:
    """`onnx.load` that turns an empty, truncated or non-ONNX file into one typed error.

    Every command that reads an .onnx comes through here (or `_open_onnx`), so a corrupt file
    reads the same everywhere instead of a protobuf traceback.
    """
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf DecodeError, onnx's own errors, OSError: all mean "unreadable"
        raise ModelFileError(f"{path} is not a readable ONNX model ({_first_line(e)}); check the file or re-export it") from None
    if not m.graph.node and not m.graph.output:
        # protobuf happily parses an empty (or some truncated) file into an empty model.
        raise ModelFileError(f"{path} is not a readable ONNX model (no graph in it: empty or truncated); check the file or re-export it")
    return m


def onnx_metadata(path: Path) -> dict[str, str]:
    m = load_onnx(path)
    return {p.key: p.value for p in m.metadata_props}


def landmark_points(shape: Sequence[Any], where: str) -> int | None:
    """Point count N of a landmark output shaped [1, 2N] (or [1, N, 2]); None when N is dynamic.

    The one definition of "a landmark output" every backend opener applies, so a model that is
    not a landmark model (a feature map, a classifier with odd width) is refused by every command.
    """
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape]
    ok_batch = len(dims) >= 2 and dims[0] in (1, None)
    if ok_batch and len(dims) == 2:
        n = dims[1]
        if n is None:
            return None
        if n % 2 == 0 and n >= 2 * MIN_POINTS:
            return int(n) // 2
    if ok_batch and len(dims) == 3 and dims[2] == 2 and (dims[1] is None or dims[1] >= MIN_POINTS):
        return None if dims[1] is None else int(dims[1])
    raise ModelFileError(
        f"{where} is not a landmark model: its output has shape {[d if d else '?' for d in dims]}, a landmark model has one "
        f"[1, 2N] output (N >= {MIN_POINTS} points, x,y in 0..1 of the crop); pass a landmark model"
    )


def _open_torch(path: Path, preprocess: Preprocess | None, threads: int | None, given: Mapping[str, Any]) -> TorchPredictor:
    from . import stage0
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(path, preprocess=preprocess)
    if loaded.meta.source_format != stage0.OWN_FORMAT:
        # A foreign checkpoint leaves its activation (and maybe bn8 and preprocessing) open:
        # measured on synthetic faces by stage 0, never left at a default, and measured once,
        # under the flags' preprocessing (the activation is settled with the colours it is fed).
        loaded, _ = stage0.resolve(path, preprocess=preprocess, given=given)
    elif given:
        loaded.meta.preprocess = dataclasses.replace(loaded.meta.preprocess, **given)
    return TorchPredictor(path=path, preprocess=loaded.meta.preprocess, module=loaded.inference_model(),
                          num_points=loaded.meta.model.points, threads=threads, name=path.name)


def ort_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session, quiet, with the thread count asked for.

    ORT's telemetry is off for the whole process: the package sets ORT_DISABLE_TELEMETRY when it
    is imported (see pfld_export/__init__.py; ORT reads it only when it is first imported).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _open_onnx(path: Path, preprocess: Preprocess | None, threads: int | None, given: Mapping[str, Any]) -> OnnxPredictor:
    if preprocess is None:
        # A foreign ONNX without our metadata is opened with the defaults only by `open_predictor`,
        # which measures (or refuses) what the flags leave open before anything is predicted.
        meta = onnx_metadata(path)
        preprocess = Preprocess.from_dict(json.loads(meta[ONNX_META_PREPROCESS])) if ONNX_META_PREPROCESS in meta else Preprocess()
    preprocess = dataclasses.replace(preprocess, **given)
    try:
        sess = ort_session(path, threads)
    except Exception as e:  # onnxruntime's pybind errors (InvalidArgument, Fail, ...) share no useful base
        raise ModelFileError(f"{path} cannot be opened by ONNX Runtime ({_first_line(e)}); check the file or re-export it") from None
    inp = sess.get_inputs()[0]
    shape = inp.shape
    nhwc = len(shape) == 4 and shape[-1] == 3
    # Prefer an output named landmarks; PFLD-pytorch exports put the 28x28 feature first.
    outs = sess.get_outputs()
    out = next((o for o in outs if o.name == "landmarks"), None) or next(
        (o for o in outs if len(o.shape) == 2), outs[0]
    )
    npts = landmark_points(out.shape, f"{path} (output {out.name})") or get_layout(preprocess.layout).num_points
    return OnnxPredictor(path=path, preprocess=preprocess, session=sess, input_name=inp.name, output_name=out.name,
                         nhwc=nhwc, num_points=npts, name=path.name)


def _open_tflite(path: Path, preprocess: Preprocess | None, threads: int | None, given: Mapping[str, Any]) -> TFLitePredictor:
    side = read_sidecar(path)
    if preprocess is None:
        preprocess = Preprocess.from_dict(side["preprocess"]) if side and "preprocess" in side else Preprocess()
    preprocess = dataclasses.replace(preprocess, **given)
    Interpreter = tflite_interpreter_class()
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads or 1)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a loadable .tflite ({_first_line(e)}); re-run convert") from None
    ind, outd = interp.get_input_details()[0], interp.get_output_details()
    out = next((o for o in outd if len(o["shape"]) == 2), outd[0])
    npts = landmark_points(tuple(out["shape"]), f"{path} (output {out.get('name', '?')})")

    def qp(d: dict[str, Any]) -> QuantParams | None:
        if np.dtype(d["dtype"]).kind not in "iu":
            return None
        scale, zp = d["quantization"]
        return QuantParams(scale=float(scale), zero_point=int(zp), dtype=str(np.dtype(d["dtype"])))

    shape = tuple(ind["shape"])
    return TFLitePredictor(path=path, preprocess=preprocess, interpreter=interp,
                           num_points=npts or get_layout(preprocess.layout).num_points,
                           input_quant=qp(ind), output_quant=qp(out), nhwc=shape[-1] == 3, name=path.name,
                           _in_index=ind["index"], _out_index=out["index"], _in_dtype=np.dtype(ind["dtype"]).type)


_OPENERS: dict[str, Callable[[Path, Preprocess | None, int | None, Mapping[str, Any]], Predictor]] = {
    ".onnx": _open_onnx,
    ".tflite": _open_tflite,
    **{s: _open_torch for s in TORCH_SUFFIXES},
}


def open_predictor(path: str | os.PathLike[str], preprocess: Preprocess | None = None, threads: int | None = None,
                   overrides: dict[str, Any] | None = None, timing_only: bool = False) -> Predictor:
    """Open a checkpoint, `.onnx` or `.tflite` as a Predictor, once. `preprocess` replaces metadata;
    `overrides` (color / mean / std from flags, see `preprocess.preprocess_overrides`) replace
    fields of it. A foreign ONNX without our metadata has the fields the flags leave open measured
    on face crops (`stage0`) or is refused naming the flags; `timing_only` (benchmarks) skips that:
    latency does not depend on what the input values mean. A foreign checkpoint goes through stage 0
    once, under the flags' preprocessing."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model {p} does not exist; check the path")
    opener = _OPENERS.get(p.suffix.lower())
    if opener is None:
        raise UsageError(f"{p}: unknown model type {p.suffix!r}; use a checkpoint ({', '.join(TORCH_SUFFIXES)}), .onnx or .tflite")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    threads = check_threads(threads)
    pred = opener(p, preprocess, threads, given)
    check_landmark_model(pred)
    if (preprocess is None and not timing_only and p.suffix.lower() == ".onnx" and not {"color", "mean", "std"} <= set(given)
            and ONNX_META_PREPROCESS not in onnx_metadata(p)):
        from . import stage0  # looked up on the module: tests replace the measurement

        pred.preprocess = stage0.measure_preprocess(pred, given)[0]
        check_landmark_model(pred)
    return pred


def check_landmark_model(pred: Predictor) -> None:
    """Refuse a model whose answers are not landmarks: one probe face must give [1, N, 2] finite
    points near the crop. The shape half of the check is `landmark_points`, in every opener."""
    s = pred.preprocess.input_size
    try:
        pts = pred.predict(np.full((1, s, s, 3), 128, np.uint8))
    except UsageError:
        raise
    except Exception as e:  # a runtime failing on its first face: the file, not the user's input
        raise ModelFileError(f"{pred.name} fails on a {s}x{s} face ({_first_line(e)}); check the file or re-export it") from None
    limit = PLAUSIBLE_CROPS * s
    if pts.shape != (1, pred.num_points, 2) or not np.all(np.isfinite(pts)) or float(np.abs(pts).max()) > limit:
        got = "non-finite values" if not np.all(np.isfinite(pts)) else f"shape {list(pts.shape)}, largest |value| {float(np.abs(pts).max()):.3g} px"
        raise ModelFileError(f"{pred.name} is not a landmark model: on a probe face it answers {got}, not {pred.num_points} "
                             f"points near the {s}-px crop; pass a landmark model (or fix --mean/--std)")
