#!/usr/bin/env bash
# The systemd guest test: the packaged vmsync-guest under a real systemd, in a Debian guest booted
# under QEMU (TCG) with its root on a virtio disk. Exit 0 only if it passed.
#
#   bash tests/vm/systemd.sh            # root, Debian x86_64
#   PKG_DIR=target/packages bash tests/vm/systemd.sh    # with packages packaging/build.sh made
#
# Measured on a busy 2-core machine: 14 min from nothing (the release builds packaging/build.sh
# runs, with debootstrap beside them), 80 s with the image cached and the builds done (30 s
# with PKG_DIR); the guest's boot, sync, check and power-off take 26-39 s of that.
#
# What it proves: vmsync-guest.service (Type=notify) sends READY=1 only once the host's first
# sync of the share is complete, so a unit ordered After=/Requires=vmsync-guest.service starts on
# the whole tree. The guest image (Debian, debootstrap --variant=minbase, systemd as init, the
# distribution kernel and initramfs) has the vmsync-guest .deb installed with dpkg, exporting
# /srv/share as `src`, and a test unit, share-check.service (tests/vm/systemd/), that at its start
# lists /srv/share and checks it against a MANIFEST of sha256sums that is part of the host's
# share (the host passes the file count and the MANIFEST's sha256 on the kernel command line);
# it prints SHARE-CHECK: PASS or FAIL on the serial console, and powers the guest off.
#
# The host agent is started only HOST_DELAY seconds after the guest's vmsync-guest.service began
# starting, and its first sync carries N_FILES files (TREE_MB in all) through TCG: a unit that
# started before that sync was complete would see a partial or empty tree. The host agent runs
# the host unit's own ExecStart= line (packaging/vmsync-host@.service, the instance's config
# substituted) from the vmsync-host .deb, with NOTIFY_SOCKET pointing at a listener that records
# its READY=1. The vsock device is vhost-device-vsock, as in tests/vm/run.sh: the host side opens
# Unix sockets only (the hybrid socket); AF_VSOCK is used inside the guest and nowhere else.
#
# Pass: the console shows SHARE-CHECK: PASS (every listed file there, with its sum, and no other,
# when the unit started), the guest reported vmsync-guest active, share-check ran only after the
# host agent started, and the guest powered off. Everything is bounded (TOTAL_TIMEOUT); the
# phase timings are printed at the end, pass or fail.
#
# Work dir: $VM_WORK (default /var/tmp/vmsync-vm/systemd). The root image built by debootstrap is cached there
# (image/<hash of suite and package lists>/, about 0.6 GB used of a 2 GB sparse file, plus the
# kernel and initramfs taken out of it), so later runs skip that phase; each run boots a copy.
# Logs of each run: $VM_WORK/results/<UTC stamp>/.
#
# Knobs (environment): PKG_DIR (a directory with vmsync-host_*.deb and vmsync-guest_*.deb already
# built; default: packaging/build.sh builds them, honouring CARGO_TARGET_DIR), N_FILES, TREE_MB,
# HOST_DELAY, SMP, MEM, BOOT_TIMEOUT, SYNC_TIMEOUT, TOTAL_TIMEOUT, KEEP_RUN=1 (keep the run's
# image). The negative controls, which pass only if share-check FAILS: CONTROL=early
# (vmsync-guest.service made Type=simple: "ready" at once, before the host is there) and
# CONTROL=connected (Type=simple plus an ExecStartPost= that waits until `vmsync-guest status`
# shows the host connected: "ready" at the connection, before the first sync is done; this one
# shows the tree is large enough for the sync to take a while under TCG).
set -euo pipefail
. "$(dirname "$0")/lib.sh"   # REPO, VM_SRC, WORK (vhost-device-vsock from tests/vm/setup.sh), log, die, now, APT

: "${VM_WORK:=/var/tmp/vmsync-vm/systemd}"
: "${SUITE:=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
: "${MIRROR:=http://deb.debian.org/debian}"
: "${SECURITY_MIRROR:=http://deb.debian.org/debian-security}"
: "${IMAGE_SIZE:=2G}"
: "${SMP:=1}"
: "${MEM:=1024M}"
: "${GUEST_CID:=3}"
: "${AGENT_PORT:=786}"
: "${N_FILES:=600}"          # files in the host's share, besides the MANIFEST
: "${TREE_MB:=6}"            # their total size
: "${HOST_DELAY:=5}"         # s between the guest agent starting and the host agent starting
: "${BOOT_TIMEOUT:=600}"     # QEMU start -> vmsync-guest.service starting
: "${SYNC_TIMEOUT:=600}"     # host agent start -> SHARE-CHECK on the console
: "${POWEROFF_TIMEOUT:=180}" # SHARE-CHECK -> QEMU exited
: "${TOTAL_TIMEOUT:=1500}"   # the whole script
: "${PKG_DIR:=}"
: "${CONTROL:=}"
: "${KEEP_RUN:=0}"
case "$CONTROL" in ''|early|connected) ;; *) die "CONTROL must be empty, 'early' or 'connected'" ;; esac

T_ALL=$(now)
DEADLINE=$(awk -v n="$T_ALL" -v t="$TOTAL_TIMEOUT" 'BEGIN { printf "%d", n + t }')
remaining() { awk -v d="$DEADLINE" -v n="$(now)" 'BEGIN { r = d - n; printf "%d", (r > 1 ? r : 1) }'; }
# bound SECONDS : the smaller of SECONDS and what is left of TOTAL_TIMEOUT
bound() { local r; r=$(remaining); if [ "$1" -lt "$r" ]; then echo "$1"; else echo "$r"; fi; }

[ "$(id -u)" = 0 ] || die "run as root"
[ "$(uname -m)" = x86_64 ] || die "x86_64 only"
mkdir -p "$VM_WORK"
VM_WORK=$(cd "$VM_WORK" && pwd)
exec 8>"$VM_WORK/lock"
flock -w 60 8 || die "another systemd.sh holds $VM_WORK/lock"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$VM_WORK/run
OUT=$VM_WORK/results/$STAMP
MNT=$VM_WORK/mnt
rm -rf "$RUN"
mkdir -p "$RUN" "$OUT" "$MNT"
SUMMARY=$RUN/summary.txt
: > "$SUMMARY"
say() { log "$*"; echo "$*" >> "$SUMMARY"; }

# ------------------------------------------------------------- timings
declare -a TIMINGS=()
CUR_PHASE=
phase() {   # phase NAME FUNCTION : runs it (a failure exits, through the cleanup), records how long it took
  CUR_PHASE=$1; CUR_T0=$(now); shift
  log "== $CUR_PHASE"
  "$@"
  TIMINGS+=("$(printf '%-38s %8.1f s' "$CUR_PHASE" "$(elapsed "$CUR_T0" "$(now)")")")
  CUR_PHASE=
}
print_timings() {
  echo "---- phase timings (systemd.sh)"
  local t; for t in "${TIMINGS[@]}"; do echo "  $t"; done
  [ -z "$CUR_PHASE" ] || printf '  %-38s %8.1f s  (did not finish)\n' "$CUR_PHASE" "$(elapsed "$CUR_T0" "$(now)")"
  printf '  %-38s %8.1f s\n' "total" "$(elapsed "$T_ALL" "$(now)")"
}

# ------------------------------------------------------------- processes, mounts, loop devices
declare -a PIDS=() MOUNTS=() LOOPS=()
spawn() {   # spawn LOGFILE CMD... ; sets LAST_PID
  local logf=$1; shift
  "$@" >>"$logf" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
alive() { kill -0 "$1" 2>/dev/null; }
ours() {    # still a child of this script? (guards against PID reuse)
  local ppid
  ppid=$(awk '/^PPid:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
  [ "$ppid" = "$$" ]
}
do_mount() {  # do_mount ARGS... DIR : mount, remembered for the cleanup
  mount "$@"
  MOUNTS+=("${*: -1}")
}
undo_mounts() {  # unmounts everything this script mounted, innermost first
  local i m
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
    m=${MOUNTS[$i]}
    [ -n "$m" ] || continue
    if mountpoint -q "$m"; then
      umount "$m" 2>/dev/null || { sleep 1; umount "$m" 2>/dev/null; } || { log "lazy unmount of $m"; umount -l "$m" || true; }
    fi
    unset 'MOUNTS[i]'
  done
  MOUNTS=()
}
loop_attach() {  # loop_attach IMAGE : sets LOOP
  LOOP=$(losetup -f --show "$1")
  LOOPS+=("$LOOP")
}
undo_loops() {
  local l
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  LOOPS=()
}
# mount_image IMAGE [ro] : the image's ext4 on $MNT through a loop device
mount_image() {
  loop_attach "$1"
  if [ "${2:-}" = ro ]; then do_mount -o ro,noload "$LOOP" "$MNT"; else do_mount "$LOOP" "$MNT"; fi
}
# chroot_mounts : /proc, /sys, /dev and /dev/pts inside $MNT, for apt and dpkg in the chroot
chroot_mounts() {
  do_mount -t proc proc "$MNT/proc"
  do_mount -t sysfs sysfs "$MNT/sys"
  do_mount --bind /dev "$MNT/dev"
  do_mount --bind /dev/pts "$MNT/dev/pts"
}
unmount_image() {
  undo_mounts
  # anything left under $MNT (debootstrap mounts /proc and /sys in its target; a run cut short
  # leaves them), deepest first
  local m
  for m in $(awk -v p="$MNT" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: cannot unmount $m"
  done
  undo_loops
}
in_chroot() { LC_ALL=C.UTF-8 chroot "$MNT" "$@"; }

# descendants PID : every process below PID (parents before children), from /proc
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$c"; descendants "$c"
  done
}
# fg_run CMD... : runs CMD in the background and waits for it, so that INT/TERM reach the
# script at once (bash runs a trap only after a foreground command ends); the cleanup ends it
FG_PID=
fg_run() {
  local rc=0
  "$@" &
  FG_PID=$!
  wait "$FG_PID" || rc=$?
  FG_PID=
  return "$rc"
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  exec 1>&3 2>&4   # the script's own output again (a trap can fire inside a redirected call)
  # The processes this script started, and below packaging/build.sh and a foreground command
  # (debootstrap, apt) everything they started (build.sh's steps run under `timeout`, each in a
  # process group of its own): each by PID, TERM first, KILL after 5 s.
  local tree=()
  for pid in "${BUILD_PID:-}" "${FG_PID:-}"; do
    [ -n "$pid" ] && ours "$pid" && mapfile -t -O "${#tree[@]}" tree < <(descendants "$pid")
  done
  for pid in "${PIDS[@]}" "${FG_PID:-}"; do [ -n "$pid" ] && ours "$pid" && tree+=("$pid"); done
  for pid in "${tree[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local any=0
    for pid in "${tree[@]}"; do alive "$pid" && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.1
  done
  for pid in "${tree[@]}"; do
    if alive "$pid"; then log "SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  unmount_image
  rm -rf "$VM_WORK/image/.build-"* 2>/dev/null || true
  cp -f "$RUN"/*.log "$RUN"/*.txt "$OUT"/ 2>/dev/null || true
  if [ "$KEEP_RUN" = 1 ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
  print_timings | tee "$OUT/timings.txt" >&2
  if [ "$rc" = 0 ]; then log "PASS (logs: $OUT)"; else log "FAIL rc=$rc (logs: $OUT)"; fi
  exit "$rc"
}
exec 3>&1 4>&2
trap cleanup EXIT
trap 'exec 1>&3 2>&4; log "interrupted"; exit 130' INT TERM

fail() {
  log "FAIL: $*"
  {
    echo "FAIL: $*"
    echo "--- console (tail)"; tail -60 "$RUN/console.log" 2>/dev/null | tr -d '\r'
    echo "--- host agent log (tail)"; tail -30 "$RUN/host.log" 2>/dev/null
    echo "--- host agent sd_notify messages (tail)"; tail -10 "$RUN/notify.txt" 2>/dev/null
    echo "--- qemu log"; tail -20 "$RUN/qemu.log" 2>/dev/null
  } > "$RUN/failure.txt" 2>&1 || true
  cat "$RUN/failure.txt" >&2 || true
  exit 1
}

# ------------------------------------------------------------- phase: tools
TOOLS_APT=(debootstrap e2fsprogs util-linux python3)
tools() {
  local p missing=()
  for p in "${TOOLS_APT[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} (apt)"
    fg_run timeout -k 10 "$(bound 300)" "${APT[@]}" update
    fg_run timeout -k 10 "$(bound 600)" "${APT[@]}" install -y --no-install-recommends --no-upgrade "${missing[@]}"
  fi
  # QEMU and vhost-device-vsock (built without its AF_VSOCK backend) as the VM test has them
  fg_run env SETUP_STEPS="apt vdv" timeout -k 10 "$(bound 900)" bash "$VM_SRC/setup.sh"
  VDV=$WORK/bin/vhost-device-vsock
  [ -x "$VDV" ] || die "$VDV missing after tests/vm/setup.sh"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after tests/vm/setup.sh"
}

# ------------------------------------------------------------- phase: packages (background)
# packaging/build.sh builds both agents' packages; it runs while debootstrap downloads.
PKG_OUT=$RUN/packages
BUILD_PID=
start_packages() {
  if [ -n "$PKG_DIR" ]; then
    log "using the packages in $PKG_DIR"
    return 0
  fi
  mkdir -p "$PKG_OUT"
  log "packaging/build.sh $PKG_OUT in the background (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}; log: $RUN/build.log)"
  # bash -c with the script's text: read whole before it runs, so an edit of build.sh meanwhile
  # cannot change it under the running shell; $0 stays its path
  spawn "$RUN/build.log" bash -c "$(cat "$REPO/packaging/build.sh")" "$REPO/packaging/build.sh" "$PKG_OUT"
  BUILD_PID=$LAST_PID
  PKG_T0=$(now)
}
GUEST_DEB=""; HOST_DEB=""; FALLBACK=""
finish_packages() {
  local dir=${PKG_DIR:-$PKG_OUT} rc=0
  if [ -n "$BUILD_PID" ]; then
    # bounded: build.sh bounds each of its steps, this bounds the whole
    local deadline; deadline=$(awk -v n="$(now)" -v t="$(bound 1500)" 'BEGIN { printf "%.3f", n + t }')
    while alive "$BUILD_PID"; do
      awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }' && die "packaging/build.sh still running at the time limit"
      sleep 1
    done
    wait "$BUILD_PID" || rc=$?
    BUILD_PID=
    TIMINGS+=("$(printf '%-38s %8.1f s' "  (packaging/build.sh, in parallel)" "$(elapsed "$PKG_T0" "$(now)")")")
    log "packaging/build.sh finished (rc $rc) after $(elapsed "$PKG_T0" "$(now)") s"
  fi
  GUEST_DEB=$(ls "$dir"/vmsync-guest_*.deb 2>/dev/null | head -1 || true)
  HOST_DEB=$(ls "$dir"/vmsync-host_*.deb 2>/dev/null | head -1 || true)
  if [ "$rc" = 0 ] && [ -n "$GUEST_DEB" ] && [ -n "$HOST_DEB" ]; then
    say "packages: $(basename "$GUEST_DEB"), $(basename "$HOST_DEB")"
    return 0
  fi
  [ -z "$PKG_DIR" ] || die "no vmsync-guest_*.deb and vmsync-host_*.deb in PKG_DIR=$PKG_DIR"
  # Fallback: what the .deb would install, by hand: the static guest binary and the unit.
  tail -20 "$RUN/build.log" >&2 || true
  say "WARNING: packaging/build.sh failed (rc $rc, log above): FALLBACK to scripts/build-static-guest.sh + the unit copied by hand"
  FALLBACK=1
  local t=${CARGO_TARGET_DIR:-$REPO/target}
  fg_run env -C "$REPO" CARGO_TARGET_DIR="$t" timeout -k 10 "$(bound 1500)" bash scripts/build-static-guest.sh > "$RUN/fallback-build.log" 2>&1 \
    || { tail -20 "$RUN/fallback-build.log" >&2; die "scripts/build-static-guest.sh failed"; }
  FALLBACK_GUEST=$(tail -1 "$RUN/fallback-build.log")
  fg_run env -C "$REPO" CARGO_TARGET_DIR="$t" timeout -k 10 "$(bound 1500)" cargo build --release --locked -q -p vmsync-host
  FALLBACK_HOST=$t/release/vmsync-host
  [ -x "$FALLBACK_GUEST" ] && [ -x "$FALLBACK_HOST" ] || die "fallback build failed"
}

# ------------------------------------------------------------- phase: the cached root image
# Everything that decides what the image holds is in the cache key.
PKGS_BOOTSTRAP="systemd-sysv,udev,kmod,e2fsprogs,procps"
PKGS_CHROOT="initramfs-tools linux-image-cloud-amd64"
RECIPE=1   # raise when the recipe in build_image changes
KEY=$(printf '%s\n' "suite=$SUITE" "mirror=$MIRROR" "security=$SECURITY_MIRROR" "size=$IMAGE_SIZE" \
  "bootstrap=$PKGS_BOOTSTRAP" "chroot=$PKGS_CHROOT" "recipe=$RECIPE" | sha256sum | cut -c1-16)
IMGDIR=$VM_WORK/image/$KEY
build_image() {
  if [ -f "$IMGDIR/complete" ]; then
    say "root image: cached, $IMGDIR ($(du -sh --apparent-size "$IMGDIR/root.img" | cut -f1) sparse, $(du -sh "$IMGDIR/root.img" | cut -f1) used; $(cat "$IMGDIR/kernel.txt"))"
    return 0
  fi
  local tmp=$VM_WORK/image/.build-$KEY
  rm -rf "$tmp"; mkdir -p "$tmp"
  truncate -s "$IMAGE_SIZE" "$tmp/root.img"
  mkfs.ext4 -q -F -L vmsys-root "$tmp/root.img"
  mount_image "$tmp/root.img"
  log "debootstrap --variant=minbase --include=$PKGS_BOOTSTRAP $SUITE ($MIRROR)"
  if ! fg_run timeout -k 10 "$(bound 1200)" debootstrap --variant=minbase --include="$PKGS_BOOTSTRAP" \
      "$SUITE" "$MNT" "$MIRROR" > "$RUN/debootstrap.log" 2>&1; then
    tail -30 "$RUN/debootstrap.log" >&2
    [ -f "$MNT/debootstrap/debootstrap.log" ] && tail -30 "$MNT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
  fi
  chroot_mounts
  cat > "$MNT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  cp /etc/resolv.conf "$MNT/etc/resolv.conf" 2>/dev/null || true
  # no service starts in the chroot
  printf '#!/bin/sh\nexit 101\n' > "$MNT/usr/sbin/policy-rc.d"; chmod 755 "$MNT/usr/sbin/policy-rc.d"
  # the initramfs: only what mounts the root (virtio-pci, virtio-blk; ext4 is built in)
  mkdir -p "$MNT/etc/initramfs-tools/conf.d"
  printf 'MODULES=list\n' > "$MNT/etc/initramfs-tools/conf.d/vmsys.conf"
  printf '%s\n' virtio_pci virtio_blk ext4 >> "$MNT/etc/initramfs-tools/modules"
  log "apt-get install $PKGS_CHROOT (in the chroot)"
  fg_run timeout -k 10 "$(bound 600)" env DEBIAN_FRONTEND=noninteractive chroot "$MNT" apt-get -q \
    -o Acquire::Retries=3 update > "$RUN/chroot-apt.log" 2>&1 || { tail -30 "$RUN/chroot-apt.log" >&2; die "apt-get update in the chroot failed"; }
  # shellcheck disable=SC2086
  fg_run timeout -k 10 "$(bound 900)" env DEBIAN_FRONTEND=noninteractive chroot "$MNT" apt-get -q -y \
    -o Acquire::Retries=3 install --no-install-recommends $PKGS_CHROOT >> "$RUN/chroot-apt.log" 2>&1 \
    || { tail -30 "$RUN/chroot-apt.log" >&2; die "apt-get install in the chroot failed"; }
  local kver
  kver=$(ls "$MNT/lib/modules" | sort -V | tail -1)
  [ -f "$MNT/boot/vmlinuz-$kver" ] && [ -f "$MNT/boot/initrd.img-$kver" ] || die "no kernel or initramfs in the image ($kver)"
  cp "$MNT/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  cp "$MNT/boot/initrd.img-$kver" "$tmp/initrd.img"
  in_chroot dpkg-query -W -f='${Package} ${Version}\n' > "$tmp/packages.txt"
  echo "kernel $kver ($(in_chroot dpkg-query -W -f='${Version}' "linux-image-$kver"))" > "$tmp/kernel.txt"
  # the guest's configuration, all but vmsync (installed per run)
  echo vmsys > "$MNT/etc/hostname"
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$MNT/etc/fstab"
  mkdir -p "$MNT/var/log/journal"   # a persistent journal: readable from the image after a run
  in_chroot apt-get clean
  rm -rf "$MNT"/var/lib/apt/lists/* "$MNT/usr/sbin/policy-rc.d" "$MNT/etc/resolv.conf"
  unmount_image
  e2fsck -fy "$tmp/root.img" > /dev/null 2>&1 || true
  rm -rf "$IMGDIR"; mv "$tmp" "$IMGDIR"
  touch "$IMGDIR/complete"
  # one cached image at a time: those of other keys go
  local old
  for old in "$VM_WORK"/image/*/; do
    if [ -d "$old" ] && [ "${old%/}" != "$IMGDIR" ]; then log "removing the cached image $old"; rm -rf "$old"; fi
  done
  say "root image: built, $IMGDIR ($(wc -l < "$IMGDIR/packages.txt") packages, $(du -sh "$IMGDIR/root.img" | cut -f1) used; $(cat "$IMGDIR/kernel.txt"))"
}

# ------------------------------------------------------------- phase: install vmsync into a copy
IMG=$RUN/root.img
install_guest() {
  cp --sparse=always "$IMGDIR/root.img" "$IMG"
  mount_image "$IMG"
  chroot_mounts
  if [ -z "$FALLBACK" ]; then
    cp "$GUEST_DEB" "$MNT/tmp/"
    in_chroot dpkg -i "/tmp/$(basename "$GUEST_DEB")" > "$RUN/dpkg.log" 2>&1 || { cat "$RUN/dpkg.log" >&2; die "dpkg -i of the guest package failed in the chroot"; }
    rm -f "$MNT/tmp/$(basename "$GUEST_DEB")"
    say "guest: dpkg -i $(basename "$GUEST_DEB"): $(in_chroot dpkg-query -W -f='${Package} ${Version} ${Status}' vmsync-guest)"
  else
    install -m 755 "$FALLBACK_GUEST" "$MNT/usr/bin/vmsync-guest"
    install -m 644 "$REPO/packaging/vmsync-guest.service" "$MNT/usr/lib/systemd/system/vmsync-guest.service"
    say "guest: FALLBACK: static vmsync-guest and packaging/vmsync-guest.service copied by hand"
  fi
  [ -f "$MNT/usr/lib/systemd/system/vmsync-guest.service" ] || [ -f "$MNT/lib/systemd/system/vmsync-guest.service" ] \
    || die "the guest package installed no vmsync-guest.service"
  mkdir -p "$MNT/etc/vmsync" "$MNT/srv/share" "$MNT/etc/systemd/system/vmsync-guest.service.d"
  cat > "$MNT/etc/vmsync/guest.toml" <<EOF
# written by tests/vm/systemd.sh
listen = "vsock://any:$AGENT_PORT"
[[share]]
name = "src"
path = "/srv/share"
EOF
  printf '[Service]\nReadWritePaths=/srv/share\n' > "$MNT/etc/systemd/system/vmsync-guest.service.d/share.conf"
  case "$CONTROL" in
    early)  # "ready" as soon as the process runs, before the host is even there
      printf '[Service]\nType=simple\n' > "$MNT/etc/systemd/system/vmsync-guest.service.d/control.conf"
      say "guest: CONTROL=early: vmsync-guest.service made Type=simple (share-check must FAIL)" ;;
    connected)  # "ready" as soon as the host is connected, before its first sync is done
      printf '%s\n' '[Service]' 'Type=simple' \
        "ExecStartPost=/bin/sh -c 'until vmsync-guest status --config /etc/vmsync/guest.toml | grep -q \"peer connected\"; do sleep 0.1; done'" \
        > "$MNT/etc/systemd/system/vmsync-guest.service.d/control.conf"
      say "guest: CONTROL=connected: vmsync-guest.service active once the host connects (share-check must FAIL)" ;;
  esac
  # a quiet console: no login prompt on the serial line
  ln -sf /dev/null "$MNT/etc/systemd/system/serial-getty@ttyS0.service"
  install -m 755 "$VM_SRC/systemd/share-check" "$MNT/usr/local/sbin/share-check"
  install -m 644 "$VM_SRC/systemd/share-check.service" "$MNT/etc/systemd/system/share-check.service"
  in_chroot systemctl enable vmsync-guest.service share-check.service > "$RUN/enable.log" 2>&1 \
    || { cat "$RUN/enable.log" >&2; die "systemctl enable failed in the chroot"; }
  [ -L "$MNT/etc/systemd/system/multi-user.target.wants/vmsync-guest.service" ] \
    && [ -L "$MNT/etc/systemd/system/multi-user.target.wants/share-check.service" ] \
    || die "systemctl enable made no links"
  unmount_image
}

# ------------------------------------------------------------- phase: the host's share
HOST_DIR=$RUN/share
HOST_CFG=$RUN/vmsys.toml
make_share() {
  mkdir -p "$HOST_DIR" "$RUN/host-state"
  python3 - "$HOST_DIR" "$N_FILES" "$TREE_MB" <<'PY'
import os, sys
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = mb * 1024 * 1024
weights = [(i * 7919) % 97 + 1 for i in range(n)]
scale = total / sum(weights)
for i, w in enumerate(weights):
    d = os.path.join(root, "d%02d" % (i % 24), "s%d" % (i % 3))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%04d.bin" % i), "wb") as f:
        f.write(os.urandom(max(1, int(w * scale))))
PY
  # the MANIFEST last: sha256 of every other file, made beside the share and renamed in
  (cd "$HOST_DIR" && find . -type f ! -path ./MANIFEST -print | sed 's|^\./||' | LC_ALL=C sort | xargs -d '\n' sha256sum) > "$RUN/MANIFEST.tmp"
  mv "$RUN/MANIFEST.tmp" "$HOST_DIR/MANIFEST"
  MANIFEST_SUM=$(sha256sum < "$HOST_DIR/MANIFEST" | cut -d' ' -f1)
  [ "$(wc -l < "$HOST_DIR/MANIFEST")" = "$N_FILES" ] || die "MANIFEST lists $(wc -l < "$HOST_DIR/MANIFEST") files, not $N_FILES"
  say "host share: $N_FILES files + MANIFEST, $(du -sb "$HOST_DIR" | awk '{ printf "%.1f", $1 / 1048576 }') MiB, $(find "$HOST_DIR" -mindepth 1 -type d | wc -l) directories"
  cat > "$HOST_CFG" <<EOF
# written by tests/vm/systemd.sh: the instance config of vmsync-host@vmsys
guest = "hybrid:$UDS:$AGENT_PORT"
state_dir = "$RUN/host-state"
control = "$RUN/host.ctl"
[[share]]
name = "src"
path = "$HOST_DIR"
EOF
  # the host agent: the unit's ExecStartPre= and ExecStart= lines, %i and its config substituted
  if [ -z "$FALLBACK" ]; then
    dpkg-deb -x "$HOST_DEB" "$RUN/hostpkg"
    HOST_BIN=$RUN/hostpkg/usr/bin/vmsync-host
  else
    HOST_BIN=$FALLBACK_HOST
  fi
  local unit=$REPO/packaging/vmsync-host@.service
  subst() { sed -n "s/^$1=//p" "$unit" | head -1 | sed -e "s|/etc/vmsync/host/%i.toml|$HOST_CFG|g" -e "s|%i|vmsys|g" -e "s|/usr/bin/vmsync-host|$HOST_BIN|g"; }
  HOST_PRE=$(subst ExecStartPre)
  HOST_START=$(subst ExecStart)
  [ -n "$HOST_START" ] || die "no ExecStart= in $unit"
  case "$HOST_START" in "$HOST_BIN "*) ;; *) die "unexpected ExecStart= in $unit: $HOST_START" ;; esac
  say "host agent: ExecStart=$HOST_START"
  if [ -n "$HOST_PRE" ]; then
    # shellcheck disable=SC2086
    $HOST_PRE > "$RUN/host-check.log" 2>&1 || { cat "$RUN/host-check.log" >&2; die "ExecStartPre= failed: $HOST_PRE"; }
  fi
}

# ------------------------------------------------------------- phase: boot, sync, check
VHOST_SOCK=$RUN/vhost-user.sock   # QEMU <-> vhost-device-vsock
UDS=$RUN/vsock.sock               # the hybrid socket: the host agent CONNECTs through it
seen() { grep -aq "$1" "$RUN/console.log" 2>/dev/null; }
# wait_for WHAT TIMEOUT_S CMD... : polls CMD every 0.1 s; fails the test on timeout or QEMU exit
wait_for() {
  local what=$1 t; t=$(bound "$2"); shift 2
  local deadline; deadline=$(awk -v n="$(now)" -v t="$t" 'BEGIN { printf "%.3f", n + t }')
  until "$@"; do
    alive "$QEMU_PID" || fail "QEMU exited while waiting for $what"
    awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }' && fail "timeout (${t}s) waiting for $what"
    sleep 0.1
  done
}
# systemd's status line for the unit (systemd.show_status=1): "Starting vmsync-guest.service - ..."
guest_agent_starting() { grep -aEq '(Starting|Started) .*vmsync-guest\.service' "$RUN/console.log" 2>/dev/null; }
boot_and_check() {
  local batch=(); command -v chrt >/dev/null && batch=(chrt --batch 0)   # as tests/vm/run.sh
  spawn "$RUN/vhost-device-vsock.log" env RUST_LOG=warn "${batch[@]}" "$VDV" \
    --vm "guest-cid=$GUEST_CID,socket=$VHOST_SOCK,uds-path=$UDS"
  local i; for i in $(seq 100); do [ -S "$VHOST_SOCK" ] && break; sleep 0.1; done
  [ -S "$VHOST_SOCK" ] || fail "vhost-device-vsock did not create $VHOST_SOCK"

  local append="root=/dev/vda rw console=ttyS0 panic=-1 loglevel=4 fsck.mode=skip systemd.show_status=1"
  append+=" share_files=$N_FILES share_manifest=$MANIFEST_SUM"
  : > "$RUN/console.log"
  T_QEMU=$(now)
  spawn "$RUN/qemu.log" qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp "$SMP" -m "$MEM" \
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$RUN/console.log" \
    -kernel "$IMGDIR/vmlinuz" -initrd "$IMGDIR/initrd.img" -append "$append" \
    -drive "file=$IMG,format=raw,if=virtio,cache=unsafe" \
    -chardev "socket,id=char0,path=$VHOST_SOCK" -device vhost-user-vsock-pci,chardev=char0
  QEMU_PID=$LAST_PID

  wait_for "vmsync-guest.service to start in the guest" "$BOOT_TIMEOUT" guest_agent_starting
  T_AGENT=$(now)
  say "guest: vmsync-guest.service starting $(elapsed "$T_QEMU" "$T_AGENT") s after QEMU started"
  # The guest agent waits for the host; nothing ordered after it may start meanwhile.
  sleep "$HOST_DELAY"
  seen 'SHARE-CHECK' && CHECK_BEFORE_HOST=1 || CHECK_BEFORE_HOST=0
  spawn "$RUN/notify-listen.log" python3 "$VM_SRC/systemd/notify-listen.py" "$RUN/notify.sock" "$RUN/notify.txt"
  for i in $(seq 50); do [ -S "$RUN/notify.sock" ] && break; sleep 0.1; done
  [ -S "$RUN/notify.sock" ] || fail "the notify listener did not bind $RUN/notify.sock"
  T_HOST=$(now)
  # shellcheck disable=SC2086
  spawn "$RUN/host.log" env NOTIFY_SOCKET="$RUN/notify.sock" VMSYNC_LOG=info VMSYNC_PROGRESS=lines $HOST_START
  HOST_PID=$LAST_PID
  say "host: vmsync-host started $(elapsed "$T_AGENT" "$T_HOST") s after vmsync-guest.service began starting"

  T_READY=
  check_seen() {
    if [ -z "$T_READY" ] && grep -q 'READY=1' "$RUN/notify.txt" 2>/dev/null; then
      T_READY=$(grep -m1 'READY=1' "$RUN/notify.txt" | cut -d' ' -f1)
    fi
    alive "$HOST_PID" || fail "the host agent exited (see host.log)"
    seen 'SHARE-CHECK:'
  }
  wait_for "SHARE-CHECK on the guest console" "$SYNC_TIMEOUT" check_seen
  T_CHECK=$(now)
  local deadline; deadline=$(awk -v n="$(now)" -v t="$(bound "$POWEROFF_TIMEOUT")" 'BEGIN { printf "%.3f", n + t }')
  while alive "$QEMU_PID"; do
    awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }' && fail "the guest did not power off within ${POWEROFF_TIMEOUT}s of SHARE-CHECK"
    sleep 0.2
  done
  local qrc=0; wait "$QEMU_PID" || qrc=$?
  T_OFF=$(now)
  [ -n "$T_READY" ] || { grep -q 'READY=1' "$RUN/notify.txt" 2>/dev/null && T_READY=$(grep -m1 'READY=1' "$RUN/notify.txt" | cut -d' ' -f1); } || true
  QEMU_RC=$qrc
  # the host agent stops on SIGTERM within seconds, with status 0 (docs/cli.md, Stopping)
  kill -TERM "$HOST_PID" 2>/dev/null || true
  local t0; t0=$(now)
  HOST_RC=0
  for i in $(seq 100); do alive "$HOST_PID" || break; sleep 0.1; done
  if alive "$HOST_PID"; then
    log "SIGKILL $HOST_PID (the host agent, 10 s after SIGTERM)"; kill -KILL "$HOST_PID" 2>/dev/null || true
    HOST_RC=timeout
  fi
  wait "$HOST_PID" || { [ "$HOST_RC" = timeout ] || HOST_RC=$?; }
  say "guest powered off (QEMU exit $qrc) $(elapsed "$T_CHECK" "$T_OFF") s after SHARE-CHECK; host agent: exit $HOST_RC $(elapsed "$t0" "$(now)") s after SIGTERM"
}

# ------------------------------------------------------------- phase: verdict
verdict() {
  local console; console=$(tr -d '\r' < "$RUN/console.log")
  echo "$console" | grep -a 'SHARE-CHECK' | sed 's/^/  guest: /' | tee -a "$SUMMARY" >&2
  local result; result=$(echo "$console" | grep -a -m1 'SHARE-CHECK:' || true)
  say "timeline (s after QEMU start): vmsync-guest starting $(elapsed "$T_QEMU" "$T_AGENT"), host agent started $(elapsed "$T_QEMU" "$T_HOST"), host READY=1 $( [ -n "$T_READY" ] && elapsed "$T_QEMU" "$T_READY" || echo never), SHARE-CHECK seen $(elapsed "$T_QEMU" "$T_CHECK"), powered off $(elapsed "$T_QEMU" "$T_OFF")"
  say "host: first sync (agent start -> READY=1) $( [ -n "$T_READY" ] && elapsed "$T_HOST" "$T_READY" || echo '-') s; its STATUS= then: $(sed -n '1,/READY=1/p' "$RUN/notify.txt" 2>/dev/null | grep -o 'STATUS=[^|]*' | tail -1 | cut -c8-120)"
  # the guest's own record, from its disk: the check's file and the units' journal
  if mount_image "$IMG" ro 2>/dev/null; then
    cp "$MNT/var/log/share-check.txt" "$RUN/guest-share-check.txt" 2>/dev/null || true
    if command -v journalctl >/dev/null && [ -d "$MNT/var/log/journal" ]; then
      journalctl --directory="$MNT/var/log/journal" -o short-monotonic --no-pager \
        -u vmsync-guest.service -u share-check.service > "$RUN/guest-journal.txt" 2>&1 || true
    fi
    unmount_image
  fi
  if [ -s "$RUN/guest-share-check.txt" ]; then
    cmp -s <(grep 'SHARE-CHECK:' "$RUN/guest-share-check.txt") <(echo "$result") \
      || say "WARNING: the guest's /var/log/share-check.txt says: $(grep 'SHARE-CHECK:' "$RUN/guest-share-check.txt")"
  fi
  local active; active=$(echo "$console" | grep -a -o 'vmsync-guest is-active=[a-z-]*' | head -1 | cut -d= -f2)
  if [ -n "$CONTROL" ]; then
    case "$result" in
      'SHARE-CHECK: FAIL'*) say "CONTROL=$CONTROL PASS: with vmsync-guest ready too early, share-check saw an incomplete tree (${result#SHARE-CHECK: FAIL })" ;;
      *) fail "CONTROL=$CONTROL: share-check should have failed on an incomplete tree, got: ${result:-nothing}" ;;
    esac
    return 0
  fi
  [ "$CHECK_BEFORE_HOST" = 0 ] || fail "share-check ran before the host agent was even started: READY=1 did not wait for the sync"
  case "$result" in
    'SHARE-CHECK: PASS'*) ;;
    *) fail "share-check: ${result:-no result}" ;;
  esac
  [ "$active" = active ] || fail "the guest reported vmsync-guest is-active=${active:-unknown}"
  [ "$QEMU_RC" = 0 ] && echo "$console" | grep -aq 'reboot: Power down' \
    || fail "the guest did not power off cleanly (QEMU exit $QEMU_RC; no 'reboot: Power down' on the console?)"
  [ "$HOST_RC" = 0 ] || fail "the host agent did not stop on SIGTERM with status 0 (exit $HOST_RC)"
  say "PASS: share-check started on the whole tree ($N_FILES files, every sha256 as listed), vmsync-guest active, guest powered off, host agent stopped with status 0"
}

log "systemd.sh: work dir $VM_WORK, suite $SUITE, image key $KEY${CONTROL:+, CONTROL=$CONTROL}"
log "disk: $(df -h --output=avail "$VM_WORK" | tail -1 | tr -d ' ') available under $VM_WORK"
phase "tools (apt, setup.sh apt vdv)" tools
start_packages
phase "root image (debootstrap, cached)" build_image
phase "packages${PKG_DIR:+ (PKG_DIR)}" finish_packages
phase "install guest package into a copy" install_guest
phase "host share and config" make_share
phase "boot, first sync, share-check" boot_and_check
phase "verdict" verdict
