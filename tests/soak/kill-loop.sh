#!/usr/bin/env bash
# The kill loop at length: `tests/soak/kill-loop.sh ROUNDS` builds release binaries, then runs
# the kill-loop test (tests/tests/kill_loop.rs) for ROUNDS rounds against them. Each round kills
# vmsync-host or vmsync-guest with SIGKILL at a random moment while writers on both sides keep
# making new versions, checks every visible file, and restarts the agent. Prints a summary
# line ("kill loop summary: ..."); exits non-zero on the first violated invariant, with the
# evidence (side, path, digest) and the tails of both agents' logs. See tests/soak/README.md.
#
# Environment (all optional): KILL_LOOP_FILES (small files per side, default 1000),
# KILL_LOOP_BIG_MIB (big files per side, comma-separated MiB, default 100),
# KILL_LOOP_SEED (repeats a run's choices), KILL_LOOP_CONVERGE_EVERY (default 5),
# KILL_LOOP_MAX_KILL_MS (default 2500).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:?usage: tests/soak/kill-loop.sh ROUNDS}"
case "$rounds" in
  ''|*[!0-9]*) echo "ROUNDS must be a number: $rounds" >&2; exit 2 ;;
esac
export CARGO_TERM_COLOR=never
echo "building release binaries"
cargo build --release --quiet -p vmsync-host -p vmsync-guest
cargo test --release --quiet -p vmsync-tests --test kill_loop --no-run
echo "running $rounds rounds"
start=$(date +%s)
status=0
KILL_LOOP_ROUNDS="$rounds" cargo test --release --quiet -p vmsync-tests --test kill_loop -- \
  --nocapture --test-threads 1 kill_9_loop || status=$?
echo "kill loop: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
