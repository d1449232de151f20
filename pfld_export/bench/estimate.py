"""An ESTIMATE of per-face latency on a Snapdragon 845 big core, from MACs alone.

    sd845_estimate(macs, precision, threads=1) -> Estimate(ms, low_ms, high_ms, method, reference)

Use it when no phone is at hand; a measurement (`pfld-export bench-arm`) always wins. It is
arithmetic, not a model of the chip:

    ms = macs / (throughput[precision] * thread_speedup(threads))

with the throughput calibrated on one published-scale reference: MobileNetV2 1.0 @224
(300 M MACs, also depthwise-separable inverted residuals like PFLD's backbone) runs in about
41 ms fp32 on ONE Snapdragon 845 big core (Cortex-A75 class, 2.8 GHz) with a mainstream mobile
runtime (TFLite/XNNPACK class), i.e. about 7.3 GMAC/s. Full-int8 kernels are 1.5-1.9x faster
than fp32 on that core (NEON int8 dot-product kernels vs fp32 FMA).

The band is wide on purpose: small 112x112 networks such as PFLD use a core less efficiently
than MobileNetV2 at 224 (tiny feature maps, per-op overhead), runtimes differ by tens of
percent, and phones throttle. Treat `low_ms..high_ms` as the plausible range, `ms` as a
midpoint.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

Precision = Literal["fp32", "int8"]

# Reference measurement the throughput is derived from (see the module docstring).
REFERENCE_MODEL = "MobileNetV2 1.0 @224"
REFERENCE_MACS = 300_000_000
REFERENCE_FP32_MS = 41.0
FP32_GMACS = REFERENCE_MACS / (REFERENCE_FP32_MS * 1e-3) / 1e9  # ~7.3 GMAC/s on one A75-class core

# Throughput band per precision, GMAC/s: (low, point, high). fp32: the reference +/- the spread
# of mobile runtimes and the lower efficiency of small inputs; int8: fp32 x (1.5, 1.7, 1.9).
FP32_BAND = (5.0, FP32_GMACS, 9.5)
INT8_SPEEDUP = (1.5, 1.7, 1.9)
THROUGHPUT_GMACS: dict[str, tuple[float, float, float]] = {
    "fp32": FP32_BAND,
    "int8": tuple(b * s for b, s in zip(FP32_BAND, INT8_SPEEDUP)),  # type: ignore[dict-item]
}

# SD845 has 4 big (Cortex-A75) cores; beyond 4 threads work lands on the little A55s.
BIG_CORES = 4
# Extra speed per additional big-core thread, (low, point, high): a PFLD-sized graph splits
# poorly (small tensors, a barrier per op), so 4 threads give ~2.2x, not 4x.
THREAD_GAIN = (0.4, 0.6, 0.8)


@dataclass(frozen=True)
class Estimate:
    """An estimated latency (NOT a measurement) with its plausible range and how it was made."""

    ms: float
    low_ms: float
    high_ms: float
    precision: str
    threads: int
    macs: int
    method: str
    reference: str
    is_estimate: bool = True

    def label(self) -> str:
        """One line for tables: `~5.5 ms (est. 4.0-8.0)`."""
        return f"~{self.ms:.2g} ms (est. {self.low_ms:.2g}-{self.high_ms:.2g})"


def thread_speedup(threads: int) -> tuple[float, float, float]:
    """(low, point, high) speed-up of `threads` big-core threads over one."""
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    if threads > BIG_CORES:
        raise UsageError(
            f"threads={threads}: a Snapdragon 845 has {BIG_CORES} big cores and the estimate covers only those; use 1-{BIG_CORES}"
        )
    return tuple(1.0 + (threads - 1) * g for g in THREAD_GAIN)  # type: ignore[return-value]


def sd845_estimate(macs: int, precision: Precision = "fp32", threads: int = 1) -> Estimate:
    """Estimate latency on Snapdragon 845 big core(s) from `macs` (multiply-accumulates per face).

    `precision` is "fp32" (also the right choice for fp16-weight models, which XNNPACK runs in
    fp32 on this core) or "int8" (full-integer model). Raises UsageError on bad input.
    """
    # numbers.Integral also admits numpy integers (MAC counters often return them).
    if isinstance(macs, bool) or not isinstance(macs, numbers.Integral) or macs <= 0:
        raise UsageError(f"macs must be a positive integer (multiply-accumulates per inference), got {macs!r}")
    if precision not in THROUGHPUT_GMACS:
        raise UsageError(f"precision must be one of {sorted(THROUGHPUT_GMACS)}, got {precision!r}")
    t_low, t_mid, t_high = THROUGHPUT_GMACS[precision]
    s_low, s_mid, s_high = thread_speedup(threads)
    to_ms = lambda gmacs: macs / (gmacs * 1e9) * 1e3  # noqa: E731
    method = (
        f"MACs / throughput: {macs / 1e6:.1f} M MACs at {t_mid:.1f} GMAC/s {precision} per A75-class core"
        f" (band {t_low:.1f}-{t_high:.1f}), x{s_mid:.2f} for {threads} thread(s) (band {s_low:.2f}-{s_high:.2f});"
        " an estimate, not a measurement"
    )
    reference = (
        f"{REFERENCE_MODEL}: {REFERENCE_MACS / 1e6:.0f} M MACs ~ {REFERENCE_FP32_MS:.0f} ms fp32 on one Snapdragon 845 "
        f"big core (Cortex-A75, mainstream mobile runtime) = {FP32_GMACS:.1f} GMAC/s; int8 {INT8_SPEEDUP[0]}-{INT8_SPEEDUP[2]}x faster"
    )
    macs = int(macs)
    return Estimate(
        ms=to_ms(t_mid * s_mid),
        low_ms=to_ms(t_high * s_high),
        high_ms=to_ms(t_low * s_low),
        precision=precision,
        threads=threads,
        macs=macs,
        method=method,
        reference=reference,
    )
