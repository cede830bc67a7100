#!/usr/bin/env bash
# What a log costs: a file on the host appended RATE lines a second (default 190) for SECS
# seconds (default 20) while both agents run live over a Unix socket. Prints the host's cycles,
# both agents' CPU time, and whether the guest's copy kept its inode (readers following it see
# it grow) and ended identical.
# Usage: bash bench/log-cost.sh [BIN_DIR]   (default target/debug)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/debug}
rate=${RATE:-190}
secs=${SECS:-20}
work=$(mktemp -d /var/tmp/vmsync-log-cost.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/host" "$work/guest"
cat > "$work/guest.toml" <<TOML
listen = "unix:$work/guest.sock"
state_dir = "$work/guest-state"
control = "$work/guest.ctl"
[[share]]
name = "s"
path = "$work/guest"
TOML
cat > "$work/host.toml" <<TOML
guest = "unix:$work/guest.sock"
state_dir = "$work/host-state"
control = "$work/host.ctl"
[[share]]
name = "s"
path = "$work/host"
TOML
"$bin/vmsync-guest" run --config "$work/guest.toml" 2>"$work/guest.log" & guest=$!; pids+=("$guest")
"$bin/vmsync-host" run --config "$work/host.toml" 2>"$work/host.log" & host=$!; pids+=("$host")
"$bin/vmsync-host" wait --config "$work/host.toml" --timeout 60 >/dev/null
echo "start" > "$work/host/app.log"
"$bin/vmsync-host" wait --config "$work/host.toml" --timeout 60 >/dev/null
sleep 0.5
inode0=$(stat -c %i "$work/guest/app.log")

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cycles() { "$bin/vmsync-host" status --config "$work/host.toml" --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["shares"][0]["cycles"])'; }
c0=$(cycles); h0=$(ticks "$host"); g0=$(ticks "$guest")
python3 - "$work/host/app.log" "$rate" "$secs" <<'PY'
import sys, time
path, rate, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
n = 0
with open(path, "a", buffering=1) as f:
    while time.monotonic() - start < secs:
        n += 1
        f.write(f"{time.time():.6f} line {n} " + "x" * 60 + "\n")
        f.flush()
        next_at = start + n / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
PY
"$bin/vmsync-host" wait --config "$work/host.toml" --timeout 60 >/dev/null
sleep 0.3
"$bin/vmsync-host" wait --config "$work/host.toml" --timeout 60 >/dev/null
c1=$(cycles); h1=$(ticks "$host"); g1=$(ticks "$guest")
hz=$(getconf CLK_TCK)
inode1=$(stat -c %i "$work/guest/app.log")
same=no; cmp -s "$work/host/app.log" "$work/guest/app.log" && same=yes
lines=$(wc -l < "$work/host/app.log")
printf 'lines=%s cycles=%s host_cpu=%.2fs guest_cpu=%.2fs cpu_per_core=%.2f same_inode=%s identical=%s\n' \
    "$lines" "$((c1 - c0))" "$(echo "($h1 - $h0) / $hz" | bc -l)" "$(echo "($g1 - $g0) / $hz" | bc -l)" \
    "$(echo "($h1 - $h0 + $g1 - $g0) / $hz / $secs" | bc -l)" \
    "$([ "$inode0" = "$inode1" ] && echo yes || echo no)" "$same"
