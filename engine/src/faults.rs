//! Filesystem faults: how a failed write, fsync, mkdir or rename is worded for `status`, and
//! (with the `faults` cargo feature, for tests only) a registry that makes those operations
//! fail on demand.
//!
//! Without the feature the registry does not exist: [`injected`] is a constant `None` and
//! nothing here reads the environment or keeps global state. With it, a test names a share
//! root (by its directory: its device and inode are recorded), an operation, a share-relative
//! path and an errno; the operation on that path under that root then fails with that errno
//! until [`clear`] (see `docs/safety.md`, "Faults and full disks"). A test can also run code of
//! its own at a [`Moment`] of sync's work on one file ([`at`]), to change the file at exactly
//! that point (`tests/tests/races.rs`).

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

/// A point in sync's work on one file where a test can run code of its own with [`at`] (the
/// `faults` feature): to change the file at exactly that moment, deterministically. Without the
/// feature, reaching a moment does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Moment {
    /// Reading and chunking a file (`scan::hash_file`: a scan hashing a new or changed file, or
    /// a destination checking a path its index cannot vouch for): right after its first chunk
    /// is cut, when the chunker has read at most its first `CHUNK_MAX_BYTES` (64 KiB) and
    /// nothing past them.
    FirstChunkCut,
    /// Putting a staged file in place: right before the `renameat` that replaces the path (the
    /// `linkat` of a new file), after the transition checked the path against what the scan
    /// saw and, for a replacement, kept the old version in the trash.
    BeforeRename,
    /// Putting a staged file in place over an existing one: right after the
    /// `renameat2(RENAME_EXCHANGE)` that put it at the path, before the agent looks at what
    /// came out (see `ShareRoot::swap_in`).
    AfterSwap,
    /// Appending to a file in place: after the file was checked to be the version sync
    /// knows, and no other program found writing it, right before the new bytes are written.
    BeforeAppendWrite,
}

/// Runs what a test set up with [`at`] for `moment` on `path` under the root of this device
/// and inode (nothing without the `faults` feature).
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub(crate) fn reached(_root: (u64, u64), _moment: Moment, _path: &RelPath) {}

/// The errno injected for `op` on `path` under the root of this device and inode, if any.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub(crate) fn injected(_root: (u64, u64), _op: FaultOp, _path: &RelPath) -> Option<Errno> {
    None
}

#[cfg(feature = "faults")]
pub use registry::{at, clear, inject};

#[cfg(feature = "faults")]
pub(crate) use registry::{injected, reached};

#[cfg(feature = "faults")]
mod registry {
    use super::{FaultOp, Moment};
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

    /// What a test runs once at a moment (see [`at`]).
    type Action = Box<dyn FnOnce() + Send>;

    struct Hook {
        root: (u64, u64),
        moment: Moment,
        path: RelPath,
        action: Action,
    }

    static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

    /// Runs `action` once, the next time `moment` is reached for `path` (share-relative) under
    /// the share root `root`, on the thread doing that work, which waits for it. Several hooks
    /// for the same moment and path run one each time, in the order they were set. [`clear`]
    /// drops those not run yet. Errors: `root` cannot be stat'ed.
    pub fn at(
        root: &Path,
        moment: Moment,
        path: &RelPath,
        action: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let meta = std::fs::metadata(root)?;
        if let Ok(mut hooks) = HOOKS.lock() {
            hooks.push(Hook {
                root: (meta.dev(), meta.ino()),
                moment,
                path: path.clone(),
                action: Box::new(action),
            });
        }
        Ok(())
    }

    pub(crate) fn reached(root: (u64, u64), moment: Moment, path: &RelPath) {
        let action = HOOKS.lock().ok().and_then(|mut hooks| {
            let i = hooks
                .iter()
                .position(|h| h.root == root && h.moment == moment && h.path == *path)?;
            Some(hooks.remove(i).action)
        });
        // Run outside the lock: the action may do anything, set another hook included.
        if let Some(action) = action {
            action();
        }
    }

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

    /// Removes every fault injected under `root`, and every hook set there and not run yet.
    pub fn clear(root: &Path) -> std::io::Result<()> {
        let meta = std::fs::metadata(root)?;
        if let Ok(mut faults) = FAULTS.lock() {
            faults.retain(|f| f.root != (meta.dev(), meta.ino()));
        }
        if let Ok(mut hooks) = HOOKS.lock() {
            hooks.retain(|h| h.root != (meta.dev(), meta.ino()));
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

    /// A hook runs once, only at its moment, path and root; hooks for one moment and path run
    /// one each time in the order they were set; `clear` drops those not run.
    #[cfg(feature = "faults")]
    #[test]
    fn a_hook_runs_once_at_its_moment_path_and_root_only() {
        use std::os::unix::fs::MetadataExt;
        use std::sync::{Arc, Mutex};
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = |d: &tempfile::TempDir| {
            let m = std::fs::metadata(d.path()).unwrap();
            (m.dev(), m.ino())
        };
        let (f, g) = (
            RelPath::from_bytes(b"f").unwrap(),
            RelPath::from_bytes(b"g").unwrap(),
        );
        let ran = Arc::new(Mutex::new(Vec::new()));
        for n in [1, 2] {
            let ran = Arc::clone(&ran);
            at(a.path(), Moment::BeforeRename, &f, move || {
                ran.lock().unwrap().push(n)
            })
            .unwrap();
        }
        let log = || ran.lock().unwrap().clone();
        reached(id(&a), Moment::FirstChunkCut, &f);
        reached(id(&a), Moment::BeforeRename, &g);
        reached(id(&b), Moment::BeforeRename, &f);
        assert_eq!(log(), Vec::<i32>::new(), "another moment, path or root");
        reached(id(&a), Moment::BeforeRename, &f);
        assert_eq!(log(), vec![1]);
        reached(id(&a), Moment::BeforeRename, &f);
        reached(id(&a), Moment::BeforeRename, &f);
        assert_eq!(log(), vec![1, 2], "each runs once");
        let r = Arc::clone(&ran);
        at(a.path(), Moment::FirstChunkCut, &f, move || {
            r.lock().unwrap().push(3)
        })
        .unwrap();
        clear(a.path()).unwrap();
        reached(id(&a), Moment::FirstChunkCut, &f);
        assert_eq!(log(), vec![1, 2], "cleared");
    }
}
