#!/usr/bin/env bash
# vmsync live-sync benchmark: edit-to-visible latency both ways with
# lsyncd as the reference, a 1,000-file git branch switch, a 10,000-file burst, idle CPU/RSS.
#
#   bash bench/latency-bench.sh [--no-build] [--no-lsyncd] [--keep]
#
# Installs what it needs (lsyncd, rsync, inotify-tools, git, python3) when missing, builds the
# release agents (unless --no-build), then runs bench/latencybench.py, which prints the figures
# and stops every process it started.
#
# Environment: SAMPLES (default 200 per direction), IDLE_SECS (default 30), WARMUP, GAP_MS,
# SAMPLE_TIMEOUT, BENCH_DIR, CARGO_TARGET_DIR (where the binaries are built and looked for).
# A short run for CI: SAMPLES=20 IDLE_SECS=3 bash bench/latency-bench.sh
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

# Packages: only when a command is missing, so a prepared machine (or CI) is not touched.
missing=()
command -v lsyncd >/dev/null 2>&1 || missing+=(lsyncd)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
# inotify-tools is not used by the timing (the helper watches through inotify itself) but is
# handy for looking at what the agents do: `inotifywait -m -r DIR`.
command -v inotifywait >/dev/null 2>&1 || missing+=(inotify-tools)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "latency-bench: please install: ${missing[*]} (no apt-get here)" >&2
        exit 1
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    echo "latency-bench: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
if ((build)); then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "latency-bench: cargo is needed to build vmsync (https://rustup.rs)" >&2
        exit 1
    fi
    echo "latency-bench: building release agents in $target_dir" >&2
    (cd "$repo" && cargo build --release --quiet -p vmsync-host -p vmsync-guest)
fi

exec python3 "$here/latencybench.py" --bin-dir "$target_dir/release" "${args[@]+"${args[@]}"}"
