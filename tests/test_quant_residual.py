"""quant/residual.py: the mean-shape residual head on real TFLite int8 kernels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pfld_export.quant.graph import Calibrated, calibrate, predict_blob  # noqa: E402
from pfld_export.export.validate import shift_stats  # noqa: E402
from pfld_export.preprocess import Preprocess  # noqa: E402
from pfld_export.quant.residual import (  # noqa: E402
    SUFFIX, NoResidualHead, ResidualCalibrated, ResidualConfig, add_mean, find_head, residual_variants, with_residual,
)
from pfld_export.runtime import open_predictor, tflite_interpreter_class  # noqa: E402

from .conftest import smooth_crops  # noqa: E402

POINTS = 9


def _net(head: str) -> Callable[[Any], Any]:
    """PFLD in miniature (conv, depthwise, conv, two means, concat) with a landmark head: "fc"
    (FULLY_CONNECTED whose bias is a face-like mean shape in [0.15, 0.85]: a wide output range
    around small per-face moves), "fc+reshape" (the same, then [1, P, 2]) or "sigmoid"."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def const(*shape: int, scale: float = 1.0) -> Any:
        return tf.constant(rng.normal(0, scale, shape).astype(np.float32))

    w1, b1 = const(3, 3, 3, 8, scale=0.5), const(8, scale=0.1)
    w2, b2 = const(3, 3, 8, 1, scale=0.3), const(8, scale=0.1)
    w3, b3 = const(1, 1, 8, 16, scale=0.3), const(16, scale=0.1)
    w4, b4 = const(3, 3, 16, 4, scale=0.3), const(4, scale=0.1)
    wf = const(20, 2 * POINTS, scale=0.05)
    shape = tf.constant(rng.uniform(0.15, 0.85, 2 * POINTS).astype(np.float32))

    def net(x: Any) -> Any:
        a = tf.nn.relu(tf.nn.conv2d(x, w1, 4, "VALID") + b1)
        b = tf.nn.relu(tf.nn.depthwise_conv2d(a, w2, [1, 2, 2, 1], "VALID") + b2)
        c = tf.nn.conv2d(b, w3, 1, "VALID") + b3
        s1 = tf.reduce_mean(c, axis=[1, 2])
        s2 = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(c, w4, 2, "VALID") + b4), axis=[1, 2])
        y = tf.matmul(tf.concat([s1, s2], 1), wf) + shape
        if head == "sigmoid":
            return tf.sigmoid(y)
        return tf.reshape(y, (1, POINTS, 2)) if head == "fc+reshape" else y

    return net


def _calibrated(head: str, pre: Preprocess, calib: np.ndarray) -> Calibrated:
    import tensorflow as tf

    net = _net(head)
    spec = tf.TensorSpec((1, 112, 112, 3), tf.float32, name="input")
    func = tf.function(lambda x: {"landmarks": net(x)}, input_signature=[spec]).get_concrete_function()
    return calibrate(None, func, pre.apply(calib))


@pytest.fixture(scope="module")
def tiny() -> Iterator[dict[str, Any]]:
    pre = Preprocess()
    calib, val = smooth_crops(32, 1), smooth_crops(12, 2)
    cal = _calibrated("fc", pre, calib)
    res = with_residual(cal, pre.apply(calib))
    yield {"pre": pre, "calib": calib, "val": val, "cal": cal, "res": res,
           "ref": predict_blob(cal.blob, pre, val)}  # the calibrated flatbuffer runs in float


def _no_delegates() -> Any:
    import importlib

    cls = tflite_interpreter_class()
    return importlib.import_module(cls.__module__).OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def _outputs(blob: bytes) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """(output details, the serving signature's output details, op names) of a model, no
    delegate (XNNPACK would list its ops as one DELEGATE)."""
    interp = tflite_interpreter_class()(model_content=blob, experimental_op_resolver_type=_no_delegates())
    interp.allocate_tensors()
    sig = interp.get_signature_runner().get_output_details() if interp.get_signature_list() else {}
    return interp.get_output_details(), sig, [o["op_name"] for o in interp._get_ops_details()]


def test_residual_head_is_closer_to_float_than_plain_int8(tiny: dict[str, Any]) -> None:
    cal, res = tiny["cal"], tiny["res"]
    assert isinstance(res, ResidualCalibrated) and res.method == "minmax" + SUFFIX
    plain_q, res_q = cal.quantize(), res.quantize()
    plain = predict_blob(plain_q, tiny["pre"], tiny["val"])
    got = predict_blob(res_q, tiny["pre"], tiny["val"])
    s_plain, s_res = shift_stats(tiny["ref"], plain), shift_stats(tiny["ref"], got)
    # The output spans [0, ~0.9] of the crop, the residual a small part of it: a finer step.
    step_plain = _output_scale(plain_q)
    step_res = _output_scale(res_q, before_add=True)
    assert step_res < 0.5 * step_plain, (step_res, step_plain)
    assert s_res.mean_px < 0.8 * s_plain.mean_px, (s_res, s_plain)
    # Every tensor before the FC output is the same int8: the two differ only by their own
    # output rounding (half a step each), nothing else.
    assert np.abs(got - plain).max() / 112 <= 0.5 * (step_plain + step_res) + 1e-5


def _output_scale(blob: bytes, before_add: bool = False) -> float:
    """Scale of the int8 tensor the float output is dequantized from."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    sg = model.subgraphs[0]
    producer = {int(t): op for op in sg.operators for t in op.outputs}
    t = int(sg.outputs[0])
    if before_add:
        t = int(producer[t].inputs[0])  # the ADD's first input: the DEQUANTIZE output
    while sg.tensors[t].type != 9:  # walk back to the int8 tensor (TensorType.INT8 = 9)
        t = int(producer[t].inputs[0])
    return float(sg.tensors[t].quantization.scale[0])


@pytest.mark.parametrize("head", ["fc", "fc+reshape"])
def test_output_name_shape_and_signature_are_unchanged(tiny: dict[str, Any], head: str) -> None:
    pre, calib = tiny["pre"], tiny["calib"]
    cal = tiny["cal"] if head == "fc" else _calibrated(head, pre, calib)
    res = tiny["res"] if head == "fc" else with_residual(cal, pre.apply(calib))
    # The converter's calibrated models carry no signature; a shipped model may: give it one.
    plain_q = _with_signature(cal.quantize())
    (before,), sig_before, ops_before = _outputs(plain_q)
    (after,), sig_after, ops_after = _outputs(add_mean(plain_q, res.mean))
    assert after["name"] == before["name"] and list(after["shape"]) == list(before["shape"])
    assert np.dtype(after["dtype"]) == np.float32
    assert _outputs(res.quantize())[2] == ops_after  # what the residual model is made of
    assert sig_after.keys() == sig_before.keys() == {"landmarks"}
    assert list(sig_after["landmarks"]["shape"]) == list(sig_before["landmarks"]["shape"])
    assert sig_after["landmarks"]["index"] == after["index"]  # the signature reads the sum, not the residual
    # One op more, last: a float ADD of the DEQUANTIZE output and the float mean shape.
    assert ops_after[:-1] == ops_before and ops_after[-1] == "ADD" and ops_before[-1] == "DEQUANTIZE"
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(res.quantize()))
    sg = model.subgraphs[0]
    add = sg.operators[-1]
    const = sg.tensors[int(add.inputs[1])]
    assert const.type == 0 and sg.tensors[int(add.outputs[0])].type == 0  # TensorType.FLOAT32
    np.testing.assert_array_equal(np.frombuffer(bytes(model.buffers[const.buffer].data), "<f4"), res.mean)
    # The mean is the float model's own mean output over the calibration crops.
    mean = predict_blob(cal.blob, pre, calib).reshape(len(calib), -1).mean(0) / 112
    np.testing.assert_allclose(res.mean, mean, atol=1e-5)


def _with_signature(blob: bytes) -> bytes:
    """`blob` with a serving signature naming its input and output."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    sg = model.subgraphs[0]
    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = b"serving_default", 0
    sig.inputs, sig.outputs = [schema.TensorMapT()], [schema.TensorMapT()]
    sig.inputs[0].name, sig.inputs[0].tensorIndex = b"input", int(sg.inputs[0])
    sig.outputs[0].name, sig.outputs[0].tensorIndex = b"landmarks", int(sg.outputs[0])
    model.signatureDefs = [sig]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_headroom_widens_the_residual_range(tiny: dict[str, Any]) -> None:
    # A held-out face past the calibration faces' extremes must not be clipped: the range is
    # the measured residual span plus `headroom` of it on each side (0 must stay inside).
    pre, calib = tiny["pre"], tiny["calib"]
    tight = with_residual(tiny["cal"], pre.apply(calib), ResidualConfig(headroom=0.0))
    fc = next(o.tensor for o in tiny["cal"].ops if o.op == "FULLY_CONNECTED")
    (lo0, hi0), (lo, hi) = tight.ranges[fc], tiny["res"].ranges[fc]
    assert lo0 < 0 < hi0
    pad = ResidualConfig().headroom * (hi0 - lo0)
    assert ResidualConfig().headroom > 0 and lo == pytest.approx(lo0 - pad) and hi == pytest.approx(hi0 + pad)


def test_int8_io_quantizes_the_unchanged_candidate(tiny: dict[str, Any]) -> None:
    cal, res = tiny["cal"], tiny["res"]
    assert res.quantize((), "int8") == cal.quantize((), "int8")
    (out,), _, ops = _outputs(res.quantize((), "int8"))
    assert np.dtype(out["dtype"]) == np.int8 and "ADD" not in ops


def test_float_ops_keep_the_mean_added_back(tiny: dict[str, Any]) -> None:
    # With the FC itself kept float (the mixed search may do that) the sum is exact again.
    cal, res = tiny["cal"], tiny["res"]
    fc = next(o.tensor for o in cal.ops if o.op == "FULLY_CONNECTED")
    a = predict_blob(cal.quantize(cal.unit(fc)), tiny["pre"], tiny["val"])
    b = predict_blob(res.quantize(res.unit(fc)), tiny["pre"], tiny["val"])
    assert np.abs(a - b).max() < 1e-3


def test_a_graph_not_ending_in_fc_is_skipped(tiny: dict[str, Any]) -> None:
    from tensorflow.lite.tools import flatbuffer_utils

    pre, calib = tiny["pre"], tiny["calib"]
    cal = _calibrated("sigmoid", pre, calib)
    with pytest.raises(NoResidualHead, match="LOGISTIC"):
        find_head(flatbuffer_utils.convert_bytearray_to_object(bytearray(cal.blob)))
    notes: list[str] = []
    assert residual_variants({"plain": cal}, pre.apply(calib), notes.append) == {}
    assert len(notes) == 1 and "residual skipped" in notes[0]
    # Where it applies, every candidate gets its variant.
    got = residual_variants({"plain": tiny["cal"]}, pre.apply(calib), notes.append)
    assert list(got) == ["plain" + SUFFIX] and len(notes) == 1


def test_runs_with_the_predictor_and_without_xnnpack_alike(tiny: dict[str, Any], tmp_path: Path) -> None:
    blob = tiny["res"].quantize()
    path = tmp_path / "residual.tflite"
    path.write_bytes(blob)
    with_xnnpack = open_predictor(path, preprocess=tiny["pre"]).predict(tiny["val"])
    interp = tflite_interpreter_class()(model_content=blob, experimental_op_resolver_type=_no_delegates())
    interp.allocate_tensors()
    x = tiny["pre"].apply(tiny["val"])
    plain = []
    for k in range(len(x)):
        interp.set_tensor(interp.get_input_details()[0]["index"], x[k : k + 1])
        interp.invoke()
        plain.append(interp.get_tensor(interp.get_output_details()[0]["index"]).reshape(-1))
    assert with_xnnpack.shape == (len(x), POINTS, 2)
    # XNNPACK's int8 kernels may round an accumulator the other way than the reference kernels
    # (plain int8 does the same); the float ADD must add nothing to that: the two differ by
    # whole steps of the residual's int8 scale (a few: the finer the step, the more of them),
    # together less than one step of plain int8's output.
    step = _output_scale(blob, before_add=True)
    steps = (with_xnnpack.reshape(len(x), -1) / 112 - np.stack(plain)) / step
    assert np.abs(steps - np.round(steps)).max() * step < 1e-5
    assert np.abs(steps).max() * step < _output_scale(tiny["cal"].quantize())
