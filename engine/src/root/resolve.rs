//! Path resolution: how a [`RelPath`] becomes a directory fd beneath the share root without
//! leaving it. `openat2` (`RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|
//! RESOLVE_NO_XDEV`) where the kernel has it, else a walk of one `openat(O_NOFOLLOW)` per
//! component; both refuse a symlink or a mount point in the way, and every directory fd is
//! checked to be on the root's device (see the rules in the module docs of `root`).

use super::error::{fail, invalid, Loc};
use super::{to_u64, ShareRoot};
use crate::root::FsError;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::sync::atomic::{AtomicBool, Ordering};
use vmsync_core::limits::MAX_NAME_BYTES;
use vmsync_core::path::RelPath;

/// How paths are resolved. `Auto` uses `openat2` where the kernel has it and the walk
/// otherwise; `Walk` always uses the walk (it exists so tests cover both, and as an escape
/// hatch should a kernel's `openat2` misbehave).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolver {
    #[default]
    Auto,
    Walk,
}

/// `openat2` fails with `EAGAIN` when a rename or mount raced the resolution; it is safe to
/// retry, but a tree being renamed in a loop must not keep us spinning forever.
const EAGAIN_RETRIES: u32 = 64;

const RESOLVE_FLAGS: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Set once `openat2` has answered `ENOSYS`: the kernel (or a seccomp filter) lacks it, so
/// every later resolution goes straight to the walk instead of paying a failing syscall.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

impl ShareRoot {
    /// Resolves `p`'s parent directory (opened with `access`: `PATH` to act on the final
    /// component, `RDONLY` when the directory will be fsynced) and returns it with `p`'s name.
    pub(super) fn parent<'p>(
        &self,
        op: &'static str,
        p: &'p RelPath,
        access: OFlags,
    ) -> Result<(OwnedFd, &'p [u8]), FsError> {
        let loc = Loc::path(p);
        let comps: Vec<&[u8]> = p.components().collect();
        let Some((name, dirs)) = comps.split_last() else {
            return Err(invalid(op, loc, "not applicable to the share root itself"));
        };
        let dir = open_beneath(
            self.root.as_fd(),
            self.dev,
            dirs,
            access | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| fail(op, loc, e))?;
        Ok((dir, name))
    }
}

/// Opens `comps` (each a single validated component; empty means `base` itself) beneath
/// `base`, never following a symlink and never crossing a mount point, with `oflags` (plus
/// `O_CLOEXEC`). A symlink in the way is `ELOOP`; a mount point or another device is `EXDEV`.
/// A directory result is checked to be on `root_dev`.
pub(super) fn open_beneath(
    base: BorrowedFd<'_>,
    root_dev: u64,
    comps: &[&[u8]],
    oflags: OFlags,
    resolver: Resolver,
) -> Result<OwnedFd, Errno> {
    let fd = if resolver == Resolver::Auto && !OPENAT2_MISSING.load(Ordering::Relaxed) {
        match openat2_beneath(base, comps, oflags) {
            Err(Errno::NOSYS) => {
                OPENAT2_MISSING.store(true, Ordering::Relaxed);
                tracing::info!("openat2 is unavailable; resolving paths component by component");
                walk_beneath(base, root_dev, comps, oflags)?
            }
            other => other?,
        }
    } else {
        walk_beneath(base, root_dev, comps, oflags)?
    };
    // RESOLVE_NO_XDEV stops at mount points, but a btrfs subvolume is a new device without
    // being a mount; renames into it would fail, and it is not the share's filesystem.
    if oflags.contains(OFlags::DIRECTORY) {
        same_dev(&fd, root_dev)?;
    }
    Ok(fd)
}

/// The `openat2` resolution: one syscall for the whole path.
pub(crate) fn openat2_beneath(
    base: BorrowedFd<'_>,
    comps: &[&[u8]],
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    if !comps.iter().all(|c| is_single_component(c)) {
        return Err(Errno::INVAL);
    }
    let path: Vec<u8> = if comps.is_empty() {
        b".".to_vec()
    } else {
        comps.join(&b'/')
    };
    let mut flags = oflags | OFlags::CLOEXEC;
    if flags.contains(OFlags::DIRECTORY) {
        // RESOLVE_NO_SYMLINKS already refuses a final symlink, with ELOOP; O_NOFOLLOW on top
        // of O_DIRECTORY would make the kernel say ENOTDIR instead, hiding why.
        flags.remove(OFlags::NOFOLLOW);
    }
    let mut retries = 0;
    loop {
        match rfs::openat2(base, path.as_slice(), flags, Mode::empty(), RESOLVE_FLAGS) {
            Err(Errno::AGAIN) if retries < EAGAIN_RETRIES => retries += 1,
            other => return other,
        }
    }
}

/// The fallback resolution: one `openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)` per directory
/// component, each checked to be on the root's device and not a mount root, then the final
/// component opened with `oflags|O_NOFOLLOW` relative to the last one and checked not to be a
/// mount root. Same answers as [`openat2_beneath`].
pub(crate) fn walk_beneath(
    base: BorrowedFd<'_>,
    root_dev: u64,
    comps: &[&[u8]],
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    if !comps.iter().all(|c| is_single_component(c)) {
        return Err(Errno::INVAL);
    }
    let Some((last, dirs)) = comps.split_last() else {
        return rfs::openat(base, ".", oflags | OFlags::CLOEXEC, Mode::empty());
    };
    let mut cur: Option<OwnedFd> = None;
    for name in dirs {
        let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
        let next = rfs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| symlink_or(at, name, e))?;
        not_crossing(&next, root_dev)?;
        cur = Some(next);
    }
    let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
    let fd = rfs::openat(
        at,
        *last,
        oflags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| symlink_or(at, last, e))?;
    // A bind-mounted file is a mount root too; directories also get the device check from
    // open_beneath.
    if is_mount_root(&fd) {
        return Err(Errno::XDEV);
    }
    Ok(fd)
}

/// The walk's stand-in for RESOLVE_NO_XDEV: a directory on another device, or the root of a
/// mount (a bind mount of the same filesystem keeps the device, so the device alone is not
/// enough where statx can tell).
fn not_crossing(fd: &OwnedFd, root_dev: u64) -> Result<(), Errno> {
    same_dev(fd, root_dev)?;
    if is_mount_root(fd) {
        return Err(Errno::XDEV);
    }
    Ok(())
}

/// `STATX_ATTR_MOUNT_ROOT` (Linux 5.8). Where statx cannot say, false: the device comparison
/// is then the only mount check, which catches every mount but a same-filesystem bind mount.
fn is_mount_root(fd: &OwnedFd) -> bool {
    match rfs::statx(fd, "", AtFlags::EMPTY_PATH, rfs::StatxFlags::empty()) {
        Ok(stx) => {
            stx.stx_attributes_mask
                .contains(rfs::StatxAttributes::MOUNT_ROOT)
                && stx
                    .stx_attributes
                    .contains(rfs::StatxAttributes::MOUNT_ROOT)
        }
        Err(_) => false,
    }
}

/// `O_DIRECTORY|O_NOFOLLOW` on a symlink fails with ENOTDIR; turn that into the ELOOP that
/// `openat2` gives, so both resolutions report a symlink the same way. A directory found there
/// now means the entry was swapped between the open and this look (typically a symlink
/// swapped out again): also reported as a refusal, since what we met was not a directory.
fn symlink_or(at: BorrowedFd<'_>, name: &[u8], e: Errno) -> Errno {
    if e == Errno::NOTDIR {
        if let Ok(st) = rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
            if matches!(
                FileType::from_raw_mode(st.st_mode),
                FileType::Symlink | FileType::Directory
            ) {
                return Errno::LOOP;
            }
        }
    }
    e
}

fn same_dev(fd: &OwnedFd, root_dev: u64) -> Result<(), Errno> {
    if to_u64(rfs::fstat(fd)?.st_dev) == root_dev {
        Ok(())
    } else {
        Err(Errno::XDEV)
    }
}

pub(super) fn is_single_component(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vmsync_core::path::escape_bytes;

    /// Both resolutions give the same answer (success, or the same errno) on a tree with
    /// every kind of obstacle.
    #[test]
    fn walk_and_openat2_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        std::fs::write(d.join("a/f"), b"x").unwrap();
        std::os::unix::fs::symlink("b", d.join("a/l")).unwrap();
        std::os::unix::fs::symlink("/", d.join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", d.join("loop")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", d.join("proc")).unwrap();
        let root = rfs::open(
            d,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let dev = to_u64(rfs::fstat(&root).unwrap().st_dev);
        let paths: &[&[u8]] = &[
            b"",
            b"a",
            b"a/b",
            b"a/b/c",
            b"a/f",
            b"a/l",
            b"a/l/c",
            b"abs",
            b"abs/etc",
            b"loop",
            b"loop/x",
            b"proc",
            b"proc/etc",
            b"missing",
            b"missing/x",
            b"a/f/x",
            b"a/b/missing",
        ];
        let flag_sets = [
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            OFlags::PATH | OFlags::NOFOLLOW,
        ];
        let mut saw_openat2 = false;
        for path in paths {
            let comps: Vec<&[u8]> = if path.is_empty() {
                vec![]
            } else {
                path.split(|&b| b == b'/').collect()
            };
            for flags in flag_sets {
                let walked = walk_beneath(root.as_fd(), dev, &comps, flags).map(|_| ());
                match openat2_beneath(root.as_fd(), &comps, flags).map(|_| ()) {
                    Err(Errno::NOSYS) => {}
                    direct => {
                        saw_openat2 = true;
                        assert_eq!(walked, direct, "{} with {flags:?}", escape_bytes(path));
                    }
                }
                // Through a symlink is never a success, whichever resolution.
                if path.starts_with(b"a/l/")
                    || path.starts_with(b"abs/")
                    || path.starts_with(b"proc/")
                    || path.starts_with(b"loop/")
                {
                    assert_eq!(walked, Err(Errno::LOOP), "{}", escape_bytes(path));
                }
            }
        }
        // This test is only meaningful where the kernel has openat2 (Linux >= 5.6).
        assert!(saw_openat2 || OPENAT2_MISSING.load(Ordering::Relaxed));
        // Names that are not single components are refused by both, never resolved.
        for bad in [&b"a/b"[..], b"..", b".", b"", b"a\0"] {
            assert_eq!(
                walk_beneath(root.as_fd(), dev, &[bad], OFlags::PATH).map(|_| ()),
                Err(Errno::INVAL)
            );
            assert_eq!(
                openat2_beneath(root.as_fd(), &[bad], OFlags::PATH).map(|_| ()),
                Err(Errno::INVAL)
            );
        }
    }
}
