//! One entry of the share at a [`RelPath`]: look at it (stat, open, read a symlink) and change
//! it (mkdir, symlink, remove, permission bits, mtime), each a `*at` call on its resolved
//! parent that never follows the final component.

use super::error::{fail, invalid, not_a_file, Loc};
use super::resolve::open_beneath;
use super::temp::Inodes;
use super::{
    mtime_only, open_regular, random_u64, read_link_at, to_i64, DirHandle, FileKind, FsError,
    FsErrorKind, ShareRoot, Stat, RESERVED_DIR_MODE, TEMP_CREATE_ATTEMPTS, TMP_SHOWN,
};
use crate::faults::FaultOp;
use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use std::fs::File;
use std::sync::atomic::Ordering;
use vmsync_core::entry::{Timestamp, PERM_MASK};
use vmsync_core::limits::MAX_SYMLINK_TARGET_BYTES;
use vmsync_core::path::{is_reserved, RelPath};

/// The owner's write bit, which moving a directory between parents needs.
const OWNER_WRITE: u32 = 0o200;

impl ShareRoot {
    /// `lstat` of `p`: `None` if it does not exist, including when an ancestor is missing or
    /// is not a directory (then `p` cannot exist). A symlink as an ancestor is an error of kind
    /// `Symlink`: it is never followed. `p` itself is never followed either: a symlink at `p`
    /// is reported as [`FileKind::Symlink`].
    pub fn stat(&self, p: &RelPath) -> Result<Option<Stat>, FsError> {
        const OP: &str = "stat";
        if p.is_root() {
            let st = rfs::fstat(&self.root).map_err(|e| fail(OP, Loc::path(p), e))?;
            return Ok(Some(Stat::from_raw(&st, self.dev)));
        }
        let (dir, name) = match self.parent(OP, p, OFlags::PATH) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), FsErrorKind::NotFound | FsErrorKind::NotADirectory) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat::from_raw(&st, self.dev))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(fail(OP, Loc::path(p), e)),
        }
    }

    /// Opens the directory at `p` for listing; `RelPath::root()` opens the root itself.
    pub fn open_dir(&self, p: &RelPath) -> Result<DirHandle, FsError> {
        let comps: Vec<&[u8]> = p.components().collect();
        let fd = open_beneath(
            self.root.as_fd(),
            self.dev,
            &comps,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| fail("open directory", Loc::path(p), e))?;
        Ok(DirHandle {
            fd,
            root_dev: self.dev,
            is_root: p.is_root(),
            path: p.as_bytes().into(),
            resolver: self.resolver,
        })
    }

    /// Opens the regular file at `p` read-only. Anything else (symlink, directory, FIFO,
    /// device, socket) is an error of kind `NotAFile` (a symlink: kind `Symlink`), and is never
    /// opened, or, if swapped in at the last moment, opened `O_NONBLOCK` so it cannot block.
    /// The returned [`Stat`] is the `fstat` of the open file.
    pub fn open_file(&self, p: &RelPath) -> Result<(File, Stat), FsError> {
        const OP: &str = "open file";
        let (dir, name) = self.parent(OP, p, OFlags::PATH)?;
        open_regular(OP, dir.as_fd(), self.dev, self.resolver, name, Loc::path(p))
    }

    /// The target of the symlink at `p`, as bytes.
    pub fn read_link(&self, p: &RelPath) -> Result<Vec<u8>, FsError> {
        const OP: &str = "read symlink";
        let (dir, name) = self.parent(OP, p, OFlags::PATH)?;
        read_link_at(OP, dir.as_fd(), name, Loc::path(p))
    }

    /// Creates the directory `p` with permission bits `mode & PERM_MASK`, whatever the umask.
    /// An existing entry at `p` is an error of kind `Exists`.
    pub fn mkdir(&self, p: &RelPath, mode: u32) -> Result<(), FsError> {
        self.mkdir_at(p, mode, None)
    }

    /// [`ShareRoot::mkdir`], the directory also given `mtime` (when set) before it becomes
    /// visible: a kill never leaves it at the time it was made, which the next cycle would
    /// read as a touch of this side's.
    pub fn mkdir_at(
        &self,
        p: &RelPath,
        mode: u32,
        mtime: Option<Timestamp>,
    ) -> Result<(), FsError> {
        const OP: &str = "mkdir";
        let loc = Loc::path(p);
        let times = mtime.map(|t| mtime_only(OP, loc, t)).transpose()?;
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        if let Some(e) = self.injected(FaultOp::Mkdir, p) {
            return Err(fail(OP, loc, e));
        }
        // Made in the temp area, owner-only, set to its exact mode there (whatever the umask),
        // then renamed into place: the directory is visible only with its final mode, never
        // wider than asked and never narrower, even when the agent is killed between the
        // steps. A directory left visible at 0700 would be read by the next cycle as a
        // creation of this side's that conflicts with the other side's. A leftover in the
        // temp area is removed by `clean_temps`.
        let temp = self.make_temp_dir(OP)?;
        let tname = temp.as_str();
        let made = (|| {
            let fd = rfs::openat(
                &self.tmp,
                tname,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // Moving a directory to another parent rewrites its `..`, which needs write
            // permission on it: one its owner may not write gets its last bit after the move.
            let exact = mode & PERM_MASK;
            rfs::fchmod(&fd, Mode::from_raw_mode(exact | OWNER_WRITE))?;
            // A rename keeps a directory's mtime (it moves its ctime only).
            if let Some(times) = &times {
                rfs::futimens(&fd, times)?;
            }
            match rfs::renameat_with(&self.tmp, tname, &dir, name, RenameFlags::NOREPLACE) {
                // A filesystem without RENAME_NOREPLACE: look, then a plain rename (which
                // would only ever replace an empty directory).
                Err(Errno::INVAL) => match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => Err(Errno::EXIST),
                    Err(Errno::NOENT) => rfs::renameat(&self.tmp, tname, &dir, name),
                    Err(e) => Err(e),
                },
                other => other,
            }?;
            if exact & OWNER_WRITE == 0 {
                rfs::fchmod(&fd, Mode::from_raw_mode(exact))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = rfs::unlinkat(&self.tmp, tname, AtFlags::REMOVEDIR);
            return Err(fail(OP, loc, e));
        }
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))
    }

    /// Makes a new, empty, owner-only directory in `.vmsync/tmp/` under a fresh unique name
    /// and returns the name.
    fn make_temp_dir(&self, op: &'static str) -> Result<String, FsError> {
        let pid = rustix::process::getpid().as_raw_pid();
        let mut last = Errno::EXIST;
        for _ in 0..TEMP_CREATE_ATTEMPTS {
            let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
            let name = format!("d.{pid}.{n}.{:016x}", random_u64(n));
            match rfs::mkdirat(
                &self.tmp,
                name.as_str(),
                Mode::from_raw_mode(RESERVED_DIR_MODE),
            ) {
                Ok(()) => return Ok(name),
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => {
                    let loc = Loc {
                        base: TMP_SHOWN,
                        name: Some(name.as_bytes()),
                    };
                    return Err(fail(op, loc, e));
                }
            }
        }
        let loc = Loc {
            base: TMP_SHOWN,
            name: None,
        };
        Err(fail(op, loc, last))
    }

    /// Creates a symlink at `p` pointing to `target`, only if `target` is relative and stays
    /// inside the root ([`symlink_target_is_contained`]); otherwise an error of kind `Symlink`.
    /// An existing entry at `p` is an error of kind `Exists`.
    pub fn symlink(&self, p: &RelPath, target: &[u8]) -> Result<(), FsError> {
        const OP: &str = "create symlink";
        let loc = Loc::path(p);
        if !symlink_target_is_contained(p, target) {
            return Err(FsError::Refused {
                op: OP,
                path: loc.shown(),
                why: "the target is empty, absolute or leaves the share",
                source: None,
            });
        }
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        rfs::symlinkat(target, &dir, name).map_err(|e| fail(OP, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))
    }

    /// Replaces the file or symlink at `p` with a symlink to `target` in one rename: the new
    /// link is made in `.vmsync/tmp/` and renamed over `p`, so `p` is never empty. Keep the
    /// old entry first ([`ShareRoot::trash_link`]). Same target rules as
    /// [`ShareRoot::symlink`]; a directory at `p` is an error.
    pub fn replace_with_symlink(
        &self,
        p: &RelPath,
        target: &[u8],
        kept: u64,
    ) -> Result<(), FsError> {
        self.replace_with_symlink_at(p, target, None, kept)
    }

    /// [`ShareRoot::replace_with_symlink`], the new link also given `mtime` (when set) before
    /// the rename puts it in place (a rename keeps it). Like [`ShareRoot::commit_temp`], it
    /// replaces only the inode `kept` that [`ShareRoot::trash_link`] kept.
    pub fn replace_with_symlink_at(
        &self,
        p: &RelPath,
        target: &[u8],
        mtime: Option<Timestamp>,
        kept: u64,
    ) -> Result<(), FsError> {
        const OP: &str = "replace with symlink";
        let loc = Loc::path(p);
        let times = mtime.map(|t| mtime_only(OP, loc, t)).transpose()?;
        if !symlink_target_is_contained(p, target) {
            return Err(FsError::Refused {
                op: OP,
                path: loc.shown(),
                why: "the target is empty, absolute or leaves the share",
                source: None,
            });
        }
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        let pid = rustix::process::getpid().as_raw_pid();
        let mut made = None;
        for _ in 0..TEMP_CREATE_ATTEMPTS {
            let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
            let temp = format!("s.{pid}.{n}.{:016x}", random_u64(n));
            match rfs::symlinkat(target, &self.tmp, temp.as_str()) {
                Ok(()) => {
                    made = Some(temp);
                    break;
                }
                Err(Errno::EXIST) => {}
                Err(e) => return Err(fail(OP, loc, e)),
            }
        }
        let Some(temp) = made else {
            return Err(fail(OP, loc, Errno::EXIST));
        };
        if let Some(times) = &times {
            if let Err(e) =
                rfs::utimensat(&self.tmp, temp.as_str(), times, AtFlags::SYMLINK_NOFOLLOW)
            {
                let _ = rfs::unlinkat(&self.tmp, temp.as_str(), AtFlags::empty());
                return Err(fail(OP, loc, e));
            }
        }
        let swapped = rfs::statat(&self.tmp, temp.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| fail(OP, loc, e))
            .and_then(|st| {
                let inodes = Inodes {
                    ours: st.st_ino,
                    kept,
                };
                self.swap_in(OP, p, (&dir, name), &temp, inodes)
            });
        if let Err(e) = swapped {
            let _ = rfs::unlinkat(&self.tmp, temp.as_str(), AtFlags::empty());
            return Err(e);
        }
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))
    }

    /// Removes the file or symlink at `p` (never what a symlink points to), then fsyncs the
    /// directory. A directory at `p` is an error of kind `NotAFile`.
    pub fn remove_file(&self, p: &RelPath) -> Result<(), FsError> {
        const OP: &str = "remove file";
        let loc = Loc::path(p);
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        rfs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| fail(OP, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))
    }

    /// Removes the empty directory at `p`, then fsyncs its parent. Not empty → kind
    /// `NotEmpty`; not a directory (a symlink included) → kind `NotADirectory`.
    pub fn remove_dir(&self, p: &RelPath) -> Result<(), FsError> {
        const OP: &str = "remove directory";
        let loc = Loc::path(p);
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        rfs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| {
            // POSIX lets rmdir say EEXIST for "not empty".
            fail(
                OP,
                loc,
                if e == Errno::EXIST {
                    Errno::NOTEMPTY
                } else {
                    e
                },
            )
        })?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))
    }

    /// Sets the permission bits of the file or directory at `p` to `mode & PERM_MASK`. Never
    /// acts on a symlink (kind `Symlink`) or a special file (kind `NotAFile`).
    pub fn set_mode(&self, p: &RelPath, mode: u32) -> Result<(), FsError> {
        const OP: &str = "set mode";
        let loc = Loc::path(p);
        let comps: Vec<&[u8]> = p.components().collect();
        let root = self.root.as_fd();
        // Linux has no race-free "chmod this name, not following" (fchmodat ignores
        // AT_SYMLINK_NOFOLLOW). So: pin the inode with an O_PATH|O_NOFOLLOW fd, check what it is,
        // then chmod that very inode through an fd.
        let pin = open_beneath(
            root,
            self.dev,
            &comps,
            OFlags::PATH | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| fail(OP, loc, e))?;
        let pinned = Stat::from_raw(&rfs::fstat(&pin).map_err(|e| fail(OP, loc, e))?, self.dev);
        let flags = match pinned.kind {
            FileKind::Dir => OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            FileKind::File => OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
            FileKind::Symlink => {
                return Err(FsError::Refused {
                    op: OP,
                    path: loc.shown(),
                    why: "permissions are never set on a symlink",
                    source: None,
                })
            }
            FileKind::Other => return Err(not_a_file(OP, loc, pinned.kind)),
        };
        let perm = Mode::from_raw_mode(mode & PERM_MASK);
        match open_beneath(root, self.dev, &comps, flags, self.resolver) {
            Ok(fd) => {
                let st = Stat::from_raw(&rfs::fstat(&fd).map_err(|e| fail(OP, loc, e))?, self.dev);
                if (st.dev, st.ino) != (pinned.dev, pinned.ino) {
                    return Err(invalid(
                        OP,
                        loc,
                        "the entry was replaced while being changed",
                    ));
                }
                rfs::fchmod(&fd, perm).map_err(|e| fail(OP, loc, e))
            }
            // No read permission (e.g. a file at 0o000 being opened up): chmod the pinned
            // inode through its /proc/self/fd link. That link names exactly the inode we
            // checked above, so no symlink and no swapped entry can be reached through it.
            Err(Errno::ACCESS) => chmod_pinned(&pin, perm).map_err(|e| fail(OP, loc, e)),
            Err(e) => Err(fail(OP, loc, e)),
        }
    }

    /// Sets the modification time of `p` (not following a symlink at `p`); the access time
    /// stays what it is.
    ///
    /// Both times are given, the access time as read just before: the kernel reports a
    /// `utimensat` that sets the mtime alone as a content change (`IN_MODIFY`), which for a
    /// directory the watcher must take to stand for everything beneath it, and one that sets
    /// both as an attribute change (`IN_ATTRIB`), which it takes for the directory alone and
    /// the echo suppression recognises (docs/how-it-works.md, "Live sync").
    pub fn set_mtime(&self, p: &RelPath, mtime: Timestamp) -> Result<(), FsError> {
        const OP: &str = "set mtime";
        let loc = Loc::path(p);
        let mut times = mtime_only(OP, loc, mtime)?;
        let parent;
        let (dir, name) = if p.is_root() {
            (self.root.as_fd(), &b"."[..])
        } else {
            let (fd, name) = self.parent(OP, p, OFlags::PATH)?;
            parent = fd;
            (parent.as_fd(), name)
        };
        // Should the stat fail, the mtime alone is set, and `utimensat` says why if it fails too.
        if let Ok(st) = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            times.last_access = rfs::Timespec {
                tv_sec: to_i64(st.st_atime),
                tv_nsec: to_i64(st.st_atime_nsec),
            };
        }
        rfs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(OP, loc, e))
    }
}

/// Whether a symlink at `link` with target `target` stays inside the share root, judged on the
/// bytes alone (the scanner uses it to decide what to sync; [`ShareRoot::symlink`] to decide
/// what to create). True only if the target:
/// - is non-empty, at most `MAX_SYMLINK_TARGET_BYTES`, without NUL, and relative;
/// - has its `..` components only at the start: a `..` after a name would be resolved by the
///   kernel from wherever that name points if it is a symlink, so `x/../y` is not lexically
///   safe even when every link involved is contained (`l -> ..`, then `l/../..`);
/// - climbs (with those leading `..`) no higher than the root, starting from `link`'s parent;
/// - does not name the reserved `.vmsync` directory at the root.
///
/// `.` and empty components (`a//b`, a trailing `/`) are allowed anywhere. So `a/b -> ../c`
/// is contained, `a -> ../x` and `a/b -> ../../x` are not, and `.` is (it names `link`'s own
/// directory: a loop for whoever follows it, but not an escape, and vmsync never follows it).
pub fn symlink_target_is_contained(link: &RelPath, target: &[u8]) -> bool {
    if target.is_empty()
        || target.len() > MAX_SYMLINK_TARGET_BYTES
        || target.first() == Some(&b'/')
        || target.contains(&0)
    {
        return false;
    }
    // Depth of the directory the link lives in (the root is 0).
    let mut depth = link.depth().saturating_sub(1);
    let mut seen_name = false;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if seen_name {
                    return false;
                }
                match depth.checked_sub(1) {
                    Some(d) => depth = d,
                    None => return false,
                }
            }
            name => {
                if depth == 0 && is_reserved(name) {
                    return false;
                }
                seen_name = true;
                depth += 1;
            }
        }
    }
    true
}

/// chmod of the inode behind an `O_PATH` fd, through its `/proc/self/fd` link (`fchmod` refuses
/// `O_PATH` fds). The link resolves to exactly that inode, never to a path.
fn chmod_pinned(pin: &OwnedFd, perm: Mode) -> Result<(), Errno> {
    let link = format!("/proc/self/fd/{}", pin.as_raw_fd());
    rfs::chmodat(rfs::CWD, link.as_str(), perm, AtFlags::empty()).map_err(|e| {
        // Without /proc the answer is ENOENT, which would read as "the entry is gone".
        if e == Errno::NOENT {
            Errno::ACCESS
        } else {
            e
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vmsync_core::path::escape_bytes;

    fn p(s: &[u8]) -> RelPath {
        RelPath::from_bytes(s).unwrap()
    }

    #[test]
    fn symlink_containment_table() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"a/b", b"../c", true),
            (b"a/b", b"c", true),
            (b"a/b", b"c/d/e", true),
            (b"a/b", b"./c", true),
            (b"a/b", b"../c/", true),
            (b"a/b", b"..//c", true),
            (b"a/b/c", b"../../x", true),
            (b"a", b".", true),
            (b"a/b", b".", true),
            (b"a", b"..", false),
            (b"a/b", b"..", true),
            (b"a", b"../x", false),
            (b"a/b", b"../../x", false),
            (b"a/b", b"../../../x", false),
            (b"a", b"/abs", false),
            (b"a", b"/", false),
            (b"a", b"", false),
            (b"a", b"x\0y", false),
            // `..` after a name: not lexically safe (the name may be a symlink).
            (b"a/b", b"c/../d", false),
            (b"a/b", b"c/../../x", false),
            // The reserved directory is not a target, however it is reached.
            (b"a", b".vmsync", false),
            (b"a", b"./.vmsync/id", false),
            (b"a/b", b"../.vmsync", false),
            (b"a/b", b".vmsync", true),
            (b"a", b".vmsync2", true),
        ];
        for (link, target, want) in cases {
            assert_eq!(
                symlink_target_is_contained(&p(link), target),
                *want,
                "{} -> {}",
                escape_bytes(link),
                escape_bytes(target)
            );
        }
        let long = vec![b'a'; MAX_SYMLINK_TARGET_BYTES + 1];
        assert!(!symlink_target_is_contained(&p(b"a"), &long));
    }

    /// The fallback `set_mode` takes when it may not open the entry (never reached as root,
    /// which may open anything): chmod through the pinned O_PATH fd.
    #[test]
    fn chmod_through_pinned_fd() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
        let pin = rfs::open(
            &f,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        chmod_pinned(&pin, Mode::from_raw_mode(0o640)).unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o640
        );
    }
}
