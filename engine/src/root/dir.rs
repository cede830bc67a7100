//! [`DirHandle`]: an open directory of the share, for walking it by fds (the scanner, the
//! trash walks) rather than by re-resolving paths from the root.

use super::error::{fail, invalid, Loc};
use super::resolve::{is_single_component, open_beneath};
use super::{open_regular, read_link_at, FsError, Resolver, Stat};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, OFlags};
use rustix::io::Errno;
use std::fs::File;
use vmsync_core::path::is_reserved;

/// An open directory of the share, for walking it by fds (the scanner) rather than by
/// re-resolving paths from the root.
#[derive(Debug)]
pub struct DirHandle {
    /// `O_RDONLY|O_DIRECTORY|O_CLOEXEC`, on the root's device.
    pub(super) fd: OwnedFd,
    pub(super) root_dev: u64,
    /// The root directory hides `.vmsync` from its listing and refuses to open it.
    pub(super) is_root: bool,
    /// For error messages only.
    pub(super) path: Box<[u8]>,
    pub(super) resolver: Resolver,
}

impl DirHandle {
    /// Every entry except `.` and `..` (and, in the root, `.vmsync`), each `lstat`ed relative to
    /// this directory, sorted by name bytes. Entries that vanish between listing and `lstat`
    /// are skipped.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Stat)>, FsError> {
        const OP: &str = "list directory";
        let loc = Loc {
            base: &self.path,
            name: None,
        };
        let dir = rfs::Dir::read_from(&self.fd).map_err(|e| fail(OP, loc, e))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| fail(OP, loc, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." || (self.is_root && is_reserved(name)) {
                continue;
            }
            match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => out.push((name.to_vec(), Stat::from_raw(&st, self.root_dev))),
                Err(Errno::NOENT) => {}
                Err(e) => {
                    return Err(fail(
                        OP,
                        Loc {
                            base: &self.path,
                            name: Some(name),
                        },
                        e,
                    ))
                }
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Opens the subdirectory `name`. A symlink or a mount point there → kind `Symlink`.
    pub fn open_subdir(&self, name: &[u8]) -> Result<DirHandle, FsError> {
        const OP: &str = "open directory";
        let loc = self.loc(name);
        self.check_name(OP, name)?;
        let fd = open_beneath(
            self.fd.as_fd(),
            self.root_dev,
            &[name],
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| fail(OP, loc, e))?;
        let mut path = Vec::with_capacity(self.path.len() + 1 + name.len());
        path.extend_from_slice(&self.path);
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        Ok(DirHandle {
            fd,
            root_dev: self.root_dev,
            is_root: false,
            path: path.into(),
            resolver: self.resolver,
        })
    }

    /// Opens the regular file `name`, as [`ShareRoot::open_file`](super::ShareRoot::open_file).
    pub fn open_file(&self, name: &[u8]) -> Result<(File, Stat), FsError> {
        const OP: &str = "open file";
        self.check_name(OP, name)?;
        open_regular(
            OP,
            self.fd.as_fd(),
            self.root_dev,
            self.resolver,
            name,
            self.loc(name),
        )
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &[u8]) -> Result<Vec<u8>, FsError> {
        const OP: &str = "read symlink";
        self.check_name(OP, name)?;
        read_link_at(OP, self.fd.as_fd(), name, self.loc(name))
    }

    /// `lstat` of the entry `name` in this directory; `None` if it does not exist.
    pub fn stat_entry(&self, name: &[u8]) -> Result<Option<Stat>, FsError> {
        const OP: &str = "stat";
        self.check_name(OP, name)?;
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat::from_raw(&st, self.root_dev))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(fail(OP, self.loc(name), e)),
        }
    }

    /// `fstat` of this directory.
    pub fn stat(&self) -> Result<Stat, FsError> {
        let st = rfs::fstat(&self.fd).map_err(|e| {
            fail(
                "stat",
                Loc {
                    base: &self.path,
                    name: None,
                },
                e,
            )
        })?;
        Ok(Stat::from_raw(&st, self.root_dev))
    }

    fn loc<'a>(&'a self, name: &'a [u8]) -> Loc<'a> {
        Loc {
            base: &self.path,
            name: Some(name),
        }
    }

    /// A name must be exactly one component: with a `/` in it, an `openat` would resolve
    /// several components, following symlinks on the way.
    fn check_name(&self, op: &'static str, name: &[u8]) -> Result<(), FsError> {
        let why = if !is_single_component(name) {
            "not a single file name"
        } else if self.is_root && is_reserved(name) {
            "the reserved directory is not share content"
        } else {
            return Ok(());
        };
        Err(invalid(op, self.loc(name), why))
    }
}
