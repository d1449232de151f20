"""Host latency benchmark: every backend against the same-run PyTorch reference.

    benchmark(models, BenchConfig(threads=(1, 2), runs=100, warmup=10, repeats=3)) -> BenchResult

What is timed: one single-face invocation of the network (TFLite `invoke`, ONNX Runtime
`session.run`, PyTorch `module(x)`), never the preprocessing: each backend gets the same uint8
crop, preprocessed and fed once before the timed loop (`Predictor.invoker` in `runtime.py`).

Why ratios: absolute milliseconds on a shared or thermally throttled machine drift by tens of
percent between minutes. So every run includes the PyTorch reference, rounds are interleaved
(round r runs every (model, threads) session once, in an order rotated by r) and the reported
ratio is the median over rounds of per-round ratios against the reference of the same round.
Two clocks are kept: wall time (what a user waits) and the invoking thread's CPU time. Under
heavy load the wall-clock ratio still moves (PyTorch eager, many small ops over several ms, is
preempted more often than a sub-millisecond TFLite invoke); the CPU-time ratio at one thread
(of each round's 10th-percentile CPU time) holds within ~10 % (benchmarks/README.md), and is
what `check` gates.

The PyTorch reference, in order of preference (recorded in `BenchResult.reference.how`):
  1. `BenchConfig.reference`, or the first checkpoint among `models` ("given");
  2. the checkpoint a `.tflite` sidecar / ONNX metadata names, if that file exists ("sidecar");
  3. a PFLD of the width / points / conv2 in the sidecar's or ONNX metadata's model config,
     built with seeded random weights ("built"): latency depends on shapes, not weight values.
Otherwise `UsageError` asks for `--reference CKPT`.

Memory: with `isolate=True` (the default) each (model, threads) session lives in its own
worker process, so `peak_rss_bytes` is that process's high-water mark (Python + numpy/OpenCV +
the one runtime + the model) and `base_rss_bytes` the same process before the model was opened.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import errors
from ..errors import PfldError, UsageError
from ..device import check_threads
from ..runtime import TORCH_SUFFIXES

ProgressFn = Callable[[int, int, str], None]
"""progress(done, total, what): called after each step; the CLI turns it into a bar."""

MODEL_SUFFIXES = TORCH_SUFFIXES + (".onnx", ".tflite")
# Where a sidecar / ONNX metadata may name its source checkpoint, first match wins.
_CHECKPOINT_KEYS: tuple[tuple[str, ...], ...] = (
    ("checkpoint",), ("source_checkpoint",), ("source", "checkpoint"), ("provenance", "checkpoint"),
    ("source",),
)
# ONNX metadata keys naming the source checkpoint (`convert` writes pfld_export.source).
ONNX_META_CHECKPOINT_KEYS = ("pfld_export.checkpoint", "pfld_export.source")
VERSIONED_PACKAGES = ("pfld-export", "torch", "onnxruntime", "ai-edge-litert", "tensorflow-cpu", "onnx2tf", "numpy")


@dataclass(frozen=True)
class BenchConfig:
    """How to measure.

    `runs` timed single-face invocations per (model, threads) session in each of `repeats`
    interleaved rounds, each round preceded by `warmup` untimed invocations.
    """

    threads: tuple[int, ...] = (1, 2)
    runs: int = 100
    warmup: int = 10
    repeats: int = 3
    reference: Path | None = None
    isolate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.threads:
            raise UsageError("--threads is empty; e.g. --threads 1,2")
        for t in self.threads:
            check_threads(t)
        if len(set(self.threads)) != len(self.threads):
            raise UsageError(f"threads lists a count twice: {self.threads!r}")
        if self.runs < 1:
            raise UsageError(f"runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise UsageError(f"warmup cannot be negative, got {self.warmup}")
        if self.repeats < 1:
            raise UsageError(f"repeats must be at least 1, got {self.repeats}")


@dataclass
class ReferenceInfo:
    """Which PyTorch model the ratios are against, and how it was chosen."""

    path: str
    how: str  # given | sidecar | built
    note: str = ""


@dataclass
class BenchRow:
    """One (model, threads) session. Times in milliseconds per face, pooled over all rounds.

    `*_ms` and `ratio_*` are wall-clock medians: what a user waits. `cpu_*` use the CPU time of
    the invoking thread (`time.thread_time_ns`): at one thread every runtime computes in that
    thread, so it is the compute time without the waiting-while-preempted. `cpu_ratio_to_torch`
    compares each round's 10th percentile of that CPU time (other jobs only ever add time, by
    cache and memory-bandwidth contention, so a low quantile is the least disturbed estimate of
    the cost), median over rounds: the figure that holds still on a loaded machine and the one
    the regression gate uses. With more threads it misses the pool's work: indicative only.
    """

    name: str
    path: str
    backend: str
    dtype: str
    bytes: int
    threads: int
    reference: bool
    samples: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    faces_per_s: float
    round_median_ms: list[float]
    ratio_to_torch: float  # model / same-run PyTorch median at the same threads; < 1 is faster
    ratio_low: float
    ratio_high: float
    cpu_median_ms: float  # CPU time of the invoking thread, pooled median
    cpu_p10_ms: float  # its 10th percentile, pooled
    cpu_ratio_to_torch: float  # per-round p10 CPU time / the reference's, median over rounds
    cpu_ratio_low: float
    cpu_ratio_high: float
    peak_rss_bytes: int | None = None
    base_rss_bytes: int | None = None
    load_s: float = 0.0

    @property
    def speedup(self) -> float:
        """How many times faster than the PyTorch reference (1 / ratio)."""
        return 1.0 / self.ratio_to_torch if self.ratio_to_torch > 0 else math.inf


@dataclass
class BenchResult:
    """All rows (reference first), what produced them, and where."""

    rows: list[BenchRow]
    reference: ReferenceInfo
    config: dict[str, Any]
    machine: dict[str, Any]
    versions: dict[str, str]
    date: str

    def row(self, name: str, threads: int) -> BenchRow:
        """The row for a model file name (or path) at a thread count."""
        for r in self.rows:
            if r.threads == threads and name in (r.name, r.path):
                return r
        raise UsageError(f"no benchmark row for {name!r} at {threads} thread(s); have {sorted({r.name for r in self.rows})}")

    def reference_row(self, threads: int) -> BenchRow:
        return next(r for r in self.rows if r.reference and r.threads == threads)


# --------------------------------------------------------------------------------------------
# Machine and versions


def machine_info() -> dict[str, Any]:
    """CPU model (lscpu), cores, memory, host, OS and the load average when the run started."""
    import psutil

    cpu = _lscpu_model() or platform.processor() or platform.machine()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        load = None
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    if m:
        return m.group(1).strip()
    try:  # containers without util-linux still have /proc/cpuinfo
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return m.group(1).strip() if m else None


def tool_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers (read without importing them)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# --------------------------------------------------------------------------------------------
# Reference resolution


def _lookup(d: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _model_metadata(path: Path) -> dict[str, Any]:
    """What a .tflite sidecar or an ONNX file says about its origin: {'checkpoint', 'model'}."""
    from ..runtime import ONNX_META_MODEL, onnx_metadata, read_sidecar

    if path.suffix.lower() == ".tflite":
        side = read_sidecar(path) or {}
        return {"checkpoint": next((v for k in _CHECKPOINT_KEYS if isinstance(v := _lookup(side, k), str)), None),
                "model": side.get("model") if isinstance(side.get("model"), dict) else None}
    if path.suffix.lower() == ".onnx":
        meta = onnx_metadata(path)
        model = None
        if ONNX_META_MODEL in meta:
            try:
                model = json.loads(meta[ONNX_META_MODEL])
            except json.JSONDecodeError:
                model = None
        ckpt = next((meta[k] for k in ONNX_META_CHECKPOINT_KEYS if meta.get(k)), None)
        return {"checkpoint": ckpt, "model": model if isinstance(model, dict) else None}
    return {"checkpoint": None, "model": None}


def _candidate_paths(model_path: Path, name: str) -> Iterator[Path]:
    p = Path(name)
    if p.is_absolute():
        yield p
        return
    yield model_path.parent / p  # sidecars written by `convert` sit beside their checkpoint's outputs
    yield model_path.parent / p.name
    yield Path.cwd() / p


def resolve_reference(models: Sequence[Path], cfg: BenchConfig, workdir: Path) -> tuple[Path, ReferenceInfo]:
    """Find (or build into `workdir`) the PyTorch checkpoint the ratios are measured against."""
    if cfg.reference is not None:
        ref = Path(cfg.reference)
        if ref.suffix.lower() not in TORCH_SUFFIXES:
            raise UsageError(f"--reference {ref} is not a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)})")
        if not ref.is_file():
            raise UsageError(f"--reference {ref} does not exist; check the path")
        return ref, ReferenceInfo(str(ref), "given")
    for m in models:
        if m.suffix.lower() in TORCH_SUFFIXES:
            return m, ReferenceInfo(str(m), "given")
    configs: list[tuple[Path, dict[str, Any]]] = []
    for m in models:
        meta = _model_metadata(m)
        if meta["checkpoint"]:
            for cand in _candidate_paths(m, meta["checkpoint"]):
                if cand.is_file() and cand.suffix.lower() in TORCH_SUFFIXES:
                    return cand, ReferenceInfo(str(cand), "sidecar", f"named by {m.name}")
        if meta["model"]:
            configs.append((m, meta["model"]))
    if configs:
        src, mc = configs[0]
        path = workdir / "reference.pth"
        _build_reference(mc, src, path, cfg.seed)
        return path, ReferenceInfo(
            str(path), "built",
            f"PFLD width {mc.get('width')} / {mc.get('points')} points from {src.name}'s model config, seeded random weights",
        )
    names = ", ".join(m.name for m in models)
    raise UsageError(
        f"no PyTorch reference for {names}: none is a checkpoint and no sidecar/metadata names one or a model "
        "config; pass the source checkpoint with --reference CKPT"
    )


def _build_reference(mc: dict[str, Any], src: Path, dest: Path, seed: int) -> None:
    import torch

    from ..checkpoint import CheckpointMeta, save_checkpoint
    from ..layouts import get_layout
    from ..model import ModelConfig, PFLD
    from ..runtime import read_sidecar
    from ..preprocess import Preprocess

    try:
        cfg = ModelConfig.from_dict(mc)  # every variant field the metadata records (channels, activation, head...)
    except (TypeError, PfldError) as e:
        raise UsageError(f"{src.name}: its model config {mc} cannot build a PFLD ({e}); pass --reference CKPT") from None
    side = read_sidecar(src) if src.suffix.lower() == ".tflite" else None
    pre = Preprocess.from_dict(side["preprocess"]) if side and "preprocess" in side else Preprocess(layout=get_layout(cfg.points).name)
    with torch.random.fork_rng():  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        net = PFLD(cfg).eval()
    save_checkpoint(dest, net, CheckpointMeta(model=cfg, preprocess=pre, provenance={"built_for": "bench reference"}))


# --------------------------------------------------------------------------------------------
# Sessions: one opened model at one thread count, in this process or in a worker process


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss(samples: list[int]) -> int:
    """This process's RSS high-water mark: Linux VmHWM, else the largest psutil sample.

    Not `getrusage().ru_maxrss`: Linux carries it across fork + exec, so a worker would report
    its parent's (torch-sized) peak.
    """
    try:
        m = re.search(r"^VmHWM:\s*(\d+)\s*kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        m = None
    return max(samples + ([int(m.group(1)) * 1024] if m else []))


class _LocalSession:
    """Open a model and time rounds of single-face invocations of it."""

    def __init__(self, path: Path, threads: int, crop: np.ndarray) -> None:
        from ..runtime import open_predictor

        self.rss_samples = [_rss()]
        t0 = time.perf_counter()
        # Timing only: what a foreign ONNX is fed does not change its latency, so nothing is measured.
        self.predictor = open_predictor(path, threads=threads, timing_only=True)
        self.load_s = time.perf_counter() - t0
        self.crop = crop
        self.rss_samples.append(_rss())
        d = self.predictor.describe()
        self.info = {"name": d.get("name") or path.name, "backend": self.predictor.backend, "dtype": str(d.get("dtype", "?")),
                     "bytes": int(d.get("bytes", 0)), "load_s": self.load_s, "base_rss": self.rss_samples[0]}

    def round(self, runs: int, warmup: int) -> dict[str, list[int]]:
        """`warmup` untimed then `runs` timed invocations: {"wall": ns, "cpu": thread-CPU ns}."""
        times: list[int] = []
        cpu: list[int] = []
        invoker = getattr(self.predictor, "invoker", None)
        with ExitStack() as stack:
            if invoker is not None:
                call = stack.enter_context(invoker(self.crop))
            else:  # a Predictor without `invoker` is timed through predict (preprocessing included)
                crop = self.crop

                def call() -> Any:
                    return self.predictor.predict(crop)

            for _ in range(warmup):
                call()
            clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
            for _ in range(runs):
                c0 = cpu_clock()
                t0 = clock()
                call()
                t1 = clock()
                cpu.append(cpu_clock() - c0)
                times.append(t1 - t0)
        self.rss_samples.append(_rss())
        return {"wall": times, "cpu": cpu}

    def peak_rss(self) -> int:
        return _peak_rss(self.rss_samples)


def _worker_main(argv: Sequence[str]) -> int:
    """Worker process (`python -m pfld_export.bench.host --worker PATH THREADS SEED`).

    Opens one session, then answers `round RUNS WARMUP` / `stop` lines on stdin with one JSON
    line each on the original stdout. fd 1 is pointed at stderr first, so whatever a runtime
    prints cannot corrupt the protocol.
    """
    path, threads, seed = Path(argv[0]), int(argv[1]), int(argv[2])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        session = _LocalSession(path, threads, bench_crop(seed))
    except PfldError as e:
        send({"error": str(e), "type": type(e).__name__})
        return 0
    except Exception as e:  # a runtime refusing the file: report it, do not hang the parent
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        send({"error": f"{path.name} could not be opened ({type(e).__name__}: {detail}); re-run convert", "type": "UsageError"})
        return 0
    send({"ready": session.info})
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "round":
            send({"times": session.round(int(cmd[1]), int(cmd[2]))})
        else:
            send({"peak_rss": session.peak_rss()})
            return 0
    return 0  # parent went away (another model failed): just leave


class _RemoteSession:
    """The same session in a worker process: honest per-model RSS, no shared runtime state.

    A plain `python -m` subprocess rather than multiprocessing, so callers need no
    `if __name__ == "__main__"` guard and nothing of the parent (torch thread pools) is inherited.
    """

    def __init__(self, path: Path, threads: int, seed: int, log_dir: Path) -> None:
        self.path = path
        self.log = log_dir / f"worker-{os.getpid()}-{id(self)}.log"
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pfld_export.bench.host", "--worker", str(path), str(threads), str(seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env,
            )
        msg = self._recv()
        if "error" in msg:
            self.close()
            # The worker's typed error keeps its class (and so its exit code) across the pipe.
            cls = getattr(errors, str(msg.get("type")), PfldError)
            raise (cls if isinstance(cls, type) and issubclass(cls, PfldError) else PfldError)(msg["error"])
        self.info = msg["ready"]

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None  # internal invariant: created with PIPE
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            tail = ""
            try:
                lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
                tail = f": {lines[-1][:200]}" if lines else ""
            except OSError:
                pass
            raise UsageError(
                f"the runtime crashed while benchmarking {self.path.name} (worker exit code {self.proc.returncode}{tail}); "
                "check that the model loads with `pfld-export predict`, or re-run convert"
            )
        return json.loads(line)

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; _recv reports it with its exit code

    def round(self, runs: int, warmup: int) -> dict[str, list[int]]:
        self._send(f"round {runs} {warmup}")
        return self._recv()["times"]

    def peak_rss(self) -> int:
        self._send("stop")
        return int(self._recv()["peak_rss"])

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()  # a worker still waiting for orders sees EOF and exits
                except OSError:
                    pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# The benchmark


def bench_crop(seed: int, size: int = 112) -> np.ndarray:
    """The one input face every backend gets: a seeded uint8 BGR crop [1, size, size, 3].

    Smooth, face-like intensities rather than white noise, so float models see ordinary
    activations (no denormals); latency of these networks does not depend on content.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 120 + 60 * np.exp(-(((xx - 0.5) ** 2) / 0.08 + ((yy - 0.5) ** 2) / 0.12))
    img = base[..., None] + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def _validate_models(models: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if not models:
        raise UsageError("no models given; pass at least one .pth / .onnx / .tflite")
    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise UsageError(f"model {p} does not exist; check the path")
        if p.suffix.lower() not in MODEL_SUFFIXES:
            raise UsageError(f"{p}: unknown model type {p.suffix!r}; use a checkpoint, .onnx or .tflite")
    seen: set[Path] = set()
    out = []
    for p in paths:  # the same file twice would only double the run time
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


CPU_QUANTILE = 10  # percentile of per-invocation CPU time compared between backends (see BenchRow)


def _round_medians(rounds: list[dict[str, list[int]]], clock: str) -> list[float]:
    return [float(np.median(r[clock])) / 1e6 for r in rounds]


def _round_cpu_low(rounds: list[dict[str, list[int]]]) -> list[float]:
    return [float(np.percentile(r["cpu"], CPU_QUANTILE)) / 1e6 for r in rounds]


def _ratios(mine: list[float], ref: list[float] | None) -> list[float]:
    # Per round, against the reference measured seconds apart in the same round.
    return [1.0] if ref is None else [m / r if r > 0 else math.inf for m, r in zip(mine, ref)]


def _summarise(rounds: list[dict[str, list[int]]], info: dict[str, Any], path: Path, threads: int, is_ref: bool,
               ref_rounds: dict[str, list[float]] | None, peak: int | None, isolate: bool) -> BenchRow:
    rounds_ms = _round_medians(rounds, "wall")
    cpu_rounds = _round_cpu_low(rounds)
    pooled = np.concatenate([np.asarray(r["wall"], np.float64) for r in rounds]) / 1e6
    cpu_pooled = np.concatenate([np.asarray(r["cpu"], np.float64) for r in rounds]) / 1e6
    med = float(np.median(pooled))
    ratios = _ratios(rounds_ms, ref_rounds["wall"] if ref_rounds else None)
    cpu_ratios = _ratios(cpu_rounds, ref_rounds["cpu"] if ref_rounds else None)
    return BenchRow(
        name=info["name"], path=str(path), backend=info["backend"], dtype=info["dtype"], bytes=info["bytes"],
        threads=threads, reference=is_ref, samples=int(pooled.size), median_ms=med,
        p90_ms=float(np.percentile(pooled, 90)), p99_ms=float(np.percentile(pooled, 99)),
        mean_ms=float(pooled.mean()), min_ms=float(pooled.min()), faces_per_s=1000.0 / med if med > 0 else math.inf,
        round_median_ms=rounds_ms, ratio_to_torch=float(np.median(ratios)), ratio_low=float(min(ratios)),
        ratio_high=float(max(ratios)), cpu_median_ms=float(np.median(cpu_pooled)),
        cpu_p10_ms=float(np.percentile(cpu_pooled, CPU_QUANTILE)),
        cpu_ratio_to_torch=float(np.median(cpu_ratios)), cpu_ratio_low=float(min(cpu_ratios)),
        cpu_ratio_high=float(max(cpu_ratios)), peak_rss_bytes=peak if isolate else None,
        base_rss_bytes=int(info["base_rss"]) if isolate else None, load_s=float(info["load_s"]),
    )


def benchmark(models: Sequence[str | os.PathLike[str]], cfg: BenchConfig = BenchConfig(),
              progress: ProgressFn | None = None) -> BenchResult:
    """Time single-face inference of every model at every thread count, with the PyTorch reference.

    Returns rows for the reference first, then each model in the given order, per thread count.
    Raises `UsageError` for missing or unopenable models and when no reference can be found.
    """
    paths = _validate_models(models)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    crop = bench_crop(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="pfld-bench-") as tmp, ExitStack() as stack:
        ref_path, ref_info = resolve_reference(paths, cfg, Path(tmp))
        ordered = [ref_path] + [p for p in paths if p.resolve() != ref_path.resolve()]
        keys = [(p, t) for t in cfg.threads for p in ordered]
        total = len(keys) * (cfg.repeats + 1)
        done = 0

        def tick(what: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, what)

        sessions: dict[tuple[Path, int], Any] = {}
        for p, t in keys:
            s = _RemoteSession(p, t, cfg.seed, Path(tmp)) if cfg.isolate else _LocalSession(p, t, crop)
            if cfg.isolate:
                stack.callback(s.close)
            sessions[(p, t)] = s
            tick(f"open {p.name} x{t}")
        samples: dict[tuple[Path, int], list[dict[str, list[int]]]] = {k: [] for k in keys}
        for r in range(cfg.repeats):
            # Rotate the order each round so no session always runs right after a heavy one.
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                samples[k].append(sessions[k].round(cfg.runs, cfg.warmup))
                tick(f"round {r + 1}/{cfg.repeats} {k[0].name} x{k[1]}")
        peaks = {k: s.peak_rss() for k, s in sessions.items()}

    rows: list[BenchRow] = []
    for t in cfg.threads:
        ref = samples[(ref_path, t)]
        ref_rounds = {"wall": _round_medians(ref, "wall"), "cpu": _round_cpu_low(ref)}
        for p in ordered:
            k = (p, t)
            is_ref = p == ref_path
            rows.append(_summarise(samples[k], sessions[k].info, p, t, is_ref, None if is_ref else ref_rounds,
                                   peaks[k], cfg.isolate))
    if ref_info.how == "built":  # the temp file is gone; say what it was
        for row in rows:
            if row.reference:
                row.path, row.name = "(built)", "torch reference (built)"
        ref_info.path = "(built)"
    conf = asdict(cfg)
    conf["reference"] = str(cfg.reference) if cfg.reference else None
    return BenchResult(rows=rows, reference=ref_info, config=conf, machine=machine, versions=tool_versions(), date=started)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    sys.exit(_worker_main(sys.argv[2:]))
