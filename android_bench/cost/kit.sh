#!/usr/bin/env bash
# The ARM cost kit: counts aarch64 instructions per TFLite invoke() under qemu-user, on an
# emulated core WITHOUT dot-product (the Snapdragon 845's Kryo 385 has none), with a small TCG
# plugin of our own (pfld_count.c). `pfld-export cost --arm` uses it.
#
#   kit.sh build   build or reuse the cached kit (root: it builds the rig's arm64 rootfs)
#   kit.sh check   count a model end to end as a smoke test: kit.sh check MODEL.tflite
#   kit.sh path    print the kit directory (what PFLD_COST_KIT points at)
#
# What it is made of, all cached under $CACHE_DIR/arm-cost-kit-$KIT_VERSION (never installed
# system-wide, so the rig's qemu 10 stays as it is):
#   * qemu-user 7.2 from Debian bookworm, the DYNAMIC build (Debian's qemu 10 is static-pie
#     without -plugin), with the two libraries it needs that the host may lack, unpacked with
#     dpkg-deb -x; run with LD_LIBRARY_PATH;
#   * qemu-plugin.h from the same version's Debian SOURCE package (apt-get source, through a
#     private apt configuration so no deb-src line is added to the host's sources);
#   * libpfld_count.so, compiled here from pfld_count.c;
#   * ai-edge-litert 2.1.6 for aarch64 (2.2 and 2.3 segfault under qemu 7.2), unpacked by the
#     host's pip --target;
#   * the arm64 Debian userland of the emulated-ARM rig (android_bench/emulated/rig.sh build,
#     cached in the same place), used read-only as qemu's -L sysroot.
#
# Only when a package registry cannot be reached over the network does it print
# `ARM COST KIT NOT BUILT: <reason>` and exit 0; a pinned package that vanished or is corrupt, and
# anything else, exits non-zero.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"

QEMU_SUITE=bookworm
KIT_LITERT_VERSION="${KIT_LITERT_VERSION:-2.1.6}"
NUMPY_VERSION="${NUMPY_VERSION:-$(sed -n 's/^numpy==//p' "$REPO/requirements.lock")}"
# An SD845-like feature set: ARMv8.0 NEON, no dot-product (cortex-a53 and a72 qualify; a55/a76 do not).
KIT_QEMU_CPU="${KIT_QEMU_CPU:-cortex-a53}"
KIT_VERSION="v1-qemu${QEMU_SUITE}-litert${KIT_LITERT_VERSION}-numpy${NUMPY_VERSION}"
CACHE_DIR="${PFLD_RIG_CACHE:-/var/cache/pfld-export}"
KIT="${PFLD_COST_KIT:-$CACHE_DIR/arm-cost-kit-$KIT_VERSION}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

APT_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60 -o Dpkg::Use-Pty=0)
EX_DOWNLOAD=75

log() { printf '[arm-cost-kit +%ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[arm-cost-kit] error: %s\n' "$*" >&2; exit 1; }

not_built() {
  local banner="ARM COST KIT NOT BUILT: $*"
  printf '\n%s\n%s\n%s\n\n' "$(printf '#%.0s' {1..78})" "$banner" "$(printf '#%.0s' {1..78})"
  printf '%s\n' "$banner" >&2
  exit 0
}

# download_failed LOG: 0 when a failed download step failed for the network (the caller skips the
# kit loudly); a pinned package that vanished or is corrupt (404, hash mismatch, no such version)
# dies naming what to re-pin, since retrying will not fix it; 1 when it was no download failure.
# One classifier for the project's downloads: the rig's (`rig.sh classify-download`).
download_failed() {
  local verdict
  verdict=$(bash "$REPO/android_bench/emulated/rig.sh" classify-download "$1") || return 1
  [[ $verdict == network ]] && return 0
  die "${verdict#repin: }: a pinned package vanished or is corrupt, which retrying will not fix: re-pin it (log: $1)"
}

# The rig's rootfs, by the same name rig.sh gives it.
rig_rootfs() {
  local litert numpy
  litert=$(sed -n 's/^ai-edge-litert==//p' "$REPO/requirements.lock")
  numpy=$(sed -n 's/^numpy==//p' "$REPO/requirements.lock")
  printf '%s/arm64-rootfs-v1-bookworm-py3-litert%s-numpy%s' "$CACHE_DIR" "$litert" "$numpy"
}

cmd_build() {
  # Cached only while the rig's rootfs it runs on is the one requirements.lock names.
  if [[ -f "$KIT/.complete" ]] && grep -qF "\"rootfs\": \"$(rig_rootfs)\"" "$KIT/kit.json" && [[ -f "$(rig_rootfs)/.pfld-rig-complete" ]]; then
    log "kit cached: $KIT"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "building the kit needs root (apt, and the rig's rootfs); run it as root"
  command -v gcc >/dev/null || die "no gcc: apt-get install gcc"
  command -v apt-get >/dev/null || die "no apt-get: the kit is built from Debian packages (Debian/Ubuntu hosts only)"

  local rootfs; rootfs=$(rig_rootfs)
  if [[ ! -f "$rootfs/.pfld-rig-complete" ]]; then
    log "building the rig's arm64 rootfs first (android_bench/emulated/rig.sh build)"
    local out; out=$(bash "$REPO/android_bench/emulated/rig.sh" build 2>&1 | tee /dev/stderr) || die "rig.sh build failed"
    if grep -q "ARM RIG NOT BUILT" <<<"$out"; then
      not_built "the rig's arm64 rootfs could not be downloaded ($(grep -m1 'ARM RIG NOT BUILT' <<<"$out" | sed 's/.*NOT BUILT: //'))"
    fi
    [[ -f "$rootfs/.pfld-rig-complete" ]] || die "rig.sh build finished but $rootfs is not complete"
  fi

  local tmp="$KIT.tmp" alog="$KIT.tmp.log"
  rm -rf "$tmp"; mkdir -p "$tmp/deb" "$tmp/qemu" "$tmp/apt/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/src"
  : >"$alog"

  # qemu-user 7.2 (dynamic, with -plugin) + the libraries it links that the host may not have.
  local qver
  qver=$(apt-cache madison qemu-user | awk -v s="$QEMU_SUITE/main" '$0 ~ s" " || $0 ~ s"$" {print $3; exit}')
  if [[ -z "$qver" ]]; then
    log "apt-get update (no $QEMU_SUITE qemu-user in the package lists yet)"
    apt-get "${APT_OPTS[@]}" -o APT::Update::Error-Mode=any -q update >>"$alog" 2>&1 \
      || { download_failed "$alog" && not_built "apt-get update failed (Debian mirror unreachable)"; die "apt-get update failed (log: $alog)"; }
    qver=$(apt-cache madison qemu-user | awk -v s="$QEMU_SUITE/main" '$0 ~ s" " || $0 ~ s"$" {print $3; exit}')
  fi
  [[ -n "$qver" ]] || die "no qemu-user in $QEMU_SUITE/main among the apt sources; add Debian $QEMU_SUITE to them"
  log "downloading qemu-user $qver, libcapstone4, liburing2 (unpacked into the kit, not installed)"
  (cd "$tmp/deb" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root download "qemu-user=$qver" libcapstone4 liburing2) >>"$alog" 2>&1 \
    || { download_failed "$alog" && not_built "apt-get download qemu-user=$qver failed"; die "apt-get download failed (log: $alog)"; }
  local d
  for d in "$tmp"/deb/*.deb; do dpkg-deb -x "$d" "$tmp/qemu"; done
  local qemu="$tmp/qemu/usr/bin/qemu-aarch64" libs="$tmp/qemu/usr/lib/x86_64-linux-gnu"
  LD_LIBRARY_PATH="$libs" "$qemu" -h | grep -q -- '-plugin' || die "qemu-aarch64 $qver has no -plugin option"
  # Host libraries qemu needs besides the two unpacked ones (glib, gnutls, numa): name them.
  local missing; missing=$(LD_LIBRARY_PATH="$libs" ldd "$qemu" | awk '/not found/ {print $1}' | tr '\n' ' ')
  [[ -z "$missing" ]] || die "qemu-aarch64 needs $missing: apt-get install libglib2.0-0 libgnutls30 libnuma1"

  # qemu-plugin.h: from the source package of the same upstream version, via a private apt config.
  local srcver="${qver%%+b*}"  # a binNMU (+bN) has the source version without the suffix
  printf 'deb-src %s %s main\ndeb-src %s %s-security main\n' "$MIRROR" "$QEMU_SUITE" "${MIRROR%/debian}/debian-security" "$QEMU_SUITE" >"$tmp/apt/sources.list"
  local priv=(-o "Dir::Etc::SourceList=$tmp/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$tmp/apt/lists"
              -o "Dir::Cache=$tmp/apt/cache" -o APT::Sandbox::User=root)
  log "apt-get source qemu=$srcver (for include/qemu/qemu-plugin.h only)"
  apt-get "${APT_OPTS[@]}" "${priv[@]}" -q update >>"$alog" 2>&1 \
    || { download_failed "$alog" && not_built "apt-get update of the deb-src lists failed"; die "apt-get update (deb-src) failed (log: $alog)"; }
  (cd "$tmp/src" && apt-get "${APT_OPTS[@]}" "${priv[@]}" source --download-only "qemu=$srcver") >>"$alog" 2>&1 \
    || { download_failed "$alog" && not_built "apt-get source qemu=$srcver failed"; die "apt-get source qemu=$srcver failed (log: $alog)"; }
  local orig; orig=$(ls "$tmp"/src/qemu_*.orig.tar.* | head -1)
  tar -xf "$orig" -C "$tmp/src" --wildcards '*/include/qemu/qemu-plugin.h' || die "no include/qemu/qemu-plugin.h in $orig"
  local inc; inc=$(dirname "$(find "$tmp/src" -name qemu-plugin.h | head -1)")
  gcc -shared -fPIC -O2 -Wall -Werror -I "$inc" -o "$tmp/libpfld_count.so" "$HERE/pfld_count.c" || die "compiling pfld_count.c failed"
  cp "$inc/qemu-plugin.h" "$tmp/qemu-plugin.h"
  rm -rf "$tmp/src" "$tmp/apt" "$tmp/deb"

  log "installing aarch64 ai-edge-litert==$KIT_LITERT_VERSION numpy==$NUMPY_VERSION into the kit"
  "$PY" -m pip install -q --disable-pip-version-check --no-compile --no-deps --retries 5 --timeout 60 \
      --target "$tmp/litert" --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
      --platform manylinux_2_28_aarch64 "ai-edge-litert==$KIT_LITERT_VERSION" "numpy==$NUMPY_VERSION" \
      >>"$alog" 2>&1 || { download_failed "$alog" && not_built "pip could not download the aarch64 ai-edge-litert $KIT_LITERT_VERSION wheel"; die "pip install failed (log: $alog)"; }

  # The launcher `pfld-export cost --arm` runs: qemu 7.2 + plugin, on the rig's userland.
  cat >"$tmp/run-aarch64" <<EOS
#!/bin/sh
# run-aarch64 MARKS_FILE SCRIPT ARGS...: aarch64 python3 under qemu-user $qver (-cpu $KIT_QEMU_CPU),
# counting instructions with pfld_count (marks to MARKS_FILE). Written by android_bench/cost/kit.sh.
out="\$1"; shift
exec env LD_LIBRARY_PATH="$KIT/qemu/usr/lib/x86_64-linux-gnu" "$KIT/qemu/usr/bin/qemu-aarch64" -L "$rootfs" \\
  -cpu "\${KIT_QEMU_CPU:-$KIT_QEMU_CPU}" -plugin "$KIT/libpfld_count.so,out=\$out" -E PYTHONPATH="$KIT/litert" \\
  -E PYTHONDONTWRITEBYTECODE=1 "$rootfs/usr/bin/python3" "\$@"
EOS
  chmod +x "$tmp/run-aarch64"
  cat >"$tmp/kit.json" <<EOS
{"version": "$KIT_VERSION", "qemu": "qemu-user $qver", "cpu": "$KIT_QEMU_CPU", "runtime": "ai-edge-litert $KIT_LITERT_VERSION",
 "rootfs": "$rootfs", "launcher": "$KIT/run-aarch64", "plugin": "libpfld_count.so"}
EOS
  touch "$tmp/.complete"
  rm -rf "$KIT"; mv "$tmp" "$KIT"; rm -f "$alog"
  log "kit ready: $KIT ($(du -sh "$KIT" | cut -f1))"
}

cmd_check() {
  [[ $# -ge 1 ]] || die "usage: $0 check MODEL.tflite..."
  cmd_build
  [[ -f "$KIT/.complete" ]] || exit 0  # not built for a download failure: already said so, loudly
  PFLD_COST_KIT="$KIT" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pfld_export.cli cost --arm "$@"
}

# Sourced (tests of the functions above): define, run nothing.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

case "${1:-}" in
  build) cmd_build ;;
  check) shift; cmd_check "$@" ;;
  path) echo "$KIT" ;;
  *) echo "usage: $0 build|check MODEL.tflite...|path" >&2; exit 2 ;;
esac
