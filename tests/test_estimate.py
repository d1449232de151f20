"""sd845_estimate arithmetic: calibration point, precision, threads, band, bad input."""

from __future__ import annotations

import pytest

from pfld_export.bench.estimate import FP32_GMACS, INT8_SPEEDUP, sd845_estimate, thread_speedup
from pfld_export.errors import UsageError


def test_reference_point_reproduces_mobilenetv2() -> None:
    e = sd845_estimate(300_000_000, "fp32")
    assert e.ms == pytest.approx(41.0)  # the calibration measurement itself
    assert FP32_GMACS == pytest.approx(7.317, abs=1e-3)
    assert e.low_ms < e.ms < e.high_ms
    assert e.low_ms == pytest.approx(300e6 / 9.5e9 * 1e3) and e.high_ms == pytest.approx(60.0)
    assert e.is_estimate and "estimate" in e.method and "MobileNetV2" in e.reference and "845" in e.reference


def test_linear_in_macs_and_int8_faster() -> None:
    a, b = sd845_estimate(10_000_000, "fp32"), sd845_estimate(40_000_000, "fp32")
    assert b.ms == pytest.approx(4 * a.ms) and b.high_ms == pytest.approx(4 * a.high_ms)
    i = sd845_estimate(40_000_000, "int8")
    assert b.ms / i.ms == pytest.approx(INT8_SPEEDUP[1])
    # int8's band is the fp32 band scaled by the 1.5-1.9x speed-up range.
    assert b.low_ms / i.low_ms == pytest.approx(INT8_SPEEDUP[2]) and b.high_ms / i.high_ms == pytest.approx(INT8_SPEEDUP[0])


def test_threads_speed_up_sublinearly_and_stop_at_big_cores() -> None:
    one, four = sd845_estimate(50_000_000, "int8", 1), sd845_estimate(50_000_000, "int8", 4)
    assert 1.5 < one.ms / four.ms < 4.0
    assert thread_speedup(1) == (1.0, 1.0, 1.0)
    low, mid, high = thread_speedup(4)
    assert low < mid < high <= 4
    with pytest.raises(UsageError, match="4 big cores"):
        sd845_estimate(50_000_000, "fp32", 8)


@pytest.mark.parametrize("macs, precision, threads", [(0, "fp32", 1), (-5, "fp32", 1), (1.5e6, "fp32", 1), (True, "fp32", 1),
                                                       (10, "fp16", 1), (10, "int8", 0)])
def test_bad_input_raises_usage_error(macs: object, precision: str, threads: int) -> None:
    with pytest.raises(UsageError):
        sd845_estimate(macs, precision, threads)  # type: ignore[arg-type]


def test_label_is_marked_as_estimate() -> None:
    assert sd845_estimate(300_000_000, "fp32").label() == "~41 ms (est. 32-60)"
