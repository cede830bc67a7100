//! Filesystem faults: how a failed write, fsync, mkdir or rename is worded for `status`, and
//! (with the `faults` cargo feature, for tests only) a registry that makes those operations
//! fail on demand.
//!
//! Without the feature the registry does not exist: [`injected`] is a constant `None` and
//! nothing here reads the environment or keeps global state. With it, a test names a share
//! root (by its directory: its device and inode are recorded), an operation, a share-relative
//! path and an errno; the operation on that path under that root then fails with that errno
//! until [`clear`] (see `docs/safety.md`, "Faults and full disks").

use crate::root::FsError;
use rustix::io::Errno;
use vmsync_core::RelPath;

/// An operation a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// Writing chunk data into a staged temp file (`stage` and `supply`).
    Write,
    /// The fsync of a staged temp file (its seal).
    Fsync,
    /// Creating a directory.
    Mkdir,
    /// Putting a temp file in place (`renameat`, or `linkat` for a new file).
    Rename,
    /// The fsync of a directory at the end of a transition batch (the path is the directory).
    DirFsync,
}

impl FaultOp {
    /// The word `status` uses for the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultOp::Write => "write",
            FaultOp::Fsync => "fsync",
            FaultOp::Mkdir => "mkdir",
            FaultOp::Rename => "rename",
            FaultOp::DirFsync => "directory fsync",
        }
    }
}

/// The problem text for a failed filesystem operation: `"<op> failed: no space left on
/// device"`, `"<op> failed: I/O error"` (also for a disk quota or a read-only filesystem,
/// which say so), or the error itself for anything else.
pub fn fault_reason(op: FaultOp, e: &FsError) -> String {
    match e.errno() {
        Some(errno) => errno_reason(op, errno).unwrap_or_else(|| e.to_string()),
        None => e.to_string(),
    }
}

/// [`fault_reason`] for an I/O error from outside the root module (writing a temp file).
pub fn io_reason(op: FaultOp, e: &std::io::Error) -> String {
    e.raw_os_error()
        .and_then(|n| errno_reason(op, Errno::from_raw_os_error(n)))
        .unwrap_or_else(|| format!("{} failed: {e}", op.as_str()))
}

fn errno_reason(op: FaultOp, errno: Errno) -> Option<String> {
    let what = match errno {
        Errno::NOSPC => "no space left on device",
        Errno::DQUOT => "no space left on device (disk quota exceeded)",
        Errno::IO => "I/O error",
        Errno::ROFS => "I/O error (read-only filesystem)",
        _ => return None,
    };
    Some(format!("{} failed: {what}", op.as_str()))
}

/// What a temp file needs to look its faults up later (its fsync runs on another thread, away
/// from its path): the root's device and inode and the path it is for. Empty without the
/// `faults` feature.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tag(#[cfg(feature = "faults")] Option<((u64, u64), RelPath)>);

impl Tag {
    #[cfg(feature = "faults")]
    pub(crate) fn new(root: (u64, u64), path: &RelPath) -> Tag {
        Tag(Some((root, path.clone())))
    }

    #[cfg(not(feature = "faults"))]
    pub(crate) fn new(_root: (u64, u64), _path: &RelPath) -> Tag {
        Tag()
    }

    pub(crate) fn injected(&self, op: FaultOp) -> Option<Errno> {
        #[cfg(feature = "faults")]
        if let Some((root, path)) = &self.0 {
            return injected(*root, op, path);
        }
        let _ = op;
        None
    }
}

/// The errno injected for `op` on `path` under the root of this device and inode, if any.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub(crate) fn injected(_root: (u64, u64), _op: FaultOp, _path: &RelPath) -> Option<Errno> {
    None
}

#[cfg(feature = "faults")]
pub use registry::{clear, inject};

#[cfg(feature = "faults")]
pub(crate) use registry::injected;

#[cfg(feature = "faults")]
mod registry {
    use super::FaultOp;
    use rustix::io::Errno;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::Mutex;
    use vmsync_core::RelPath;

    struct Fault {
        root: (u64, u64),
        op: FaultOp,
        path: RelPath,
        errno: Errno,
    }

    static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

    /// From now on, `op` on `path` (share-relative) under the share root `root` fails with
    /// `errno`, until [`clear`]. Errors: `root` cannot be stat'ed.
    pub fn inject(root: &Path, op: FaultOp, path: &RelPath, errno: Errno) -> std::io::Result<()> {
        let meta = std::fs::metadata(root)?;
        if let Ok(mut faults) = FAULTS.lock() {
            faults.push(Fault {
                root: (meta.dev(), meta.ino()),
                op,
                path: path.clone(),
                errno,
            });
        }
        Ok(())
    }

    /// Removes every fault injected under `root`.
    pub fn clear(root: &Path) -> std::io::Result<()> {
        let meta = std::fs::metadata(root)?;
        if let Ok(mut faults) = FAULTS.lock() {
            faults.retain(|f| f.root != (meta.dev(), meta.ino()));
        }
        Ok(())
    }

    pub(crate) fn injected(root: (u64, u64), op: FaultOp, path: &RelPath) -> Option<Errno> {
        let faults = FAULTS.lock().ok()?;
        faults
            .iter()
            .find(|f| f.root == root && f.op == op && f.path == *path)
            .map(|f| f.errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_operation_and_the_cause() {
        let p = RelPath::from_bytes(b"a/b").unwrap_or_default();
        let cases: &[(FaultOp, Errno, &str)] = &[
            (
                FaultOp::Write,
                Errno::NOSPC,
                "write failed: no space left on device",
            ),
            (FaultOp::Fsync, Errno::IO, "fsync failed: I/O error"),
            (
                FaultOp::Mkdir,
                Errno::NOSPC,
                "mkdir failed: no space left on device",
            ),
            (FaultOp::Rename, Errno::IO, "rename failed: I/O error"),
            (
                FaultOp::DirFsync,
                Errno::DQUOT,
                "directory fsync failed: no space left on device (disk quota exceeded)",
            ),
        ];
        for (op, errno, want) in cases {
            let e = FsError::Sys {
                op: "x",
                path: p.to_string(),
                source: *errno,
            };
            assert_eq!(fault_reason(*op, &e), *want);
            let io = std::io::Error::from_raw_os_error(errno.raw_os_error());
            assert_eq!(io_reason(*op, &io), *want);
        }
        let other = FsError::Sys {
            op: "x",
            path: "p".into(),
            source: Errno::PERM,
        };
        assert_eq!(fault_reason(FaultOp::Write, &other), other.to_string());
    }
}
