"""Latency on an ARM phone over adb with TensorFlow Lite's `benchmark_model`.

    find_device(serial=None) -> AdbDevice
    run_benchmark_model(device, model_path, cfg: DeviceBenchConfig) -> DeviceBenchResult
    bench_arm(cfg: BenchArmConfig) -> BenchArmResult     (the stage: several models, JSON files)
    bench_arm_devices(cfg: BenchFarmConfig) -> BenchFarmResult   (the same on several devices at once)

Every adb call carries a subprocess timeout; adb failures become `DeviceError`s whose message
says what to do. Files pushed to the device are removed in a `finally`; a device that vanishes
mid-run raises DeviceError and leaves no result file behind (each model's JSON is written, with
io.py's atomic write, only once that model's runs are complete).

`benchmark_model` is not on any package registry: TensorFlow publishes nightly prebuilt
`android_aarch64_benchmark_model` binaries, linked from the TFLite "performance measurement"
docs (see android_bench/README.md). Its path comes from `--benchmark-model` or `BENCHMARK_MODEL`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DeviceError, PfldError, UsageError
from ..io import atomic_write_json, file_sha256
from ..report import to_jsonable
from ..device import check_threads
from .parse import BenchmarkModelOutput, parse_benchmark_output

ADB_INSTALL_HINT = (
    "install Android platform-tools (Debian/Ubuntu: `apt-get install adb`; macOS: `brew install "
    "android-platform-tools`; others: the platform-tools zip from developer.android.com) or point --adb / ADB at it"
)
BENCHMARK_MODEL_HINT = (
    "download TensorFlow's prebuilt android_aarch64_benchmark_model (linked from the TFLite "
    "'performance measurement' docs; see android_bench/README.md) and pass --benchmark-model PATH or set BENCHMARK_MODEL"
)
REMOTE_BASE = "/data/local/tmp"
_RC_MARK = "__PFLD_RC="
# adb's own words when the device is gone or the transport broke.
_GONE = re.compile(
    r"device '?[^']*'? not found|no devices/emulators found|device offline|device unauthorized|"
    r"error: closed|protocol fault|connection reset|broken pipe|failed to get feature set|cannot connect",
    re.I,
)

# ELF e_machine -> Android ABI (for the local "is this binary for this phone?" check).
_ELF_ABI = {0xB7: "arm64-v8a", 0x28: "armeabi-v7a", 0x3E: "x86_64", 0x03: "x86"}
# `uname -m` -> Android ABI name, for devices without getprop (Linux boards, the emulated rig).
_UNAME_ABI = {"aarch64": "arm64-v8a", "arm64": "arm64-v8a", "armv8l": "armeabi-v7a", "armv7l": "armeabi-v7a",
              "x86_64": "x86_64", "i686": "x86", "i386": "x86"}


def default_profiles_dir() -> Path:
    """android_bench/devices of this checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parents[2] / "android_bench" / "devices"


# ------------------------------------------------------------------------------------ device
@dataclass(frozen=True)
class DeviceProfile:
    """A device family from android_bench/devices/*.json: how to recognise it, which cores to use."""

    name: str
    description: str = ""
    match: dict[str, Any] = field(default_factory=dict)  # {"board": [...], "marker": true}
    big_cores: tuple[int, ...] | None = None  # None: pick from cpufreq
    emulated: bool = False
    notes: str = ""

    @classmethod
    def from_file(cls, path: Path) -> "DeviceProfile":
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"device profile {path} is not valid JSON ({e}); fix or delete it") from None
        bc = d.get("big_cores")
        return cls(name=str(d.get("name", path.stem)), description=str(d.get("description", "")), match=dict(d.get("match", {})),
                   big_cores=tuple(int(c) for c in bc) if bc else None, emulated=bool(d.get("emulated", False)),
                   notes=str(d.get("notes", "")))


GENERIC_PROFILE = DeviceProfile(name="generic", description="any adb device; big cores picked from cpufreq")


def load_profiles(directory: Path | None = None) -> list[DeviceProfile]:
    """All profiles in `directory` (default android_bench/devices); empty if it does not exist."""
    d = default_profiles_dir() if directory is None else Path(directory)
    return [DeviceProfile.from_file(p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


@dataclass(frozen=True)
class DeviceInfo:
    """What the probe found on the device."""

    serial: str
    model: str
    abi: str
    abilist: tuple[str, ...]
    board: str
    core_max_khz: tuple[int | None, ...]  # per core index
    big_cores: tuple[int, ...]
    mask: str  # taskset hex mask of big_cores, e.g. "f0"
    taskset: bool  # the device has a taskset command
    emulated: bool
    profile: str
    marker: str = ""


def pick_big_cores(max_khz: Sequence[int | None]) -> tuple[int, ...]:
    """Cores faster than the slowest cluster (SD845: 4-7); all cores when they are equal or unknown."""
    known = [f for f in max_khz if f]
    if not known or min(known) == max(known):
        return tuple(range(len(max_khz)))
    slowest = min(known)
    return tuple(i for i, f in enumerate(max_khz) if f and f > slowest)


def cpu_mask(cores: Sequence[int]) -> str:
    """taskset hex mask: cores 4-7 -> "f0"."""
    if not cores:
        raise UsageError("no cores to build a taskset mask from")
    return format(sum(1 << c for c in set(cores)), "x")


_PROBE = (
    "for p in ro.product.cpu.abi ro.product.cpu.abilist ro.product.model ro.board.platform ro.kernel.qemu; do "
    "echo \"prop $p=$(getprop $p 2>/dev/null)\"; done; "
    "echo \"uname=$(uname -m)\"; "
    "for c in /sys/devices/system/cpu/cpu[0-9]*; do echo \"cpu ${c##*/} $(cat $c/cpufreq/cpuinfo_max_freq 2>/dev/null)\"; done; "
    "[ -e /etc/pfld-export-emulated ] && echo \"marker=$(cat /etc/pfld-export-emulated)\"; "
    "command -v taskset >/dev/null 2>&1 && echo taskset=yes; true"
)


@dataclass
class ShellResult:
    output: str  # stdout and stderr interleaved, as the device printed them
    rc: int


class AdbDevice:
    """One adb device. Every call runs `adb -s SERIAL ...` under a subprocess timeout."""

    def __init__(self, serial: str, adb: str = "adb", timeout_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.serial = serial
        self.adb = adb
        self.timeout_s = float(timeout_s)
        self.env = env
        self._info: DeviceInfo | None = None

    def __repr__(self) -> str:
        return f"AdbDevice({self.serial!r})"

    def run(self, args: Sequence[str], timeout_s: float | None = None, what: str | None = None) -> subprocess.CompletedProcess[str]:
        """`adb -s SERIAL ARGS`; DeviceError on timeout or when adb says the device is gone."""
        return _adb(self.adb, ["-s", self.serial, *args], timeout_s or self.timeout_s, self.env,
                    what=what or f"adb {' '.join(args[:2])}", serial=self.serial)

    def shell(self, command: str, timeout_s: float | None = None, what: str | None = None) -> ShellResult:
        """Run a shell command on the device; its exit status is read from a marker line because
        older adb versions always exit 0 for `adb shell`."""
        what = what or f"adb shell {command[:60]}"
        p = self.run(["shell", f"{command}; echo {_RC_MARK}$?"], timeout_s, what=what)
        stdout, stderr = (p.stdout or "").replace("\r", ""), (p.stderr or "").replace("\r", "")
        # adb >= 24 (shell protocol v2) keeps the device's stderr apart, so the marker ends stdout;
        # older adb merges both into stdout.
        m = re.search(rf"{_RC_MARK}(\d+)\s*$", stdout)
        if m is None:
            # No marker: the shell never finished (device vanished, adb transport broke).
            raise DeviceError(f"lost device {self.serial} during {what}: {_last_line(stderr + stdout) or 'no output'}; "
                              "reconnect it (check the cable and `adb devices`) and re-run")
        return ShellResult(output=stdout[: m.start()] + stderr, rc=int(m.group(1)))

    def push(self, local: Path, remote: str, timeout_s: float | None = None) -> None:
        """`adb push LOCAL REMOTE`; DeviceError (with the fix) when it fails."""
        p = self.run(["push", str(local), remote], timeout_s, what=f"adb push {Path(local).name}")
        if p.returncode != 0:
            raise DeviceError(f"adb push {local} -> {remote} failed on {self.serial}: {_said(p)}; "
                              "check free space on the device (`adb shell df /data/local/tmp`)")

    def pull(self, remote: str, local: Path, timeout_s: float | None = None) -> None:
        """`adb pull REMOTE LOCAL`; DeviceError when it fails."""
        p = self.run(["pull", remote, str(local)], timeout_s, what=f"adb pull {remote}")
        if p.returncode != 0:
            raise DeviceError(f"adb pull {remote} failed on {self.serial}: {_said(p)}")

    def info(self, profiles: Sequence[DeviceProfile] | None = None) -> DeviceInfo:
        """Probe ABI, CPU layout (max frequency per core), taskset, emulation; match a profile."""
        if self._info is None:
            res = self.shell(_PROBE, timeout_s=min(self.timeout_s, 60.0), what="device probe")
            self._info = _device_info(self.serial, res.output, load_profiles() if profiles is None else profiles)
        return self._info


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").replace("\r", "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _said(p: subprocess.CompletedProcess[str]) -> str:
    """What a failed adb call said, with its exit code (an adb that prints nothing still says something)."""
    line = _last_line((p.stderr or "") + (p.stdout or ""))
    return f"exit code {p.returncode}: {line}" if line else f"exit code {p.returncode}, no output"


def _adb(adb: str, args: Sequence[str], timeout_s: float, env: dict[str, str] | None, what: str,
         serial: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run([adb, *args], capture_output=True, text=True, timeout=timeout_s, env=env,
                           stdin=subprocess.DEVNULL, errors="replace")
    except FileNotFoundError:
        raise DeviceError(f"adb not found at {adb!r}: {ADB_INSTALL_HINT}") from None
    except PermissionError:
        raise DeviceError(f"{adb!r} is not executable: chmod +x it or {ADB_INSTALL_HINT}") from None
    except subprocess.TimeoutExpired:
        who = f" on {serial}" if serial else ""
        raise DeviceError(f"{what}{who} timed out after {timeout_s:g} s: the device may be hung or disconnected; "
                          "check `adb devices`, replug it, or raise --timeout for slow models") from None
    if serial is not None and p.returncode != 0 and _GONE.search((p.stderr or "") + (p.stdout or "")):
        raise DeviceError(f"device {serial} disappeared during {what} ({_said(p)}); "
                          "reconnect it (check the cable and `adb devices`) and re-run")
    return p


def _device_info(serial: str, text: str, profiles: Sequence[DeviceProfile]) -> DeviceInfo:
    props: dict[str, str] = {}
    cores: dict[int, int | None] = {}
    uname = marker = ""
    has_taskset = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("prop ") and "=" in line:
            k, v = line[5:].split("=", 1)
            props[k] = v.strip()
        elif line.startswith("uname="):
            uname = line[6:].strip()
        elif m := re.match(r"cpu cpu(\d+)\s*(\d*)", line):
            cores[int(m.group(1))] = int(m.group(2)) if m.group(2) else None
        elif line.startswith("marker="):
            marker = line[7:].strip()
        elif line == "taskset=yes":
            has_taskset = True
    abi = props.get("ro.product.cpu.abi") or _UNAME_ABI.get(uname, uname)
    if not abi:
        raise DeviceError(f"could not read the CPU ABI of {serial} (no getprop, no `uname -m` output); is it an Android/Linux device?")
    abilist = tuple(a for a in props.get("ro.product.cpu.abilist", "").split(",") if a) or (abi,)
    n = max(cores) + 1 if cores else 0
    khz = tuple(cores.get(i) for i in range(n))
    board = props.get("ro.board.platform", "")
    profile = _match_profile(board, marker, profiles)
    if profile.big_cores and n and max(profile.big_cores) < n:
        big = tuple(profile.big_cores)
    else:
        big = pick_big_cores(khz) if n else ()
    emulated = profile.emulated or bool(marker) or props.get("ro.kernel.qemu") == "1"
    return DeviceInfo(serial=serial, model=props.get("ro.product.model") or uname or "unknown", abi=abi, abilist=abilist,
                      board=board, core_max_khz=khz, big_cores=big, mask=cpu_mask(big) if big else "",
                      taskset=has_taskset, emulated=emulated, profile=profile.name, marker=marker)


def _match_profile(board: str, marker: str, profiles: Sequence[DeviceProfile]) -> DeviceProfile:
    for p in profiles:
        m = p.match
        if m.get("marker") and marker:
            return p
        if board and board.lower() in [b.lower() for b in m.get("board", [])]:
            return p
    return next((p for p in profiles if p.name == "generic"), GENERIC_PROFILE)


_STATE_HELP = {
    "unauthorized": "accept the 'Allow USB debugging?' prompt on the phone (tick 'Always allow'); no prompt? "
                    "Developer options > Revoke USB debugging authorizations, then replug",
    "offline": "replug the cable or run `adb reconnect` (if it stays offline: `adb kill-server`, then unlock the phone)",
    "no permissions": "add a udev rule for the phone (Debian: `apt-get install android-sdk-platform-tools-common`) "
                      "and replug, or run adb as root",
    "authorizing": "wait for the device to finish authorizing, then re-run",
    "connecting": "wait for the device to connect, then re-run",
}


def list_devices(adb: str | None = None, timeout_s: float = 30.0, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """[(serial, state)] from `adb devices` (starts the adb server if needed)."""
    exe = adb or shutil.which("adb")
    if not exe:
        raise DeviceError(f"adb is not installed (not on PATH): {ADB_INSTALL_HINT}")
    p = _adb(exe, ["devices"], timeout_s, env, what="adb devices")
    if p.returncode != 0:
        raise DeviceError(f"`adb devices` failed: {_said(p)}; try `adb kill-server` and re-run")
    found = []
    for line in p.stdout.replace("\r", "").splitlines():
        if not line.strip() or line.startswith(("List of devices", "*", "adb server")):
            continue
        parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
        if len(parts) == 2:
            found.append((parts[0].strip(), parts[1].strip()))
    return found


def _state_key(state: str) -> str:
    return "no permissions" if state.startswith("no permissions") else state


def find_device(serial: str | None = None, adb: str | None = None, timeout_s: float = 60.0,
                env: dict[str, str] | None = None) -> AdbDevice:
    """The one usable device (or `serial`), with a DeviceError naming the fix otherwise."""
    exe = adb or shutil.which("adb")
    if not exe:
        raise DeviceError(f"adb is not installed (not on PATH): {ADB_INSTALL_HINT}")
    devices = list_devices(exe, timeout_s=min(timeout_s, 60.0), env=env)
    listing = ", ".join(f"{s} ({st})" for s, st in devices) or "none"
    if serial is not None:
        match = [st for s, st in devices if s == serial]
        if not match:
            hint = f"run `adb connect {serial}` first" if ":" in serial else "check the serial with `adb devices`"
            raise DeviceError(f"device {serial!r} is not attached (attached: {listing}); {hint}")
        state = _state_key(match[0])
        if state != "device":
            raise DeviceError(f"device {serial} is {match[0]}: {_STATE_HELP.get(state, 'fix it on the phone and re-run')}")
        return AdbDevice(serial, exe, timeout_s, env)
    ready = [s for s, st in devices if st == "device"]
    if len(ready) == 1:
        return AdbDevice(ready[0], exe, timeout_s, env)
    if len(ready) > 1:
        raise DeviceError(f"{len(ready)} devices attached ({', '.join(ready)}): pass --serial SERIAL (make bench-arm SERIAL=...)")
    if devices:
        s, st = devices[0]
        more = f" (all: {listing})" if len(devices) > 1 else ""
        raise DeviceError(f"device {s} is {st}{more}: {_STATE_HELP.get(_state_key(st), 'fix it on the phone and re-run')}")
    raise DeviceError("no adb device attached: connect a phone with USB debugging on (Settings > Developer options), "
                      "check `adb devices`, or `adb connect HOST:PORT` for a network device")


# --------------------------------------------------------------------------------- benchmark
@dataclass(frozen=True)
class DeviceBenchConfig:
    """How to run benchmark_model on the device."""

    benchmark_model: Path
    threads: tuple[int, ...] = (1, 4)
    warmup_runs: int = 5
    num_runs: int = 50
    use_xnnpack: bool = True
    op_profiling: bool = False
    taskset: bool = True  # pin to the big cores
    timeout_s: float = 600.0  # per benchmark_model run
    push_timeout_s: float = 120.0
    extra_args: tuple[str, ...] = ()
    remote_base: str = REMOTE_BASE
    # Optional on-device inference on given input bytes (benchmark_model's
    # --input_layer_value_files / --output_filepath); the raw output is pulled to `output_dir`.
    input_files: tuple[tuple[str, Path], ...] = ()
    output_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.threads:
            raise UsageError("--threads is empty; e.g. --threads 1,4")
        for t in self.threads:
            check_threads(t)
        if self.num_runs < 1 or self.warmup_runs < 0:
            raise UsageError(f"need --runs >= 1 and --warmup >= 0, got runs={self.num_runs} warmup={self.warmup_runs}")
        if self.timeout_s <= 0 or self.push_timeout_s <= 0:
            raise UsageError(f"timeouts must be positive, got {self.timeout_s} / {self.push_timeout_s}")


@dataclass
class ThreadRun:
    """One benchmark_model invocation at one thread count."""

    threads: int
    ok: bool
    inference_avg_ms: float | None
    init_ms: float | None
    first_ms: float | None
    warmup_avg_ms: float | None
    std_ms: float | None
    count: int | None
    percentiles_ms: dict[str, float]
    peak_memory_mb: float | None
    command: str
    parsed: BenchmarkModelOutput
    output_file: Path | None = None  # pulled raw output bytes, when input_files were given


@dataclass
class DeviceBenchResult:
    """benchmark_model results for one model on one device (one JSON file per model)."""

    model: str
    model_bytes: int
    model_sha256: str
    device: DeviceInfo
    emulated: bool
    cores_used: tuple[int, ...]
    mask: str | None
    use_xnnpack: bool
    warmup_runs: int
    num_runs: int
    tool: str
    tool_sha256: str
    tool_version: str | None
    runs: list[ThreadRun]
    date: str
    host: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)


def elf_abi(path: Path) -> str | None:
    """Android ABI an ELF executable is built for, or None if it is not ELF (e.g. a script)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    endian = "little" if head[5] == 1 else "big"
    machine = int.from_bytes(head[18:20], endian)
    return _ELF_ABI.get(machine, f"elf-machine-{machine:#x}")


def _check_local(model_path: Path, cfg: DeviceBenchConfig, info: DeviceInfo) -> None:
    if not model_path.is_file():
        raise UsageError(f"model {model_path} does not exist; check the path")
    if model_path.suffix.lower() != ".tflite":
        raise UsageError(f"{model_path}: benchmark_model runs .tflite files, got {model_path.suffix!r}; convert it first (pfld-export convert)")
    bm = Path(cfg.benchmark_model)
    if not bm.is_file():
        raise UsageError(f"benchmark_model binary {bm} does not exist: {BENCHMARK_MODEL_HINT}")
    abi = elf_abi(bm)
    if abi is not None and abi not in info.abilist and abi != info.abi:
        raise DeviceError(f"ABI mismatch: {bm} is built for {abi} but device {info.serial} runs {info.abi} "
                          f"(supports {', '.join(info.abilist)}); use the android_{'aarch64' if info.abi == 'arm64-v8a' else 'arm'}"
                          "_benchmark_model build")


def _runs_check(device: AdbDevice, rdir: str, cfg: DeviceBenchConfig, info: DeviceInfo) -> None:
    """The pushed binary must start on the device (wrong ABI / missing libraries show here)."""
    res = device.shell(f"cd {rdir} && chmod 755 benchmark_model && ./benchmark_model --help 2>&1 | head -n 40",
                       timeout_s=min(cfg.timeout_s, 120.0), what="benchmark_model start check")
    bad = re.search(r"not executable|Exec format error|cannot execute|CANNOT LINK EXECUTABLE|syntax error|"
                    r"not found|No such file|Permission denied|Illegal instruction", res.output, re.I)
    if bad:
        raise DeviceError(f"benchmark_model does not run on {info.serial} ({info.abi}): {_last_line(res.output)}; "
                          f"it is probably built for another ABI or needs missing libraries: {BENCHMARK_MODEL_HINT}")


def benchmark_command(model_name: str, threads: int, cfg: DeviceBenchConfig, info: DeviceInfo,
                      input_names: Sequence[tuple[str, str]] = (), output_name: str | None = None) -> str:
    """The device-side command line (relative to the pushed directory)."""
    args = [
        "./benchmark_model", f"--graph={model_name}", f"--num_threads={threads}",
        f"--use_xnnpack={'true' if cfg.use_xnnpack else 'false'}", f"--warmup_runs={cfg.warmup_runs}",
        f"--num_runs={cfg.num_runs}", "--report_peak_memory_footprint=true",
    ]
    if cfg.op_profiling:
        args.append("--enable_op_profiling=true")
    if input_names:
        args.append("--input_layer_value_files=" + ",".join(f"{layer}:{name}" for layer, name in input_names))
    if output_name:
        args.append(f"--output_filepath={output_name}")
    args.extend(cfg.extra_args)
    cmd = " ".join(shlex.quote(a) for a in args)
    if cfg.taskset and info.taskset and info.mask:
        cmd = f"taskset {info.mask} {cmd}"
    return cmd


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000.0


def run_benchmark_model(device: AdbDevice, model_path: str | os.PathLike[str], cfg: DeviceBenchConfig,
                        progress: Callable[[str], None] | None = None) -> DeviceBenchResult:
    """Push `model_path` and benchmark_model, run it at each thread count (pinned to the big cores),
    parse every run; remove the pushed files whatever happens. Raises DeviceError when the device
    is lost or the binary cannot run there; a benchmark_model failure (e.g. an unsupported op) is
    returned as a ThreadRun with ok=False and the reason."""
    model = Path(model_path)
    info = device.info()
    _check_local(model, cfg, info)
    say = progress or (lambda _msg: None)
    rdir = f"{cfg.remote_base.rstrip('/')}/pfld-export-{secrets.token_hex(4)}"
    runs: list[ThreadRun] = []
    try:
        device.shell(f"mkdir -p {rdir}", timeout_s=30, what="mkdir on device")
        say(f"push benchmark_model and {model.name} to {info.serial}:{rdir}")
        device.push(Path(cfg.benchmark_model), f"{rdir}/benchmark_model", cfg.push_timeout_s)
        _runs_check(device, rdir, cfg, info)
        device.push(model, f"{rdir}/{model.name}", cfg.push_timeout_s)
        inputs: list[tuple[str, str]] = []
        for i, (layer, local) in enumerate(cfg.input_files):
            name = f"input{i}.bin"
            device.push(Path(local), f"{rdir}/{name}", cfg.push_timeout_s)
            inputs.append((layer, name))
        for t in cfg.threads:
            out_name = f"output_t{t}.bin" if cfg.output_dir is not None else None
            cmd = benchmark_command(model.name, t, cfg, info, inputs, out_name)
            say(f"{model.name}: {t} thread(s) on cores {','.join(map(str, info.big_cores))}")
            res = device.shell(f"cd {rdir} && {cmd} 2>&1", timeout_s=cfg.timeout_s, what=f"benchmark_model ({t} threads)")
            parsed = parse_benchmark_output(res.output)
            if res.rc != 0 and parsed.ok:
                # Timings printed but the tool then died (e.g. crashed while reporting): not a result.
                parsed.ok, parsed.failure_reason = False, f"benchmark_model exited with status {res.rc} after printing timings"
            local_out = None
            if out_name and parsed.ok:
                local_out = Path(cfg.output_dir) / f"{model.stem}.t{t}.output.bin"  # type: ignore[arg-type]
                local_out.parent.mkdir(parents=True, exist_ok=True)
                device.pull(f"{rdir}/{out_name}", local_out, cfg.push_timeout_s)
            runs.append(ThreadRun(
                threads=t, ok=parsed.ok, inference_avg_ms=_ms(parsed.inference_avg_us), init_ms=_ms(parsed.init_us),
                first_ms=_ms(parsed.first_us), warmup_avg_ms=_ms(parsed.warmup_avg_us), std_ms=_ms(parsed.std_us),
                count=parsed.count, percentiles_ms={k: v / 1000.0 for k, v in parsed.percentiles.items()},
                peak_memory_mb=parsed.peak_memory_mb, command=cmd, parsed=parsed, output_file=local_out,
            ))
    finally:
        # Best effort: on a vanished device this fails too, and the original error must win.
        try:
            device.shell(f"rm -rf {rdir}", timeout_s=30, what="cleanup")
        except DeviceError:
            pass
    versions = [r.parsed.tool_version for r in runs if r.parsed.tool_version]
    return DeviceBenchResult(
        model=str(model), model_bytes=model.stat().st_size, model_sha256=file_sha256(model), device=info,
        emulated=info.emulated or any(r.parsed.emulated for r in runs),
        cores_used=info.big_cores if (cfg.taskset and info.taskset and info.mask) else tuple(range(len(info.core_max_khz))),
        mask=info.mask if (cfg.taskset and info.taskset and info.mask) else None,
        use_xnnpack=cfg.use_xnnpack, warmup_runs=cfg.warmup_runs, num_runs=cfg.num_runs,
        tool=str(Path(cfg.benchmark_model).resolve()), tool_sha256=file_sha256(Path(cfg.benchmark_model)),
        tool_version=versions[0] if versions else None, runs=runs,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
    )


# -------------------------------------------------------------------------------------- stage
@dataclass(frozen=True)
class BenchArmConfig:
    """`pfld-export bench-arm`: which models, which device, where the JSON files go."""

    models: tuple[Path, ...]
    bench: DeviceBenchConfig
    out_dir: Path = Path("out/bench-arm")
    serial: str | None = None
    adb: str | None = None
    adb_timeout_s: float = 60.0
    profiles_dir: Path | None = None


@dataclass(frozen=True)
class BenchFarmConfig(BenchArmConfig):
    """`pfld-export bench-arm` on several devices: `serials`, or every attached one (`all_devices`)."""

    serials: tuple[str, ...] = ()
    all_devices: bool = False

    def __post_init__(self) -> None:
        if self.all_devices and self.serials:
            raise UsageError("pass either --serial a,b,c or --all-devices, not both")
        if not self.all_devices and not self.serials:
            raise UsageError("name the devices with --serial a,b,c or pass --all-devices")
        if len(set(self.serials)) != len(self.serials):
            raise UsageError(f"--serial lists a device twice ({','.join(self.serials)}); each device runs once")


@dataclass
class BenchArmResult:
    device: DeviceInfo
    results: list[DeviceBenchResult]
    files: list[Path]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def result_path(out_dir: Path, model: Path, info: DeviceInfo) -> Path:
    """One JSON per model and device: `<out>/<model stem>.<profile>-<serial>.json`."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", info.serial)
    return Path(out_dir) / f"{model.stem}.{info.profile}-{safe}.json"


def _check_inputs(cfg: BenchArmConfig) -> None:
    if not cfg.models:
        raise UsageError("no models given; pass one or more .tflite files")
    for m in cfg.models:
        if not Path(m).is_file():
            raise UsageError(f"model {m} does not exist; check the path")
    if not Path(cfg.bench.benchmark_model).is_file():
        raise UsageError(f"benchmark_model binary {cfg.bench.benchmark_model} does not exist: {BENCHMARK_MODEL_HINT}")


def bench_arm(cfg: BenchArmConfig, progress: Callable[[str], None] | None = None) -> BenchArmResult:
    """Benchmark each model on the device and write one JSON per model (atomically, only when that
    model's runs completed: a lost device leaves no partial file)."""
    _check_inputs(cfg)
    device = find_device(cfg.serial, cfg.adb, cfg.adb_timeout_s)
    info = device.info(load_profiles(cfg.profiles_dir))
    results, files = [], []
    for m in cfg.models:
        r = run_benchmark_model(device, m, cfg.bench, progress)
        path = result_path(cfg.out_dir, Path(m), info)
        atomic_write_json(path, to_jsonable(r))
        results.append(r)
        files.append(path)
    return BenchArmResult(device=info, results=results, files=files)


# --------------------------------------------------------------------------------- many devices
@dataclass
class DeviceOutcome:
    """One device of a farm run: what it measured, and why it stopped if it did not finish."""

    serial: str
    device: DeviceInfo | None  # None when the device could not even be probed
    results: list[DeviceBenchResult]
    files: list[Path]
    error: str | None = None  # the DeviceError / UsageError message that stopped this device
    failed_model: str | None = None  # the model it was on when it stopped

    @property
    def ok(self) -> bool:
        """Finished every model, and every benchmark_model run succeeded."""
        return self.error is None and all(r.ok for r in self.results)


@dataclass
class BenchFarmResult:
    """`bench-arm --serial a,b,c` / `--all-devices`: one outcome per device, in the order asked."""

    devices: list[DeviceOutcome]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.devices)

    @property
    def failed(self) -> list[DeviceOutcome]:
        return [d for d in self.devices if not d.ok]


def farm_serials(cfg: BenchFarmConfig) -> list[tuple[str, str]]:
    """[(serial, adb state)] of the devices to run: the given serials, or every attached one."""
    listed = list_devices(cfg.adb, timeout_s=min(cfg.adb_timeout_s, 60.0))
    if not cfg.all_devices:
        states = dict(listed)
        return [(s, states.get(s, "not attached")) for s in cfg.serials]
    if not listed:
        raise DeviceError("--all-devices but no adb device is attached: connect the phones (USB debugging on) or "
                          "`adb connect HOST:PORT` them, and check `adb devices`")
    return listed


def _bench_one_device(serial: str, state: str, cfg: BenchFarmConfig, progress: Callable[[str], None] | None) -> DeviceOutcome:
    """All models on one device, in turn; stops at the first error and keeps what finished."""
    out = DeviceOutcome(serial=serial, device=None, results=[], files=[])
    say = (lambda msg: progress(f"{serial}: {msg}")) if progress is not None else None
    model: Path | None = None
    try:
        if state != "device":
            raise DeviceError(f"device {serial} is {state}: "
                              f"{_STATE_HELP.get(_state_key(state), 'check the serial with `adb devices`')}")
        device = find_device(serial, cfg.adb, cfg.adb_timeout_s)
        out.device = device.info(load_profiles(cfg.profiles_dir))
        for model in cfg.models:
            r = run_benchmark_model(device, model, cfg.bench, say)
            path = result_path(cfg.out_dir, Path(model), out.device)
            atomic_write_json(path, to_jsonable(r))
            out.results.append(r)
            out.files.append(path)
    except PfldError as e:  # this device's failure is its row; the other devices go on
        out.error = str(e)
        out.failed_model = str(model) if model is not None else None
    return out


def bench_arm_devices(cfg: BenchFarmConfig, progress: Callable[[str], None] | None = None) -> BenchFarmResult:
    """Benchmark every model on several devices at once: one worker thread per device, each
    device's runs in turn (two benchmark_model processes on one phone would disturb each other's
    timings). One JSON per device and model, as `bench_arm` writes them. A device that fails or
    disconnects stops only itself: its outcome carries the error, the others finish."""
    from concurrent.futures import ThreadPoolExecutor

    _check_inputs(cfg)
    serials = farm_serials(cfg)
    # Threads, not processes: the workers wait on adb subprocesses; nothing here holds the GIL long.
    with ThreadPoolExecutor(max_workers=len(serials), thread_name_prefix="bench-arm") as pool:
        futures = [pool.submit(_bench_one_device, s, st, cfg, progress) for s, st in serials]
        return BenchFarmResult(devices=[f.result() for f in futures])
