"""adb.py against a fake `adb` executable on PATH (a small script written into tmp_path).

The fake answers `adb devices`, `push`, `pull` and the shell commands adb.py sends, per a JSON
scenario file; it logs every call so tests can check what was run and that cleanup happened.
The real adb/adbd path is covered by the emulated-ARM rig (`make test-arm`).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pfld_export.bench.adb import (
    BenchArmConfig,
    BenchFarmConfig,
    DeviceBenchConfig,
    bench_arm,
    bench_arm_devices,
    cpu_mask,
    elf_abi,
    find_device,
    load_profiles,
    pick_big_cores,
    run_benchmark_model,
)
from pfld_export.cli import main
from pfld_export.errors import DeviceError, UsageError
from pfld_export.report import format_bench_arm_devices

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "android_bench" / "devices"

SD845_KHZ = [1766400] * 4 + [2803200] * 4
GOOD_OUTPUT = """INFO: STARTING!
INFO: Num threads: [{threads}]
INFO: Graph: [m.tflite]
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
VERBOSE: Replacing 31 out of 31 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 1 partitions for subgraph 0.
INFO: Initialized session in 3.5ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=90 first=9100 curr=5020 min=4990 max=9100 avg=5120.5 std=400

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=200 first=5010 curr=5005 min=4950 max=6100 avg={avg} std=81 p5=4960 median=5001 p95=5200

INFO: Inference timings in us: Init: 3500, First inference: 9100, Warmup (avg): 5120.5, Inference (avg): {avg}
INFO: Memory footprint delta from the start of the tool (MB): init=2.5 overall=9.75
INFO: Overall peak memory footprint (MB) via periodic monitoring: 14.25
"""

FAKE_ADB = r'''
import json, os, re, sys, time
cfg = json.load(open(os.environ["FAKE_ADB_CONFIG"]))
args = sys.argv[1:]
with open(cfg["log"], "a") as f:
    f.write(json.dumps(args) + "\n")
serial = None
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
sub = args[0] if args else ""
hang = cfg.get("hang", "")
if sub == "devices":
    if hang == "devices":
        time.sleep(30)
    print("List of devices attached")
    for s, st in cfg.get("devices", []):
        print(f"{s}\t{st}")
    print()
    sys.exit(0)
if serial not in [s for s, st in cfg.get("devices", []) if st == "device"]:
    print(f"adb: device '{serial}' not found", file=sys.stderr); sys.exit(1)
if serial in cfg.get("dies_after", {}):
    # The device is gone from its (dies_after + 1)-th benchmark_model run on (the log holds this call).
    runs = sum(1 for line in open(cfg["log"]) if serial in json.loads(line) and "--graph" in line)
    if runs > cfg["dies_after"][serial]:
        print(f"adb: error: device '{serial}' not found", file=sys.stderr); sys.exit(1)
if sub == "push":
    if cfg.get("vanish") == "push":
        print(f"adb: error: device '{serial}' not found", file=sys.stderr); sys.exit(1)
    print(f"{args[1]}: 1 file pushed."); sys.exit(0)
if sub == "pull":
    open(args[2], "wb").write(b"\x01\x02"); sys.exit(0)
if sub == "shell":
    cmd = args[1]
    if "ro.product.cpu.abi" in cmd:
        p = cfg.get("probes", {}).get(serial, cfg["probe"])
        for k, v in p.get("props", {}).items():
            print(f"prop {k}={v}")
        print(f"uname={p.get('uname', 'aarch64')}")
        for i, khz in enumerate(p.get("khz", [])):
            print(f"cpu cpu{i} {khz or ''}")
        if p.get("taskset", True):
            print("taskset=yes")
    elif "--help" in cmd:
        print(cfg.get("help_output", "usage: benchmark_model"))
    elif "./benchmark_model --graph" in cmd or "benchmark_model --graph" in cmd:
        if hang == "benchmark":
            time.sleep(30)
        if cfg.get("vanish") == "benchmark":
            print("INFO: STARTING!", flush=True)
            print(f"error: device '{serial}' not found", file=sys.stderr); sys.exit(1)
        threads = re.search(r"--num_threads=(\d+)", cmd).group(1)
        if cfg.get("bench_sleep"):
            with open(cfg["log"] + ".events", "a") as f:
                f.write(f"{serial} start {time.time()}\n")
            time.sleep(cfg["bench_sleep"])
            with open(cfg["log"] + ".events", "a") as f:
                f.write(f"{serial} end {time.time()}\n")
        print(cfg["bench_output"].replace("{threads}", threads).replace("{avg}", str(5000 + int(threads))))
    print(f"__PFLD_RC={cfg.get('rc', 0)}")
    sys.exit(0)
print("unknown command", args, file=sys.stderr); sys.exit(1)
'''


class FakeAdb:
    """Writes the fake adb + its scenario into tmp_path and puts it first on PATH."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp_path / "bin"
        self.dir.mkdir()
        self.log = tmp_path / "adb.log"
        self.config = tmp_path / "adb.json"
        exe = self.dir / "adb"
        exe.write_text(f"#!{sys.executable}\n{FAKE_ADB}")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{self.dir}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("FAKE_ADB_CONFIG", str(self.config))
        self.set(devices=[["ABC123", "device"]])

    def set(self, **kw: object) -> None:
        cfg = {"log": str(self.log), "probe": {"props": {"ro.product.cpu.abi": "arm64-v8a", "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a",
                                                         "ro.product.model": "Pixel 3", "ro.board.platform": "sdm845"},
                                               "khz": SD845_KHZ}, "bench_output": GOOD_OUTPUT}
        cfg.update(kw)
        self.config.write_text(json.dumps(cfg))

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def shell_cmds(self) -> list[str]:
        return [c[c.index("shell") + 1] for c in self.calls() if "shell" in c]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAdb:
    return FakeAdb(tmp_path, monkeypatch)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3" + bytes(64))
    bm = tmp_path / "benchmark_model"
    # A minimal aarch64 ELF header: EI_CLASS 64-bit, little-endian, e_machine 0xB7.
    bm.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + (0xB7).to_bytes(2, "little") + bytes(44))
    return model, bm


# ----------------------------------------------------------------------------- find_device
def test_adb_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(DeviceError, match=r"adb is not installed.*apt-get install adb"):
        find_device()


def test_no_device(fake: FakeAdb) -> None:
    fake.set(devices=[])
    with pytest.raises(DeviceError, match=r"no adb device attached.*USB debugging"):
        find_device()


def test_unauthorized(fake: FakeAdb) -> None:
    fake.set(devices=[["ABC123", "unauthorized"]])
    with pytest.raises(DeviceError, match=r"ABC123 is unauthorized.*accept the 'Allow USB debugging\?' prompt"):
        find_device()
    with pytest.raises(DeviceError, match="accept"):
        find_device("ABC123")


def test_offline(fake: FakeAdb) -> None:
    fake.set(devices=[["ABC123", "offline"]])
    with pytest.raises(DeviceError, match=r"offline.*adb reconnect"):
        find_device()


def test_several_devices_need_serial(fake: FakeAdb) -> None:
    fake.set(devices=[["ABC123", "device"], ["XYZ789", "device"]])
    with pytest.raises(DeviceError, match=r"2 devices attached \(ABC123, XYZ789\).*--serial"):
        find_device()
    assert find_device("XYZ789").serial == "XYZ789"
    with pytest.raises(DeviceError, match=r"'NOPE' is not attached.*ABC123 \(device\)"):
        find_device("NOPE")


def test_adb_devices_timeout(fake: FakeAdb) -> None:
    fake.set(devices=[["ABC123", "device"]], hang="devices")
    with pytest.raises(DeviceError, match=r"adb devices timed out after 1 s"):
        find_device(timeout_s=1)


# --------------------------------------------------------------------------------- probe
def test_sd845_probe_picks_big_cores_and_profile(fake: FakeAdb) -> None:
    info = find_device().info(load_profiles(PROFILES))
    assert info.abi == "arm64-v8a" and info.abilist == ("arm64-v8a", "armeabi-v7a")
    assert info.big_cores == (4, 5, 6, 7) and info.mask == "f0"
    assert info.profile == "sd845" and not info.emulated
    assert info.core_max_khz == tuple(SD845_KHZ)


def test_probe_without_getprop_uses_uname_and_all_cores(fake: FakeAdb) -> None:
    fake.set(devices=[["ABC123", "device"]], probe={"props": {}, "uname": "aarch64", "khz": [None, None, None]})
    info = find_device().info(load_profiles(PROFILES))
    assert info.abi == "arm64-v8a" and info.profile == "generic"
    assert info.big_cores == (0, 1, 2) and info.mask == "7"


def test_pick_big_cores_and_mask() -> None:
    assert pick_big_cores(SD845_KHZ) == (4, 5, 6, 7) and cpu_mask((4, 5, 6, 7)) == "f0"
    # SD855-style tri-cluster: prime + gold are "big", silver is not.
    assert pick_big_cores([1785600] * 4 + [2419200] * 3 + [2841600]) == (4, 5, 6, 7)
    assert pick_big_cores([2000000] * 4) == (0, 1, 2, 3)
    assert pick_big_cores([None, 1000, 2000]) == (2,)
    assert cpu_mask([0]) == "1" and cpu_mask([0, 1, 2, 3, 4, 5, 6, 7]) == "ff"
    with pytest.raises(UsageError):
        cpu_mask([])


# ---------------------------------------------------------------------------- benchmark
def test_run_benchmark_model_command_parse_and_cleanup(fake: FakeAdb, files: tuple[Path, Path]) -> None:
    model, bm = files
    dev = find_device()
    dev.info(load_profiles(PROFILES))
    res = run_benchmark_model(dev, model, DeviceBenchConfig(benchmark_model=bm, threads=(1, 4), warmup_runs=3, num_runs=20,
                                                            op_profiling=True))
    assert [r.threads for r in res.runs] == [1, 4]
    assert [r.inference_avg_ms for r in res.runs] == [5.001, 5.004]  # parsed from the fake's output, per thread count
    r = res.runs[1]
    assert r.ok and r.count == 200 and r.percentiles_ms == {"p5": 4.96, "median": 5.001, "p95": 5.2}
    assert r.peak_memory_mb == 14.25 and r.parsed.xnnpack_nodes == (31, 31)
    assert r.command == ("taskset f0 ./benchmark_model --graph=m.tflite --num_threads=4 --use_xnnpack=true --warmup_runs=3 "
                         "--num_runs=20 --report_peak_memory_footprint=true --enable_op_profiling=true")
    assert res.cores_used == (4, 5, 6, 7) and res.mask == "f0" and not res.emulated
    pushes = [c for c in fake.calls() if "push" in c]
    remote = {Path(c[-1]).name for c in pushes}
    assert remote == {"benchmark_model", "m.tflite"} and all(c[-1].startswith("/data/local/tmp/pfld-export-") for c in pushes)
    assert not any("pull" in c for c in fake.calls())  # nothing pulled that is not needed
    assert fake.shell_cmds()[-1].startswith("rm -rf /data/local/tmp/pfld-export-")


def test_no_taskset_on_device(fake: FakeAdb, files: tuple[Path, Path]) -> None:
    fake.set(devices=[["ABC123", "device"]], probe={"props": {"ro.product.cpu.abi": "arm64-v8a"}, "khz": SD845_KHZ, "taskset": False})
    model, bm = files
    res = run_benchmark_model(find_device(), model, DeviceBenchConfig(benchmark_model=bm, threads=(1,)))
    assert res.runs[0].command.startswith("./benchmark_model ") and res.mask is None


def test_abi_mismatch_is_refused_before_push(fake: FakeAdb, files: tuple[Path, Path]) -> None:
    model, bm = files
    data = bytearray(bm.read_bytes())
    data[18:20] = (0x3E).to_bytes(2, "little")  # x86-64
    bm.write_bytes(bytes(data))
    assert elf_abi(bm) == "x86_64"
    with pytest.raises(DeviceError, match=r"ABI mismatch: .* x86_64 but device ABC123 runs arm64-v8a.*android_aarch64"):
        run_benchmark_model(find_device(), model, DeviceBenchConfig(benchmark_model=bm))
    assert not any("push" in c for c in fake.calls())


def test_binary_that_does_not_start_is_refused(fake: FakeAdb, files: tuple[Path, Path]) -> None:
    fake.set(devices=[["ABC123", "device"]], help_output='/system/bin/sh: ./benchmark_model: not executable: 32-bit ELF file')
    model, bm = files
    with pytest.raises(DeviceError, match=r"does not run on ABC123 \(arm64-v8a\).*not executable"):
        run_benchmark_model(find_device(), model, DeviceBenchConfig(benchmark_model=bm))
    assert fake.shell_cmds()[-1].startswith("rm -rf ")


def test_benchmark_timeout_is_a_device_error_and_cleans_up(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=[["ABC123", "device"]], hang="benchmark")
    model, bm = files
    out = tmp_path / "out"
    # timeout_s also bounds the start check (`benchmark_model --help`, one fake-adb process start):
    # 5 s leaves that room on a loaded machine, and the hang (30 s) still outlasts it.
    cfg = BenchArmConfig(models=(model,), out_dir=out, bench=DeviceBenchConfig(benchmark_model=bm, threads=(1,), timeout_s=5))
    with pytest.raises(DeviceError, match=r"benchmark_model \(1 threads\) on ABC123 timed out after 5 s"):
        bench_arm(cfg)
    assert not out.exists()
    assert fake.shell_cmds()[-1].startswith("rm -rf ")


def test_device_vanishing_mid_run_leaves_no_partial_file(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=[["ABC123", "device"]], vanish="benchmark")
    model, bm = files
    out = tmp_path / "out"
    cfg = BenchArmConfig(models=(model,), out_dir=out, bench=DeviceBenchConfig(benchmark_model=bm, threads=(1, 4)))
    with pytest.raises(DeviceError, match=r"ABC123 disappeared during benchmark_model \(1 threads\).*reconnect"):
        bench_arm(cfg)
    assert not out.exists() or not any(out.iterdir())
    assert fake.shell_cmds()[-1].startswith("rm -rf ")  # cleanup was attempted


def test_vanishing_during_push(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=[["ABC123", "device"]], vanish="push")
    model, bm = files
    with pytest.raises(DeviceError, match="disappeared during adb push"):
        bench_arm(BenchArmConfig(models=(model,), out_dir=tmp_path / "o", bench=DeviceBenchConfig(benchmark_model=bm)))
    assert not (tmp_path / "o").exists()


def test_bench_arm_writes_one_json_per_model(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    model, bm = files
    model2 = tmp_path / "m2.tflite"
    model2.write_bytes(model.read_bytes())
    out = tmp_path / "out"
    result = bench_arm(BenchArmConfig(models=(model, model2), out_dir=out, profiles_dir=PROFILES,
                                      bench=DeviceBenchConfig(benchmark_model=bm, threads=(1, 4))))
    assert [f.name for f in result.files] == ["m.sd845-ABC123.json", "m2.sd845-ABC123.json"]
    d = json.loads(result.files[0].read_text())
    assert d["device"]["abi"] == "arm64-v8a" and d["device"]["serial"] == "ABC123" and d["emulated"] is False
    assert d["cores_used"] == [4, 5, 6, 7] and d["mask"] == "f0"
    assert [r["threads"] for r in d["runs"]] == [1, 4] and d["runs"][0]["inference_avg_ms"] == 5.001
    assert d["runs"][0]["parsed"]["memory"]["periodic_peak_mb"] == 14.25
    assert sorted(p.name for p in out.iterdir()) == ["m.sd845-ABC123.json", "m2.sd845-ABC123.json"]  # no temp files


def test_failed_benchmark_is_reported_not_hidden(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=[["ABC123", "device"]], rc=1,
             bench_output="ERROR: Node number 12 (TfLiteXNNPackDelegate) failed to prepare.\nBenchmarking failed.\n")
    model, bm = files
    res = run_benchmark_model(find_device(), model, DeviceBenchConfig(benchmark_model=bm, threads=(1,)))
    assert not res.ok and not res.runs[0].ok
    assert "Node number 12" in res.runs[0].parsed.failure_reason


# ------------------------------------------------------------------------------------ CLI
def test_cli_bench_arm_table_and_errors(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    model, bm = files
    runner = CliRunner()
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "1,4", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "device ABC123: Pixel 3 (arm64-v8a), profile sd845, big cores 4,5,6,7 (taskset mask f0)" in r.output
    assert "31/31" in r.output and "wrote " in r.output
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "2", "--json", "--out", str(tmp_path / "j")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["device"]["mask"] == "f0" and doc["results"][0]["runs"][0]["threads"] == 2 and len(doc["files"]) == 1

    r = runner.invoke(main, ["bench-arm", str(model)], env={"BENCHMARK_MODEL": ""})
    assert r.exit_code == 2 and "no benchmark_model binary given" in r.output and "Traceback" not in r.output

    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "1,x"])
    assert r.exit_code == 2 and "--threads '1,x' is not comma-separated whole numbers" in r.output

    fake.set(devices=[])
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm)])
    assert r.exit_code == DeviceError.exit_code and r.output.count("\n") == 1 and "no adb device attached" in r.output

    fake.set(devices=[["ABC123", "device"]], rc=1, bench_output="ERROR: Failed to apply GPU delegate.\nBenchmarking failed.\n")
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "1", "--out", str(tmp_path / "f")])
    assert r.exit_code == DeviceError.exit_code and "benchmark_model failed for m.tflite at 1 thread(s)" in r.output
    assert json.loads(next((tmp_path / "f").glob("*.json")).read_text())["runs"][0]["ok"] is False


def test_config_validation() -> None:
    with pytest.raises(UsageError, match="threads must be positive"):
        DeviceBenchConfig(benchmark_model=Path("x"), threads=(0,))
    with pytest.raises(UsageError, match="--runs >= 1"):
        DeviceBenchConfig(benchmark_model=Path("x"), num_runs=0)


# ---------------------------------------------------------------------------- many devices
TWO = [["ABC123", "device"], ["XYZ789", "device"]]
# XYZ789: a 4-core board with equal cores (all of them "big"), no getprop board name.
OTHER_PROBE = {"props": {"ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "Dev board"}, "khz": [2000000] * 4}


def _intervals(fake: FakeAdb) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every fake benchmark_model run, by serial."""
    open_: dict[str, float] = {}
    out: dict[str, list[tuple[float, float]]] = {}
    for line in Path(str(fake.log) + ".events").read_text().splitlines():
        serial, what, t = line.split()
        if what == "start":
            open_[serial] = float(t)
        else:
            out.setdefault(serial, []).append((open_.pop(serial), float(t)))
    return out


def test_two_devices_in_parallel_one_dying_mid_run(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    """Two devices at once: XYZ789 disappears at its 2nd benchmark_model run (model 1, 4 threads);
    ABC123 finishes both models; each device's runs never overlap, the devices' runs do."""
    fake.set(devices=TWO, probes={"XYZ789": OTHER_PROBE}, dies_after={"XYZ789": 1}, bench_sleep=0.5)
    model, bm = files
    model2 = tmp_path / "m2.tflite"
    model2.write_bytes(model.read_bytes())
    out = tmp_path / "out"
    res = bench_arm_devices(BenchFarmConfig(models=(model, model2), serials=("ABC123", "XYZ789"), out_dir=out,
                                            profiles_dir=PROFILES, bench=DeviceBenchConfig(benchmark_model=bm, threads=(1, 4))))
    a, x = res.devices
    assert [a.serial, x.serial] == ["ABC123", "XYZ789"] and not res.ok and res.failed == [x]
    assert a.ok and a.error is None and [len(r.runs) for r in a.results] == [2, 2]
    assert [f.name for f in a.files] == ["m.sd845-ABC123.json", "m2.sd845-ABC123.json"]
    assert x.error is not None and "XYZ789 disappeared during benchmark_model (4 threads)" in x.error
    assert x.failed_model == str(model) and x.results == [] and x.files == []
    assert x.device is not None and x.device.big_cores == (0, 1, 2, 3) and x.device.profile == "generic"
    assert sorted(p.name for p in out.iterdir()) == ["m.sd845-ABC123.json", "m2.sd845-ABC123.json"]  # none for XYZ789
    assert any(c[:2] == ["-s", "XYZ789"] and "rm -rf" in c[-1] for c in fake.calls())  # its cleanup was tried
    runs = _intervals(fake)
    assert len(runs["ABC123"]) == 4 and len(runs["XYZ789"]) == 1
    for serial, iv in runs.items():  # sequential on each device
        iv.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(iv, iv[1:])), f"{serial} ran two benchmarks at once: {iv}"
    # ... and in parallel across devices: XYZ789's run overlaps one of ABC123's.
    (xs, xe), = runs["XYZ789"]
    assert any(s < xe and xs < e for s, e in runs["ABC123"]), runs

    text = format_bench_arm_devices(res)
    rows = [ln for ln in text.splitlines() if "ABC123" in ln or "XYZ789" in ln]
    abc = [ln for ln in rows if ln.startswith("ABC123")]
    assert len(abc) == 4 and all("sdm845" in ln and "4,5,6,7" in ln and "arm64-v8a" in ln for ln in abc)
    xyz = [ln for ln in rows if ln.startswith("XYZ789")]
    assert len(xyz) == 1 and "DEVICE FAILED" in xyz[0] and "0,1,2,3" in xyz[0] and "m.tflite" in xyz[0]


def test_all_devices_reports_an_unusable_device_in_its_row(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=[["ABC123", "device"], ["BAD1", "unauthorized"]])
    model, bm = files
    res = bench_arm_devices(BenchFarmConfig(models=(model,), all_devices=True, out_dir=tmp_path / "o",
                                            bench=DeviceBenchConfig(benchmark_model=bm, threads=(1,))))
    ok, bad = res.devices
    assert ok.ok and len(ok.files) == 1
    assert bad.serial == "BAD1" and bad.device is None and "unauthorized" in (bad.error or "") and "Allow USB debugging" in bad.error
    assert not any("BAD1" in c for c in fake.calls() if c[:1] == ["-s"])  # never talked to


def test_cli_bench_arm_two_devices_table_and_exit_code(fake: FakeAdb, files: tuple[Path, Path], tmp_path: Path) -> None:
    fake.set(devices=TWO, probes={"XYZ789": OTHER_PROBE}, dies_after={"XYZ789": 0})
    model, bm = files
    runner = CliRunner()
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "1",
                             "--serial", "ABC123,XYZ789", "--out", str(tmp_path / "o")])
    assert r.exit_code == DeviceError.exit_code, r.output
    assert "device" in r.stdout and "big cores" in r.stdout and "DEVICE FAILED" in r.stdout
    assert "wrote " in r.stdout and (tmp_path / "o" / "m.sd845-ABC123.json").is_file()
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 devices failed: XYZ789: device XYZ789 disappeared"), r.stderr
    assert "Traceback" not in r.output

    fake.set(devices=TWO, probes={"XYZ789": OTHER_PROBE})
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--threads", "1", "--all-devices",
                             "--json", "--out", str(tmp_path / "j")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [d["serial"] for d in doc["devices"]] == ["ABC123", "XYZ789"] and all(d["error"] is None for d in doc["devices"])
    assert len(list((tmp_path / "j").glob("*.json"))) == 2

    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--serial", "ABC123", "--all-devices"])
    assert r.exit_code == 2 and "not both" in r.output
    r = runner.invoke(main, ["bench-arm", str(model), "--benchmark-model", str(bm), "--serial", "ABC123,ABC123"])
    assert r.exit_code == 2 and "lists a device twice" in r.output
