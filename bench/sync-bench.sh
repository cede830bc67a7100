#!/usr/bin/env bash
# vmsync vs. rsync benchmark.
#
#   bash bench/sync-bench.sh [--rsync-only | --vmsync-only] [--no-build] [--keep] [--json FILE]
#
# Installs what it needs (rsync, python3) when missing, builds the release binaries (unless
# --rsync-only or --no-build), then runs bench/syncbench.py, which generates the data set in a
# temporary directory, times initial sync, no-op re-sync and delta for vmsync and for rsync
# through an rsync daemon on 127.0.0.1, verifies every destination against the source, prints a
# table and removes everything it created (--keep leaves the data for a look).
#
# Environment: SCALE (default 1 = 20,000 files / 500 MiB + 4 x 256 MiB; 0.05 for a quick run),
# SEED, BENCH_DIR (where the temporary data goes), BENCH_TIMEOUT, RSYNC_FLAGS, and
# CARGO_TARGET_DIR (where the binaries are built and looked for). See bench/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

build=1
vmsync=1
for arg in "$@"; do
    case "$arg" in
        --rsync-only) vmsync=0 ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    esac
done
args=()
for arg in "$@"; do
    [[ "$arg" == --no-build ]] || args+=("$arg")
done

# Packages: only when a command is missing, so a prepared machine (or CI) is not touched.
missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bench: please install: ${missing[*]} (no apt-get here)" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    echo "bench: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
bin_dir="$target_dir/release"
if ((vmsync && build)); then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "bench: cargo is needed to build vmsync (https://rustup.rs), or pass --rsync-only" >&2
        exit 1
    fi
    echo "bench: building release binaries in $target_dir" >&2
    (cd "$repo" && cargo build --release --quiet -p vmsync-host -p vmsync-guest -p vmsync-tests)
fi

exec python3 "$here/syncbench.py" run --bin-dir "$bin_dir" "${args[@]}"
