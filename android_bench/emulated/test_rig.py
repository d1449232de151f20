"""What the emulated-ARM rig proves (run by `make test-arm`, inside the rig's network namespace).

The `bench-arm` code path runs unmodified against a real adb server and a real adbd whose shell
is an arm64 Debian userland under qemu-user:
- push / run / parse / pull work over real adb, and pushed files are cleaned up;
- the aarch64 XNNPACK int8 output is byte-identical to the x86 XNNPACK output for the same input,
  and fp32 agrees within 1e-5;
- a binary for the wrong ABI, or one that cannot start there, is refused with a DeviceError;
- a device that disconnects mid-run gives a DeviceError and no result file;
- two devices measured at once: both run in parallel, and when one disconnects mid-run it is
  reported in its row while the other finishes and writes its results.
Timings from the rig are qemu's: every result must say `emulated: true`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pfld_export.bench.adb import (
    BenchArmConfig,
    BenchFarmConfig,
    DeviceBenchConfig,
    bench_arm,
    bench_arm_devices,
    find_device,
    run_benchmark_model,
)
from pfld_export.errors import DeviceError

PFLD_EXPORT = [sys.executable, "-m", "pfld_export.cli"]


def _adb(serial: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["adb", "-s", serial, *args], capture_output=True, text=True, timeout=timeout)


def _leftovers(serial: str) -> list[str]:
    out = _adb(serial, "shell", "ls /data/local/tmp").stdout
    return [n for n in out.split() if n.startswith("pfld-export-")]


def test_probe_over_real_adb(rig_serial: str) -> None:
    dev = find_device(rig_serial)
    info = dev.info()
    assert info.abi == "arm64-v8a", info  # from `uname -m` under qemu-aarch64: no getprop there
    assert info.emulated and info.profile == "emulated-arm64-rig"
    assert info.taskset and info.mask == format((1 << len(info.core_max_khz)) - 1, "x")


def test_cli_bench_arm_push_run_parse(rig_serial: str, runner: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results"
    p = subprocess.run(
        [*PFLD_EXPORT, "bench-arm", str(tiny_models["fp32"]), str(tiny_models["int8"]), "--serial", rig_serial,
         "--benchmark-model", str(runner), "--threads", "1,2", "--runs", "3", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "EMULATED device" in p.stdout
    files = sorted(out.glob("*.json"))
    assert [f.name.split(".")[0] for f in files] == ["pfldlike_fp32", "pfldlike_int8"]
    for f in files:
        d = json.loads(f.read_text())
        assert d["emulated"] is True and d["device"]["abi"] == "arm64-v8a"
        assert d["mask"] == d["device"]["mask"] and d["cores_used"] == d["device"]["big_cores"]
        assert [r["threads"] for r in d["runs"]] == [1, 2]
        for r in d["runs"]:
            assert r["ok"] and r["count"] == 3 and r["inference_avg_ms"] > 0
            assert r["command"].startswith(f"taskset {d['mask']} ./benchmark_model ")
            assert r["parsed"]["num_threads"] == r["threads"]
            assert r["parsed"]["xnnpack_created"] is True
            assert r["peak_memory_mb"] and r["peak_memory_mb"] > 0
    assert _leftovers(rig_serial) == []


def _host_output(model: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), num_threads=1)  # XNNPACK is the default delegate
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def _device_output(serial: str, runner: Path, model: Path, x: np.ndarray, tmp: Path) -> tuple[bytes, object]:
    from ai_edge_litert.interpreter import Interpreter

    name = Interpreter(model_path=str(model)).get_input_details()[0]["name"]
    (tmp / "in.bin").write_bytes(np.ascontiguousarray(x).tobytes())
    cfg = DeviceBenchConfig(benchmark_model=runner, threads=(1,), warmup_runs=0, num_runs=1,
                            input_files=((name, tmp / "in.bin"),), output_dir=tmp / "pulled")
    res = run_benchmark_model(find_device(serial), model, cfg)
    run = res.runs[0]
    assert run.ok and res.emulated, run.parsed.failure_reason
    assert run.output_file is not None and run.output_file.is_file()
    return run.output_file.read_bytes(), res


def test_int8_aarch64_output_byte_identical_to_x86(rig_serial: str, runner: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    x = rng.integers(-128, 128, size=(1, 112, 112, 3), dtype=np.int16).astype(np.int8)
    host = _host_output(tiny_models["int8"], x)
    assert host.dtype == np.int8
    dev, _ = _device_output(rig_serial, runner, tiny_models["int8"], x, tmp_path)
    assert len(dev) == host.nbytes
    diff = np.frombuffer(dev, np.int8).astype(int) - host.reshape(-1).astype(int)
    assert dev == host.tobytes(), f"aarch64 int8 differs from x86 at {np.count_nonzero(diff)} values, max |diff| {np.abs(diff).max()}"
    assert _leftovers(rig_serial) == []


def test_fp32_aarch64_output_within_1e5_of_x86(rig_serial: str, runner: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(2025)
    x = rng.random((1, 112, 112, 3), dtype=np.float32)
    host = _host_output(tiny_models["fp32"], x)
    dev, _ = _device_output(rig_serial, runner, tiny_models["fp32"], x, tmp_path)
    got = np.frombuffer(dev, np.float32).reshape(host.shape)
    assert np.abs(host).max() > 1e-3  # a real signal, not all zeros
    np.testing.assert_allclose(got, host, rtol=0, atol=1e-5)


def test_wrong_abi_binary_is_refused(rig_serial: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    x86 = Path(shutil.which("true") or "/bin/true")  # an x86-64 ELF: the local ABI check must refuse it
    with pytest.raises(DeviceError, match=r"ABI mismatch.*x86_64.*arm64-v8a"):
        run_benchmark_model(find_device(rig_serial), tiny_models["int8"], DeviceBenchConfig(benchmark_model=x86))
    # Not ELF and unable to start on the device (its interpreter does not exist there): caught by
    # the on-device start check after the push.
    script = tmp_path / "benchmark_model"
    script.write_text("#!/system/bin/sh\necho never\n")
    with pytest.raises(DeviceError, match="does not run on"):
        run_benchmark_model(find_device(rig_serial), tiny_models["int8"], DeviceBenchConfig(benchmark_model=script))
    assert _leftovers(rig_serial) == []


def test_device_disconnecting_mid_run_leaves_no_result(rig_serial: str, runner: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results"
    cfg = BenchArmConfig(models=(tiny_models["fp32"],), serial=rig_serial, out_dir=out,
                         bench=DeviceBenchConfig(benchmark_model=runner, threads=(1,), warmup_runs=1, num_runs=200))

    def cut() -> None:
        # Wait until benchmark_model is running on the device, then drop the transport. The
        # bracket keeps grep from matching its own command line.
        for _ in range(240):
            probe = _adb(rig_serial, "shell", "grep -l -s -- 'num_runs=20[0]' /proc/[0-9]*/cmdline; true")
            if "/proc/" in probe.stdout:
                break
            time.sleep(0.5)
        subprocess.run(["adb", "disconnect", rig_serial], capture_output=True, timeout=30)

    t = threading.Thread(target=cut)
    t.start()
    try:
        with pytest.raises(DeviceError, match=r"lost device|disappeared"):
            bench_arm(cfg)
    finally:
        t.join()
        subprocess.run(["adb", "connect", rig_serial], capture_output=True, timeout=30)
        subprocess.run(["adb", "-s", rig_serial, "wait-for-device"], capture_output=True, timeout=60)
    assert not out.exists() or list(out.iterdir()) == []
    # The device is back; the leftover dir from the cut run is removed by hand here.
    _adb(rig_serial, "shell", "rm -rf /data/local/tmp/pfld-export-*")
    assert os.environ.get("PFLD_RIG_SERIAL") == rig_serial


def test_second_device_is_its_own_device(rig_serial: str, rig_serial2: str) -> None:
    """Same arm64 userland, separate /data/local/tmp: a file pushed to one is not on the other."""
    assert find_device(rig_serial2).info().abi == "arm64-v8a"
    _adb(rig_serial2, "shell", "echo x > /data/local/tmp/pfld-export-probe2")
    try:
        assert "pfld-export-probe2" in _adb(rig_serial2, "shell", "ls /data/local/tmp").stdout
        assert "pfld-export-probe2" not in _adb(rig_serial, "shell", "ls /data/local/tmp").stdout
    finally:
        _adb(rig_serial2, "shell", "rm -f /data/local/tmp/pfld-export-probe2")


def test_two_devices_in_parallel_one_disconnecting(rig_serial: str, rig_serial2: str, runner: Path,
                                                   tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """bench-arm on both devices: the second is cut once its benchmark_model is running; the first
    finishes both models (its runs in turn) and writes them; the second's row carries the loss."""
    out = tmp_path / "results"
    cfg = BenchFarmConfig(models=(tiny_models["fp32"], tiny_models["int8"]), serials=(rig_serial, rig_serial2), out_dir=out,
                          bench=DeviceBenchConfig(benchmark_model=runner, threads=(1, 2), warmup_runs=1, num_runs=40))
    rdir2: list[str] = []
    running2 = threading.Event()
    last_run: dict[str, float] = {}  # when each device last started a benchmark_model run
    cut_at: list[float] = []

    def progress(msg: str) -> None:
        serial, _, rest = msg.partition(": ")
        if "thread(s) on cores" in rest:
            last_run[serial] = time.monotonic()
        if serial == rig_serial2 and rest.startswith("push ") and not rdir2:
            rdir2.append(rest.rsplit(":", 1)[1])  # "push ... to SERIAL:/data/local/tmp/pfld-export-XXXX"
        if serial == rig_serial2 and "thread(s) on cores" in rest:
            running2.set()

    def cut() -> None:
        # Once device 2 starts benchmark_model, wait until a process runs in its pushed folder (only
        # device 2's processes can have that folder as cwd), then drop its transport.
        if not running2.wait(600):
            return
        for _ in range(240):
            probe = _adb(rig_serial2, "shell", f"ls -l /proc/[0-9]*/cwd 2>/dev/null | grep -c -- '{rdir2[0]}$'; true")
            if probe.stdout.strip() not in ("", "0"):
                break
            time.sleep(0.25)
        cut_at.append(time.monotonic())
        subprocess.run(["adb", "disconnect", rig_serial2], capture_output=True, timeout=30)

    t = threading.Thread(target=cut)
    t.start()
    try:
        res = bench_arm_devices(cfg, progress)
    finally:
        t.join()
        subprocess.run(["adb", "connect", rig_serial2], capture_output=True, timeout=30)
        subprocess.run(["adb", "-s", rig_serial2, "wait-for-device"], capture_output=True, timeout=60)
    one, two = res.devices
    assert one.serial == rig_serial and one.ok, one.error
    assert [len(r.runs) for r in one.results] == [2, 2] and all(r.emulated for r in one.results)
    assert two.serial == rig_serial2 and not two.ok and re.search(r"lost device|disappeared", two.error or ""), two.error
    assert two.failed_model == str(tiny_models["fp32"]) and two.files == []
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in one.files) and len(one.files) == 2
    # Parallel: device 2 was cut while device 1 still had runs to start.
    assert cut_at and cut_at[0] < last_run[rig_serial], (cut_at, last_run)
    assert _leftovers(rig_serial) == []
    _adb(rig_serial2, "shell", "rm -rf /data/local/tmp/pfld-export-*")
