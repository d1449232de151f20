"""Instructions per inference: a cost figure that does not move with machine load.

    instructions_per_invoke([a.tflite, b.tflite], CostConfig()) -> CostResult

Why instructions: on a shared machine the CPU-time ratio to PyTorch spreads 15-17 % over
repeats for the 0.25X models (benchmarks/README.md), so a latency gate built on it must
tolerate ~20 % and misses a real 10 % slowdown. The number of instructions one `invoke()`
executes depends on the model, the runtime and the kernels it picks, not on who else uses
the cores; counted exactly it can be gated at 2 %.

How (x86): each model runs in a Python process under valgrind's callgrind, which counts
instructions only while `WINDOW` (the TFLite Python wrapper's `Invoke`, the whole of one
`invoke()` call: XNNPACK's delegated part and any op left on the builtin kernels) is on the
stack, and writes one profile dump after every call (`--dump-after`). So start-up, model
loading, `allocate_tensors` and the XNNPACK graph build are never counted, each invoke has its
own figure, and the first `warmup` invokes (the first one touches lazily initialised state:
7,000-17,000 instructions more on the gate's models) are dropped. The median of the rest is the figure; their
spread is reported and must stay under `max_spread` (single-threaded invokes measured exact).

What it is not: the host's cost. Valgrind emulates no AVX-512, so XNNPACK runs its AVX2
kernels under it; the count is a regression metric for this runtime on an AVX2-class x86, and
`isa` records which kernels that was. Threads other than 1 are refused: a thread pool's
spin-waits would be counted and depend on scheduling.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..errors import CostError, ToolMissingError, UsageError
from .host import machine_info, tool_versions

# Demangled name of the C++ function behind `Interpreter.invoke()` in ai-edge-litert,
# tflite_runtime and tf.lite alike. Exact: callgrind's --dump-after ignores a trailing `*`.
WINDOW = "tflite::interpreter_wrapper::InterpreterWrapper::Invoke(int)"
# How the child process is started: it imports this module from the same package tree.
_WORKER = "import sys; from pfld_export.bench.cost import invoke_worker; invoke_worker(sys.argv[1:])"


@dataclass(frozen=True)
class CostConfig:
    """How `instructions_per_invoke` counts.

    invokes: counted invokes per model (after `warmup`); their median is the figure.
    warmup: invokes run and dropped first.
    threads: interpreter threads; only 1 gives a figure independent of scheduling.
    valgrind: the valgrind executable (name on PATH or a path).
    timeout_s: per valgrind process (one per call, every model in it).
    max_spread: (max - min) / median of the counted invokes above which the figure is refused.
    """

    invokes: int = 3
    warmup: int = 1
    threads: int = 1
    valgrind: str = "valgrind"
    timeout_s: float = 1800.0
    max_spread: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.invokes, int) or self.invokes < 1:
            raise UsageError(f"invokes must be a positive integer, got {self.invokes!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.threads != 1:
            raise UsageError(f"instruction counts are taken at 1 thread only (a thread pool's spin-waits depend on "
                             f"scheduling), got threads={self.threads!r}; use --threads 1")
        if not self.max_spread >= 0:
            raise UsageError(f"max_spread must be a non-negative fraction, got {self.max_spread!r}")


@dataclass
class CostRow:
    """One model's instructions per invoke."""

    name: str
    path: str
    bytes: int
    threads: int
    instructions: int  # median over the counted invokes
    per_invoke: list[int]  # the counted invokes, in order
    first_invoke: int  # the first (warm-up) invoke when warmup > 0, else the first counted one
    spread_rel: float  # (max - min) / median of per_invoke


@dataclass
class CostResult:
    """Every model's count, and what counted it."""

    rows: list[CostRow]
    tool: str  # "callgrind (valgrind-3.19.0)"
    isa: str  # the SIMD level XNNPACK sees under the tool
    window: str
    config: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    date: str
    wall_s: float
    env: dict[str, str] = field(default_factory=dict)  # what makes two counts comparable: tool + isa + runtime

    def row(self, path: str | os.PathLike[str]) -> CostRow:
        """The row of `path` (as given, or by file name)."""
        p = str(path)
        for r in self.rows:
            if r.path == p or Path(r.path).name == Path(p).name:
                return r
        raise KeyError(p)


def find_valgrind(valgrind: str = "valgrind") -> str:
    """The valgrind executable, or ToolMissingError naming how to install it."""
    exe = shutil.which(valgrind)
    if exe is None:
        raise ToolMissingError(f"valgrind ({valgrind!r}) is not installed: instruction counts need it "
                               "(Debian/Ubuntu: apt-get install valgrind)")
    return exe


def valgrind_version(exe: str) -> str:
    """`valgrind-3.19.0`; CostError when the executable does not answer."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        raise CostError(f"cannot run {exe} --version ({e}); reinstall valgrind") from None
    ver = out.stdout.strip()
    if out.returncode != 0 or not ver.startswith("valgrind"):
        raise CostError(f"{exe} --version answered {ver or out.stderr.strip()!r}; reinstall valgrind")
    return ver


def simd_level(cpuinfo: str | None = None) -> str:
    """The widest x86 SIMD level XNNPACK can use under valgrind (which has no AVX-512).

    Counts are comparable only between machines of the same level: a different level means
    different kernels. `cpuinfo` is /proc/cpuinfo's text (read when None).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    m = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(m.group(1).split()) if m else set()
    if {"avx2", "fma"} <= flags:
        return "avx2"
    if "avx" in flags:
        return "avx"
    if "sse4_1" in flags:
        return "sse4.1"
    return "sse2" if flags else "unknown"


def parse_dump_total(text: str) -> int:
    """The instruction total of one callgrind profile (`totals:` or `summary:` line)."""
    m = re.search(r"^(?:totals|summary):\s*(\d+)", text, re.M)
    if m is None:
        raise CostError("a callgrind profile has no totals line; valgrind's output format changed or the file was cut short")
    return int(m.group(1))


def read_dumps(out_dir: Path, base: str) -> list[int]:
    """Totals of `base.1`, `base.2`, ... (one per window exit), in dump order."""
    dumps = []
    for p in Path(out_dir).iterdir():
        m = re.fullmatch(re.escape(base) + r"\.(\d+)", p.name)
        if m:
            dumps.append((int(m.group(1)), parse_dump_total(p.read_text(errors="replace"))))
    return [t for _, t in sorted(dumps)]


def invoke_worker(argv: Sequence[str]) -> None:
    """Child process body: `THREADS TOTAL MODEL...`: open each model, feed it, invoke TOTAL times.

    Inputs are a fixed seeded pattern in each input's own dtype and range (the count does not
    depend on the values for these kernels, but a fixed input keeps any data-dependent path fixed).
    """
    import numpy as np

    from ..runtime import tflite_interpreter_class

    threads, total, *paths = argv
    interpreter_cls = tflite_interpreter_class()
    for p in paths:
        interp = interpreter_cls(model_path=p, num_threads=int(threads))
        interp.allocate_tensors()
        rng = np.random.default_rng(0)
        for d in interp.get_input_details():
            dt = np.dtype(d["dtype"])
            if np.issubdtype(dt, np.integer):
                info = np.iinfo(dt)
                x = rng.integers(info.min, int(info.max) + 1, size=d["shape"], dtype=dt)
            else:
                x = rng.random(d["shape"]).astype(dt)
            interp.set_tensor(d["index"], x)
        for _ in range(int(total)):
            interp.invoke()
        del interp


def instructions_per_invoke(models: Sequence[str | os.PathLike[str]], cfg: CostConfig | None = None) -> CostResult:
    """Count instructions per `invoke()` of each .tflite in `models` (one valgrind process for all).

    Raises UsageError (not a .tflite / missing), ToolMissingError (no valgrind), CostError (the
    count failed, saw a different number of invokes than it ran, or was not repeatable).
    """
    cfg = cfg or CostConfig()
    paths = [Path(m) for m in models]
    if not paths:
        raise UsageError("cost needs at least one .tflite model")
    for p in paths:
        if p.suffix != ".tflite":
            raise UsageError(f"{p}: instruction counts are taken for .tflite models only; convert it first (pfld-export convert)")
        if not p.is_file():
            raise UsageError(f"{p} does not exist; pass a .tflite file (pfld-export convert writes them)")
    exe = find_valgrind(cfg.valgrind)
    tool = valgrind_version(exe)
    total = cfg.warmup + cfg.invokes
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pfld-cost-") as tmp:
        base = "cg.out"
        cmd = [exe, "--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={WINDOW}", f"--dump-after={WINDOW}",
               f"--callgrind-out-file={Path(tmp) / base}", f"--log-file={Path(tmp) / 'valgrind.log'}",
               sys.executable, "-c", _WORKER, str(cfg.threads), str(total), *[str(p.absolute()) for p in paths]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise CostError(f"callgrind took longer than {cfg.timeout_s:.0f} s for {len(paths)} model(s); "
                            "count fewer models per call or fewer --invokes") from None
        if proc.returncode != 0:
            log = (Path(tmp) / "valgrind.log")
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            if not tail and log.is_file():
                tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
            raise CostError(f"the model process under callgrind exited with {proc.returncode} ({tail[:300]}); "
                            "run the model with `pfld-export bench` to see whether it loads at all")
        totals = read_dumps(Path(tmp), base)
    expected = total * len(paths)
    if len(totals) != expected:
        raise CostError(f"callgrind saw {len(totals)} invoke(s) of {WINDOW}, expected {expected}: this TFLite runtime "
                        f"({tool_versions().get('ai-edge-litert', 'unknown version')}) has no such symbol; "
                        "install the runtime in requirements.lock")
    rows = []
    for i, p in enumerate(paths):
        mine = totals[i * total:(i + 1) * total]
        counted = mine[cfg.warmup:]
        med = int(statistics.median(counted))
        spread = (max(counted) - min(counted)) / med if med else 0.0
        if med <= 0:
            raise CostError(f"{p}: callgrind counted no instructions inside {WINDOW}; the runtime did not run the model")
        if spread > cfg.max_spread:
            raise CostError(f"{p}: invokes differ by {100 * spread:.2f} % ({min(counted):,}-{max(counted):,}), more than "
                            f"{100 * cfg.max_spread:.2f} %; something in the invoke depends on timing (threads?)")
        rows.append(CostRow(name=p.stem, path=str(p), bytes=p.stat().st_size, threads=cfg.threads, instructions=med,
                            per_invoke=counted, first_invoke=mine[0], spread_rel=spread))
    versions = tool_versions()
    isa = simd_level()
    runtime = next((f"{k} {versions[k]}" for k in ("ai-edge-litert", "tflite-runtime", "tensorflow-cpu") if versions.get(k)), "unknown")
    machine = {k: v for k, v in machine_info().items() if k != "loadavg_at_start"}
    return CostResult(rows=rows, tool=f"callgrind ({tool})", isa=isa, window=WINDOW, config=asdict(cfg), machine=machine,
                      versions=versions, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      wall_s=time.perf_counter() - t0, env={"tool": tool, "isa": isa, "runtime": runtime})


# --------------------------------------------------------------------------------------------
# aarch64: the ARM cost kit (android_bench/cost/kit.sh) under qemu-user

ARM_KIT_ENV = "PFLD_COST_KIT"
ARM_KIT_GLOB = "/var/cache/pfld-export/arm-cost-kit-*"
ARM_WINDOW = "marker calls around Interpreter.invoke(), the marker's own cost subtracted"
# Empty marker pairs counted first: their median is the marker's own cost.
_ARM_CALIB = 5


def find_arm_kit(kit: str | os.PathLike[str] | None = None) -> Path:
    """The built ARM cost kit: `kit`, else $PFLD_COST_KIT, else the newest under /var/cache/pfld-export."""
    if kit is None and os.environ.get(ARM_KIT_ENV):
        kit = os.environ[ARM_KIT_ENV]
    if kit is not None:
        candidates = [Path(kit)]
    else:
        import glob

        candidates = sorted((Path(p) for p in glob.glob(ARM_KIT_GLOB) if not p.endswith(".tmp")),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if (c / ".complete").is_file() and (c / "run-aarch64").is_file():
            return c
    where = str(candidates[0]) if kit is not None else ARM_KIT_GLOB
    raise ToolMissingError(f"the ARM cost kit is not built ({where}): run `make arm-cost-kit` (root, Debian; "
                           "android_bench/cost/kit.sh build)")


def guest_script() -> Path:
    """android_bench/cost/guest_count.py of this checkout (it runs inside the aarch64 guest)."""
    p = Path(__file__).resolve().parents[2] / "android_bench" / "cost" / "guest_count.py"
    if not p.is_file():
        raise ToolMissingError(f"{p} is missing: ARM counts run from a checkout of the repository")
    return p


def parse_marks(text: str) -> list[int]:
    """The plugin's marks file: one count per marker, then `total N` (or `overflow N`)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith(("total ", "overflow ")):
        raise CostError("the pfld_count plugin wrote no totals line: the guest did not exit normally")
    if lines[-1].startswith("overflow"):
        raise CostError("the pfld_count plugin ran out of marker slots; count fewer models or invokes per call")
    return [int(ln) for ln in lines[:-1]]


def arm_instructions_per_invoke(models: Sequence[str | os.PathLike[str]], cfg: CostConfig | None = None,
                                kit: str | os.PathLike[str] | None = None) -> CostResult:
    """Count aarch64 instructions per `invoke()` of each .tflite on the ARM cost kit (qemu-user,
    a core without dot-product, 1 thread): one guest process for all models.

    The guest brackets each invoke with marker calls (`guest_count.py`), the plugin records the
    count at each; the marker's own cost (median of empty pairs) is subtracted. Repeats agree to
    ~0.01 % (Python's allocator moves a few hundred instructions), not to the instruction.
    Raises as `instructions_per_invoke`, ToolMissingError when the kit is not built.
    """
    import json

    cfg = cfg or CostConfig()
    paths = [Path(m) for m in models]
    if not paths:
        raise UsageError("cost needs at least one .tflite model")
    for p in paths:
        if p.suffix != ".tflite" or not p.is_file():
            raise UsageError(f"{p}: not an existing .tflite file; pass models that pfld-export convert wrote")
    kit_dir = find_arm_kit(kit)
    script = guest_script()
    try:
        info = json.loads((kit_dir / "kit.json").read_text())
    except (OSError, ValueError):
        raise ToolMissingError(f"{kit_dir}/kit.json is unreadable: rebuild the kit (make arm-cost-kit)") from None
    total = cfg.warmup + cfg.invokes
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pfld-armcost-") as tmp:
        marks_file = Path(tmp) / "marks.txt"
        cmd = [str(kit_dir / "run-aarch64"), str(marks_file), str(script), str(cfg.threads), str(total), str(_ARM_CALIB),
               *[str(p.absolute()) for p in paths]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise CostError(f"the aarch64 guest took longer than {cfg.timeout_s:.0f} s for {len(paths)} model(s); "
                            "count fewer models per call") from None
        if proc.returncode != 0 or not marks_file.is_file():
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            raise CostError(f"the aarch64 guest exited with {proc.returncode} ({tail[:300]}); "
                            f"check the kit with android_bench/cost/kit.sh check MODEL.tflite")
        marks = parse_marks(marks_file.read_text())
    expected = 2 * (_ARM_CALIB + total * len(paths))
    if len(marks) != expected:
        raise CostError(f"the guest made {len(marks)} marker calls, expected {expected}; guest_count.py and this module disagree")
    pairs = [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]
    overhead = int(statistics.median(pairs[:_ARM_CALIB]))
    rows = []
    for i, p in enumerate(paths):
        mine = [n - overhead for n in pairs[_ARM_CALIB + i * total:_ARM_CALIB + (i + 1) * total]]
        counted = mine[cfg.warmup:]
        med = int(statistics.median(counted))
        if med <= 0:
            raise CostError(f"{p}: no instructions counted between the markers; the runtime did not run the model")
        spread = (max(counted) - min(counted)) / med
        if spread > cfg.max_spread:
            raise CostError(f"{p}: aarch64 invokes differ by {100 * spread:.2f} % ({min(counted):,}-{max(counted):,}), more than "
                            f"{100 * cfg.max_spread:.2f} %")
        rows.append(CostRow(name=p.stem, path=str(p), bytes=p.stat().st_size, threads=cfg.threads, instructions=med,
                            per_invoke=counted, first_invoke=mine[0], spread_rel=spread))
    cpu = str(info.get("cpu", "?"))
    machine = {k: v for k, v in machine_info().items() if k != "loadavg_at_start"}
    return CostResult(rows=rows, tool=f"pfld_count plugin on {info.get('qemu', 'qemu-user')}", isa=f"aarch64 {cpu} (no dot-product)",
                      window=ARM_WINDOW, config=asdict(cfg), machine=machine, versions=tool_versions(),
                      date=datetime.now(timezone.utc).isoformat(timespec="seconds"), wall_s=time.perf_counter() - t0,
                      env={"tool": str(info.get("qemu", "")), "isa": f"aarch64-{cpu}", "runtime": str(info.get("runtime", "")),
                           "kit": str(info.get("version", ""))})
