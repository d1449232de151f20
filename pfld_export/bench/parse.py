"""Read TensorFlow Lite `benchmark_model` output in every dialect it has been seen in.

    parse_benchmark_output(text) -> BenchmarkModelOutput

Dialects handled (samples in ../shared/fixtures/benchmark_model/):

- bare lines, as printed by a shell on the device, possibly with CRLF line ends (old `adb shell`
  allocates a pty that turns LF into CRLF);
- `INFO: ` / `VERBOSE: ` / `ERROR: ` level prefixes (TFLite's logger, 2020 on);
- logcat lines (`11-25 10:02:13.401  8123  8140 I tflite  : ...`, `I/tflite  ( 8123): ...`) from
  the benchmark APK, which has no `Running benchmark ...` separators;
- the 2018 format (`Average inference timings in us: Warmup: ..., Init: ..., no stats: ...`);
- numbers in scientific notation (`avg=2.95034e+06`);
- op profiling (`--enable_op_profiling`), whose `Timings (microseconds): count=...` summary line is
  not the run statistics;
- failures: `Benchmarking failed.`, delegate errors naming the unsupported ops, NNAPI failures,
  crashes and truncated output.

The parser never raises on odd text: a run it cannot read is `ok=False` with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Prefixes that wrap the tool's own text. Order matters: logcat first, then the level tag.
_LOGCAT_THREADTIME = re.compile(r"^\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+(?P<lvl>[VDIWEF])\s+[^:]*?\s*:\s?")
_LOGCAT_BRIEF = re.compile(r"^(?P<lvl>[VDIWEF])/[^(:]+\(\s*\d+\):\s?")
_LEVEL = re.compile(r"^(INFO|VERBOSE|WARNING|WARN|ERROR|DEBUG|FATAL): ")

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_KV = re.compile(rf"(\w+)=({_NUM})")
_STATS = re.compile(rf"^count=\d+(?:\s+\w+={_NUM})*\s*$")
_SUMMARY = re.compile(r"^Inference timings in us:\s*(.*)$")
_SUMMARY_2018 = re.compile(r"^Average inference timings in us:\s*(.*)$")
_SUMMARY_FIELD = re.compile(rf"([A-Za-z][A-Za-z ()]*?):\s*({_NUM})")
_INIT_SESSION = re.compile(rf"^Initialized session in ({_NUM})\s*ms")
_OLD_PEAK = re.compile(rf"^Peak memory footprint \(MB\):\s*init=({_NUM})\s+overall=({_NUM})")
_DELTA = re.compile(rf"^Memory footprint delta from the start of the tool \(MB\):\s*init=({_NUM})\s+overall=({_NUM})")
_PERIODIC = re.compile(rf"^Overall peak memory footprint \(MB\) via periodic monitoring:\s*({_NUM})")
_REPLACING = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\)")
_XNNPACK_CREATED = re.compile(r"Created TensorFlow Lite XNNPACK delegate")
_NUM_THREADS = re.compile(r"^Num threads:\s*\[(\d+)\]")
_GRAPH = re.compile(r"^Graph:\s*\[(.*)\]")
_MODEL_SIZE = re.compile(rf"^The input model file size \(MB\):\s*({_NUM})")
_VERSION = re.compile(r"(?:benchmark tool|TF ?Lite|TensorFlow Lite|LiteRT|Tool)\s+version\s*[:=]\s*\[?([^\]\s,]+)", re.I)
_EMULATED = re.compile(r"^Emulated\b", re.I)
_UNSUPPORTED_HEADER = re.compile(r"Following operations are not supported by (.+?)(?: delegate)?:\s*$")
_UNSUPPORTED_OP = re.compile(r"^([A-Z0-9_]+(?: \S+)?): (.+)$")
_FAILED_APPLY = re.compile(r"Failed to apply (\w+) delegate")
_NODE_FAILED = re.compile(r"Node number (\d+) \((\w+)\) failed to (prepare|invoke)")
# Lines that mean the process never got to benchmark at all (wrong ABI, missing libs, crash).
_FATAL = re.compile(
    r"(Benchmarking failed|Segmentation fault|Aborted|Illegal instruction|CANNOT LINK EXECUTABLE|"
    r"Exec format error|not executable|cannot execute|Killed|Bus error|Failed to (?:load|mmap|allocate|construct))",
    re.I,
)


@dataclass(frozen=True)
class MemoryFootprint:
    """Memory as benchmark_model reported it, in MB.

    `kind` is "peak" for the 2019-2022 line (`Peak memory footprint (MB): init= overall=`) and
    "delta" for newer tools, which report the growth since the tool started (not a peak).
    `periodic_peak_mb` is the newer `Overall peak memory footprint ... via periodic monitoring`.
    """

    init_mb: float | None = None
    overall_mb: float | None = None
    kind: str | None = None
    periodic_peak_mb: float | None = None

    @property
    def peak_mb(self) -> float | None:
        """The best peak figure available: periodic monitoring, else the old peak line; a delta
        alone is not a peak, so None."""
        if self.periodic_peak_mb is not None:
            return self.periodic_peak_mb
        return self.overall_mb if self.kind == "peak" else None


@dataclass(frozen=True)
class RunStats:
    """One `count=... first=... avg=... std=...` statistics line, microseconds."""

    count: int
    first_us: float | None = None
    curr_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    avg_us: float | None = None
    std_us: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchmarkModelOutput:
    """Everything read from one benchmark_model run. Times in microseconds, memory in MB.

    `ok` is False when the tool failed (then `failure_reason` says why and `raw_lines` holds the
    lines that show it) or when its output holds no inference timing at all.
    """

    ok: bool
    failure_reason: str | None = None
    inference_avg_us: float | None = None
    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    count: int | None = None
    std_us: float | None = None
    min_us: float | None = None
    max_us: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)
    memory: MemoryFootprint | None = None
    xnnpack_nodes: tuple[int, int] | None = None  # (delegated, total) summed over subgraphs
    xnnpack_created: bool = False
    unsupported_ops: list[str] = field(default_factory=list)
    num_threads: int | None = None
    graph: str | None = None
    model_size_mb: float | None = None
    dialect: str = "bare"  # bare | info | logcat | 2018; "+crlf" when the lines ended in CR LF
    tool_version: str | None = None
    emulated: bool = False  # the pfld-export emulated-ARM rig's runner said so: timings mean nothing
    warmup: RunStats | None = None
    run: RunStats | None = None
    raw_lines: list[str] = field(default_factory=list)

    @property
    def peak_memory_mb(self) -> float | None:
        """Peak memory in MB (see MemoryFootprint.peak_mb), or None when the tool gave none."""
        return self.memory.peak_mb if self.memory else None

    @property
    def inference_avg_ms(self) -> float | None:
        return None if self.inference_avg_us is None else self.inference_avg_us / 1000.0


def _strip(line: str) -> tuple[str, str | None, str | None]:
    """-> (text, level, wrapper) with logcat and level prefixes removed."""
    wrapper = None
    m = _LOGCAT_THREADTIME.match(line) or _LOGCAT_BRIEF.match(line)
    if m:
        wrapper = "logcat"
        level = {"E": "ERROR", "W": "WARNING", "F": "FATAL"}.get(m.group("lvl"))
        line = line[m.end():]
    else:
        level = None
    m = _LEVEL.match(line)
    if m:
        level = m.group(1)
        wrapper = wrapper or "info"
        line = line[m.end():]
    return line.strip(), level, wrapper


def _stats(text: str) -> RunStats:
    kv = {k: float(v) for k, v in _KV.findall(text)}
    pct = {k: v for k, v in kv.items() if re.fullmatch(r"p\d+(?:\.\d+)?|median", k)}
    return RunStats(
        count=int(kv["count"]), first_us=kv.get("first"), curr_us=kv.get("curr"), min_us=kv.get("min"),
        max_us=kv.get("max"), avg_us=kv.get("avg"), std_us=kv.get("std"), percentiles=pct,
    )


def _summary_fields(text: str) -> dict[str, float]:
    return {name.strip().lower(): float(v) for name, v in _SUMMARY_FIELD.findall(text)}


@dataclass
class _Scan:
    """What one pass over the tool's lines collects before the output's fields are settled."""

    stats: list[RunStats] = field(default_factory=list)
    summary: dict[str, float] | None = None
    summary_2018: bool = False
    init_ms: float | None = None
    mem: dict[str, float | str | None] = field(default_factory=dict)
    xnn: list[int] = field(default_factory=lambda: [0, 0])
    saw_replacing: bool = False
    wrappers: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    delegate_failures: list[str] = field(default_factory=list)
    unsupported_by: str | None = None
    in_unsupported: bool = False


def parse_benchmark_output(text: str) -> BenchmarkModelOutput:
    """Parse benchmark_model's stdout+stderr (any dialect) into a BenchmarkModelOutput.

    The run statistics are the last `count=` line before the `Inference timings` summary (the
    one before it is the warm-up); op-profiling tables after the summary are ignored. Summary
    values win over the statistics lines where both exist, because old tools print the warm-up
    and first-run numbers only there.
    """
    out = BenchmarkModelOutput(ok=False)
    scan = _Scan()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for raw in lines:
        _scan_line(scan, out, raw)
    _settle_dialect(out, scan, crlf="\r\n" in text)
    _settle_timings(out, scan)
    _settle_verdict(out, scan, lines)
    return out


def _scan_line(scan: _Scan, out: BenchmarkModelOutput, raw: str) -> None:
    """One line: errors, unsupported-op lists, statistics and the summary here; facts in `_scan_facts`."""
    line, level, wrapper = _strip(raw)
    if wrapper:
        scan.wrappers.add(wrapper)
    if not line:
        scan.in_unsupported = False
        return
    # A list of unsupported ops follows its header until a line that is not an op entry.
    if scan.in_unsupported:
        m = _UNSUPPORTED_OP.match(line)
        if m and level is None:
            out.unsupported_ops.append(m.group(1))
            return
        scan.in_unsupported = False
    if level in ("ERROR", "FATAL"):
        scan.errors.append(line)
    if _FATAL.search(line):
        scan.fatal.append(line)
    if _FAILED_APPLY.search(line) or _NODE_FAILED.search(line):
        scan.delegate_failures.append(line.rstrip("."))
    m = _UNSUPPORTED_HEADER.search(line)
    if m:
        scan.unsupported_by, scan.in_unsupported = m.group(1), True
        return
    if scan.summary is None and _STATS.match(line):
        scan.stats.append(_stats(line))
        return
    m = _SUMMARY.match(line)
    if m and scan.summary is None:
        scan.summary = _summary_fields(m.group(1))
        return
    m = _SUMMARY_2018.match(line)
    if m and scan.summary is None:
        scan.summary, scan.summary_2018 = _summary_fields(m.group(1)), True
        return
    _scan_facts(scan, out, line)


def _scan_facts(scan: _Scan, out: BenchmarkModelOutput, line: str) -> None:
    """Init time, memory, threads, graph, size, emulation, XNNPACK and the tool's version."""
    if (m := _INIT_SESSION.match(line)) and scan.init_ms is None:
        scan.init_ms = float(m.group(1))
    elif m := _OLD_PEAK.match(line):
        scan.mem.update(init_mb=float(m.group(1)), overall_mb=float(m.group(2)), kind="peak")
    elif m := _DELTA.match(line):
        scan.mem.update(init_mb=float(m.group(1)), overall_mb=float(m.group(2)), kind="delta")
    elif m := _PERIODIC.match(line):
        scan.mem["periodic_peak_mb"] = float(m.group(1))
    elif m := _NUM_THREADS.match(line):
        out.num_threads = int(m.group(1))
    elif m := _GRAPH.match(line):
        out.graph = m.group(1)
    elif m := _MODEL_SIZE.match(line):
        out.model_size_mb = float(m.group(1))
    elif _EMULATED.match(line):
        out.emulated = True
    if m := _REPLACING.search(line):
        if "xnnpack" in m.group(3).lower():
            scan.saw_replacing = True
            scan.xnn[0] += int(m.group(1))
            scan.xnn[1] += int(m.group(2))
    if _XNNPACK_CREATED.search(line):
        out.xnnpack_created = True
    if out.tool_version is None and (m := _VERSION.search(line)):
        out.tool_version = m.group(1)


def _settle_dialect(out: BenchmarkModelOutput, scan: _Scan, crlf: bool) -> None:
    """Dialect (the wrapper the tool's lines came in; the 2018 format names itself), XNNPACK nodes, memory."""
    if scan.summary_2018:
        out.dialect = "2018"
    elif "logcat" in scan.wrappers:
        out.dialect = "logcat"
    elif "info" in scan.wrappers:
        out.dialect = "info"
    if crlf:
        out.dialect += "+crlf"
    if scan.saw_replacing:
        out.xnnpack_nodes = (scan.xnn[0], scan.xnn[1])
    if scan.mem:
        out.memory = MemoryFootprint(**scan.mem)  # type: ignore[arg-type]


def _settle_timings(out: BenchmarkModelOutput, scan: _Scan) -> None:
    """Run and warm-up statistics from the last two `count=` lines; summary values win."""
    if scan.stats:
        out.run = scan.stats[-1]
        out.warmup = scan.stats[-2] if len(scan.stats) >= 2 else None
        out.count, out.std_us = out.run.count, out.run.std_us
        out.min_us, out.max_us = out.run.min_us, out.run.max_us
        out.percentiles = dict(out.run.percentiles)
        out.inference_avg_us = out.run.avg_us
        if out.warmup is not None:
            out.warmup_avg_us = out.warmup.avg_us if out.warmup.avg_us is not None else out.warmup.curr_us
    if scan.init_ms is not None:
        out.init_us = scan.init_ms * 1000.0
    if scan.summary is not None:
        s = scan.summary
        out.init_us = s.get("init", out.init_us)
        out.first_us = s.get("first inference", out.first_us)
        out.warmup_avg_us = s.get("warmup (avg)", s.get("warmup", out.warmup_avg_us))
        out.inference_avg_us = s.get("inference (avg)", s.get("no stats", out.inference_avg_us))


def _settle_verdict(out: BenchmarkModelOutput, scan: _Scan, lines: list[str]) -> None:
    """ok, or why not with the lines that show it."""
    failed = [ln for ln in scan.fatal if "benchmarking failed" in ln.lower()] or scan.fatal
    if failed or (scan.errors and out.inference_avg_us is None):
        out.ok = False
        out.failure_reason = _failure_reason(out, scan.errors, scan.fatal, scan.delegate_failures, scan.unsupported_by)
        out.raw_lines = _evidence(lines)
    elif out.inference_avg_us is None:
        out.ok = False
        out.failure_reason = (
            "no inference timing in the output (no `Inference timings` or `count=` line): the tool "
            "was killed, crashed, or this is not benchmark_model output"
        )
        out.raw_lines = [ln for ln in lines if ln.strip()][-20:]
    else:
        out.ok = True


def _failure_reason(
    out: BenchmarkModelOutput, errors: list[str], fatal: list[str], delegate_failures: list[str], unsupported_by: str | None
) -> str:
    parts: list[str] = []
    if out.unsupported_ops:
        who = f"{unsupported_by} delegate" if unsupported_by else "the delegate"
        parts.append(f"{who} does not support: {', '.join(out.unsupported_ops)}")
    parts.extend(dict.fromkeys(delegate_failures))
    if not parts:
        interesting = [ln for ln in errors + fatal if "benchmarking failed" not in ln.lower()]
        parts.extend(ln.rstrip(".") for ln in interesting[:3])
    if not parts:
        parts.append("benchmark_model reported `Benchmarking failed.` without an error line")
    return "; ".join(parts)


def _evidence(lines: list[str]) -> list[str]:
    """The lines that show a failure: errors and delegate messages, else the tail."""
    keep = [ln.rstrip() for ln in lines if re.search(r"ERROR|FATAL|fail|not supported|Operation|Node number|CANNOT|error", ln, re.I)]
    return keep[:40] if keep else [ln.rstrip() for ln in lines if ln.strip()][-20:]
