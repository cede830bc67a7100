#!/usr/bin/env bash
# Checks the packages packaging/build.sh made, then installs, removes and purges the .debs on
# this machine. As root:
#
#   bash packaging/test-packages.sh PKG_DIR
#
# 1. Contents: every expected file in each .deb (dpkg-deb) and .rpm (rpm, installed with apt
#    when missing; else rpm2cpio and cpio; else the rpm listing is skipped, said so), the
#    conffiles / %config(noreplace), and every maintainer script parses (sh -n).
# 2. Maintainer scripts as if systemd ran (a private mount namespace with /run/systemd/system,
#    systemctl and friends stubbed to a log): removal stops the units, an upgrade restarts them.
# 3. On this machine (PID 1 need not be systemd): dpkg -i of both .debs; the binaries run, the
#    man pages render, the completions and units are there (and pass systemd-analyze verify),
#    dpkg lists the conffiles, the user vmsync exists. Then a share (a directory under /tmp),
#    state under /var/lib/vmsync, edited conffiles and units enabled with `systemctl enable`;
#    `dpkg -r`: binaries gone, conffiles, state and share kept; `dpkg -P` of the host package
#    first (the state stays for the guest package), then of the guest package: conffiles,
#    state and the links `systemctl enable` made gone, the share untouched.
#
# It changes nothing but what it makes and the packages' own paths, and leaves those as it found
# them: it refuses to start when a vmsync package is installed; what is already at the
# packages' paths (a hand-installed binary, /etc/vmsync, state in /var/lib/vmsync, enable
# links) it renames aside (PATH.vmsync-pkgtest-aside) and puts back at the end (or at the
# start of the next run, should this one be killed). On exit, whatever happened, it purges
# what it installed and removes what it made (and the user vmsync, when the install created
# it). Ends with "N passed, N failed"; exits 1 on any failure.
set -euo pipefail
pkg_dir=${1:?usage: test-packages.sh PKG_DIR}
pkg_dir=$(cd "$pkg_dir" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "test-packages.sh: run as root (it installs the .debs)" >&2; exit 1; }

HOST_COMMANDS="run check status metrics sync wait resume resolve trash restore completions"
GUEST_COMMANDS="run check status trash restore completions"

pass=0 fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*" >&2; }
# check DESCRIPTION CMD...: CMD must succeed.
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok; else bad "$what"; fi; }
# check_not DESCRIPTION CMD...: CMD must fail.
check_not() { local what=$1; shift; if "$@" >/dev/null 2>&1; then bad "$what"; else ok; fi; }

one() {
  # shellcheck disable=SC2206 # $1 is a glob
  local matches=("$pkg_dir"/$1)
  [ ${#matches[@]} -eq 1 ] && [ -f "${matches[0]}" ] || { echo "test-packages.sh: expected one $1 in $pkg_dir" >&2; exit 1; }
  echo "${matches[0]}"
}
shopt -s nullglob
host_deb=$(one 'vmsync-host_*.deb')
guest_deb=$(one 'vmsync-guest_*.deb')
host_rpm=$(one 'vmsync-host-*.rpm')
guest_rpm=$(one 'vmsync-guest-*.rpm')
shopt -u nullglob

work=$(mktemp -d /tmp/vmsync-pkgtest.XXXXXX)
aside=.vmsync-pkgtest-aside
installed=0 user_made=0 group_made=0 made_paths=() set_aside=()
# put_back PATH: PATH$aside back to PATH, unless something is at PATH again.
put_back() {
  if [ -e "$1" ] || [ -L "$1" ]; then
    echo "test-packages.sh: $1 exists again: what was there is at $1$aside" >&2
  else
    mv "$1$aside" "$1"
  fi
}
cleanup() {
  set +e
  if [ "$installed" = 1 ]; then
    for p in vmsync-host vmsync-guest; do
      if [ "$(status "$p")" != not-installed ]; then
        timeout 300 dpkg -P "$p" >>"$work/dpkg.log" 2>&1 || echo "test-packages.sh: could not purge $p" >&2
      fi
    done
    # Before the install these were not there, or were set aside.
    rm -rf /etc/vmsync /var/lib/vmsync
    for path in "${made_paths[@]}"; do rm -f "$path"; done
    if [ "$user_made" = 1 ] && getent passwd vmsync >/dev/null; then userdel vmsync; fi
    if [ "$group_made" = 1 ] && getent group vmsync >/dev/null; then groupdel vmsync; fi
  fi
  for path in "${set_aside[@]}"; do put_back "$path"; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
status() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || echo not-installed; }

# --- 1. Contents -------------------------------------------------------------------------------

# expected NAME ZSH_DIR: the paths both formats hold for agent NAME (without the unit paths and
# the copyright file, whose place differs).
expected() {
  local name=$1 zsh_dir=$2 commands
  if [ "$name" = vmsync-host ]; then commands=$HOST_COMMANDS; else commands=$GUEST_COMMANDS; fi
  echo "/usr/bin/$name"
  echo "/usr/share/man/man1/$name.1.gz"
  for c in $commands; do echo "/usr/share/man/man1/$name-$c.1.gz"; done
  echo "/usr/share/bash-completion/completions/$name"
  echo "$zsh_dir/_$name"
  echo "/usr/share/fish/vendor_completions.d/$name.fish"
  echo "/usr/share/doc/$name/README.md"
  for d in cli configuration hypervisors safety security; do echo "/usr/share/doc/$name/docs/$d.md"; done
  echo "/usr/share/doc/$name/packaging/README.md"
  if [ "$name" = vmsync-host ]; then
    echo /etc/vmsync/host/vm1.toml
    echo /usr/lib/systemd/user/vmsync-host@.service
    echo /usr/lib/sysusers.d/vmsync.conf
  else
    echo /etc/vmsync/guest.toml
  fi
}
unit_of() { if [ "$1" = vmsync-host ]; then echo 'vmsync-host@.service'; else echo vmsync-guest.service; fi; }
conffile_of() { if [ "$1" = vmsync-host ]; then echo /etc/vmsync/host/vm1.toml; else echo /etc/vmsync/guest.toml; fi; }

# has LIST PATH: PATH is a line of LIST.
has() { grep -qxF -- "$2" "$1"; }

for name in vmsync-host vmsync-guest; do
  deb=$host_deb; [ "$name" = vmsync-guest ] && deb=$guest_deb
  list=$work/$name.deb.list
  dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./|/|; s|/$||' >"$list"
  while read -r path; do check "$name.deb holds $path" has "$list" "$path"; done < <(expected "$name" /usr/share/zsh/vendor-completions)
  check "$name.deb holds its unit" grep -qE "^(/usr)?/lib/systemd/system/$(unit_of "$name")\$" "$list"
  check "$name.deb holds its copyright" has "$list" "/usr/share/doc/$name/copyright"
  mkdir -p "$work/$name.control"
  dpkg-deb -e "$deb" "$work/$name.control"
  check "$name.deb conffiles is $(conffile_of "$name")" test "$(cat "$work/$name.control/conffiles")" = "$(conffile_of "$name")"
  for script in preinst postinst prerm postrm; do
    [ -f "$work/$name.control/$script" ] || continue
    check "$name.deb $script parses" sh -n "$work/$name.control/$script"
  done
  check "$name.deb has a postrm" test -f "$work/$name.control/postrm"
done

rpm_tool=
if ! command -v rpm >/dev/null && command -v apt-get >/dev/null; then
  # About 8 MB from Debian's archive.
  echo "test-packages.sh: installing rpm (apt) to read the .rpm packages"
  if ! DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends rpm >"$work/apt.log" 2>&1; then
    timeout 300 apt-get update -qq >>"$work/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends rpm >>"$work/apt.log" 2>&1 || true
  fi
fi
if command -v rpm >/dev/null; then
  rpm_tool=rpm
elif command -v rpm2cpio >/dev/null && command -v cpio >/dev/null; then
  rpm_tool=rpm2cpio
  echo "test-packages.sh: no rpm: listing the .rpm packages with rpm2cpio and cpio (no %config or scriptlet checks)"
else
  echo "test-packages.sh: SKIPPED the .rpm checks: neither rpm nor rpm2cpio and cpio could be had"
fi
for name in vmsync-host vmsync-guest; do
  [ -n "$rpm_tool" ] || break
  rpm_file=$host_rpm; [ "$name" = vmsync-guest ] && rpm_file=$guest_rpm
  list=$work/$name.rpm.list
  if [ "$rpm_tool" = rpm ]; then
    rpm -qpl "$rpm_file" 2>/dev/null >"$list"
  else
    rpm2cpio "$rpm_file" | (cd "$work" && cpio -t --quiet) | sed 's|^\./|/|' >"$list"
  fi
  while read -r path; do check "$name.rpm holds $path" has "$list" "$path"; done < <(expected "$name" /usr/share/zsh/site-functions)
  check "$name.rpm holds its unit" has "$list" "/usr/lib/systemd/system/$(unit_of "$name")"
  [ "$rpm_tool" = rpm ] || continue
  # %config(noreplace): flags "cn".
  check "$name.rpm: $(conffile_of "$name") is %config(noreplace)" \
    has <(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm_file" 2>/dev/null) "$(conffile_of "$name") cn"
  for tag in POSTIN PREUN POSTUN; do
    rpm -qp --qf "%{$tag}" "$rpm_file" 2>/dev/null >"$work/$name.rpm.$tag"
    check "$name.rpm $tag scriptlet is a script" grep -q '^if \[' "$work/$name.rpm.$tag"
    check "$name.rpm $tag scriptlet parses" sh -n "$work/$name.rpm.$tag"
  done
done

# --- 2. Maintainer scripts as if systemd ran ---------------------------------------------------

stubs=$work/stubs
mkdir -p "$stubs"
for tool in systemctl deb-systemd-invoke deb-systemd-helper systemd-sysusers; do
  printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$tool" "$work/calls" >"$stubs/$tool"
  chmod 755 "$stubs/$tool"
done
# as_if_systemd SCRIPT ARGS...: the calls SCRIPT makes, run where /run/systemd/system exists.
as_if_systemd() {
  local over=/run/systemd
  [ -d "$over" ] || over=/run
  : >"$work/calls"
  unshare -m sh -c 'mount -t tmpfs tmpfs "$1" && mkdir -p /run/systemd/system && shift && PATH="$0:$PATH" exec sh "$@"' \
    "$stubs" "$over" "$@" >/dev/null 2>&1 || return 1
  cat "$work/calls"
}
if as_if_systemd /dev/null >/dev/null; then
  c=$work/vmsync-host.control g=$work/vmsync-guest.control
  check "deb: removing vmsync-host stops every vmsync-host@ instance" \
    grep -qxF "systemctl stop vmsync-host@*.service" <(as_if_systemd "$c/prerm" remove)
  check_not "deb: upgrading vmsync-host does not stop its instances" \
    grep -q "stop" <(as_if_systemd "$c/prerm" upgrade 0.1.0-1)
  check "deb: upgrading vmsync-host restarts the running instances" \
    grep -qxF "systemctl try-restart vmsync-host@*.service" <(as_if_systemd "$c/postinst" configure 0.0.1-1)
  check "deb: installing vmsync-host makes the user vmsync (sysusers.d)" \
    grep -qxF "systemd-sysusers vmsync.conf" <(as_if_systemd "$c/postinst" configure)
  check "deb: removing vmsync-guest stops it" \
    grep -qxF "deb-systemd-invoke stop vmsync-guest.service" <(as_if_systemd "$g/prerm" remove)
  check "deb: upgrading vmsync-guest restarts it if it runs" \
    grep -qxF "deb-systemd-invoke try-restart vmsync-guest.service" <(as_if_systemd "$g/postinst" configure 0.0.1-1)
  check_not "deb: installing vmsync-guest does not start it" \
    grep -qE "(start|restart) vmsync-guest" <(as_if_systemd "$g/postinst" configure)
  if [ "$rpm_tool" = rpm ]; then
    check "rpm: erasing vmsync-host stops every vmsync-host@ instance" \
      grep -qxF "systemctl stop vmsync-host@*.service" <(as_if_systemd "$work/vmsync-host.rpm.PREUN" 0)
    check_not "rpm: upgrading vmsync-host does not stop its instances" \
      grep -q "stop" <(as_if_systemd "$work/vmsync-host.rpm.PREUN" 1)
    check "rpm: upgrading vmsync-host restarts the running instances" \
      grep -qxF "systemctl try-restart vmsync-host@*.service" <(as_if_systemd "$work/vmsync-host.rpm.POSTUN" 1)
    check "rpm: erasing vmsync-guest stops it" \
      grep -qxF "systemctl stop vmsync-guest.service" <(as_if_systemd "$work/vmsync-guest.rpm.PREUN" 0)
    check "rpm: upgrading vmsync-guest restarts it if it runs" \
      grep -qxF "systemctl try-restart vmsync-guest.service" <(as_if_systemd "$work/vmsync-guest.rpm.POSTUN" 1)
  fi
else
  echo "test-packages.sh: SKIPPED the maintainer scripts under systemd: no mount namespace (unshare -m)"
fi

# --- 3. Install, remove, purge ----------------------------------------------------------------

for p in vmsync-host vmsync-guest; do
  [ "$(status "$p")" = not-installed ] || { echo "test-packages.sh: $p is installed here ($(status "$p")): not touching it" >&2; exit 1; }
done
enabled_links=(/etc/systemd/system/multi-user.target.wants/vmsync-host@vm1.service
  /etc/systemd/system/multi-user.target.wants/vmsync-guest.service)
# What is at the packages' paths now: the directories their scripts remove, the links purge
# removes, the files they hold. First what an earlier run that was killed left aside.
shopt -s nullglob
for saved in /etc/systemd/system/*"$aside" /etc/systemd/system/*.wants/*"$aside"; do
  put_back "${saved%"$aside"}"
done
theirs=(/etc/vmsync /var/lib/vmsync /etc/systemd/system/*.wants/vmsync-host@*.service
  /etc/systemd/system/*.wants/vmsync-guest.service /etc/systemd/system/vmsync-guest.service)
shopt -u nullglob
mapfile -t -O "${#theirs[@]}" theirs < <(cat "$work/vmsync-host.deb.list" "$work/vmsync-guest.deb.list")
for path in "${theirs[@]}"; do
  [ -n "$path" ] || continue
  # What an earlier run that was killed left aside.
  if [ -e "$path$aside" ] || [ -L "$path$aside" ]; then put_back "$path"; fi
  if [ -L "$path" ] || { [ -e "$path" ] && { [ ! -d "$path" ] || [ "$path" = /etc/vmsync ] || [ "$path" = /var/lib/vmsync ]; }; }; then
    [ ! -e "$path$aside" ] && [ ! -L "$path$aside" ] || { echo "test-packages.sh: $path$aside exists: not touching $path" >&2; exit 1; }
    echo "test-packages.sh: $path exists here: set aside as $path$aside until the end"
    mv "$path" "$path$aside"
    set_aside+=("$path")
  fi
done
getent passwd vmsync >/dev/null || user_made=1
getent group vmsync >/dev/null || group_made=1

installed=1
if ! timeout 300 dpkg -i "$host_deb" "$guest_deb" >"$work/dpkg.log" 2>&1; then
  cat "$work/dpkg.log" >&2
  bad "dpkg -i of both .debs"
fi
for p in vmsync-host vmsync-guest; do check "$p is installed" test "$(status "$p")" = installed; done
version=$(dpkg-deb -f "$host_deb" Version)
version=${version%-*}
check "vmsync-host --version" test "$(vmsync-host --version 2>/dev/null)" = "vmsync-host $version"
check "vmsync-guest --version" test "$(vmsync-guest --version 2>/dev/null)" = "vmsync-guest $version"
check_not "the installed vmsync-guest is static" sh -c "readelf -l /usr/bin/vmsync-guest | grep -q 'program interpreter'"
for name in vmsync-host vmsync-guest; do
  check "man -l of $name.1.gz renders" sh -c "MANPAGER=cat man -l /usr/share/man/man1/$name.1.gz 2>/dev/null | grep -q '$name-status'"
  check "man finds $name-status" sh -c "man -w $name-status | grep -q '/usr/share/man/man1/$name-status.1.gz'"
  check "zcat of $name-check.1.gz is a man page" sh -c "zcat /usr/share/man/man1/$name-check.1.gz | grep -q '^\\.TH $name-check 1'"
  check "$name's bash completion is installed and parses" bash -n "/usr/share/bash-completion/completions/$name"
  check "$name's installed bash completion is what the binary prints" \
    cmp -s "/usr/share/bash-completion/completions/$name" <($name completions bash)
  check "$name's zsh completion is installed" test -s "/usr/share/zsh/vendor-completions/_$name"
  check "$name's fish completion is installed" test -s "/usr/share/fish/vendor_completions.d/$name.fish"
  check "$name's README is installed" test -s "/usr/share/doc/$name/README.md"
  check "dpkg lists $(conffile_of "$name") as $name's conffile" \
    sh -c "dpkg-query --showformat='\${Conffiles}\n' --show $name | grep -q '^ $(conffile_of "$name") [0-9a-f]\{32\}\$'"
  unit=$(unit_of "$name")
  check "$name's unit is installed" sh -c "test -f /usr/lib/systemd/system/$unit || test -f /lib/systemd/system/$unit"
done
check "vmsync-host's user unit is installed" test -f /usr/lib/systemd/user/vmsync-host@.service
if command -v systemd-analyze >/dev/null; then
  check "vmsync-host@vm1.service passes systemd-analyze verify" systemd-analyze verify vmsync-host@vm1.service
  check "vmsync-guest.service passes systemd-analyze verify" systemd-analyze verify vmsync-guest.service
fi
check "the user vmsync exists" sh -c "getent passwd vmsync | grep -q ':/var/lib/vmsync:/usr/sbin/nologin\$'"
check "the shipped vm1.toml passes check" vmsync-host check --config /etc/vmsync/host/vm1.toml
check "the shipped guest.toml passes check" vmsync-guest check --config /etc/vmsync/guest.toml
check "the host unit is not enabled on install" test ! -e /etc/systemd/system/multi-user.target.wants/vmsync-host@vm1.service
check "the guest unit is not enabled on install" test ! -e /etc/systemd/system/multi-user.target.wants/vmsync-guest.service

# A share, state, an edited conffile, units the admin enabled.
share=$work/share
mkdir -p "$share/sub"
echo "a file of the share" >"$share/sub/keep.txt"
find "$share" -printf '%P %s %T@\n' | sort >"$work/share.before"
mkdir -p /var/lib/vmsync/vm1
echo "state" >/var/lib/vmsync/vm1/state.txt
sed -i "s|^path = \"/home/alice/src\"|path = \"$share\"|" /etc/vmsync/host/vm1.toml
sed -i "s|^path = \"/home/dev/src\"|path = \"$share\"|" /etc/vmsync/guest.toml
check "the edited vm1.toml names the share" sh -c "vmsync-host check --config /etc/vmsync/host/vm1.toml | grep -qxF 'share src: $share'"
made_paths+=("${enabled_links[@]}")
if systemctl enable vmsync-host@vm1.service vmsync-guest.service >"$work/enable.log" 2>&1; then
  check "systemctl enable made vmsync-host@vm1's link" test -L "${enabled_links[0]}"
else
  echo "test-packages.sh: systemctl enable does not work here: purge's removal of enable links not checked"
  cat "$work/enable.log"
fi

if ! timeout 300 dpkg -r vmsync-host vmsync-guest >>"$work/dpkg.log" 2>&1; then
  cat "$work/dpkg.log" >&2
  bad "dpkg -r of both packages"
fi
for p in vmsync-host vmsync-guest; do check "$p is removed, its conffiles kept" test "$(status "$p")" = config-files; done
for path in /usr/bin/vmsync-host /usr/bin/vmsync-guest /usr/share/man/man1/vmsync-host.1.gz \
  /usr/share/bash-completion/completions/vmsync-guest /usr/lib/sysusers.d/vmsync.conf; do
  check "removal removed $path" test ! -e "$path"
done
check "removal kept the edited vm1.toml" grep -qxF "path = \"$share\"" /etc/vmsync/host/vm1.toml
check "removal kept the edited guest.toml" grep -qxF "path = \"$share\"" /etc/vmsync/guest.toml
check "removal kept the state" test -f /var/lib/vmsync/vm1/state.txt

if ! timeout 300 dpkg -P vmsync-host >>"$work/dpkg.log" 2>&1; then
  cat "$work/dpkg.log" >&2
  bad "dpkg -P vmsync-host"
fi
check "vmsync-host is purged" test "$(status vmsync-host)" = not-installed
check "purge removed vm1.toml" test ! -e /etc/vmsync/host/vm1.toml
check "purge removed vmsync-host@vm1's enable link" test ! -L "${enabled_links[0]}"
check "purging vmsync-host kept the state for the removed vmsync-guest" test -f /var/lib/vmsync/vm1/state.txt
if ! timeout 300 dpkg -P vmsync-guest >>"$work/dpkg.log" 2>&1; then
  cat "$work/dpkg.log" >&2
  bad "dpkg -P vmsync-guest"
fi
check "vmsync-guest is purged" test "$(status vmsync-guest)" = not-installed
check "purge removed guest.toml" test ! -e /etc/vmsync/guest.toml
check "purge removed /etc/vmsync" test ! -e /etc/vmsync
check "purge removed the state, /var/lib/vmsync" test ! -e /var/lib/vmsync
check "purge removed vmsync-guest's enable link" test ! -L "${enabled_links[1]}"
check "purge removed the unit mask" test ! -L /etc/systemd/system/vmsync-guest.service
check "the share is untouched" cmp -s "$work/share.before" <(find "$share" -printf '%P %s %T@\n' | sort)
left=$(cat "$work/vmsync-host.deb.list" "$work/vmsync-guest.deb.list" | while read -r path; do
  if [ -e "$path" ] && [ ! -d "$path" ]; then echo "$path"; fi
done)
check "nothing of the packages is left: ${left:-}" test -z "$left"

echo "test-packages.sh: $host_deb $guest_deb $host_rpm $guest_rpm"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
