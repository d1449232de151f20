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


def test_instruction_estimate_arithmetic_and_x86_conversion() -> None:
    from pfld_export.bench.estimate import IPC, SD845_GHZ, X86_TO_AARCH64, sd845_estimate_from_instructions

    arm = sd845_estimate_from_instructions(84_000_000, "aarch64")
    assert arm.ms == pytest.approx(84e6 / (IPC[1] * SD845_GHZ * 1e9) * 1e3)  # 25 ms: 84 M at 1.2 IPC, 2.8 GHz
    assert arm.low_ms == pytest.approx(84e6 / (IPC[2] * SD845_GHZ * 1e9) * 1e3)
    assert arm.high_ms == pytest.approx(84e6 / (IPC[0] * SD845_GHZ * 1e9) * 1e3)
    assert arm.instructions == 84_000_000 and arm.is_estimate and "not a measurement" in arm.method
    x86 = sd845_estimate_from_instructions(100_000_000, "x86-avx2")
    assert x86.ms == pytest.approx(sd845_estimate_from_instructions(int(100e6 * X86_TO_AARCH64["int8"][1]), "aarch64").ms)
    fp32 = sd845_estimate_from_instructions(100_000_000, "x86-avx2", precision="fp32")
    assert fp32.ms / x86.ms == pytest.approx(X86_TO_AARCH64["fp32"][1] / X86_TO_AARCH64["int8"][1])  # AVX2 is 8 floats wide
    assert x86.low_ms < x86.ms < x86.high_ms and "x86-avx2" in x86.method and "dot-product" in x86.reference
    four = sd845_estimate_from_instructions(84_000_000, "aarch64", threads=4)
    assert arm.ms / four.ms == pytest.approx(thread_speedup(4)[1])


@pytest.mark.parametrize("instructions,source,precision", [(0, "aarch64", "int8"), (1.5e6, "aarch64", "int8"),
                                                           (10**6, "arm", "int8"), (10**6, "x86-avx2", "fp16")])
def test_instruction_estimate_bad_input(instructions: object, source: str, precision: str) -> None:
    from pfld_export.bench.estimate import sd845_estimate_from_instructions

    with pytest.raises(UsageError):
        sd845_estimate_from_instructions(instructions, source, 1, precision)  # type: ignore[arg-type]
