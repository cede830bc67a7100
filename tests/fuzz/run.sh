#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a time budget.
#
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Defaults: 60 seconds, every target. Works on a stable toolchain: cargo-fuzz needs nightly-only
# flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1 unlocks on stable; a nightly toolchain works too
# (FUZZ_TOOLCHAIN=nightly). Installs cargo-fuzz if it is missing. Crashes land in
# tests/fuzz/artifacts/TARGET/ and make this script exit non-zero; the corpus grows in
# tests/fuzz/corpus/TARGET/ (both git-ignored), starting from the committed tests/fuzz/seeds/TARGET/.
set -euo pipefail

secs="${1:-60}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
toolchain="${FUZZ_TOOLCHAIN:-stable}"
target_dir="${CARGO_TARGET_DIR:-$root/target}/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd "$root" && cargo fuzz list --fuzz-dir "$here")
fi

export RUSTC_BOOTSTRAP=1
cd "$root"
cargo "+$toolchain" fuzz build --fuzz-dir "$here" --target-dir "$target_dir"
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    mkdir -p "$here/corpus/$t"
    # New inputs go to corpus/ (ignored by git); seeds/ holds small, committed starting points.
    dirs=("$here/corpus/$t")
    [ -d "$here/seeds/$t" ] && dirs+=("$here/seeds/$t")
    cargo "+$toolchain" fuzz run --fuzz-dir "$here" --target-dir "$target_dir" "$t" \
        "${dirs[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -max_len=1048576
done
