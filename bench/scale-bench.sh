#!/usr/bin/env bash
# vmsync at scale: 200,000 and 1,000,000 small files, a 20 GiB file, a fleet of 20 agent
# pairs, and the standard benchmark, against rsync where it applies.
#
#   bash bench/scale-bench.sh [--no-build] [--keep] [--vmsync-only] [--json FILE] [CASE...]
#
# CASE: files200k, million, standard, bigfile, fleet (default: all but million), or filesN.
# Installs what it needs (rsync, python3) when missing, builds the release binaries (unless
# --no-build), then runs bench/scalebench.py, which prints a table per case and removes
# everything it created (--keep leaves it).
#
# Environment: BENCH_DIR (where the temporary data goes; needs ~4 x 4.6 KiB per file, 3 x the
# big file), SEED, FILES (files200k becomes filesFILES in the default list), SOURCE_DIR (a
# file-count case's source tree, made if missing, reused, never removed), MODE (two-way),
# REST_SECS (10), REST_LONG_SECS (60), LATENCY_SAMPLES (50), VERIFY (1), BIGFILE_GIB (20),
# FLEET (20), FLEET_FILES (200), FLEET_IDLE_SECS (30), STANDARD_SCALE (1), BENCH_TIMEOUT,
# MALLOC_ARENA_MAX and VMSYNC_LOG (to the agents), HOST_WRAPPER / GUEST_WRAPPER (e.g.
# "heaptrack -o F": a file-count case then ends with both agents killed at rest; with
# WRAP_PHASE=restart only the agents started for the restart run wrapped), and
# CARGO_TARGET_DIR (where the binaries are built and looked for).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

build=1
args=()
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done

# Packages: only when a command is missing, so a prepared machine (or CI) is not touched.
missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "scale-bench: please install: ${missing[*]} (no apt-get here)" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    echo "scale-bench: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
if ((build)); then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "scale-bench: cargo is needed to build vmsync (https://rustup.rs)" >&2
        exit 1
    fi
    echo "scale-bench: building release binaries in $target_dir" >&2
    (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet \
        -p vmsync-host -p vmsync-guest -p vmsync-tests \
        --bin vmsync-host --bin vmsync-guest --bin vmsync-relay)
fi

exec python3 "$here/scalebench.py" --bin-dir "$target_dir/release" "${args[@]}"
