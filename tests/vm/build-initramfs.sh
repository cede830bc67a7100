#!/usr/bin/env bash
# Assembles $VMSYNC_VM_DIR/initramfs.cpio.gz: static busybox, /init, vm-ctl, the static
# vmsync-guest, the helper scripts and the vsock kernel modules. Needs setup.sh's other steps.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ -x /bin/busybox ] || die "busybox-static missing (run setup.sh)"
for f in "$WORK/bin/vm-ctl" "$WORK/bin/vmsync-guest" "$WORK/kernel/modules.load"; do
  [ -e "$f" ] || die "$f missing (run setup.sh)"
done
# busybox must be the static one: it is the only userland in the guest
if readelf -l /bin/busybox | grep -q 'program interpreter'; then die "/bin/busybox is dynamic; install busybox-static"; fi
if readelf -l "$WORK/bin/vmsync-guest" | grep -q 'program interpreter'; then die "vmsync-guest is not static"; fi

OUTF=${INITRAMFS_OUT:-$WORK/initramfs.cpio.gz}
R=$WORK/initramfs.root.$$
rm -rf "$R"
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,lib/modules}
cp /bin/busybox "$R/bin/busybox"
install -m 755 "$WORK/bin/vm-ctl" "$WORK/bin/vmsync-guest" "$R/bin/"
install -m 755 "$VM_SRC/guest/agent-start" "$VM_SRC/guest/agent-stop" "$VM_SRC/guest/raw-send" "$R/bin/"
install -m 755 "$VM_SRC/guest/init" "$R/init"
cp "$WORK/kernel/modules/"*.ko "$WORK/kernel/modules.load" "$R/lib/modules/"
# The marker vm-ctl needs before it opens AF_VSOCK: it exists ONLY inside the guest.
touch "$R/.vmsync-vm-guest"
# The kernel opens /dev/console before /init runs; without the node init has no stdio.
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3
(cd "$R" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) | gzip -1 > "$OUTF.tmp"
mv "$OUTF.tmp" "$OUTF"
rm -rf "$R"
log "initramfs: $OUTF ($(stat -c %s "$OUTF") bytes)"
