#!/usr/bin/env bash
# Installs and builds everything tests/vm/run.sh needs, from nothing. Idempotent: a re-run skips
# what is already there. Non-interactive; root; Debian 12 x86_64. Adapted from a lab recipe, but
# self-contained: nothing outside this repository is read.
#
#   bash tests/vm/setup.sh
#   SETUP_STEPS="apt vdv kernel" bash tests/vm/setup.sh     # only some steps
#   VM_CARGO_TARGET_DIR=/some/target bash tests/vm/setup.sh  # reuse a cargo target dir for the agents
#
# Products (under $VMSYNC_VM_DIR, default /var/tmp/vmsync-vm):
#   bin/vhost-device-vsock  rust-vmm's vhost-user vsock device, AF_VSOCK backend compiled out
#   bin/vm-ctl              static test helper (guest: runs commands; host: hybrid-socket client)
#   bin/vmsync-guest        static guest agent (scripts/build-static-guest.sh)
#   bin/vmsync-host         host agent, release build
#   kernel/vmlinuz, kernel/modules/*.ko, kernel/modules.load
#   initramfs.cpio.gz
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_root_x86_64
mkdir -p "$WORK"/{bin,dl,src,kernel}
echo "# setup.sh $(date -u +%FT%TZ)" >> "$WORK/timings-setup.txt"
T_ALL=$(now)
: "${SETUP_STEPS:=apt vdv kernel vm-ctl agents initramfs}"
want_step() { case " $SETUP_STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- 1. Debian packages
apt_packages() {
  local p missing=()
  for p in qemu-system-x86 busybox-static xz-utils zstd binutils file; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" = 0 ]; then
    log "packages already installed: $(qemu-system-x86_64 --version | head -1)"
    return 0
  fi
  log "missing packages: ${missing[*]}"
  if [ "$QEMU_SUITE" = bookworm-backports ] || [ "$KERNEL_SUITE" = bookworm-backports ]; then
    # Machines whose qemu-utils comes from bookworm-backports (10.0.x) have it Break
    # qemu-system-common << 8.0: bookworm's QEMU 7.2 would REMOVE qemu-utils. Taking
    # qemu-system-x86 from backports keeps both at the same version.
    local f=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding $f"
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > "$f"
    fi
  fi
  "${APT[@]}" update
  local rest=()
  for p in "${missing[@]}"; do
    if [ "$p" = qemu-system-x86 ] && [ "$QEMU_SUITE" = bookworm-backports ]; then
      "${APT[@]}" install -y --no-install-recommends --no-upgrade -t bookworm-backports qemu-system-x86
    else
      rest+=("$p")
    fi
  done
  # --no-upgrade: install what is missing, never upgrade what the machine already has
  if [ "${#rest[@]}" -gt 0 ]; then
    "${APT[@]}" install -y --no-install-recommends --no-upgrade "${rest[@]}"
  fi
  qemu-system-x86_64 --version | head -1
}

# ---------------------------------------------------------------- 2. vhost-device-vsock
# Built from the crates.io source with --no-default-features, i.e. WITHOUT the optional AF_VSOCK
# host backend (forward-cid=...): this binary can only talk to Unix sockets on the host, which
# is what the "no AF_VSOCK on the host" rule needs. 0.3.0 does not compile without that feature
# (two `path.trim()` calls on a PathBuf in main.rs); the sed fixes exactly those two lines.
vhost_device_vsock() {
  local bin=$WORK/bin/vhost-device-vsock stamp=$WORK/bin/.vhost-device-vsock.stamp
  if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VDV_VERSION no-default-features" ]; then
    log "vhost-device-vsock already built: $("$bin" --version)"
    return 0
  fi
  local stub=$WORK/src/vdv-fetch-stub
  mkdir -p "$stub/src"
  cat > "$stub/Cargo.toml" <<TOML
[package]
name = "vdv-fetch-stub"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
vhost-device-vsock = "=$VDV_VERSION"
[workspace]
TOML
  echo 'fn main() {}' > "$stub/src/main.rs"
  # cargo fetch downloads (and checksum-verifies) the crate source into $CARGO_HOME/registry/src
  (cd "$stub" && cargo fetch --target x86_64-unknown-linux-gnu -q)
  local reg; reg=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"vhost-device-vsock-$VDV_VERSION" | head -1)
  [ -d "$reg" ] || die "crate source not found after cargo fetch"
  local src=$WORK/src/vhost-device-vsock-$VDV_VERSION
  rm -rf "$src"; cp -r "$reg" "$src"
  sed -i 's/UnixDomainSocket(path\.trim()\.to_string())/UnixDomainSocket(path)/' "$src/src/main.rs"
  CARGO_TARGET_DIR=$WORK/target/vdv cargo install --locked --path "$src" --no-default-features \
    --root "$WORK" --force -q
  "$bin" --version
  if "$bin" --help | grep -q forward-cid; then die "vhost-device-vsock still has the AF_VSOCK backend"; fi
  echo "$VDV_VERSION no-default-features" > "$stamp"
}

# ---------------------------------------------------------------- 3. guest kernel + modules
guest_kernel() {
  local stamp=$WORK/kernel/.stamp want="$KERNEL_META $KERNEL_SUITE"
  if [ -f "$WORK/kernel/vmlinuz" ] && [ "$(head -1 "$stamp" 2>/dev/null)" = "$want" ]; then
    log "kernel already extracted: $(sed -n 2p "$stamp")"
    return 0
  fi
  local dl=$WORK/dl/kernel
  rm -rf "$dl"; mkdir -p "$dl"; chown _apt:root "$dl" 2>/dev/null || true  # apt's sandbox user must write here
  # resolve the metapackage to the real image package (its ABI name changes with every update)
  local meta=$KERNEL_META
  [ "$KERNEL_SUITE" = bookworm ] || meta="$KERNEL_META/$KERNEL_SUITE"
  (cd "$dl" && "${APT[@]}" download "$meta") || { "${APT[@]}" update; (cd "$dl" && "${APT[@]}" download "$meta"); }
  local dep; dep=$(dpkg-deb -f "$dl"/"${KERNEL_META}"_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*' | head -1)
  local depver; depver=$(dpkg-deb -f "$dl"/"${KERNEL_META}"_*.deb Depends | tr ',' '\n' | grep "$dep" | sed -n 's/.*(= \(.*\)).*/\1/p')
  log "kernel package: $dep $depver"
  (cd "$dl" && "${APT[@]}" download "$dep${depver:+=$depver}")
  dpkg-deb -x "$dl"/"$dep"_*.deb "$dl/x"
  local kver; kver=$(ls "$dl/x/lib/modules" | head -1)
  local moddir=$dl/x/lib/modules/$kver out=$WORK/kernel
  rm -rf "$out"; mkdir -p "$out/modules"
  cp "$dl/x/boot/vmlinuz-$kver" "$out/vmlinuz"
  cp "$dl/x/boot/config-$kver" "$out/config"
  # Module closure in load order, from each module's depends= string: the machine has no
  # kmod/modinfo/depmod, and busybox insmod loads exactly one uncompressed file.
  declare -A seen=()
  local order=()
  modfile() { find "$moddir/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" \) | head -1; }
  visit() {
    local m=$1 f d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    f=$(modfile "$m"); [ -n "$f" ] || f=$(modfile "${m//_/-}")
    if [ -z "$f" ]; then
      if grep -Eq "/(${m}|${m//_/-})\.ko$" "$moddir/modules.builtin"; then return 0; fi
      die "module $m neither found nor built in"
    fi
    case "$f" in
      *.ko.xz)  xz -dc "$f" > "$out/modules/$m.ko" ;;
      *.ko.zst) zstd -q -dc "$f" > "$out/modules/$m.ko" ;;
      *.ko.gz)  gzip -dc "$f" > "$out/modules/$m.ko" ;;
      *)        cp "$f" "$out/modules/$m.ko" ;;
    esac
    for d in $(strings -a "$out/modules/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' '); do
      visit "$d"
    done
    order+=("$m")
  }
  local root
  for root in virtio_pci vmw_vsock_virtio_transport; do visit "$root"; done
  printf '%s\n' "${order[@]}" > "$out/modules.load"
  log "guest modules (load order): ${order[*]}"
  printf '%s\n%s %s (%s)\n' "$want" "$dep" "$depver" "$kver" > "$stamp"
  rm -rf "$dl/x"
}

# ---------------------------------------------------------------- 4. vm-ctl test helper
# No dependencies (raw libc calls through std's libc), so it builds offline in seconds.
vm_ctl() {
  (cd "$VM_SRC/vm-ctl" && CARGO_TARGET_DIR=$WORK/target/vm-ctl RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -q)
  install -m 755 "$WORK/target/vm-ctl/x86_64-unknown-linux-gnu/release/vm-ctl" "$WORK/bin/vm-ctl"
  if readelf -l "$WORK/bin/vm-ctl" | grep -q 'program interpreter'; then die "vm-ctl is not static"; fi
}

# ---------------------------------------------------------------- 5. the agents
agents() {
  local out
  out=$(CARGO_TARGET_DIR=${VM_CARGO_TARGET_DIR:-$WORK/target/vmsync} bash "$REPO/scripts/build-static-guest.sh" | tail -1)
  # stripped: the initramfs stays small (the debug line tables are for the host's own builds)
  strip -o "$WORK/bin/vmsync-guest" "$out"
  (cd "$REPO" && CARGO_TARGET_DIR=${VM_CARGO_TARGET_DIR:-$WORK/target/vmsync} cargo build --release --locked -q -p vmsync-host)
  install -m 755 "${VM_CARGO_TARGET_DIR:-$WORK/target/vmsync}/release/vmsync-host" "$WORK/bin/vmsync-host"
}

want_step apt && step apt-packages apt_packages
want_step vdv && step vhost-device-vsock vhost_device_vsock
want_step kernel && step guest-kernel guest_kernel
want_step vm-ctl && step vm-ctl vm_ctl
want_step agents && step agents agents
want_step initramfs && step initramfs bash "$VM_SRC/build-initramfs.sh"
printf '%-28s %8ss\n' "setup.sh total" "$(elapsed "$T_ALL" "$(now)")" | tee -a "$WORK/timings-setup.txt" >&2
if [ -x "$WORK/bin/vhost-device-vsock" ] && [ -f "$WORK/kernel/.stamp" ]; then
  log "versions: $(qemu-system-x86_64 --version | head -1) | $("$WORK/bin/vhost-device-vsock" --version) | kernel $(sed -n 2p "$WORK/kernel/.stamp")"
fi
