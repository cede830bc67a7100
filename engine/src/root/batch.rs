//! Directory fsyncs: every change to a directory's entries is made durable by an fsync of the
//! directory, at once, or, inside a batch, once per directory when the batch ends, on a few
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

impl ShareRoot {
    /// Opens a batch: until [`ShareRoot::end_batch`], operations that change a directory's
    /// entries (mkdir, symlink, remove, commit) record the directory instead of fsyncing it,
    /// so a batch touching many entries of one directory fsyncs it once.
    pub fn begin_batch(&self) {
        if let Ok(mut d) = self.dirty_dirs.lock() {
            d.get_or_insert_with(Default::default);
        }
        if let Ok(mut t) = self.trash_batch.lock() {
            t.in_batch = true;
        }
    }

    /// Closes the batch: fsyncs every directory changed since [`ShareRoot::begin_batch`]. Until
    /// this returns `Ok`, the batch's changes may not survive a crash: do not record them.
    pub fn end_batch(&self) -> Result<(), FsError> {
        match self.end_batch_each().into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// [`ShareRoot::end_batch`], going on past a directory whose fsync fails: returns each
    /// such directory with its error. The changes made in those directories are in place but
    /// may not survive a crash (do not record them); those elsewhere are durable.
    pub fn end_batch_each(&self) -> Vec<(RelPath, FsError)> {
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

    /// Makes the change just made in `dir` (the parent of `p`) durable, now or at
    /// [`ShareRoot::end_batch`].
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
