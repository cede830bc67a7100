//! Directory fsyncs: every change to a directory's entries is made durable by an fsync of the
//! directory, at once, or, inside a [`Batch`], once per directory when the batch ends, on a few
//! threads (concurrent fsyncs share journal commits).

use super::error::{fail, invalid, Loc};
use super::trash::sync_trash;
use super::{FsError, FsErrorKind, ShareRoot};
use crate::faults::FaultOp;
use rustix::fd::OwnedFd;
use rustix::fs as rfs;
use rustix::io::Errno;
use vmsync_core::path::RelPath;

/// Threads that fsync a batch's changed directories.
const DIR_SYNC_THREADS: usize = 8;

const DIR_FSYNC_OP: &str = "fsync directory";

/// An open batch (see [`ShareRoot::batch`]): the directories its changes touched are fsynced
/// when it ends, once each. [`Batch::finish`] or [`Batch::finish_each`] ends it and says
/// whether the changes are durable; only then may they be recorded.
///
/// Dropped without being finished (an early return, a panic), it still fsyncs those
/// directories, logging each failure, so no batch is ever left open: later operations fsync
/// their directories at once again, and the trash batch is closed. A dropped batch tells its
/// caller nothing, so nothing it changed may be recorded as durable on its account.
///
/// There is one batch per root at a time: a second opened before the first ends joins it,
/// and whichever ends first ends both.
#[must_use = "a batch's changes are durable only once it is finished"]
#[derive(Debug)]
pub struct Batch<'r> {
    root: &'r ShareRoot,
    /// Until finished: the drop then has the directories to fsync.
    open: bool,
}

impl Batch<'_> {
    /// Ends the batch: fsyncs every directory changed since [`ShareRoot::batch`]. Until this
    /// returns `Ok`, the batch's changes may not survive a crash: do not record them.
    pub fn finish(self) -> Result<(), FsError> {
        match self.finish_each().into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Batch::finish`], going on past a directory whose fsync fails: returns each such
    /// directory with its error. The changes made in those directories are in place but may
    /// not survive a crash (do not record them); those elsewhere are durable.
    pub fn finish_each(mut self) -> Vec<(RelPath, FsError)> {
        self.open = false;
        self.root.end_batch()
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        for (dir, e) in self.root.end_batch() {
            tracing::warn!(dir = %dir.escaped(), "fsync at the end of an unfinished batch: {e}");
        }
    }
}

impl ShareRoot {
    /// Opens a batch: until it ends, operations that change a directory's entries (mkdir,
    /// symlink, remove, commit) record the directory instead of fsyncing it, so a batch
    /// touching many entries of one directory fsyncs it once. Finish the returned [`Batch`];
    /// dropped unfinished, it still fsyncs what it deferred.
    pub fn batch(&self) -> Batch<'_> {
        if let Ok(mut d) = self.dirty_dirs.lock() {
            d.get_or_insert_with(Default::default);
        }
        if let Ok(mut t) = self.trash_batch.lock() {
            t.in_batch = true;
        }
        Batch {
            root: self,
            open: true,
        }
    }

    /// Ends the open batch: fsyncs the trash directories and every directory changed since
    /// [`ShareRoot::batch`], going on past failures; returns each directory whose fsync failed,
    /// with its error.
    fn end_batch(&self) -> Vec<(RelPath, FsError)> {
        // The trash first: a kept version must be durable no later than what replaced it. If
        // it cannot be made durable, the batch's changes are reported as not durable either
        // (under the root: the caller fails what it cannot vouch for).
        let mut failed = Vec::new();
        if let Err(e) = self.take_trash_batch().and_then(|fds| sync_trash(&fds)) {
            failed.push((RelPath::root(), e));
        }
        let dirs: Vec<RelPath> = self
            .dirty_dirs
            .lock()
            .ok()
            .and_then(|mut d| d.take())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let sync = |d: &RelPath| self.fsync_dir(d).err().map(|e| (d.clone(), e));
        // One directory (a live edit) is synced here: a thread would only add its start-up.
        if dirs.len() <= 1 {
            failed.extend(dirs.iter().filter_map(sync));
            return failed;
        }
        // Concurrent fsyncs of different directories share journal commits.
        let per_thread = dirs.len().div_ceil(DIR_SYNC_THREADS);
        std::thread::scope(|scope| {
            let workers: Vec<_> = dirs
                .chunks(per_thread)
                .map(|slice| scope.spawn(move || slice.iter().filter_map(sync).collect::<Vec<_>>()))
                .collect();
            for (w, slice) in workers.into_iter().zip(dirs.chunks(per_thread)) {
                match w.join() {
                    Ok(list) => failed.extend(list),
                    Err(_) => failed.extend(slice.iter().map(|d| {
                        (
                            d.clone(),
                            invalid(DIR_FSYNC_OP, Loc::path(d), "a worker panicked"),
                        )
                    })),
                }
            }
            failed
        })
    }

    fn fsync_dir(&self, dir: &RelPath) -> Result<(), FsError> {
        match self.open_dir(dir) {
            Ok(handle) => {
                if let Some(e) = self.injected(FaultOp::DirFsync, dir) {
                    return Err(fail(DIR_FSYNC_OP, Loc::path(dir), e));
                }
                rfs::fsync(&handle.fd).map_err(|e| fail(DIR_FSYNC_OP, Loc::path(dir), e))
            }
            // Removed or replaced later in the same batch: what matters now is its parent's
            // entry, and the parent is in the set too.
            Err(e) if matches!(e.kind(), FsErrorKind::NotFound | FsErrorKind::NotADirectory) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the change just made in `dir` (the parent of `p`) durable, now or, in a batch,
    /// when the [`Batch`] ends.
    pub(super) fn sync_parent(&self, dir: &OwnedFd, p: &RelPath) -> Result<(), Errno> {
        if let Ok(mut d) = self.dirty_dirs.lock() {
            if let Some(set) = d.as_mut() {
                set.insert(p.parent().unwrap_or_default());
                return Ok(());
            }
        }
        rfs::fsync(dir)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A batch left by an early return still ends: what it deferred is fsynced, and the next
    /// change fsyncs its directory at once again.
    #[test]
    fn a_batch_dropped_unfinished_ends_all_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(tmp.path()).unwrap();
        let made = || -> Result<(), FsError> {
            let _batch = root.batch();
            root.mkdir(&RelPath::from_bytes(b"d").unwrap(), 0o755)?;
            let deferred = root.dirty_dirs.lock().unwrap().clone().unwrap_or_default();
            assert!(
                deferred.contains(&RelPath::root()),
                "deferred to the batch's end"
            );
            Err(invalid(
                "test",
                Loc::path(&RelPath::root()),
                "an early return",
            ))
        };
        assert!(made().is_err());
        assert!(
            root.dirty_dirs.lock().unwrap().is_none(),
            "no batch left open"
        );
        assert!(!root.trash_batch.lock().unwrap().in_batch);
        assert!(tmp.path().join("d").is_dir());
    }
}
