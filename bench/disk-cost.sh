#!/usr/bin/env bash
# What a sync costs on the destination's disk, per filesystem: ext4, xfs and btrfs images made
# with mkfs on sparse loop files (root needed), the guest's share on the image, the host's on
# the disk beside it. For each: bytes the guest agent wrote (/proc/PID/io write_bytes), the
# file's allocated blocks (stat %b × 512) and what the filesystem's used space grew by, for
#   1. a 2 GiB sparse file (1 MiB of data at its start) synced for the first time,
#   2. 1 MiB written into its middle (a hole),
#   3. a 1 GiB dense file synced for the first time,
#   4. 1 MiB rewritten in its middle (the old version goes to the trash).
# Usage: bash bench/disk-cost.sh [BIN_DIR]   (default target/debug); FS="ext4 xfs btrfs".
# Images are 4 GiB sparse files under $WORK (default /var/tmp/vmsync-disk-cost), removed at exit.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/debug}
work=${WORK:-/var/tmp/vmsync-disk-cost}
filesystems=${FS:-ext4 xfs btrfs}
mib=$((1 << 20))

pids=()
mounted=()
loops=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for m in "${mounted[@]}"; do umount "$m" 2>/dev/null || true; done
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"

write_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
used_bytes() { df -B1 --output=used "$1" | tail -1 | tr -d ' '; }
blocks_bytes() { echo $(( $(stat -c %b "$1") * 512 )); }

# Runs "$@" (a change on the host), waits until the guest has it, and prints one table row:
# name, guest bytes written, file blocks, fs used growth.
measure() {
    local name=$1 file=$2; shift 2
    sync
    local w0 u0
    w0=$(write_bytes "$guest_pid"); u0=$(used_bytes "$mnt")
    "$@"
    "$bin/vmsync-host" sync --config "$cfg/host.toml" >/dev/null || true
    if ! "$bin/vmsync-host" wait --config "$cfg/host.toml" --timeout 600 >/dev/null; then
        echo "$fs $name: not in sync; host log:" >&2
        tail -5 "$cfg/host.log" >&2
        "$bin/vmsync-host" status --config "$cfg/host.toml" >&2 || true
        exit 1
    fi
    cmp -s "$host/$file" "$mnt/share/$file" || { echo "$name: contents differ" >&2; exit 1; }
    sync
    local w1 u1
    w1=$(write_bytes "$guest_pid"); u1=$(used_bytes "$mnt")
    printf '| %s | %s | %.1f MiB | %.1f MiB | %.1f MiB |\n' "$fs" "$name" \
        "$(echo "($w1 - $w0) / $mib" | bc -l)" \
        "$(echo "$(blocks_bytes "$mnt/share/$file") / $mib" | bc -l)" \
        "$(echo "($u1 - $u0) / $mib" | bc -l)"
}

echo "| fs | step | guest wrote | file blocks | fs used grew |"
echo "|---|---|---|---|---|"
for fs in $filesystems; do
    img=$work/$fs.img
    mnt=$work/mnt-$fs
    truncate -s 4G "$img"
    case $fs in
        ext4) mkfs.ext4 -q -F "$img" ;;
        xfs) mkfs.xfs -q -f "$img" ;;
        btrfs) mkfs.btrfs -q -f "$img" ;;
    esac
    loop=$(losetup --find --show "$img"); loops+=("$loop")
    mkdir -p "$mnt"; mount "$loop" "$mnt"; mounted+=("$mnt")
    cfg=$work/cfg-$fs; host=$work/host-$fs
    mkdir -p "$cfg" "$host" "$mnt/share"
    cat > "$cfg/guest.toml" <<TOML
listen = "unix:$cfg/guest.sock"
state_dir = "$cfg/guest-state"
control = "$cfg/guest.ctl"
[[share]]
name = "s"
path = "$mnt/share"
min_free = "1%"
TOML
    cat > "$cfg/host.toml" <<TOML
guest = "unix:$cfg/guest.sock"
state_dir = "$cfg/host-state"
control = "$cfg/host.ctl"
[[share]]
name = "s"
path = "$host"
min_free = "1%"
TOML
    "$bin/vmsync-guest" run --config "$cfg/guest.toml" 2>"$cfg/guest.log" & guest_pid=$!; pids+=("$guest_pid")
    "$bin/vmsync-host" run --config "$cfg/host.toml" 2>"$cfg/host.log" & pids+=($!)
    "$bin/vmsync-host" wait --config "$cfg/host.toml" --timeout 60 >/dev/null

    measure "2 GiB sparse, initial" sparse.img \
        sh -c "truncate -s 2G '$host/sparse.img' && head -c $mib /dev/urandom | dd of='$host/sparse.img' conv=notrunc status=none"
    measure "1 MiB into the sparse file" sparse.img \
        sh -c "head -c $mib /dev/urandom | dd of='$host/sparse.img' bs=1M seek=1024 conv=notrunc status=none"
    measure "1 GiB dense, initial" dense.bin \
        sh -c "head -c 1G /dev/urandom > '$host/dense.bin'"
    measure "1 MiB into the dense file" dense.bin \
        sh -c "head -c $mib /dev/urandom | dd of='$host/dense.bin' bs=1M seek=512 conv=notrunc status=none"

    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
    rm -rf "$host" "$cfg"
done
