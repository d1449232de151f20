"""An ESTIMATE of per-face latency on a Snapdragon 845 big core, from instructions or MACs.

    sd845_estimate_from_instructions(instructions, source="aarch64"|"x86-avx2", threads=1) -> Estimate
    sd845_estimate(macs, precision, threads=1) -> Estimate(ms, low_ms, high_ms, method, reference)

Both are estimates, not measurements: `make bench-arm` on a phone is the measurement. The
instruction count is exact; the clock and especially the IPC are assumptions, hence the band.

From instructions (preferred for int8, where counts exist; see `bench.cost`):

    ms = aarch64 instructions per invoke / (IPC * 2.8 GHz)

`SD845_GHZ` is the big cores' (Kryo 385 Gold, Cortex-A75 derivative) top clock. `IPC`
(instructions per cycle, low/point/high) is the assumption: XNNPACK's int8 kernels without
dot-product (the SD845 has none) are SMLAL-heavy NEON, and an A75 has two 64-bit ASIMD pipes,
so a 128-bit multiply-accumulate (int8 SMLAL or fp32 FMLA) issues about once a cycle; loads,
address arithmetic and the per-op scalar code issue alongside. Hence ~1.2, band 0.8-1.8 (memory
stalls on 1X's larger tensors pull it down, small cache-resident 0.25X tensors up). The aarch64
counts come from the ARM cost kit (`pfld-export cost --arm`: qemu-user, -cpu cortex-a53, no
dot-product, LiteRT 2.1.6). Counts taken on x86 under valgrind (AVX2 kernels, LiteRT 2.3.0)
are converted first with `X86_TO_AARCH64[precision]`: the ratio of the two counts of the same
model, measured on both reference models (benchmarks/README.md, 2026-12-02).

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
    instructions: int = 0  # what an instruction-based estimate started from (0: made from MACs)

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


# --------------------------------------------------------------------------------------------
# From instructions (see the module docstring for the assumption behind each constant)

SD845_GHZ = 2.8
IPC = (0.8, 1.2, 1.8)  # (low, point, high) aarch64 instructions per cycle on one A75-class core
# aarch64 (ARM cost kit) / x86 (callgrind) instructions per invoke of the same model, measured
# 2026-12-02 on the gate's models: int8 0.25X 12.55 M / 11.96 M = 1.05, 1X 114.5 M / 102.5 M =
# 1.12; fp32 0.25X 12.02 M / 9.14 M = 1.32, 1X 132.0 M / 105.5 M = 1.25. (low, point, high)
# spans both models.
X86_TO_AARCH64: dict[str, tuple[float, float, float]] = {"int8": (1.04, 1.08, 1.13), "fp32": (1.24, 1.28, 1.33)}
InstructionSource = Literal["aarch64", "x86-avx2"]


def sd845_estimate_from_instructions(instructions: int, source: InstructionSource = "aarch64", threads: int = 1,
                                     precision: Precision = "int8") -> Estimate:
    """Estimate latency on Snapdragon 845 big core(s) from instructions per invoke.

    `source` says where the count was taken: "aarch64" (the ARM cost kit, a core without
    dot-product, used as is) or "x86-avx2" (`pfld-export cost` on x86, converted with
    `X86_TO_AARCH64[precision]`). Raises UsageError on bad input.
    """
    if isinstance(instructions, bool) or not isinstance(instructions, numbers.Integral) or instructions <= 0:
        raise UsageError(f"instructions must be a positive integer (instructions per invoke), got {instructions!r}")
    if source not in ("aarch64", "x86-avx2"):
        raise UsageError(f"source must be 'aarch64' or 'x86-avx2', got {source!r}")
    if precision not in THROUGHPUT_GMACS:
        raise UsageError(f"precision must be one of {sorted(THROUGHPUT_GMACS)}, got {precision!r}")
    k = X86_TO_AARCH64[precision] if source == "x86-avx2" else (1.0, 1.0, 1.0)
    s_low, s_mid, s_high = thread_speedup(threads)
    n = int(instructions)
    to_ms = lambda arm, ipc, speed: arm / (ipc * SD845_GHZ * 1e9 * speed) * 1e3  # noqa: E731
    arm_mid = n * k[1]
    method = (
        f"instructions / (IPC x clock): {n / 1e6:.1f} M {source} instructions"
        + (f" x {k[1]:.2f} (band {k[0]:.2f}-{k[2]:.2f}) = {arm_mid / 1e6:.1f} M aarch64" if source != "aarch64" else "")
        + f" at IPC {IPC[1]} (band {IPC[0]}-{IPC[2]}) x {SD845_GHZ} GHz, x{s_mid:.2f} for {threads} thread(s);"
        " an estimate, not a measurement"
    )
    reference = (
        f"Snapdragon 845 big core (Kryo 385 Gold, Cortex-A75 class, {SD845_GHZ} GHz, no dot-product); assumed IPC "
        f"{IPC[0]}-{IPC[2]} for XNNPACK's NEON kernels without dot-product (two 64-bit ASIMD pipes)"
        + (f"; x86 AVX2 {precision} counts x {k[0]}-{k[2]} to aarch64" if source != "aarch64" else "")
    )
    return Estimate(
        ms=to_ms(arm_mid, IPC[1], s_mid),
        low_ms=to_ms(n * k[0], IPC[2], s_high),
        high_ms=to_ms(n * k[2], IPC[0], s_low),
        precision=precision,
        threads=threads,
        macs=0,
        method=method,
        instructions=n,
        reference=reference,
    )
