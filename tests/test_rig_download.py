"""The emulated-ARM rig's download-failure rule (android_bench/emulated/rig.sh): only a registry
that cannot be reached over the network may skip the rig; a pinned package that vanished (404, no
such version) or arrives corrupt (hash mismatch) fails, naming what to re-pin.

Canned apt-get / debootstrap / pip output goes through `rig.sh classify-download LOG` (no root,
no network: the classifier only reads the log).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

RIG = ROOT / "android_bench" / "emulated" / "rig.sh"

APT_404 = """\
Get:1 http://deb.debian.org/debian bookworm-backports/main amd64 adbd amd64 1:34.0.5-12~bpo12+1 [120 kB]
Err:2 http://deb.debian.org/debian bookworm-backports/main amd64 qemu-user-static amd64 1:10.0.2+ds-1~bpo12+1
  404  Not Found [IP: 151.101.2.132 80]
E: Failed to fetch http://deb.debian.org/debian/pool/main/q/qemu/qemu-user-static_10.0.2%2bds-1~bpo12%2b1_amd64.deb  404  Not Found [IP: 151.101.2.132 80]
E: Unable to fetch some archives, maybe run apt-get update or try with --fix-missing?
"""

APT_HASH = """\
Get:1 http://deb.debian.org/debian bookworm-backports/main amd64 adb amd64 1:34.0.5-12~bpo12+1 [140 kB]
Err:1 http://deb.debian.org/debian bookworm-backports/main amd64 adb amd64 1:34.0.5-12~bpo12+1
  Hash Sum mismatch
  Hashes of expected file:
   - SHA256:0f1c9a0e2b7d4c3e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e
  Hashes of received file:
   - SHA256:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d
E: Failed to fetch http://deb.debian.org/debian/pool/main/a/android-platform-tools/adb_34.0.5-12~bpo12%2b1_amd64.deb  Hash Sum mismatch
E: Unable to fetch some archives, maybe run apt-get update or try with --fix-missing?
"""

APT_DNS = """\
Err:1 http://deb.debian.org/debian bookworm InRelease
  Temporary failure resolving 'deb.debian.org'
Err:2 http://deb.debian.org/debian bookworm-backports InRelease
  Temporary failure resolving 'deb.debian.org'
W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving 'deb.debian.org'
E: Failed to fetch http://deb.debian.org/debian/dists/bookworm-backports/InRelease  Temporary failure resolving 'deb.debian.org'
E: Some index files failed to download. They have been ignored, or old ones used instead.
"""

APT_TIMEOUT = """\
Err:1 http://deb.debian.org/debian bookworm-backports/main amd64 adb amd64 1:34.0.5-12~bpo12+1
  Could not connect to deb.debian.org:80 (151.101.2.132), connection timed out
E: Failed to fetch http://deb.debian.org/debian/pool/main/a/android-platform-tools/adb_34.0.5-12~bpo12%2b1_amd64.deb  Could not connect to deb.debian.org:80 (151.101.2.132), connection timed out
"""

APT_REFUSED = "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Unable to connect to deb.debian.org:http: [IP: 151.101.2.132 80] Connection refused\n"

# One source gone, another unreachable: the vanished package is the verdict (retrying cannot bring it back).
APT_404_AND_DNS = APT_DNS + APT_404

PIP_DNS = """\
WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f3c>: Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/ai-edge-litert/
ERROR: Could not find a version that satisfies the requirement ai-edge-litert==2.3.0 (from versions: none)
ERROR: No matching distribution found for ai-edge-litert==2.3.0
"""

PIP_READ_TIMEOUT = """\
ERROR: Exception:
pip._vendor.urllib3.exceptions.ReadTimeoutError: HTTPSConnectionPool(host='files.pythonhosted.org', port=443): Read timed out.
"""

PIP_GONE = """\
ERROR: Could not find a version that satisfies the requirement ai-edge-litert==2.3.0 (from versions: 1.0.1, 1.1.0, 1.2.0, 2.4.0)
ERROR: No matching distribution found for ai-edge-litert==2.3.0
"""

PIP_404 = "ERROR: HTTP error 404 while getting https://files.pythonhosted.org/packages/ab/cd/ai_edge_litert-2.3.0-cp311-cp311-manylinux_2_27_aarch64.whl\n"

PIP_HASH = """\
ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. If you have updated the package versions, please update the hashes. Otherwise, examine the package contents carefully; someone may have tampered with them.
    numpy==2.4.6 from https://files.pythonhosted.org/packages/12/34/numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.whl:
        Expected sha256 1111111111111111111111111111111111111111111111111111111111111111
             Got        2222222222222222222222222222222222222222222222222222222222222222
"""

# rig.sh's retry() writes this when an attempt hits its timeout (a hung download).
RETRY_TIMEOUT = "[arm-rig +1800s] attempt 3/3 timed out after 900 s: python -m pip install ai-edge-litert==2.3.0\n"

DEBOOTSTRAP_PKG = """\
I: Retrieving InRelease
I: Checking Release signature
I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)
I: Retrieving Packages
W: Couldn't download package python3.11-minimal (ver 3.11.2-6+deb12u5 arch arm64) at http://deb.debian.org/debian/pool/main/p/python3.11/python3.11-minimal_3.11.2-6%2bdeb12u5_arm64.deb
E: Couldn't download packages: python3.11-minimal
"""

DEBOOTSTRAP_RELEASE = "I: Retrieving InRelease\nI: Retrieving Release\nE: Failed getting release file http://deb.debian.org/debian/dists/bookworm/Release\n"
# What probe_mirror() appends when the mirror's host cannot be reached.
PROBE_FAILED = "network probe: cannot reach deb.debian.org:80\n"

NOT_A_DOWNLOAD = """\
Reading package lists...
E: Unable to locate package adbd
"""


def classify(tmp_path: Path, text: str) -> tuple[int, str]:
    log = tmp_path / "tool.log"
    log.write_text(text)
    p = subprocess.run(["bash", str(RIG), "classify-download", str(log)], capture_output=True, text=True, timeout=60)
    assert p.stderr == "", p.stderr
    return p.returncode, p.stdout.strip()


pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="rig.sh is a bash script")


@pytest.mark.parametrize("text", [APT_DNS, APT_TIMEOUT, APT_REFUSED, PIP_DNS, PIP_READ_TIMEOUT, RETRY_TIMEOUT,
                                  DEBOOTSTRAP_RELEASE + PROBE_FAILED, DEBOOTSTRAP_PKG + PROBE_FAILED],
                         ids=["apt-dns", "apt-timeout", "apt-refused", "pip-dns", "pip-read-timeout", "retry-timeout",
                              "debootstrap-release-unreachable", "debootstrap-pkg-unreachable"])
def test_network_level_failures_may_skip(tmp_path: Path, text: str) -> None:
    assert classify(tmp_path, text) == (0, "network")


@pytest.mark.parametrize("text,verdict", [
    (APT_404, "repin: qemu-user-static 10.0.2+ds-1~bpo12+1 (404 Not Found)"),
    (APT_404_AND_DNS, "repin: qemu-user-static 10.0.2+ds-1~bpo12+1 (404 Not Found)"),
    (APT_HASH, "repin: adb 34.0.5-12~bpo12+1 (hash mismatch)"),
    (PIP_GONE, "repin: ai-edge-litert==2.3.0 (no such version on the index)"),
    (PIP_404, "repin: ai_edge_litert-2.3.0-cp311-cp311-manylinux_2_27_aarch64.whl (404 Not Found)"),
    (PIP_HASH, "repin: numpy==2.4.6 (hash mismatch)"),
    (DEBOOTSTRAP_PKG, "repin: python3.11-minimal 3.11.2-6+deb12u5 (the mirror answers without it)"),
], ids=["apt-404", "apt-404-and-dns", "apt-hash", "pip-no-such-version", "pip-404", "pip-hash", "debootstrap-pkg"])
def test_vanished_or_corrupt_package_fails_and_names_it(tmp_path: Path, text: str, verdict: str) -> None:
    assert classify(tmp_path, text) == (0, verdict)


def test_debootstrap_release_missing_from_a_reachable_mirror_fails(tmp_path: Path) -> None:
    rc, out = classify(tmp_path, DEBOOTSTRAP_RELEASE)
    assert rc == 0 and out.startswith("repin: http://deb.debian.org/debian/dists/bookworm/Release") and "DEBIAN_MIRROR" in out


@pytest.mark.parametrize("text", [NOT_A_DOWNLOAD, ""], ids=["apt-unknown-package", "empty-log"])
def test_other_failures_are_not_download_failures(tmp_path: Path, text: str) -> None:
    assert classify(tmp_path, text) == (1, "")


@pytest.mark.parametrize("text,rc,needle", [
    (APT_DNS, 0, ""),
    (PIP_DNS, 0, ""),
    (APT_HASH, 1, "[arm-rig] error: apt-get install adb: adb 34.0.5-12~bpo12+1 (hash mismatch); a pinned package vanished"),
    (PIP_GONE, 1, "pip install: ai-edge-litert==2.3.0 (no such version on the index)"),
    (NOT_A_DOWNLOAD, 2, ""),
], ids=["apt-dns", "pip-dns", "apt-hash", "pip-gone", "not-a-download"])
def test_download_verdict_skips_only_on_the_network(tmp_path: Path, text: str, rc: int, needle: str) -> None:
    """download_verdict is what every download step calls on failure: 0 lets the caller skip the rig
    (ARM RIG NOT BUILT), a vanished/corrupt package exits 1 naming it, anything else returns 1 to
    the caller (which dies with its own message; 2 here)."""
    log = tmp_path / "tool.log"
    log.write_text(text)
    what = "apt-get install adb" if "apt" in needle else "pip install"
    script = f'source "{RIG}"; download_verdict "{log}" "{what}" && exit 0; exit 2'
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == rc, (p.returncode, p.stderr)
    assert needle in p.stderr and (needle or p.stderr == "")
    if rc == 1:
        assert "re-pin it" in p.stderr and str(log) in p.stderr


KIT = ROOT / "android_bench" / "cost" / "kit.sh"


@pytest.mark.parametrize("text,rc,needle", [
    (APT_DNS, 0, ""),
    (APT_404, 1, "qemu-user-static 10.0.2+ds-1~bpo12+1 (404 Not Found): a pinned package vanished"),
    (PIP_GONE, 1, "ai-edge-litert==2.3.0 (no such version on the index)"),
    (NOT_A_DOWNLOAD, 2, ""),
], ids=["apt-dns", "apt-404", "pip-gone", "not-a-download"])
def test_the_arm_cost_kit_skips_only_on_the_network_too(tmp_path: Path, text: str, rc: int, needle: str) -> None:
    """The ARM cost kit uses the rig's classifier: a vanished pin fails it as it fails the rig."""
    log = tmp_path / "tool.log"
    log.write_text(text)
    script = f'source "{KIT}"; download_failed "{log}" && exit 0; exit 2'
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == rc, (p.returncode, p.stderr)
    assert needle in p.stderr and (needle or p.stderr == "")
