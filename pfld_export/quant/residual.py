"""The mean-shape residual head: the landmark FC predicts `y - m`, and `m` is added back in float.

PFLD's landmarks leave the network as one int8 tensor (the FULLY_CONNECTED output). Its range
must hold 0 and spans about [0, 1] of the crop, so one int8 step is 0.45 px at 112 px and
rounding alone costs a large part of the 0.25 px goal. The residual from the mean shape `m`
spans a few tenths of the crop around 0, so its int8 step is several times finer.

The TFLite converter folds FC + ADD(const) into the FC bias, so this is done around the
quantizer, on the calibrated float flatbuffer (`Calibrated`):

1. `m` is the mean of the float model's own output over the calibration inputs (no labels);
2. `m` is written out of the FC bias (`bias -= m`), and the FC output (with every data-movement
   op after it) gets the range the residual measured on the same inputs;
3. the converter quantizes that as usual;
4. in the float-I/O model, an ADD with the float constant `m` after the final DEQUANTIZE takes
   over the output's name, shape and signature entry, so every reader of the model is unaffected.

An int8-I/O model (full-int8) has no float to add `m` in: it is quantized from the unchanged
calibration, since requantizing the sum brings back the output's coarse step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .graph import Calibrated, flatbuffer_bytes, flatbuffer_object, quantize_calibrated
from .recipes import RESIDUAL_SUFFIX

Progress = Callable[[str], None]
SUFFIX = RESIDUAL_SUFFIX  # appended to a candidate's method name
# Ops between the FC and the output that keep the values' flat order: `m` measured at the output
# is then `m` of the FC output too. (TRANSPOSE reorders values and is not followed.)
FLAT_ORDER_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "QUANTIZE", "DEQUANTIZE"})


class NoResidualHead(Exception):
    """The model's output does not come from a FULLY_CONNECTED with a float bias (through
    data-movement ops only): the residual head does not apply. The message says what was found."""


@dataclass(frozen=True)
class ResidualConfig:
    """How the residual's int8 range is set."""

    # Fraction of the measured residual span added on each side: a face beyond the calibration
    # faces' extremes is then still inside the range instead of clipped (a clipped landmark
    # moves by the overshoot), at the cost of a proportionally coarser step. Without it, the
    # 17-point fixture's held-out max shift went from 2.67 to 5.12 px (benchmarks/int8_fidelity.md).
    headroom: float = 0.25


@dataclass(frozen=True)
class Head:
    """Where the landmarks come from in a flatbuffer (subgraph 0)."""

    fc: int  # operator index of the FULLY_CONNECTED
    bias: int  # tensor index of its bias
    chain: tuple[int, ...]  # tensors from the FC output to the graph output, in order


@dataclass
class ResidualCalibrated(Calibrated):
    """A `Calibrated` whose FC predicts the residual from `mean`; `quantize` adds `mean` back
    for float I/O and quantizes `base` (the unchanged calibration) for int8 I/O."""

    base: Calibrated | None = None
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def quantize(self, float_ops: Iterable[str] = (), io_dtype: str = "float32") -> bytes:
        if io_dtype != "float32" and self.base is not None:
            return self.base.quantize(float_ops, io_dtype)
        return add_mean(quantize_calibrated(self.blob, float_ops, io_dtype), self.mean)


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _op_name(model: Any, op: Any) -> str:
    schema = _schema()
    code = model.operatorCodes[op.opcodeIndex]
    c = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))  # codes past 127 live in builtinCode only
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(c, f"op {c}")


def find_head(model: Any) -> Head:
    """The FC behind the (single) graph output of a flatbuffer object, through data movement."""
    sg = model.subgraphs[0]
    if len(sg.outputs) != 1:
        raise NoResidualHead(f"the model has {len(sg.outputs)} outputs, not one landmark output")
    producer = {int(t): k for k, op in enumerate(sg.operators) for t in op.outputs}
    chain = [int(sg.outputs[0])]
    while True:
        k = producer.get(chain[0])
        if k is None:
            raise NoResidualHead("the model's output is not computed by any op")
        op = sg.operators[k]
        name = _op_name(model, op)
        if name == "FULLY_CONNECTED":
            break
        if name not in FLAT_ORDER_OPS:
            raise NoResidualHead(f"the landmark output comes from {name}, not from a FULLY_CONNECTED")
        chain.insert(0, int(op.inputs[0]))
    schema = _schema()
    if len(op.inputs) < 3 or int(op.inputs[2]) < 0:
        raise NoResidualHead("the landmark FULLY_CONNECTED has no bias to hold the mean shape")
    bias = int(op.inputs[2])
    if sg.tensors[bias].type != schema.TensorType.FLOAT32 or not _buffer_data(model, bias).size:
        raise NoResidualHead("the landmark FULLY_CONNECTED's bias is not a float constant")
    return Head(fc=k, bias=bias, chain=tuple(chain))


def _buffer_data(model: Any, tensor: int) -> np.ndarray:
    data = model.buffers[model.subgraphs[0].tensors[tensor].buffer].data
    return np.zeros(0, np.uint8) if data is None else np.asarray(data, np.uint8)


def float_outputs(blob: bytes, inputs: np.ndarray) -> np.ndarray:
    """The model's output [len(inputs), values] for float NHWC `inputs` (the default TFLite kernels)."""
    from ..runtime import tflite_interpreter_class

    interp = tflite_interpreter_class()(model_content=blob, num_threads=1)
    interp.allocate_tensors()
    i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    out = []
    for k in range(len(inputs)):
        interp.set_tensor(i, np.ascontiguousarray(inputs[k : k + 1], np.float32))
        interp.invoke()
        out.append(np.asarray(interp.get_tensor(o), np.float32).reshape(-1))
    return np.stack(out)


def with_residual(cal: Calibrated, inputs: np.ndarray, cfg: ResidualConfig = ResidualConfig()) -> ResidualCalibrated:
    """`cal` with its landmark FC rewritten to predict the residual from the float model's mean
    output over `inputs` (float NHWC, the calibration inputs); raises NoResidualHead."""
    model = flatbuffer_object(cal.blob)
    head = find_head(model)
    y = float_outputs(cal.blob, inputs)
    mean = y.mean(0).astype(np.float32)
    bias = _buffer_data(model, head.bias).view(np.float32)
    if bias.size != mean.size:
        raise NoResidualHead(f"the FC bias has {bias.size} values for {mean.size} outputs")
    r = y - mean
    lo, hi = float(r.min()), float(r.max())
    pad = cfg.headroom * (hi - lo)
    lo, hi = min(lo - pad, 0.0), max(hi + pad, 0.0)
    _set_bias(model, head.bias, (bias - mean).astype(np.float32))
    sg = model.subgraphs[0]
    ranges = dict(cal.ranges)
    for t in head.chain:
        q = sg.tensors[t].quantization
        if q is not None and q.min is not None and len(q.min):
            q.min, q.max = [lo], [hi]
        ranges[_name(sg.tensors[t])] = (lo, hi)
    return ResidualCalibrated(blob=flatbuffer_bytes(model), ops=cal.ops, method=cal.method + SUFFIX, faces=cal.faces,
                              ranges=ranges, base=cal, mean=mean)


def _name(t: Any) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else str(t.name)


def _set_bias(model: Any, tensor: int, values: np.ndarray) -> None:
    """Write `values` as the tensor's data, in a buffer of its own if another tensor shares it."""
    schema = _schema()
    t = model.subgraphs[0].tensors[tensor]
    shared = sum(x.buffer == t.buffer for sg in model.subgraphs for x in sg.tensors) > 1
    if shared:
        model.buffers.append(schema.BufferT())
        t.buffer = len(model.buffers) - 1
    model.buffers[t.buffer].data = np.frombuffer(values.astype("<f4").tobytes(), np.uint8).copy()


def add_mean(blob: bytes, mean: np.ndarray) -> bytes:
    """Append `output + mean` (a float ADD) to a model with a float output; the sum takes over
    the output's name, shape, graph output and signature entries."""
    schema = _schema()
    model = flatbuffer_object(blob)
    sg = model.subgraphs[0]
    old = int(sg.outputs[0])
    t = sg.tensors[old]
    if t.type != schema.TensorType.FLOAT32:
        raise NoResidualHead("the model's output is not float: the mean shape has no float tensor to be added to")
    if int(np.prod(t.shape)) != mean.size:
        raise NoResidualHead(f"the output has {int(np.prod(t.shape))} values for a mean shape of {mean.size}")
    name = _name(t)
    model.buffers.append(schema.BufferT())
    model.buffers[-1].data = np.frombuffer(mean.astype("<f4").tobytes(), np.uint8).copy()
    const = _tensor(t, f"{name}/mean_shape", len(model.buffers) - 1)
    model.buffers.append(schema.BufferT())  # an empty buffer: the sum is computed, not stored
    out = _tensor(t, name, len(model.buffers) - 1)
    t.name = f"{name}/residual".encode()
    sg.tensors += [const, out]
    c, s = len(sg.tensors) - 2, len(sg.tensors) - 1
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(model, schema.BuiltinOperator.ADD)
    op.inputs, op.outputs = [old, c], [s]
    op.builtinOptionsType = schema.BuiltinOptions.AddOptions
    op.builtinOptions = schema.AddOptionsT()
    op.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.NONE
    sg.operators.append(op)
    sg.outputs = [s if int(i) == old else int(i) for i in sg.outputs]
    for sig in model.signatureDefs or []:
        for m in sig.outputs or []:
            if int(m.tensorIndex) == old:
                m.tensorIndex = s
    return flatbuffer_bytes(model)


def _tensor(like: Any, name: str, buffer: int) -> Any:
    schema = _schema()
    t = schema.TensorT()
    t.shape = np.asarray(like.shape, np.int32).copy()
    if like.shapeSignature is not None:
        t.shapeSignature = np.asarray(like.shapeSignature, np.int32).copy()
    t.type, t.name, t.buffer = schema.TensorType.FLOAT32, name.encode(), buffer
    return t


def _opcode(model: Any, builtin: int) -> int:
    """Index of the builtin op's code in the model, added when missing."""
    schema = _schema()
    for k, code in enumerate(model.operatorCodes):
        if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == builtin:
            return k
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def residual_variants(cals: Mapping[str, Calibrated], inputs: np.ndarray, progress: Progress | None = None,
                      cfg: ResidualConfig = ResidualConfig()) -> dict[str, Calibrated]:
    """`X+residual` for every calibration `X` (empty, with a note, where the head does not apply)."""
    out: dict[str, Calibrated] = {}
    for name, cal in cals.items():
        try:
            out[name + SUFFIX] = with_residual(cal, inputs, cfg)
        except NoResidualHead as e:
            if progress:
                progress(f"mean-shape residual skipped: {e}")
            return {}
    return out
