#!/usr/bin/env bash
# Builds vmsync-guest as a statically linked x86_64 Linux binary (release), so it runs in any
# guest whatever its libc. Prints the binary's path as the last line of stdout.
#
#   bash scripts/build-static-guest.sh
#   CARGO_TARGET_DIR=/some/dir bash scripts/build-static-guest.sh
#
# `+crt-static` needs an explicit --target: without it RUSTFLAGS also applies to build scripts
# and proc macros, which then fail to link statically. The result is a static-pie.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" -p vmsync-guest >&2
out="${CARGO_TARGET_DIR:-target}/$target/release/vmsync-guest"
[ -x "$out" ] || { echo "build-static-guest: $out missing after the build" >&2; exit 1; }
# Static means no program interpreter (PT_INTERP) and no shared libraries.
if readelf -l "$out" | grep -q 'program interpreter'; then
  echo "build-static-guest: $out is dynamically linked" >&2; exit 1
fi
if command -v file >/dev/null; then file "$out" >&2; fi
ldd "$out" >&2 2>&1 || true   # "not a dynamic executable" / "statically linked"
case "$out" in /*) echo "$out" ;; *) echo "$PWD/$out" ;; esac
