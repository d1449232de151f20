"""No network at run time: the tool runs in a private network namespace whose only DNS server is
a stub that counts queries, and must make none (native code included: ONNX Runtime's telemetry
is C++, which Python-level socket hooks would not see)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the namespace: answers every DNS query with NXDOMAIN and records its name, runs
# the command, then writes {"rc", "queries", "control"} to the report file. The control lookup
# proves the trap catches a real getaddrinfo before the command's silence is believed.
STUB = r'''
import json, socket, subprocess, sys, threading, time
report, cmd = sys.argv[1], sys.argv[2:]
queries = []
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))

def serve():
    while True:
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return
        i, labels = 12, []
        while i < len(data) and data[i]:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode(errors="replace"))
            i += n + 1
        queries.append(".".join(labels))
        if len(data) >= 12:  # NXDOMAIN, so resolvers give up at once
            sock.sendto(data[:2] + bytes([0x81, 0x83]) + data[4:6] + bytes(6) + data[12:], addr)

threading.Thread(target=serve, daemon=True).start()
try:
    socket.getaddrinfo("control.pfld-export.invalid", 80)
except OSError:
    pass
control = list(queries)
del queries[:]
rc = subprocess.run(cmd).returncode
time.sleep(0.5)  # a lookup sent at exit still arrives
with open(report, "w") as f:
    json.dump({"rc": rc, "queries": queries, "control": control}, f)
'''


def _netns_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("a private network namespace needs root (unshare -n)")
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; cannot build a no-network namespace")
    r = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"unshare -n -m is not allowed here ({r.stderr.strip()})")


def run_offline(cmd: list[str], tmp: Path, timeout: float) -> dict:
    """Run `cmd` with no network and a counting DNS stub; returns the stub's report."""
    _netns_or_skip()
    stub, resolv, report, tmpdir = tmp / "dns_stub.py", tmp / "resolv.conf", tmp / "dns.json", tmp / "tmpdir"
    stub.write_text(STUB)
    resolv.write_text("nameserver 127.0.0.1\n")
    tmpdir.mkdir(exist_ok=True)
    inner = " ".join([
        "ip link set lo up &&",
        f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf &&",
        f"exec {shlex.quote(sys.executable)} {shlex.quote(str(stub))} {shlex.quote(str(report))}",
        *(shlex.quote(c) for c in cmd),
    ])
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir))
    env.pop("ORT_DISABLE_TELEMETRY", None)  # the tool must switch telemetry off itself
    r = subprocess.run(["unshare", "-n", "-m", "--", "sh", "-c", inner], env=env, cwd=tmp, capture_output=True,
                       text=True, timeout=timeout)
    assert report.exists(), f"the DNS stub did not report: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    out = json.loads(report.read_text())
    out["stderr"] = r.stderr
    out["tmpdir"] = sorted(p.name for p in tmpdir.iterdir())
    assert out["control"], "the stub saw no control lookup: the trap does not work, so silence proves nothing"
    return out


def test_opening_an_onnx_model_makes_no_lookup_and_leaves_no_telemetry_file(tmp_path: Path) -> None:
    import torch

    from pfld_export.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from pfld_export.export.onnx import OnnxConfig, to_onnx
    from pfld_export.model import ModelConfig, build_model
    from pfld_export.preprocess import Preprocess

    torch.manual_seed(0)
    pfld, aux = build_model(0.25)
    ckpt = save_checkpoint(tmp_path / "tiny.pth", pfld, CheckpointMeta(model=ModelConfig(width=0.25), preprocess=Preprocess()), aux)
    onnx_path = to_onnx(load_checkpoint(ckpt), OnnxConfig(path=tmp_path / "tiny.onnx")).path
    code = (f"from pfld_export.runtime import open_predictor; import numpy as np; "
            f"print(open_predictor({str(onnx_path)!r}).predict(np.zeros((1, 112, 112, 3), np.uint8)).shape)")
    res = run_offline([sys.executable, "-c", code], tmp_path, timeout=120)
    assert res["rc"] == 0, res["stderr"][-2000:]
    assert res["queries"] == [], f"DNS lookups made: {res['queries']}"
    assert ".ses" not in res["tmpdir"], "ONNX Runtime telemetry left its session file"


@pytest.mark.slow
def test_convert_int8_makes_no_dns_lookup(tmp_path: Path) -> None:
    import torch

    from pfld_export.checkpoint import CheckpointMeta, save_checkpoint
    from pfld_export.model import ModelConfig, build_model
    from pfld_export.preprocess import Preprocess

    torch.manual_seed(0)
    pfld, aux = build_model(0.25)
    ckpt = save_checkpoint(tmp_path / "tiny.pth", pfld, CheckpointMeta(model=ModelConfig(width=0.25), preprocess=Preprocess()), aux)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pfld_export.cli", "convert", str(ckpt), "--int8", "--calib-count", "20", "--out", str(out)]
    res = run_offline(cmd, tmp_path, timeout=900)
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert sorted(p.name for p in out.glob("*.tflite")) == ["tiny_fp32.tflite", "tiny_full_int8.tflite", "tiny_int8.tflite"]
    assert res["queries"] == [], f"DNS lookups made: {res['queries']}"
    assert ".ses" not in res["tmpdir"], "ONNX Runtime telemetry left its session file"
