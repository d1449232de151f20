"""What the emulated-ARM rig proves (run by `make test-arm`, inside the rig's network namespace).

The `bench-arm` code path runs unmodified against a real adb server and a real adbd whose shell
is an arm64 Debian userland under qemu-user:
- push / run / parse / pull work over real adb, and pushed files are cleaned up;
- the aarch64 XNNPACK int8 output is byte-identical to the x86 XNNPACK output for the same input,
  and fp32 agrees within 1e-5;
- a binary for the wrong ABI, or one that cannot start there, is refused with a DeviceError;
- a device that disconnects mid-run gives a DeviceError and no result file.
Timings from the rig are qemu's: every result must say `emulated: true`.
"""

from __future__ import annotations

import json
import os
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
    DeviceBenchConfig,
    bench_arm,
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
