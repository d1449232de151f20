"""One `Predictor` for every backend: PyTorch checkpoint, ONNX, TFLite (float or int8 I/O).

    predict(crops: uint8 BGR [N, 112, 112, 3]) -> landmarks float32 [N, P, 2] in crop pixels

Evaluation, fidelity, calibration checks, benchmarks and `predict` use only this interface;
this module is the only place that knows which backend it is talking to.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from .errors import UsageError
from .layouts import get_layout
from .preprocess import Preprocess

ONNX_META_PREPROCESS = "pfld_export.preprocess"
ONNX_META_MODEL = "pfld_export.model"
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")


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


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def _open_torch(path: Path, preprocess: Preprocess | None, threads: int | None) -> TorchPredictor:
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(path, preprocess=preprocess)
    if loaded.meta.source_format != "pfld-export":
        # A foreign checkpoint leaves its activation (and maybe bn8 and preprocessing) open:
        # measured on synthetic faces by stage 0, never left at a default.
        from .stage0 import resolve

        loaded, _ = resolve(path, preprocess=preprocess)
    return TorchPredictor(path=path, preprocess=loaded.meta.preprocess, module=loaded.inference_model(),
                          num_points=loaded.meta.model.points, threads=threads, name=path.name)


def _open_onnx(path: Path, preprocess: Preprocess | None, threads: int | None) -> OnnxPredictor:
    import onnxruntime as ort

    meta = onnx_metadata(path)
    if preprocess is None:
        preprocess = Preprocess.from_dict(json.loads(meta[ONNX_META_PREPROCESS])) if ONNX_META_PREPROCESS in meta else Preprocess()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = inp.shape
    nhwc = len(shape) == 4 and shape[-1] == 3
    # Prefer an output named landmarks; PFLD-pytorch exports put the 28x28 feature first.
    outs = sess.get_outputs()
    out = next((o for o in outs if o.name == "landmarks"), None) or next(
        (o for o in outs if len(o.shape) == 2), outs[0]
    )
    npts = int(out.shape[-1]) // 2 if isinstance(out.shape[-1], int) else get_layout(preprocess.layout).num_points
    return OnnxPredictor(path=path, preprocess=preprocess, session=sess, input_name=inp.name, output_name=out.name,
                         nhwc=nhwc, num_points=npts, name=path.name)


def _open_tflite(path: Path, preprocess: Preprocess | None, threads: int | None) -> TFLitePredictor:
    side = read_sidecar(path)
    if preprocess is None:
        preprocess = Preprocess.from_dict(side["preprocess"]) if side and "preprocess" in side else Preprocess()
    Interpreter = tflite_interpreter_class()
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads or 1)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"{path} is not a loadable .tflite ({str(e).splitlines()[0]}); re-run convert") from None
    ind, outd = interp.get_input_details()[0], interp.get_output_details()
    out = next((o for o in outd if len(o["shape"]) == 2), outd[0])

    def qp(d: dict[str, Any]) -> QuantParams | None:
        if np.dtype(d["dtype"]).kind not in "iu":
            return None
        scale, zp = d["quantization"]
        return QuantParams(scale=float(scale), zero_point=int(zp), dtype=str(np.dtype(d["dtype"])))

    shape = tuple(ind["shape"])
    return TFLitePredictor(path=path, preprocess=preprocess, interpreter=interp, num_points=int(out["shape"][-1]) // 2,
                           input_quant=qp(ind), output_quant=qp(out), nhwc=shape[-1] == 3, name=path.name,
                           _in_index=ind["index"], _out_index=out["index"], _in_dtype=np.dtype(ind["dtype"]).type)


_OPENERS: dict[str, Callable[[Path, Preprocess | None, int | None], Predictor]] = {
    ".onnx": _open_onnx,
    ".tflite": _open_tflite,
    **{s: _open_torch for s in TORCH_SUFFIXES},
}


def open_predictor(path: str | os.PathLike[str], preprocess: Preprocess | None = None, threads: int | None = None) -> Predictor:
    """Open a checkpoint, `.onnx` or `.tflite` as a Predictor. `preprocess` overrides metadata."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model {p} does not exist; check the path")
    opener = _OPENERS.get(p.suffix.lower())
    if opener is None:
        raise UsageError(f"{p}: unknown model type {p.suffix!r}; use a checkpoint ({', '.join(TORCH_SUFFIXES)}), .onnx or .tflite")
    return opener(p, preprocess, threads)
