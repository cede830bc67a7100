#!/usr/bin/env bash
# vmsync soak benchmark: both agents' RSS each minute and CPU per 1,000 operations under
# random creates, edits, appends, deletes and renames on both sides of a 2,000-file share.
#
#   bash bench/soak.sh [--no-build] [--keep] MINUTES
#
# Builds the release agents (unless --no-build), then runs bench/soak.py, which prints a line
# a minute, checks at the end that both trees are identical (PASS/FAIL) and whether RSS at the
# end is within 10 % of its 5-minute value, and stops every process it started.
#
# Environment: SEED, OPS_PER_SEC (default 48), FILES (default 2000), WAIT_TIMEOUT, BENCH_DIR,
# CARGO_TARGET_DIR (where the binaries are built and looked for), MALLOC_ARENA_MAX and
# VMSYNC_LOG (passed to the agents), HOST_WRAPPER / GUEST_WRAPPER (e.g. "heaptrack -o F").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

build=1
args=()
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done
if ((${#args[@]} == 0)); then
    echo "soak: usage: bench/soak.sh [--no-build] [--keep] MINUTES" >&2
    exit 2
fi

if ! command -v python3 >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "soak: please install python3 (no apt-get here)" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq python3 >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
if ((build)); then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "soak: cargo is needed to build vmsync (https://rustup.rs)" >&2
        exit 1
    fi
    echo "soak: building release agents in $target_dir" >&2
    (cd "$repo" && cargo build --release --quiet -p vmsync-host -p vmsync-guest)
fi

exec python3 "$here/soak.py" --bin-dir "$target_dir/release" "${args[@]}"
