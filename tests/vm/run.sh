#!/usr/bin/env bash
# The VM test: vmsync over a real virtio-vsock. Exit 0 only if every scenario passed.
#
#   bash tests/vm/setup.sh && bash tests/vm/run.sh
#
# A QEMU guest (TCG, Debian 6.1 cloud kernel, busybox initramfs) runs the static vmsync-guest
# listening on AF_VSOCK `vsock://any:786`, its share on tmpfs. The device is vhost-device-vsock;
# on the host, vmsync-host (release build) dials the hybrid socket `hybrid:$UDS:786`. The host
# side opens Unix sockets only: AF_VSOCK is used inside the guest and nowhere else.
# The test steers the guest through `vm-ctl`, a remote shell on vsock port 9000 reached through
# the same hybrid socket.
#
# Scenarios (each compares both trees byte for byte, sha256 of every file):
#   1. initial two-way sync: host-only and guest-only files (~2,000 files, ~50 MB)
#   2. live edits both ways: create, modify, rename, delete (edit-to-visible latency printed)
#   3. 100 MB file, 1 MiB changed in the middle: about 1 MiB of chunk data crosses
#   4. guest rebooted with an empty share: the host halts (root-replaced), loses nothing; after
#      `vmsync-host resume` the guest is repopulated
#   5. vmsync-guest killed and restarted mid-transfer: converges, no torn file
#   +  the 32 KiB write cap's cost: guest->host throughput with max_write_bytes 32 KiB vs 256 KiB
# Every process it starts is ended by PID; every wait is bounded.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

: "${SMP:=1}"               # guest vCPUs: 1 is fastest under TCG on a small host
: "${MEM:=1536M}"           # guest RAM; the share is tmpfs inside it (100 MB file + staging)
: "${GUEST_CID:=3}"
: "${AGENT_PORT:=786}"
: "${CTL_PORT:=9000}"
: "${BOOT_TIMEOUT:=120}"
: "${SYNC_TIMEOUT:=300}"    # bound for each "until in sync" wait
: "${N_FILES:=1000}"        # per side, for scenario 1
: "${TREE_MB:=25}"          # per side, for scenario 1
: "${BIG_MB:=100}"          # scenario 3
: "${CAP_MB:=24}"           # per trial of the write-cap measurement
: "${CAP_TRIALS:=3}"        # trials per setting (alternating)
: "${KEEP_RUN:=0}"

[ "$(id -u)" = 0 ] || die "run as root"
for f in "$WORK/bin/vhost-device-vsock" "$WORK/bin/vm-ctl" "$WORK/bin/vmsync-host" \
         "$WORK/kernel/vmlinuz" "$WORK/initramfs.cpio.gz"; do
  [ -e "$f" ] || die "$f missing: run tests/vm/setup.sh first"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run setup.sh first"
command -v python3 >/dev/null || die "python3 missing (used to read status --json)"

mkdir -p "$WORK/results"
exec 9>"$WORK/run.lock"
flock -w 900 9 || die "another run.sh holds $WORK/run.lock"

RUN=$WORK/run
rm -rf "$RUN"; mkdir -p "$RUN"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$WORK/results/$STAMP
mkdir -p "$OUT"
SUMMARY=$RUN/summary.txt
: > "$SUMMARY"
say() { log "$*"; echo "$*" >> "$SUMMARY"; }

# ------------------------------------------------------------- process bookkeeping
declare -a PIDS=()
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
stop_pid() {  # stop_pid PID: TERM, up to 5 s, then KILL; only if it is still ours
  local pid=$1
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" && ours "$pid" || break; sleep 0.1; done
  if ours "$pid" && alive "$pid"; then log "SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do ours "$pid" && kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local any=0
    for pid in "${PIDS[@]}"; do ours "$pid" && alive "$pid" && any=1; done
    [ "$any" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do
    if ours "$pid" && alive "$pid"; then log "SIGKILL $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  cp -f "$RUN"/*.log "$RUN"/*.txt "$OUT"/ 2>/dev/null || true
  [ "$KEEP_RUN" = 1 ] || rm -rf "$RUN"
  [ "$rc" = 0 ] && log "PASS (logs: $OUT)" || log "FAIL rc=$rc (logs: $OUT)"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# device_state : vhost-device-vsock seen from outside (threads and their states, its sockets)
device_state() {
  local t
  echo "vhost-device-vsock pid $VDV_PID, threads (name, state, wait channel):"
  for t in /proc/"$VDV_PID"/task/*; do
    [ -d "$t" ] && echo "  $(cat "$t/comm" 2>/dev/null) $(awk '{ print $3 }' "$t/stat" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
  done
  if command -v ss >/dev/null; then echo "unix sockets under $RUN:"; ss -xap 2>/dev/null | grep -F "$RUN" | sed 's/^/  /'; fi
}
fail() {
  log "FAIL: $*"
  echo "FAIL: $*" >> "$SUMMARY"
  # Everything needed to tell a vmsync failure from a VM/device one goes to failure.txt (kept
  # with the run's logs), not only to stderr.
  {
    echo "FAIL: $*"
    echo "--- console (tail)"; tail -40 "$RUN/console.log"
    echo "--- host agent log (tail)"; tail -40 "$RUN/host.log"
    echo "--- guest: agent pid file, processes, agent log (tail)"
    gctl_n 5 10 'cat /run/agent.pid; ps; tail -40 /tmp/agent.log' || echo "(vm-ctl could not reach the guest: rc $?)"
    echo "--- device"; device_state
  } > "$RUN/failure.txt" 2>&1 || true
  cat "$RUN/failure.txt" >&2 || true
  exit 1
}

# until_ok TIMEOUT_S CMD... : retries CMD every 20 ms until it succeeds; 1 on timeout
until_ok() {
  local t=$1; shift
  local deadline; deadline=$(awk -v n="$(now)" -v t="$t" 'BEGIN { printf "%.3f", n + t }')
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n > d) }' && return 1
    sleep 0.02
  done
}

VHOST_SOCK=$RUN/vhost-user.sock   # QEMU <-> vhost-device-vsock
UDS=$RUN/vsock.sock               # the hybrid socket: host processes CONNECT through it
HOST_DIR=$RUN/host
HOST_CFG=$RUN/host.toml
VMSYNC_HOST=$WORK/bin/vmsync-host

# gctl TIMEOUT_S 'shell command' : runs a command in the guest, prints its output, returns its rc
# vm-ctl exits 126 when the command never reached the guest (vhost-device-vsock 0.3.0 now and
# then drops a host-initiated connection made right after another one closed): retry those.
GCTL_RETRIES=0
# The drop is a race inside the device: it reads the CONNECT line the moment it accepts, and
# closes the connection when the line is not there yet. Under load the device's wakeup can
# preempt vm-ctl between its connect and its write many times in a row, so retries back off
# (0.05 s growing to 1 s, about 60 s in all for 100 tries) and the device runs as SCHED_BATCH
# (below), which never preempts on wakeup.
gctl_n() {  # gctl_n TRIES TIMEOUT_S 'shell command'
  local i rc pause=0.05
  for i in $(seq "$1"); do
    rc=0; "$WORK/bin/vm-ctl" run "$UDS" "$CTL_PORT" "$2" "$3" 2>>"$RUN/vm-ctl.log" || rc=$?
    [ "$rc" = 126 ] || return "$rc"
    GCTL_RETRIES=$((GCTL_RETRIES + 1))
    sleep "$pause"
    pause=$(awk -v p="$pause" 'BEGIN { p *= 1.5; if (p > 1) p = 1; print p }')
  done
  return 126
}
gctl() { gctl_n 100 "$1" "$2"; }

host_status() { "$VMSYNC_HOST" status --json --config "$HOST_CFG"; }
# share_field FIELD : one field of the share's status (empty when unavailable)
share_field() {
  host_status 2>/dev/null | python3 -c "import json,sys; v=json.load(sys.stdin)['shares'][0].get('$1'); print('' if v is None else v)" 2>/dev/null || true
}
host_connected() { [ -n "$(share_field state)" ] && [ "$(share_field state)" != connecting ]; }
is_root_replaced() { [ "$(share_field halt_code)" = root-replaced ]; }
# host_cycle : one full cycle while connected (`sync` exits 1 when not connected)
host_cycle() { "$VMSYNC_HOST" sync --config "$HOST_CFG" >>"$RUN/host-cli.log" 2>&1; }
wait_in_sync() {  # wait_in_sync TIMEOUT_S
  "$VMSYNC_HOST" wait --config "$HOST_CFG" --timeout "$1" >>"$RUN/host-cli.log" 2>&1
}

host_sums() { (cd "$HOST_DIR" && find . -type f ! -path './.vmsync*' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum); }
guest_sums() { gctl 300 'cd /share && find . -type f ! -path "./.vmsync*" | LC_ALL=C sort | xargs -r sha256sum'; }
# trees_equal LABEL : both trees byte for byte (sha256 of every file, same paths)
trees_equal() {
  host_sums > "$RUN/sums-host.txt"
  guest_sums > "$RUN/sums-guest.txt" || fail "$1: cannot list the guest tree"
  if ! cmp -s "$RUN/sums-host.txt" "$RUN/sums-guest.txt"; then
    diff "$RUN/sums-host.txt" "$RUN/sums-guest.txt" | head -20 >&2 || true
    return 1
  fi
}
# converge LABEL : wait until in sync and the trees are identical (bounded)
converge() {
  local label=$1 i
  for i in $(seq 10); do
    wait_in_sync "$SYNC_TIMEOUT" || true
    trees_equal "$label" 2>/dev/null && return 0
    sleep 1
  done
  trees_equal "$label" || fail "$label: trees differ after waiting"
}

# ------------------------------------------------------------- host side
mkdir -p "$HOST_DIR" "$RUN/host-state"
cat > "$HOST_CFG" <<EOF
guest = "hybrid:$UDS:$AGENT_PORT"
state_dir = "$RUN/host-state"
control = "$RUN/host.ctl"
[[share]]
name = "data"
path = "$HOST_DIR"
mode = "two-way"
EOF
"$VMSYNC_HOST" check --config "$HOST_CFG" >/dev/null || die "host config rejected"

# host-only files: N_FILES files, TREE_MB in total, in 20 directories, sizes varied
python3 - "$HOST_DIR" "$N_FILES" "$TREE_MB" <<'PY'
import os, sys
root, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total = mb * 1024 * 1024
weights = [(i * 7919) % 97 + 1 for i in range(n)]
scale = total / sum(weights)
for i, w in enumerate(weights):
    d = os.path.join(root, "h%02d" % (i % 20))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%04d.bin" % i), "wb") as f:
        f.write(os.urandom(max(1, int(w * scale))))
PY

# ------------------------------------------------------------- device, agent, VM
# SCHED_BATCH: see gctl_n. chrt comes with util-linux; without it the device runs as usual.
BATCH=(); command -v chrt >/dev/null && BATCH=(chrt --batch 0)
spawn "$RUN/vhost-device-vsock.log" env RUST_LOG=warn "${BATCH[@]}" "$WORK/bin/vhost-device-vsock" \
  --vm "guest-cid=$GUEST_CID,socket=$VHOST_SOCK,uds-path=$UDS"
VDV_PID=$LAST_PID
until_ok 10 test -S "$VHOST_SOCK" || fail "vhost-device-vsock did not create $VHOST_SOCK"

# The host agent starts before the guest: it must retry quietly until the guest listens.
spawn "$RUN/host.log" env VMSYNC_LOG=info "$VMSYNC_HOST" run --config "$HOST_CFG"
HOST_PID=$LAST_PID

QEMU_PID=
boot_guest() {  # boot_guest [EXTRA_APPEND]
  local append="console=ttyS0 panic=-1 quiet vm_port=$AGENT_PORT vm_ctl_port=$CTL_PORT ${1:-}"
  : > "$RUN/console.log"
  local t0; t0=$(now)
  spawn "$RUN/qemu.log" qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp "$SMP" -m "$MEM" \
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$RUN/console.log" \
    -kernel "$WORK/kernel/vmlinuz" -initrd "$WORK/initramfs.cpio.gz" -append "$append" \
    -chardev "socket,id=char0,path=$VHOST_SOCK" -device vhost-user-vsock-pci,chardev=char0
  QEMU_PID=$LAST_PID
  local i=0
  until grep -aq 'GUEST-READY' "$RUN/console.log" 2>/dev/null; do
    alive "$QEMU_PID" || fail "qemu exited during boot"
    i=$((i + 1)); [ "$i" -lt $((BOOT_TIMEOUT * 20)) ] || fail "guest not ready in ${BOOT_TIMEOUT}s"
    sleep 0.05
  done
  until_ok 30 gctl 5 true || fail "vm-ctl in the guest does not answer"
  say "guest booted in $(elapsed "$t0" "$(now)") s: $(grep -a GUEST-READY "$RUN/console.log" | tr -d '\r' | sed 's/^GUEST-READY //')"
}
boot_guest

# ------------------------------------------------------------- scenario 1: initial two-way sync
# guest-only files, made inside the guest before its agent starts
gctl 300 "i=0; while [ \$i -lt $N_FILES ]; do d=/share/g\$((i % 20)); mkdir -p \$d;
  head -c \$(( ((i * 6007) % 97 + 1) * $TREE_MB * 1024 * 1024 / ($N_FILES * 49) )) /dev/urandom > \$d/f\$i.bin;
  i=\$((i + 1)); done" || fail "cannot create the guest-only files"
HOST_BYTES=$(du -sb "$HOST_DIR" | cut -f1)
GUEST_BYTES=$(gctl 60 'du -sb /share | cut -f1' | tr -d '\r\n ')
say "scenario 1: host-only $(find "$HOST_DIR" -type f | wc -l) files / $((HOST_BYTES / 1048576)) MiB, guest-only $(gctl 60 'find /share -type f | wc -l' | tr -d '\r\n ') files / $((GUEST_BYTES / 1048576)) MiB"
if grep -q 'cannot reach guest' "$RUN/host.log"; then
  say "  before the guest agent started, the host logged: $(grep -m1 -o 'cannot reach guest.*' "$RUN/host.log" | cut -c1-160)"
fi
[ "$(share_field state)" = connecting ] || log "WARNING: host share state before the guest agent: $(share_field state)"
T0=$(now)
gctl 40 agent-start >/dev/null || fail "cannot start vmsync-guest"
until_ok 30 host_connected || fail "scenario 1: the host did not connect to the guest agent"
T1=$(now)
say "  host connected $(elapsed "$T0" "$T1") s after the guest agent started (reconnect backoff)"
wait_in_sync "$SYNC_TIMEOUT" || fail "scenario 1: not in sync within ${SYNC_TIMEOUT}s"
T1E=$(now)
converge "scenario 1"
S1=$(elapsed "$T1" "$T1E")
say "scenario 1 PASS: $(wc -l < "$RUN/sums-host.txt") files identical; initial sync $S1 s for $(( (HOST_BYTES + GUEST_BYTES) / 1048576 )) MiB both ways = $(awk -v b=$((HOST_BYTES + GUEST_BYTES)) -v s="$S1" 'BEGIN { printf "%.1f", b / 1048576 / s }') MiB/s (connected -> in sync: scan, hash, transfer, apply)"

# ------------------------------------------------------------- scenario 2: live edits
declare -a LAT=()
# host_edit LABEL HOST_CMD GUEST_CHECK : edit on the host; wait in the guest for the check
host_edit() {
  local label=$1 cmd=$2 check=$3 t0 t1
  t0=$(now)
  bash -c "$cmd"
  gctl 60 "i=0; until $check; do i=\$((i+1)); [ \$i -lt 5000 ] || exit 1; usleep 5000; done" \
    || fail "scenario 2: host $label did not reach the guest within 25 s"
  t1=$(now)
  LAT+=("host->guest $label $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms")
}
# guest_edit LABEL GUEST_CMD HOST_CHECK
guest_edit() {
  local label=$1 cmd=$2 check=$3 t0 t1
  t0=$(now)
  gctl 30 "$cmd" || fail "scenario 2: guest $label failed"
  until_ok 25 bash -c "$check" || fail "scenario 2: guest $label did not reach the host within 25 s"
  t1=$(now)
  LAT+=("guest->host $label $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms")
}
H=$HOST_DIR
host_edit create "printf 'made on host\n' > $H/live-h.txt" "grep -q 'made on host' /share/live-h.txt 2>/dev/null"
host_edit modify "printf 'changed on host\n' > $H/live-h.txt" "grep -q 'changed on host' /share/live-h.txt 2>/dev/null"
host_edit rename "mv $H/live-h.txt $H/live-h2.txt" "[ -f /share/live-h2.txt ] && [ ! -e /share/live-h.txt ]"
host_edit delete "rm $H/live-h2.txt" "[ ! -e /share/live-h2.txt ]"
guest_edit create "printf 'made in guest\n' > /share/live-g.txt" "grep -q 'made in guest' $H/live-g.txt"
guest_edit modify "printf 'changed in guest\n' > /share/live-g.txt" "grep -q 'changed in guest' $H/live-g.txt"
guest_edit rename "mv /share/live-g.txt /share/live-g2.txt" "[ -f $H/live-g2.txt ] && [ ! -e $H/live-g.txt ]"
guest_edit delete "rm /share/live-g2.txt" "[ ! -e $H/live-g2.txt ]"
converge "scenario 2"
say "scenario 2 PASS: edit-to-visible latency (upper bounds: include one vm-ctl round trip and 5-20 ms polling):"
for l in "${LAT[@]}"; do say "    $l"; done

# ------------------------------------------------------------- scenario 3: 100 MB, 1 MiB changed
head -c $((BIG_MB * 1048576)) /dev/urandom > "$H/big.bin"
BIG_SUM=$(sha256sum < "$H/big.bin" | cut -d' ' -f1)
gctl 300 "i=0; until [ \"\$(sha256sum /share/big.bin 2>/dev/null | cut -d' ' -f1)\" = $BIG_SUM ]; do i=\$((i+1)); [ \$i -lt 300 ] || exit 1; sleep 1; done" \
  || fail "scenario 3: the ${BIG_MB} MB file did not reach the guest"
wait_in_sync "$SYNC_TIMEOUT" || fail "scenario 3: not in sync after the first copy"
SENT0=$(share_field bytes_sent)
dd if=/dev/urandom of="$H/big.bin" bs=1M count=1 seek=$((BIG_MB / 2)) conv=notrunc status=none
BIG_SUM=$(sha256sum < "$H/big.bin" | cut -d' ' -f1)
gctl 300 "i=0; until [ \"\$(sha256sum /share/big.bin 2>/dev/null | cut -d' ' -f1)\" = $BIG_SUM ]; do i=\$((i+1)); [ \$i -lt 300 ] || exit 1; sleep 1; done" \
  || fail "scenario 3: the changed file did not reach the guest"
wait_in_sync "$SYNC_TIMEOUT" || fail "scenario 3: not in sync after the change"
SENT1=$(share_field bytes_sent)
DELTA=$((SENT1 - SENT0))
converge "scenario 3"
# 1 MiB of new data touches at most 1 MiB + two boundary chunks (64 KiB max each).
if [ "$DELTA" -lt 1000000 ] || [ "$DELTA" -gt $((1048576 + 4 * 65536)) ]; then
  fail "scenario 3: $DELTA bytes of chunk data crossed for a 1 MiB change"
fi
say "scenario 3 PASS: ${BIG_MB} MB file with 1 MiB changed -> $DELTA bytes of chunk data sent ($(awk -v d="$DELTA" 'BEGIN { printf "%.2f", d / 1048576 }') MiB)"

# ------------------------------------------------------------- 32 KiB write cap: what it costs
# Guest->host throughput of fresh random files with the agent's writes capped at 32 KiB (the
# default) and at 256 KiB, alternating, in the same VM. The agent is restarted between settings.
set_cap() {   # set_cap BYTES : rewrite the guest config and restart the agent
  gctl 60 "sed -i '/^max_write_bytes/d' /etc/vmsync/guest.toml && sed -i '1i max_write_bytes = $1' /etc/vmsync/guest.toml && agent-stop TERM >/dev/null && agent-start" >/dev/null \
    || fail "cannot restart the guest agent with max_write_bytes=$1"
  # the host reconnects (backoff restarts at 100 ms); `sync` succeeds only once connected
  sleep 0.5
  until_ok 60 host_cycle || fail "the host did not reconnect after the agent restart"
  wait_in_sync "$SYNC_TIMEOUT" || fail "not in sync after restarting the agent"
}
declare -A CAP_RATE=()
trial=0
for rep in $(seq "$CAP_TRIALS"); do
  for cap in 32768 262144; do
    trial=$((trial + 1))
    set_cap "$cap"
    gctl 120 "rm -rf /tmp/cap && mkdir -p /tmp/cap && i=0; while [ \$i -lt 8 ]; do head -c $((CAP_MB * 1048576 / 8)) /dev/urandom > /tmp/cap/c$trial-\$i.bin; i=\$((i+1)); done" \
      || fail "cannot make the write-cap payload"
    t0=$(now)
    gctl 60 "cp -r /tmp/cap /share/cap$trial" || fail "cannot copy the write-cap payload"
    until_ok 300 bash -c "[ \$(ls $H/cap$trial 2>/dev/null | wc -l) = 8 ] && [ \$(du -sb $H/cap$trial | cut -f1) -ge $((CAP_MB * 1048576 / 8 * 8)) ]" \
      || fail "write-cap trial $trial did not reach the host"
    t1=$(now)
    rate=$(awk -v a="$t0" -v b="$t1" -v m="$CAP_MB" 'BEGIN { printf "%.1f", m / (b - a) }')
    CAP_RATE[$cap]="${CAP_RATE[$cap]:-} $rate"
    log "write cap $cap: $CAP_MB MiB guest->host in $(elapsed "$t0" "$t1") s = $rate MiB/s"
    gctl 30 "rm -rf /tmp/cap /share/cap$trial" >/dev/null
    until_ok 30 test ! -e "$H/cap$trial" || fail "write-cap cleanup did not propagate"
  done
done
med() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
C32=$(echo "${CAP_RATE[32768]}" | med); C256=$(echo "${CAP_RATE[262144]}" | med)
say "write cap: guest->host MiB/s with max_write_bytes=32768:${CAP_RATE[32768]} (median $C32); =262144:${CAP_RATE[262144]} (median $C256); cost of the 32 KiB cap: $(awk -v a="$C32" -v b="$C256" 'BEGIN { printf "%.0f", (1 - a / b) * 100 }') %"
# The same question at the socket level, without vmsync's own costs: 64 MiB guest->host over a
# vsock connection written by dd with 32 KiB and with 256 KiB writes (guest/raw-send; the stream
# is vm-ctl's, so it is a host-initiated connection through the hybrid socket).
declare -A RAW_RATE=()
for rep in $(seq "$CAP_TRIALS"); do
  for bs in 32 256; do
    line=$(gctl 120 "raw-send $bs 64" | tail -1 | tr -d '\r')
    secs=${line#secs=}
    case "$secs" in ''|*[!0-9.]*) fail "raw vsock measurement: unexpected output: $line" ;; esac
    RAW_RATE[$bs]="${RAW_RATE[$bs]:-} $(awk -v s="$secs" 'BEGIN { printf "%.1f", 64 / s }')"
  done
done
R32=$(echo "${RAW_RATE[32]}" | med); R256=$(echo "${RAW_RATE[256]}" | med)
say "raw vsock guest->host (dd, 64 MiB): 32 KiB writes:${RAW_RATE[32]} MiB/s (median $R32); 256 KiB writes:${RAW_RATE[256]} (median $R256); cost of 32 KiB writes: $(awk -v a="$R32" -v b="$R256" 'BEGIN { printf "%.0f", (1 - a / b) * 100 }') %"
set_cap 32768
converge "write-cap trials"

# ------------------------------------------------------------- scenario 4: guest reboots empty
host_sums > "$RUN/sums-host-before-reboot.txt"
gctl 10 'sync; (sleep 0.2; reboot -f) >/dev/null 2>&1 &' >/dev/null || true
for _ in $(seq 300); do alive "$QEMU_PID" || break; sleep 0.1; done
alive "$QEMU_PID" && fail "scenario 4: qemu did not exit on guest reboot"
wait "$QEMU_PID" 2>/dev/null || true
if ! alive "$VDV_PID"; then   # vhost-device-vsock normally waits for the next VMM
  log "vhost-device-vsock exited with the VM; starting it again"
  rm -f "$VHOST_SOCK" "$UDS"
  spawn "$RUN/vhost-device-vsock.log" env RUST_LOG=warn "${BATCH[@]}" "$WORK/bin/vhost-device-vsock" \
    --vm "guest-cid=$GUEST_CID,socket=$VHOST_SOCK,uds-path=$UDS"
  VDV_PID=$LAST_PID
  until_ok 10 test -S "$VHOST_SOCK" || fail "vhost-device-vsock did not come back"
fi
boot_guest
[ "$(gctl 10 'find /share -type f | wc -l' | tr -d '\r\n ')" = 0 ] || fail "scenario 4: the rebooted guest's share is not empty"
gctl 40 agent-start >/dev/null || fail "cannot start vmsync-guest after the reboot"
until_ok 120 is_root_replaced \
  || fail "scenario 4: the host did not halt with root-replaced (state: $(share_field state) $(share_field halt_code))"
host_sums > "$RUN/sums-host-halted.txt"
cmp -s "$RUN/sums-host-before-reboot.txt" "$RUN/sums-host-halted.txt" || fail "scenario 4: the host tree changed while halted"
say "scenario 4: host halted with root-replaced: $(share_field halt_reason | cut -c1-140)"
# `resume` lifts the halt and then waits for the merge cycle with the CLI's 10 s control
# timeout; repopulating ~150 MiB under TCG takes longer, so a timeout there is not a failure as
# long as the halt is gone (checked below, and the trees must converge).
if ! "$VMSYNC_HOST" resume --config "$HOST_CFG" --share data >>"$RUN/host-cli.log" 2>&1; then
  [ "$(share_field state)" != halted ] || fail "scenario 4: resume failed and the share is still halted"
  say "  note: \`vmsync-host resume\` returned an error ($(tail -1 "$RUN/host-cli.log" | cut -c1-100)) but lifted the halt"
fi
converge "scenario 4"
cmp -s "$RUN/sums-host-before-reboot.txt" "$RUN/sums-host.txt" || fail "scenario 4: the host tree is not what it was before the reboot"
say "scenario 4 PASS: host tree unchanged ($(wc -l < "$RUN/sums-host.txt") files), guest repopulated"

# ------------------------------------------------------------- scenario 5: agent killed mid-transfer
# Both directions in flight: a 60 MiB file made on the host, a 40 MiB file copied into the guest
# share; the agent is SIGKILLed while it is staging the host's file.
KILL_H=$((60 * 1048576)); KILL_G=$((40 * 1048576))
gctl 120 "head -c $KILL_G /dev/urandom > /tmp/kill-g.bin" || fail "scenario 5: cannot make the guest file"
# Both files appear atomically (rename), so any other size at the final path is a torn file.
head -c "$KILL_H" /dev/urandom > "$RUN/kill-h.tmp"
mv "$RUN/kill-h.tmp" "$H/kill-h.bin"
gctl 60 "cp /tmp/kill-g.bin /share/kill-g.part && mv /share/kill-g.part /share/kill-g.bin" \
  || fail "scenario 5: cannot copy the guest file"
# Kill from inside the guest the moment the agent has a staging file (a transfer to the guest is
# in flight, when the filesystem has no O_TMPFILE and vmsync stages under .vmsync/tmp), or after
# about 3 s (tmpfs has O_TMPFILE: staging is invisible; the 60 MiB take ~10 s under TCG).
# agent-stop waits until every thread of the killed agent has exited (they hold its state
# database's lock and its listener; see guest/agent-stop), agent-start until the new one
# listens: a restart that failed is reported as such, not as "the host did not reconnect".
AT_KILL=$(gctl 90 'i=0; until [ -n "$(ls -A /share/.vmsync/tmp 2>/dev/null)" ] || [ $i -ge 120 ]; do usleep 25000; i=$((i+1)); done
  staged=$(ls -A /share/.vmsync/tmp 2>/dev/null | wc -l)
  if [ -f /share/kill-h.bin ]; then h=$(wc -c < /share/kill-h.bin | tr -d " "); else h=absent; fi
  stop=$(agent-stop KILL) || { echo "agent-stop: the killed agent did not exit: $stop"; exit 3; }
  agent-start >/dev/null || { echo "agent-start: the restarted agent did not come up (see /tmp/agent.log)"; exit 4; }
  echo "staged=$staged kill-h.bin=$h $stop"' | tr -d '\r' | tail -1) \
  || fail "scenario 5: cannot kill and restart vmsync-guest: $AT_KILL"
kv() { echo "$AT_KILL" | sed -n "s/.*$1=\([^ ]*\).*/\1/p"; }
case "$(kv kill-h.bin)" in
  absent) MID="mid-transfer: $(kv staged) staging file(s), the host->guest file not in place yet" ;;
  "$KILL_H") MID="host->guest file already complete" ;;
  *) fail "scenario 5: torn file visible in the guest at kill time: $AT_KILL" ;;
esac
HOST_G=$(stat -c %s "$H/kill-g.bin" 2>/dev/null || echo absent)
[ "$HOST_G" = absent ] || [ "$HOST_G" = "$KILL_G" ] || fail "scenario 5: torn guest->host file on the host: $HOST_G bytes"
sleep 0.5
if ! until_ok 120 host_cycle; then
  # Tell the two possible causes apart: the guest answers vm-ctl (vsock and the device work:
  # vmsync-guest is not listening or vmsync-host does not reconnect) or it does not (device/VM).
  if gctl_n 5 10 true >/dev/null; then
    fail "scenario 5: the host did not reconnect, although the guest answers vm-ctl (the device works)"
  fi
  fail "scenario 5: the host did not reconnect, and vm-ctl cannot reach the guest either (vhost-device-vsock or the VM stopped answering; see failure.txt)"
fi
converge "scenario 5"
LEFT=$(gctl 10 'cd /share/.vmsync 2>/dev/null && find . -type f | tr "\n" " "' | tr -d '\r')
say "scenario 5 PASS: vmsync-guest SIGKILLed ($MID; guest->host file on the host: $HOST_G) and restarted; trees identical, no torn file; guest .vmsync holds: ${LEFT:-nothing}"
say "  the killed agent's last thread exited $(kv waited_ms) ms after SIGKILL (polls that saw its main thread a zombie while other threads still ran: $(kv zombie_with_threads))"

# ------------------------------------------------------------- done
say "host 'cannot reach guest' log lines over the whole run: $(grep -c 'cannot reach guest' "$RUN/host.log" || true) (once per outage and distinct error)"
say "versions: $(qemu-system-x86_64 --version | head -1); $("$WORK/bin/vhost-device-vsock" --version); guest kernel $(sed -n 2p "$WORK/kernel/.stamp")"
say "vm-ctl connections retried (dropped by the device before the command was sent): $GCTL_RETRIES (details: vm-ctl.log)"
say "VM TEST PASS"
cp "$SUMMARY" "$OUT/summary.txt"
