#!/usr/bin/env bash
# The emulated-ARM rig: a REAL adb server talking to a REAL adbd whose shell is an arm64 Debian
# userland run by qemu-user, all inside a network namespace that carries only loopback traffic.
# `pfld-export bench-arm` runs against it unmodified (serial 127.0.0.1:$RIG_PORT).
#
#   rig.sh build   install adb/adbd/qemu (Debian; adbd from bookworm-backports), build or reuse the
#                  cached arm64 rootfs with python3 + aarch64 ai-edge-litert
#   rig.sh start   netns + two adbd "devices" (chrooted into the same rootfs, the second with its
#                  own /data/local/tmp) + adb server, both connected
#   rig.sh stop    stop what `start` started (by pid), delete the netns
#   rig.sh exec CMD...   run CMD inside the rig's netns (e.g. `pfld-export bench-arm ...`)
#   rig.sh test    build, start, run android_bench/emulated/test_*.py inside the netns, stop
#
#   rig.sh classify-download LOG   print why a logged apt/debootstrap/pip run failed to download
#                  (`network`, `repin: <package>`, or nothing with exit 1); see download_failure()
#
# Only when a package registry cannot be reached over the network (DNS, refused or timed-out
# connections, after retries) does it print `ARM RIG NOT BUILT: <reason>` and exit 0. A registry
# that answers but no longer has a pinned file (404) or serves a corrupt one (hash mismatch) is
# not transient: it fails, naming the package to re-pin. Anything else, including a failing test,
# exits non-zero.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"

# The cache key names everything baked into the rootfs: change any of it and a new rootfs is built.
LITERT_VERSION="${LITERT_VERSION:-$(sed -n 's/^ai-edge-litert==//p' "$REPO/requirements.lock")}"
NUMPY_VERSION="${NUMPY_VERSION:-$(sed -n 's/^numpy==//p' "$REPO/requirements.lock")}"
SUITE=bookworm
ROOTFS_VERSION="v1-${SUITE}-py3-litert${LITERT_VERSION}-numpy${NUMPY_VERSION}"
CACHE_DIR="${PFLD_RIG_CACHE:-/var/cache/pfld-export}"
ROOTFS="$CACHE_DIR/arm64-rootfs-$ROOTFS_VERSION"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

NETNS="${RIG_NETNS:-pfld-arm-rig}"
# Outside 5555-5585: the adb server probes those as emulator consoles/ports.
RIG_PORT="${RIG_PORT:-5612}"
SERIAL="127.0.0.1:$RIG_PORT"
# A second "device" for bench-arm across several devices (parallel runs, one dying mid-run).
RIG_PORT2="${RIG_PORT2:-$((RIG_PORT + 2))}"
SERIAL2="127.0.0.1:$RIG_PORT2"
RUN_DIR="${RIG_RUN_DIR:-/run/pfld-arm-rig}"
# qemu 10 emulates a named core so XNNPACK picks the kernels an SD845-class phone would run
# (ARMv8.2 + dot product; the A75 itself is not a qemu model, the A76 is the closest).
QEMU_CPU_MODEL="${RIG_QEMU_CPU:-cortex-a76}"

APT_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60 -o Dpkg::Use-Pty=0)
EX_DOWNLOAD=75  # "temporary failure": a registry download failed; see not_built()

log() { printf '[arm-rig +%ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[arm-rig] error: %s\n' "$*" >&2; exit 1; }

not_built() {
  local banner="ARM RIG NOT BUILT: $*"
  printf '\n%s\n%s\n%s\n\n' "$(printf '#%.0s' {1..78})" "$banner" "$(printf '#%.0s' {1..78})"
  printf '%s\n' "$banner" >&2
  exit 0
}

# retry N SECONDS CMD...: run CMD up to N times, each under a SECONDS timeout.
retry() {
  local n=$1 t=$2 i; shift 2
  for ((i = 1; i <= n; i++)); do
    local rc=0
    timeout "$t" "$@" || rc=$?
    [[ $rc -eq 0 ]] && return 0
    # Said in the words download_failure() counts as network-level: a download that hangs is one.
    [[ $rc -eq 124 ]] && log "attempt $i/$n timed out after $t s: $*"
    log "attempt $i/$n failed (exit $rc): $*"
    sleep $((i * 5))
  done
  return 1
}

# download_failure LOG: why a failed apt-get / debootstrap / pip run (its output in LOG) failed to
# download. Prints one line and returns 0 for a download failure, returns 1 for anything else:
#   network          the registry could not be reached (DNS, refused, timed out, unreachable):
#                    transient, the only case that may skip the rig
#   repin: <what>    the registry answered, but a pinned file is gone (404, no such version) or
#                    corrupt (hash mismatch): retrying will not help, someone must re-pin <what>
# A gone or corrupt file wins over network noise in the same log (apt fetches from several
# hosts); pip's "no matching distribution" counts only when pip reached the index.
NET_FAILURE_RE="Temporary failure resolving|Temporary failure in name resolution|Could not resolve|Name or service not known|Connection refused|Connection timed out|Connection reset|Could not connect|Unable to connect|Network is unreachable|No route to host|Failed to establish a new connection|NewConnectionError|ConnectTimeoutError|ReadTimeoutError|Read timed out|timed out after [0-9]+ s|network probe: cannot reach"
download_failure() {
  local log=$1 line what why
  # apt: "Failed to fetch URL  404  Not Found [IP: ...]" / "Failed to fetch URL  Hash Sum mismatch"
  # (apt first prints "Err:N URL suite pkg arch version" and the reason on the next line, without the URL.)
  line=$(grep -m1 -E "Failed to fetch .*(404 +Not Found|Hash Sum mismatch)" "$log" || grep -m1 -E "404 +Not Found|Hash Sum mismatch" "$log" || true)
  if [[ -n $line ]]; then
    what=$(grep -oE "https?://[^ ]+" <<<"$line" | head -1 || true)
    what=${what##*/}
    what=$(printf '%b' "${what//%/\\x}")  # URL-encoded: adb_1%3a34.0.5-12~bpo12%2b1_amd64.deb
    if [[ $what == *.deb ]]; then  # name_version_arch.deb -> "name version"
      what=${what%.deb}; what=${what%_*}; what="${what%%_*} ${what#*_}"
    fi
    why="404 Not Found"; [[ $line == *"Hash Sum mismatch"* ]] && why="hash mismatch"
    printf 'repin: %s (%s)\n' "${what:-$line}" "$why"
    return 0
  fi
  # pip: a 404 on a file, or a wheel whose hash does not match.
  line=$(grep -m1 -oE "HTTP error 404 while getting [^ ]+" "$log" || true)
  if [[ -n $line ]]; then printf 'repin: %s (404 Not Found)\n' "${line##*/}"; return 0; fi
  if grep -q "DO NOT MATCH THE HASHES" "$log"; then
    what=$(grep -m1 -E "^ +[A-Za-z0-9_.-]+(==[^ ]+)? from https?://" "$log" | awk '{print $1}' || true)
    printf 'repin: %s (hash mismatch)\n' "${what:-a package in the pip log}"
    return 0
  fi
  if grep -qE "$NET_FAILURE_RE" "$log"; then
    echo network
    return 0
  fi
  # pip reached the index (no network error above), but the pinned version is not there (any more).
  line=$(grep -m1 -oE "No matching distribution found for [^ ]+" "$log" || true)
  if [[ -n $line ]]; then printf 'repin: %s (no such version on the index)\n' "${line##* }"; return 0; fi
  # debootstrap does not say why a file failed: its caller probes the mirror first (probe_mirror),
  # so a dead network is already in the log and matched above.
  line=$(grep -m1 -oE "Couldn't download package [^ ]+ \(ver [^ ]+" "$log" || true)
  if [[ -n $line ]]; then
    what=${line#Couldn\'t download package }
    printf 'repin: %s %s (the mirror answers without it)\n' "${what%% *}" "${what##* }"
    return 0
  fi
  line=$(grep -m1 -oE "Failed getting release file [^ ]+" "$log" || true)
  if [[ -n $line ]]; then printf 'repin: %s (the mirror answers without it: check DEBIAN_MIRROR and the suite)\n' "${line##* }"; return 0; fi
  return 1
}

# probe_mirror URL LOG: append "network probe: cannot reach HOST:PORT" to LOG when a TCP connection
# to URL's host fails (debootstrap's log does not say why a download failed).
probe_mirror() {
  local url=$1 log=$2 hostport host port
  hostport=${url#*://}; hostport=${hostport%%/*}
  host=${hostport%%:*}; port=${hostport##*:}
  if [[ $port == "$hostport" ]]; then port=80; [[ $url == https://* ]] && port=443; fi
  timeout 15 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null || echo "network probe: cannot reach $host:$port" >>"$log"
}

# download_verdict LOG WHAT: after a failed download step, return 0 when the network was at fault
# (the caller returns $EX_DOWNLOAD and the rig is skipped), die naming the package to re-pin when the
# registry answered without it, or return 1 when it was no download failure (the caller dies).
download_verdict() {
  local log=$1 what=$2 verdict
  verdict=$(download_failure "$log") || return 1
  [[ $verdict == network ]] && return 0
  die "$what: ${verdict#repin: }; a pinned package vanished or is corrupt, which retrying will not fix: re-pin it (log: $log)"
}

need_root() { [[ $(id -u) -eq 0 ]] || die "the rig needs root (apt, debootstrap, chroot, ip netns); run it as root"; }

# ---------------------------------------------------------------------------------------- build
install_host_packages() {
  # Only adb/adbd/qemu come from backports; everything else from the default suite, so the rig
  # never upgrades unrelated system packages.
  local bpo=() main=()
  command -v adb >/dev/null || bpo+=(adb)
  [[ -x /usr/lib/android-sdk/platform-tools/adbd ]] || bpo+=(adbd)
  local qv
  qv=$(qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)
  # qemu 7.2 (plain bookworm) segfaults in ai-edge-litert >= 2.2 and mis-computes int8 with -cpu max.
  [[ -n "$qv" && "$qv" -ge 10 ]] || bpo+=(qemu-user-static)
  command -v debootstrap >/dev/null || main+=(debootstrap)
  command -v ip >/dev/null || main+=(iproute2)
  command -v unshare >/dev/null || main+=(util-linux)
  [[ ${#bpo[@]} -eq 0 && ${#main[@]} -eq 0 ]] && return 0

  command -v apt-get >/dev/null || die "no apt-get: install ${bpo[*]} ${main[*]} (adbd and qemu-user-static >= 10 from Debian bookworm-backports) by hand"
  local src=/etc/apt/sources.list.d/pfld-export-bookworm-backports.sources
  if [[ ${#bpo[@]} -gt 0 ]] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding Debian bookworm-backports (adbd 34 and qemu 10 live there) as $src"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$MIRROR" >"$src"
  fi
  log "apt-get install: from bookworm-backports [${bpo[*]}], from the default suite [${main[*]}]"
  local alog=/tmp/pfld-arm-rig-apt.log
  : >"$alog"
  # `apt-get update` exits 0 even when a source is unreachable; -o APT::Update::Error-Mode=any makes
  # that an error so a dead mirror is reported as a download failure, not as a missing package.
  retry 3 300 apt-get "${APT_OPTS[@]}" -o APT::Update::Error-Mode=any -q update >>"$alog" 2>&1 \
    || { download_verdict "$alog" "apt-get update" && return $EX_DOWNLOAD; die "apt-get update failed (log: $alog)"; }
  local inst=(env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends)
  if [[ ${#bpo[@]} -gt 0 ]]; then
    # adb 34 to match adbd 34; qemu 10 for ai-edge-litert 2.3.
    retry 3 600 "${inst[@]}" -t bookworm-backports "${bpo[@]}" >>"$alog" 2>&1 \
      || { download_verdict "$alog" "apt-get install ${bpo[*]}" && return $EX_DOWNLOAD; die "apt-get install ${bpo[*]} failed (log: $alog)"; }
  fi
  if [[ ${#main[@]} -gt 0 ]]; then
    retry 3 600 "${inst[@]}" "${main[@]}" >>"$alog" 2>&1 \
      || { download_verdict "$alog" "apt-get install ${main[*]}" && return $EX_DOWNLOAD; die "apt-get install ${main[*]} failed (log: $alog)"; }
  fi
}

register_binfmt() {
  local bm=/proc/sys/fs/binfmt_misc
  [[ -e $bm/register ]] || mount -t binfmt_misc binfmt_misc "$bm" || die "cannot mount binfmt_misc; the kernel needs CONFIG_BINFMT_MISC"
  if [[ -e $bm/qemu-aarch64 ]] && grep -q enabled "$bm/qemu-aarch64"; then
    # Reuse only a registration that loads the interpreter up front ("F"): it must work inside a chroot.
    grep -q '^flags:.*F' "$bm/qemu-aarch64" && return 0
    echo -1 >"$bm/qemu-aarch64"
  fi
  local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  if [[ -f $conf ]]; then
    grep -v '^#' "$conf" | head -1 >"$bm/register"
  else
    # Same magic/mask as Debian's qemu-user-binfmt, interpreter loaded up front (F).
    printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' >"$bm/register"
  fi
  log "registered qemu-aarch64 with binfmt_misc"
}

build_rootfs() {
  if [[ -f "$ROOTFS/.pfld-rig-complete" ]]; then
    log "rootfs cached: $ROOTFS"
    return 0
  fi
  mkdir -p "$CACHE_DIR"
  local tmp="$ROOTFS.tmp"
  rm -rf "$tmp"
  log "debootstrap arm64 $SUITE (first stage) -> $tmp"
  local ok=0 i
  for i in 1 2 3; do
    if timeout 900 debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 \
        "$SUITE" "$tmp" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1; then ok=1; break; fi
    log "debootstrap attempt $i/3 failed (tail of $CACHE_DIR/debootstrap.log):"; tail -3 "$CACHE_DIR/debootstrap.log" >&2 || true
    rm -rf "$tmp"; sleep $((i * 10))
  done
  if [[ $ok -ne 1 ]]; then
    probe_mirror "$MIRROR" "$CACHE_DIR/debootstrap.log"
    download_verdict "$CACHE_DIR/debootstrap.log" "debootstrap $SUITE from $MIRROR" && return $EX_DOWNLOAD
    die "debootstrap failed, and not for a download (log: $CACHE_DIR/debootstrap.log)"
  fi
  log "debootstrap second stage under qemu-aarch64 (several minutes)"
  timeout 1500 chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$CACHE_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; die "debootstrap --second-stage failed (log: $CACHE_DIR/debootstrap.log)"; }

  # The aarch64 wheels are resolved and unpacked by the HOST's pip (no pip, no network, no CA
  # certificates needed inside the rootfs); versions pinned to the host's lock so both sides run
  # the same XNNPACK release.
  log "installing aarch64 ai-edge-litert==$LITERT_VERSION numpy==$NUMPY_VERSION into the rootfs"
  retry 3 900 "$PY" -m pip install -q --disable-pip-version-check --no-compile --retries 5 --timeout 60 \
      --target "$tmp/opt/pfld-litert" --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
      --platform manylinux_2_28_aarch64 -c "$REPO/requirements.lock" \
      "ai-edge-litert==$LITERT_VERSION" "numpy==$NUMPY_VERSION" >"$CACHE_DIR/pip.log" 2>&1 \
    || { download_verdict "$CACHE_DIR/pip.log" "pip install of the aarch64 wheels" && return $EX_DOWNLOAD
         die "pip could not install the aarch64 wheels, and not for a download (log: $CACHE_DIR/pip.log)"; }

  mkdir -p "$tmp/data/local/tmp" "$tmp/etc"
  chmod 1777 "$tmp/data/local/tmp"
  # Marker the device probe reads: results from this "device" are labelled emulated.
  printf 'pfld-export emulated arm64 rig %s (qemu-user %s)\n' "$ROOTFS_VERSION" "$QEMU_CPU_MODEL" >"$tmp/etc/pfld-export-emulated"
  rm -rf "$tmp/var/cache/apt/archives/"*.deb
  touch "$tmp/.pfld-rig-complete"
  rm -rf "$ROOTFS"
  mv "$tmp" "$ROOTFS"
  log "rootfs ready: $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
}

# adbd is an x86-64 program; inside the arm64 chroot it runs through its own copy of the host's
# loader and libraries, so that its /bin/sh (and everything `adb shell` starts) is arm64.
install_adbd_into_rootfs() {
  local adbd=/usr/lib/android-sdk/platform-tools/adbd dst="$ROOTFS/opt/pfld-adbd"
  rm -rf "$dst"; mkdir -p "$dst/lib"
  cp -L "$adbd" "$dst/adbd"
  local lib
  for lib in $(ldd "$adbd" | awk '/=> \// {print $3}'); do cp -L "$lib" "$dst/lib/"; done
  cp -L "$(ldd "$adbd" | awk '/ld-linux/ {print $1}')" "$dst/ld.so"
}

cmd_build() {
  need_root
  local t0=$SECONDS rc=0
  install_host_packages || rc=$?
  [[ $rc -eq $EX_DOWNLOAD ]] && not_built "apt could not reach the Debian mirror for adb/adbd/qemu-user-static/debootstrap (network)"
  [[ $rc -eq 0 ]] || die "installing host packages failed"
  register_binfmt
  build_rootfs || rc=$?
  [[ $rc -eq $EX_DOWNLOAD ]] && not_built "could not reach $MIRROR (debootstrap) or PyPI (aarch64 ai-edge-litert wheel) over the network"
  [[ $rc -eq 0 ]] || die "building the arm64 rootfs failed"
  install_adbd_into_rootfs
  # Sanity: the rootfs really is arm64 and its python really loads LiteRT.
  local arch
  arch=$(chroot "$ROOTFS" /usr/bin/uname -m)
  [[ $arch == aarch64 ]] || die "rootfs reports machine '$arch', expected aarch64 (binfmt/qemu problem)"
  log "build done in $((SECONDS - t0)) s (qemu $(qemu-aarch64-static --version | head -1 | awk '{print $3}'), rootfs $ROOTFS)"
}

# ---------------------------------------------------------------------------------- start/stop
in_ns() { ip netns exec "$NETNS" "$@"; }

# start_adbd NAME PORT [own-data]: one adbd "device" in the netns, chrooted into the rootfs, in a
# private mount namespace (its bind mounts vanish with it, nothing leaks onto the host). With
# own-data it gets a tmpfs of its own on /data/local/tmp: two devices share the userland but never
# see each other's pushed files, as two phones would.
start_adbd() {
  local name=$1 port=$2 own_data=${3:-}
  in_ns unshare --mount --propagation private env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      ADBD_PORT="$port" QEMU_CPU="$QEMU_CPU_MODEL" ROOTFS="$ROOTFS" OWN_DATA="$own_data" bash -c '
    set -e
    mount -t proc proc "$ROOTFS/proc"
    mount --rbind /dev "$ROOTFS/dev"
    mount --rbind /sys "$ROOTFS/sys"
    mount -t tmpfs tmpfs "$ROOTFS/tmp"
    if [ -n "$OWN_DATA" ]; then mount -t tmpfs -o mode=1777 tmpfs "$ROOTFS/data/local/tmp"; fi
    exec chroot "$ROOTFS" /opt/pfld-adbd/ld.so --library-path /opt/pfld-adbd/lib /opt/pfld-adbd/adbd
  ' >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
  local i
  for i in $(seq 1 50); do
    grep -q "adbd listening on tcp:$port" "$RUN_DIR/$name.log" 2>/dev/null && return 0
    kill -0 "$(cat "$RUN_DIR/$name.pid")" 2>/dev/null || { cat "$RUN_DIR/$name.log" >&2; die "$name exited at start"; }
    sleep 0.2
  done
}

connect_device() {
  local serial=$1 log=$2 i
  for i in 1 2 3 4 5; do
    in_ns timeout 20 adb connect "$serial" | grep -q "connected to" && break
    sleep 1
  done
  in_ns timeout 30 adb -s "$serial" wait-for-device || die "adb does not see $serial (log: $log)"
}

cmd_start() {
  need_root
  [[ -f "$ROOTFS/.pfld-rig-complete" && -x "$ROOTFS/opt/pfld-adbd/adbd" ]] || die "rig not built; run: $0 build"
  register_binfmt
  if [[ -f "$RUN_DIR/adbd.pid" ]] && kill -0 "$(cat "$RUN_DIR/adbd.pid")" 2>/dev/null; then
    log "already running (adbd pid $(cat "$RUN_DIR/adbd.pid")); serials $SERIAL $SERIAL2 in netns $NETNS"
    return 0
  fi
  mkdir -p "$RUN_DIR"
  ip netns list | grep -qw "$NETNS" || ip netns add "$NETNS"
  in_ns ip link set lo up
  start_adbd adbd "$RIG_PORT"
  start_adbd adbd2 "$RIG_PORT2" own-data
  connect_device "$SERIAL" "$RUN_DIR/adbd.log"
  connect_device "$SERIAL2" "$RUN_DIR/adbd2.log"
  log "running: serials $SERIAL and $SERIAL2 in netns $NETNS; e.g. $0 exec pfld-export bench-arm MODEL.tflite --serial $SERIAL,$SERIAL2 --benchmark-model $HERE/benchmark_model"
}

cmd_stop() {
  if ip netns list 2>/dev/null | grep -qw "$NETNS"; then
    in_ns timeout 10 adb kill-server >/dev/null 2>&1 || true
  fi
  local name pid
  for name in adbd adbd2; do
    [[ -f "$RUN_DIR/$name.pid" ]] || continue
    pid=$(cat "$RUN_DIR/$name.pid")
    # The pid is our bash -> exec chroot -> exec ld.so adbd chain: one process, started by us.
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/$name.pid"
  done
  ip netns list 2>/dev/null | grep -qw "$NETNS" && ip netns del "$NETNS" || true
  log "stopped"
}

cmd_exec() { in_ns env PFLD_RIG_SERIAL="$SERIAL" PFLD_RIG_SERIAL2="$SERIAL2" "$@"; }

cmd_test() {
  local t0=$SECONDS
  cmd_build
  cmd_stop >/dev/null 2>&1 || true
  cmd_start
  trap 'cmd_stop' EXIT
  local rc=0
  in_ns env PFLD_RIG_SERIAL="$SERIAL" PFLD_RIG_SERIAL2="$SERIAL2" PFLD_RIG_BENCHMARK_MODEL="$HERE/benchmark_model" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "$HERE" || rc=$?
  log "make test-arm: $((SECONDS - t0)) s wall"
  return $rc
}

# Sourced (tests of the functions above): define, run nothing.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_build; cmd_start ;;
  stop) cmd_stop ;;
  exec) shift; cmd_exec "$@" ;;
  test) cmd_test ;;
  classify-download) shift; download_failure "$@" ;;
  *) echo "usage: $0 build|start|stop|exec CMD...|test|classify-download LOG" >&2; exit 2 ;;
esac
