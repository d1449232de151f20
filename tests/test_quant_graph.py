"""quant/graph.py: calibration, selective quantization and float-op counting on real TFLite int8
kernels (the tiny network of conftest.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pfld_export.errors import UsageError
from pfld_export.export.validate import shift_stats
from pfld_export.quant.graph import PASSTHROUGH_OPS, Calibrated, float_op_count, predict_blob, quantize_calibrated


def test_calibrated_float_model_matches_keras_and_int8_moves_it(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    got = predict_blob(cal.blob, tiny["pre"], tiny["val"])  # the calibrated flatbuffer still runs in float
    assert np.abs(got - tiny["ref"]).max() < 1e-3
    full = predict_blob(cal.quantize(), tiny["pre"], tiny["val"])
    s = shift_stats(tiny["ref"], full)
    assert 0 < s.mean_px < 20
    # every compute op int8 in the plain model; ranges were recorded for every op output
    assert float_op_count(cal.quantize()) == {}
    assert all(o.tensor in cal.ranges for o in cal.ops)


def test_selective_quantization_keeps_denylisted_ops_float(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    fc = next(o for o in cal.ops if o.op == "FULLY_CONNECTED")
    blob = quantize_calibrated(cal.blob, [fc.tensor])
    assert float_op_count(blob) == {"FULLY_CONNECTED": 1}
    everything = [o.tensor for o in cal.ops]
    assert sum(float_op_count(cal.quantize(everything)).values()) == len(cal.ops)


def test_quantizable_ops_leave_data_movement_out_and_unknown_tensors_are_named(tiny: dict[str, Any]) -> None:
    cal: Calibrated = tiny["cal"]
    assert cal.quantizable and all(o.op not in PASSTHROUGH_OPS for o in cal.quantizable)
    with pytest.raises(UsageError, match="no op writes tensor 'nope'"):
        cal.op("nope")
    with pytest.raises(UsageError, match="I/O dtype 'int16'"):
        cal.quantize((), "int16")
