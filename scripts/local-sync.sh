#!/usr/bin/env bash
# Runs vmsync's main job on one machine: a vmsync-guest and a vmsync-host keeping two
# directories in sync over a Unix socket (the same agents talk over virtio-vsock in a VM).
#
#   scripts/local-sync.sh [HOST_DIR] [GUEST_DIR]     (defaults: ./demo/host ./demo/guest)
#
# Builds the agents (release), writes configs under ./demo/, starts both agents, waits for the
# first sync, prints the status, then keeps running until Ctrl-C; `vmsync-host sync --config
# demo/host.toml` from another terminal runs a cycle on demand. Stops both agents on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
host_dir=$(realpath -m "${1:-demo/host}")
guest_dir=$(realpath -m "${2:-demo/guest}")
work=$root/demo
mkdir -p "$work" "$host_dir" "$guest_dir"

cargo build --release -p vmsync-host -p vmsync-guest
bin=$root/target/release

cat > "$work/guest.toml" <<TOML
listen = "unix:$work/guest.sock"
state_dir = "$work/guest-state"
control = "$work/guest.ctl"
[[share]]
name = "demo"
path = "$guest_dir"
TOML
cat > "$work/host.toml" <<TOML
guest = "unix:$work/guest.sock"
state_dir = "$work/host-state"
control = "$work/host.ctl"
[[share]]
name = "demo"
path = "$host_dir"
mode = "two-way"
conflict = "keep"
ignore = ["*.swp", "target/"]
TOML
[ -e "$host_dir/README.txt" ] || echo "edit me on the host; vmsync keeps $guest_dir identical" > "$host_dir/README.txt"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

"$bin/vmsync-guest" run --config "$work/guest.toml" 2>"$work/guest.log" & pids+=($!)
"$bin/vmsync-host" run --config "$work/host.toml" 2>"$work/host.log" & pids+=($!)
echo "host  $host_dir"
echo "guest $guest_dir"
if "$bin/vmsync-host" wait --config "$work/host.toml" --timeout 60; then
  echo "first sync done:"
else
  echo "not in sync yet (see $work/host.log):"
fi
"$bin/vmsync-host" status --config "$work/host.toml" || true
echo
echo "running; 'target/release/vmsync-host sync --config demo/host.toml' syncs now; Ctrl-C stops"
wait
