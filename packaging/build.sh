#!/usr/bin/env bash
# Builds the vmsync packages: a .deb (cargo-deb) and an .rpm (cargo-generate-rpm) of each agent,
# vmsync-host and vmsync-guest, into OUT_DIR (default target/packages), and prints their paths.
#
#   bash packaging/build.sh [OUT_DIR]
#   CARGO_TARGET_DIR=/some/dir bash packaging/build.sh
#
# Installs cargo-deb and cargo-generate-rpm (`cargo install --locked`, the versions below)
# and the Debian packages it uses, each only when missing. Builds vmsync-host (release) and the
# static vmsync-guest (scripts/build-static-guest.sh); stages each binary without its debug
# info in the target directory (release/pkg-staging/vmsync-host/ and
# x86_64-unknown-linux-gnu/release/pkg-staging/vmsync-guest/, where the package metadata in
# agent-*/Cargo.toml looks), with the man pages and completion scripts the binary itself
# writes (`generate-man`, `completions`); then packages. What the steps print goes to
# TARGET_DIR/pkg-staging.log, shown only when a step fails; every step is time-bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
triple=x86_64-unknown-linux-gnu

out=${1:-target/packages}
mkdir -p "$out"
out=$(cd "$out" && pwd)
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$root/$target_dir ;; esac
mkdir -p "$target_dir"
export CARGO_TARGET_DIR=$target_dir CARGO_TERM_COLOR=never
# The packages' timestamps: the last commit's. Given to the packaging steps only: a build
# script (zstd-sys) tracks it, and the builds should stay the ones the other scripts make.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

log=$target_dir/pkg-staging.log
: >"$log"
say() { echo "build.sh: $*"; }
# run SECONDS CMD...: CMD with its output in the log, killed after SECONDS; on failure the
# log's end is shown.
run() {
  local limit=$1; shift
  echo "+ $*" >>"$log"
  if ! timeout -k 10 "$limit" "$@" >>"$log" 2>&1; then
    echo "build.sh: failed (or over ${limit} s): $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

# Tools. readelf and objcopy: binutils; dpkg-shlibdeps (cargo-deb's $auto Depends): dpkg-dev.
apt_need=()
for tool in readelf:binutils objcopy:binutils gzip:gzip dpkg-shlibdeps:dpkg-dev; do
  command -v "${tool%%:*}" >/dev/null || apt_need+=("${tool##*:}")
done
if [ ${#apt_need[@]} -gt 0 ]; then
  mapfile -t apt_need < <(printf '%s\n' "${apt_need[@]}" | sort -u)
  say "installing ${apt_need[*]} (apt)"
  run 300 apt-get update -qq
  run 600 env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${apt_need[@]}"
fi
# cargo-deb prints "cargo-deb 3.8.0", cargo-generate-rpm "cargo-generate-rpm 0.21.1".
for tool in "cargo-deb:deb:$CARGO_DEB_VERSION" \
  "cargo-generate-rpm:generate-rpm:$CARGO_GENERATE_RPM_VERSION"; do
  IFS=: read -r crate sub version <<<"$tool"
  if [ "$(cargo "$sub" --version 2>/dev/null)" != "$crate $version" ]; then
    say "installing $crate $version (cargo install, a few minutes)"
    run 1200 cargo install --locked --quiet "$crate" --version "$version"
  fi
done

say "building vmsync-host (release) and the static vmsync-guest into $target_dir"
run 1500 cargo build --release --locked -p vmsync-host
run 1500 bash scripts/build-static-guest.sh
host_bin=$target_dir/release/vmsync-host
guest_bin=$target_dir/$triple/release/vmsync-guest

# stage NAME BINARY STAGING_DIR: the binary without debug info (symbols stay, for backtraces),
# its man pages (gzipped) and completion scripts.
stage() {
  local name=$1 bin=$2 dir=$3
  rm -rf "$dir"
  mkdir -p "$dir/man" "$dir/completions"
  run 60 objcopy --strip-debug "$bin" "$dir/$name"
  run 60 "$dir/$name" generate-man "$dir/man"
  run 60 gzip -9n "$dir"/man/*.1
  local shell file
  for shell in bash zsh fish; do
    case $shell in bash) file=$name.bash ;; zsh) file=_$name ;; fish) file=$name.fish ;; esac
    run 60 sh -c '"$1" completions "$2" >"$3"' sh "$dir/$name" "$shell" "$dir/completions/$file"
  done
}
stage vmsync-host "$host_bin" "$target_dir/release/pkg-staging/vmsync-host"
stage vmsync-guest "$guest_bin" "$target_dir/$triple/release/pkg-staging/vmsync-guest"

say "packaging into $out"
rm -f "$out"/vmsync-host_*.deb "$out"/vmsync-guest_*.deb \
  "$out"/vmsync-host-*.rpm "$out"/vmsync-guest-*.rpm
run 300 env SOURCE_DATE_EPOCH="$epoch" \
  cargo deb -p vmsync-host --no-build --no-strip --output "$out/"
run 300 env SOURCE_DATE_EPOCH="$epoch" \
  cargo deb -p vmsync-guest --no-build --no-strip --target "$triple" --output "$out/"
# Run from the workspace root: the metadata's non-target paths are relative to it.
run 300 env SOURCE_DATE_EPOCH="$epoch" \
  cargo generate-rpm -p agent-host --auto-req builtin --output "$out/"
run 300 env SOURCE_DATE_EPOCH="$epoch" \
  cargo generate-rpm -p agent-guest --target "$triple" --output "$out/"

shopt -s nullglob
packages=("$out"/vmsync-host_*.deb "$out"/vmsync-guest_*.deb
  "$out"/vmsync-host-*.rpm "$out"/vmsync-guest-*.rpm)
if [ ${#packages[@]} -ne 4 ]; then
  echo "build.sh: expected 4 packages in $out, found ${#packages[@]}" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
printf '%s\n' "${packages[@]}"
