# shellcheck shell=bash
# Common settings for the VM test scripts (sourced, not executed).
#
# Everything built or downloaded goes under $VMSYNC_VM_DIR (default /var/tmp/vmsync-vm), never
# into the git work tree. Keep that path short: Unix socket paths must stay under 108 bytes,
# including the `_PORT` suffix vhost-device-vsock appends for guest-initiated connections.

VM_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$VM_SRC/../.." && pwd)
: "${VMSYNC_VM_DIR:=/var/tmp/vmsync-vm}"
WORK=$VMSYNC_VM_DIR

# pinned versions (change here, nowhere else)
: "${VDV_VERSION:=0.3.0}"                       # vhost-device-vsock on crates.io
: "${QEMU_SUITE:=bookworm-backports}"           # bookworm-backports -> QEMU 10.0.x; bookworm -> 7.2
: "${KERNEL_META:=linux-image-cloud-amd64}"     # resolved to the current ABI package at setup
: "${KERNEL_SUITE:=bookworm}"                   # bookworm(-security) -> 6.1.x; bookworm-backports -> 6.12.x
: "${APT_LOCK_TIMEOUT:=300}"

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" -o "Acquire::Retries=3" -q)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# step NAME CMD... : runs a step and appends its duration to $WORK/timings-setup.txt
step() {
  local name=$1; shift
  local t0; t0=$(now)
  log "== $name"
  "$@"
  printf '%-28s %8ss\n' "$name" "$(elapsed "$t0" "$(now)")" | tee -a "$WORK/timings-setup.txt" >&2
}

require_root_x86_64() {
  [ "$(id -u)" = 0 ] || die "run as root"
  [ "$(uname -m)" = x86_64 ] || die "x86_64 only"
  grep -q 'VERSION_CODENAME=bookworm' /etc/os-release \
    || log "WARNING: not Debian 12 (bookworm); package names and suites may differ"
}
