//! Transitions: each change is checked against what the scan saw, then put in place (a staged
//! file renamed or appended in place, a directory or symlink made, an entry removed), what it
//! replaces or deletes kept in the trash first. Staged files not sealed yet are sealed before,
//! a few at a time; the directories written into keep their times; the batch's directories
//! are fsynced before anything is recorded. `put_back` returns kept entries from the trash.

use super::source::OpenFiles;
use super::stage::{write_at, Staged, StagedAppend};
use super::{io_err, LocalShare};
use crate::chunk::hash_chunk;
use crate::faults::{fault_reason, FaultOp};
use crate::index::{Identity, IndexRecord};
use crate::root::{Appended, FileKind, FsError, FsErrorKind, SealJob, Sealed, ShareRoot};
use crate::scan::hash_file;
use crate::seal::SealHandle;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use vmsync_core::endpoint::{Change, EndpointError, Outcome};
use vmsync_core::entry::PERM_MASK;
use vmsync_core::{Entry, FileMeta, RelPath, Timestamp};

impl LocalShare {
    pub(super) fn transition(
        &mut self,
        changes: Vec<Change>,
    ) -> Result<Vec<Outcome>, EndpointError> {
        // Below the reserve nothing new is made (removals, which free space, still go).
        if changes.iter().any(|c| c.new.is_some()) {
            self.check_room(0)?;
        }
        let share_root = self.shared_root()?;
        let batch = share_root.batch();
        let clock = std::time::Instant::now();
        let seals = self.seal_staged(&changes);
        let sealed = clock.elapsed();
        let (mut checking, mut applying) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let count = changes.len();
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut index_changes: Vec<(RelPath, Option<IndexRecord>)> = Vec::new();
        let mut paths = Vec::with_capacity(changes.len());
        let mut parents = ParentTimes::default();
        // Directories whose own time or mode this batch set: their watcher events are echoes.
        let mut attrs_set = Vec::new();
        for change in changes {
            paths.push(change.path.clone());
            let step = std::time::Instant::now();
            let current = self.current(&change.path);
            checking += step.elapsed();
            let step = std::time::Instant::now();
            let will_apply =
                matches!(&current, Ok(c) if still_expected(c.as_ref(), change.expected.as_ref()));
            if let (true, Some(root)) = (will_apply, self.root.as_ref()) {
                parents.before_write(root, &change.path);
            }
            let outcome = match current {
                Err(reason) => Outcome::Failed(reason),
                Ok(current) if !still_expected(current.as_ref(), change.expected.as_ref()) => {
                    Outcome::Changed(current)
                }
                Ok(current) => match self.apply(&change, current.as_ref()) {
                    Ok(record) => {
                        // Whatever the path is now, it has no other name until linked below.
                        self.links.set(&change.path, None);
                        if let Some(Entry::Dir { mtime, .. }) = &change.new {
                            parents.set(&change.path, *mtime);
                            if matches!(current, Some(Entry::Dir { .. })) {
                                attrs_set.push(change.path.clone());
                            }
                        }
                        match (&change.new, &record) {
                            (Some(Entry::File(_)), Some(r)) => {
                                self.echoes.insert(change.path.clone(), Some(r.identity));
                            }
                            (None, _) => {
                                self.echoes.insert(change.path.clone(), None);
                            }
                            _ => {}
                        }
                        index_changes.push((change.path.clone(), record));
                        Outcome::Applied
                    }
                    // Something appeared there since it was checked: decide again with it.
                    Err(ApplyError::Appeared) => match self.current(&change.path) {
                        Ok(now) => Outcome::Changed(now),
                        Err(reason) => Outcome::Failed(reason),
                    },
                    Err(ApplyError::Failed(reason)) => Outcome::Failed(reason),
                },
            };
            applying += step.elapsed();
            outcomes.push(outcome);
        }
        // Links go in before the parents' times are put back: they rename into those too.
        if !self.to_link.is_empty() {
            self.link_committed(&mut index_changes);
        }
        let root = self.root()?;
        let set: Vec<(RelPath, Identity)> = attrs_set
            .into_iter()
            .filter_map(|dir| match root.stat(&dir) {
                Ok(Some(st)) if st.kind == FileKind::Dir => Some((dir, Identity::of(&st))),
                _ => None,
            })
            .collect();
        let restored = parents.restore(root, &self.name);
        for (dir, left) in set.into_iter().chain(restored) {
            self.dir_echoes.insert(dir, Some(left));
        }
        // Nothing is recorded or acknowledged before the directories are durable.
        let step = std::time::Instant::now();
        let unsynced = batch.finish_each();
        if !unsynced.is_empty() {
            // In place but maybe not durable: not recorded, and failed, so that a later cycle
            // (which finds them done) records them once their directory is synced.
            let reasons: HashMap<RelPath, String> = unsynced
                .into_iter()
                .map(|(dir, e)| {
                    tracing::warn!(share = %self.name, dir = %dir.escaped(), "{e}");
                    (dir, fault_reason(FaultOp::DirFsync, &e))
                })
                .collect();
            for (path, outcome) in paths.iter().zip(outcomes.iter_mut()) {
                let dir = path.parent().unwrap_or_default();
                if let (Outcome::Applied, Some(reason)) = (&*outcome, reasons.get(&dir)) {
                    *outcome = Outcome::Failed(reason.clone());
                    index_changes.retain(|(p, _)| p != path);
                    self.echoes.remove(path);
                }
            }
        }
        let synced = step.elapsed();
        let step = std::time::Instant::now();
        let changes = index_changes.iter().map(|(p, r)| (p, r.as_ref()));
        self.index.apply(changes).map_err(io_err)?;
        self.share_bytes
            .store(self.index.bytes(), Ordering::Relaxed);
        self.tell_pruner(false);
        tracing::debug!(
            share = %self.name,
            changes = count,
            early = seals.early,
            waited = seals.waited,
            claimed = seals.claimed,
            inline = seals.inline,
            "transition: staged files sealed in {} us, checked in {} us, applied in {} us, \
             directories synced in {} us, indexed in {} us",
            sealed.as_micros(),
            checking.as_micros(),
            applying.as_micros(),
            synced.as_micros(),
            step.elapsed().as_micros()
        );
        Ok(outcomes)
    }

    /// Makes sure the complete staged files these changes will commit are sealed (mode, mtime,
    /// fsync). Most were handed to the background sealer as they completed: this takes the
    /// results of those that finished, waits for those still running, and runs those not
    /// started yet (or never handed over) itself, on a few threads: concurrent fsyncs let the
    /// filesystem and the disk merge their work. A temp whose seal fails is dropped; its change
    /// then fails. A temp whose seal result is missing (a worker gone) stays unsealed, and its
    /// commit seals it.
    fn seal_staged(&mut self, changes: &[Change]) -> SealCounts {
        let mut counts = SealCounts::default();
        let Some(root) = self.root.as_ref() else {
            return counts;
        };
        let wanted: HashMap<&RelPath, &FileMeta> = changes
            .iter()
            .filter_map(|c| match &c.new {
                Some(Entry::File(m)) => Some((&c.path, m)),
                _ => None,
            })
            .collect();
        let mut items: Vec<(&RelPath, &mut Staged)> = self
            .staged
            .iter_mut()
            .filter(|(p, s)| {
                s.missing.is_empty()
                    && wanted.get(p).is_some_and(|m| m.digest == s.meta.digest)
                    && !s.temp.is_sealed(s.meta.mode, s.meta.mtime)
            })
            .collect();
        if items.is_empty() {
            return counts;
        }
        // Which seals to run here (not started by a worker, or never submitted) and which to
        // wait for, by index into `items`. Claiming a queued job first keeps a worker from
        // starting it behind our back.
        let mut jobs: Vec<(usize, SealJob)> = Vec::new();
        let mut waits: Vec<(usize, SealHandle)> = Vec::new();
        let mut failed: Vec<(RelPath, String)> = Vec::new();
        for (i, (path, staged)) in items.iter_mut().enumerate() {
            let (mode, mtime) = (staged.meta.mode, staged.meta.mtime);
            match staged.seal.take() {
                Some(handle) => match handle.claim() {
                    Some(job) => {
                        counts.claimed += 1;
                        jobs.push((i, job));
                    }
                    None => {
                        if handle.is_done() {
                            counts.early += 1;
                        } else {
                            counts.waited += 1;
                        }
                        waits.push((i, handle));
                    }
                },
                None => {
                    counts.inline += 1;
                    match staged.temp.seal_job(mode, mtime) {
                        Ok(job) => jobs.push((i, job)),
                        // No descriptor to spare for a dup: seal through the temp's own.
                        Err(_) => {
                            if let Err(e) = root.seal_temp(&mut staged.temp, mode, mtime) {
                                tracing::warn!(path = %path.escaped(), "fsync of staged file failed: {e}");
                                failed.push(((*path).clone(), fault_reason(FaultOp::Fsync, &e)));
                            }
                        }
                    }
                }
            }
        }
        let mut results: Vec<(usize, Option<Result<Sealed, FsError>>)> = Vec::new();
        let per_thread = jobs.len().div_ceil(SEAL_THREADS).max(1);
        let run = |slice: Vec<(usize, SealJob)>| -> Vec<(usize, Option<Result<Sealed, FsError>>)> {
            slice
                .into_iter()
                .map(|(i, job)| (i, Some(job.run())))
                .collect()
        };
        let mut slices: Vec<Vec<(usize, SealJob)>> = Vec::new();
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            slices.push(jobs.by_ref().take(per_thread).collect());
        }
        // The calling thread runs the first slice, then waits for the background's seals: a
        // live edit's one file costs no thread.
        std::thread::scope(|scope| {
            let mut slices = slices.into_iter();
            let first = slices.next();
            let workers: Vec<_> = slices
                .map(|slice| scope.spawn(move || run(slice)))
                .collect();
            if let Some(slice) = first {
                results.extend(run(slice));
            }
            for (i, handle) in waits {
                results.push((i, handle.wait()));
            }
            for w in workers {
                // A panicked thread's temps stay unsealed; their commits seal them.
                results.extend(w.join().unwrap_or_default());
            }
        });
        for (i, result) in results {
            let Some((path, staged)) = items.get_mut(i) else {
                continue;
            };
            match result {
                Some(Ok(proof)) => {
                    staged.temp.accept_seal(proof);
                }
                Some(Err(e)) => {
                    tracing::warn!(path = %path.escaped(), "fsync of staged file failed: {e}");
                    failed.push(((*path).clone(), fault_reason(FaultOp::Fsync, &e)));
                }
                None => {}
            }
        }
        for (path, reason) in failed {
            self.unstage(&path);
            self.fault(path, reason);
        }
        counts
    }

    /// What `path` is on disk right now, hashing it if the index cannot vouch for it.
    fn current(&mut self, path: &RelPath) -> Result<Option<Entry>, String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let Some(stat) = root.stat(path).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        Ok(Some(match stat.kind {
            FileKind::Dir => Entry::Dir {
                mode: stat.mode & PERM_MASK,
                mtime: stat.mtime,
            },
            FileKind::Symlink => Entry::Symlink {
                target: root.read_link(path).map_err(|e| e.to_string())?,
                mtime: stat.mtime,
            },
            FileKind::Other => return Err("a special file is in the way".into()),
            FileKind::File => {
                let mode = stat.mode & PERM_MASK;
                match self.index.get(path) {
                    Some(rec) if rec.identity == Identity::of(&stat) => {
                        Entry::File(FileMeta { mode, ..rec.meta })
                    }
                    _ => {
                        let rec = hash_file(root, path)?;
                        let meta = rec.meta;
                        if let Err(e) = self.index.apply([(path, Some(&rec))]) {
                            tracing::debug!(path = %path.escaped(), "indexing: {e}");
                        }
                        Entry::File(meta)
                    }
                }
            }
        }))
    }

    /// Makes `path` hold `change.new`; `current` is what is there (already checked against
    /// `change.expected`). Returns the index record for the path afterwards (`None`: not a file).
    fn apply(
        &mut self,
        change: &Change,
        current: Option<&Entry>,
    ) -> Result<Option<IndexRecord>, ApplyError> {
        let path = &change.path;
        let fs = |e: FsError| e.to_string();
        let mkdir = |e: FsError| fault_reason(FaultOp::Mkdir, &e);
        match &change.new {
            None => {
                self.remove(path, current)?;
                Ok(None)
            }
            Some(Entry::Dir { mode, mtime }) => {
                let root = self.root().map_err(|e| e.to_string())?;
                match current {
                    Some(Entry::Dir { mode: m, .. }) if m == mode => {}
                    Some(Entry::Dir { .. }) => root.set_mode(path, *mode).map_err(fs)?,
                    Some(old) => {
                        self.keep(path, old, false)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.mkdir_at(path, *mode, Some(*mtime)).map_err(mkdir)?;
                        return Ok(None);
                    }
                    None => {
                        root.mkdir_at(path, *mode, Some(*mtime)).map_err(mkdir)?;
                        return Ok(None);
                    }
                }
                // The directory's own time; what lands beneath it later in this batch leaves
                // it alone (see `ParentTimes`).
                let root = self.root().map_err(|e| e.to_string())?;
                if current.map(Entry::mtime) != Some(*mtime) {
                    root.set_mtime(path, *mtime).map_err(fs)?;
                }
                Ok(None)
            }
            Some(Entry::Symlink { target, mtime }) => {
                match current {
                    // Same link, another time: a metadata update in place, nothing replaced.
                    Some(Entry::Symlink { target: t, .. }) if t == target => {}
                    Some(Entry::Dir { .. }) => {
                        self.remove(path, current)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.symlink(path, target).map_err(fs)?;
                    }
                    // Kept first, then replaced in one rename: the path is never empty.
                    Some(old) => {
                        let kept = self.keep(path, old, true)?;
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.replace_with_symlink_at(path, target, Some(*mtime), kept)
                            .map_err(fs)?;
                        return Ok(None);
                    }
                    None => {
                        let root = self.root().map_err(|e| e.to_string())?;
                        root.symlink(path, target).map_err(fs)?;
                    }
                }
                let root = self.root().map_err(|e| e.to_string())?;
                root.set_mtime(path, *mtime).map_err(fs)?;
                Ok(None)
            }
            Some(Entry::File(meta)) => self.apply_file(path, meta, current).map(Some),
        }
    }

    fn apply_file(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        current: Option<&Entry>,
    ) -> Result<IndexRecord, ApplyError> {
        let fs = |e: FsError| e.to_string();
        // Same content already there: only metadata changes, no data moves.
        if let Some(Entry::File(cur)) = current {
            if cur.digest == meta.digest && cur.size == meta.size {
                self.unstage(path);
                let root = self.root().map_err(|e| e.to_string())?;
                // Never through to a name outside the share (or a version in the trash): the
                // file is replaced by a copy with the new mode and mtime instead.
                let nlink = root.stat(path).map_err(fs)?.map_or(1, |st| st.nlink);
                if nlink > self.links.names_in_share(path) {
                    return self.replace_with_copy(path, meta, current);
                }
                root.set_mode(path, meta.mode).map_err(fs)?;
                root.set_mtime(path, meta.mtime).map_err(fs)?;
                let stat = root
                    .stat(path)
                    .map_err(fs)?
                    .ok_or("vanished while updating metadata")?;
                let manifest = self
                    .index
                    .get(path)
                    .map(|r| r.manifest())
                    .unwrap_or_default();
                return Ok(IndexRecord::new(Identity::of(&stat), *meta, &manifest));
            }
        }
        match self.staged.get(path) {
            Some(s) if s.meta.digest != meta.digest => return Err("content was not staged".into()),
            Some(s) if !s.missing.is_empty() => return Err("staged file is incomplete".into()),
            _ => {}
        }
        let Some(mut staged) = self.staged.remove(path) else {
            return Err(match self.faulted.remove(path) {
                Some(reason) => reason.into(),
                None => "content was not staged".into(),
            });
        };
        let root = self.root().map_err(|e| e.to_string())?;
        // `seal_staged` settled every seal this commit could meet; should one still be out,
        // it must finish (or be taken back) before the temp is renamed, and a failure is final.
        if let Some(handle) = staged.seal.take() {
            let result = match handle.claim() {
                Some(job) => Some(job.run()),
                None => handle.wait(),
            };
            match result {
                Some(Ok(proof)) => {
                    staged.temp.accept_seal(proof);
                }
                Some(Err(e)) => {
                    root.discard_temp(staged.temp);
                    return Err(fault_reason(FaultOp::Fsync, &e).into());
                }
                None => {}
            }
        }
        if let Some(append) = staged.append.take() {
            match self.append_in_place(path, meta, current, &staged, append) {
                Ok(Some(record)) => {
                    if let Ok(root) = self.root() {
                        root.discard_temp(staged.temp);
                    }
                    return Ok(record);
                }
                // Not an append after all: the temp gets its head and replaces the file.
                Ok(None) => {
                    if let Err(reason) = self.fill_head(path, meta, &mut staged, append) {
                        if let Ok(root) = self.root() {
                            root.discard_temp(staged.temp);
                        }
                        return Err(reason.into());
                    }
                }
                Err(e) => {
                    if let Ok(root) = self.root() {
                        root.discard_temp(staged.temp);
                    }
                    return Err(e);
                }
            }
        }
        let root = self.root().map_err(|e| e.to_string())?;
        let mut kept = None;
        match current {
            Some(Entry::Dir { .. }) => {
                if let Err(e) = root.remove_dir(path) {
                    root.discard_temp(staged.temp);
                    return Err(e.to_string().into());
                }
            }
            // The old version is kept (a second link in the trash) before the rename replaces
            // it; if it cannot be kept, it is not replaced.
            Some(old) => match self.keep(path, old, true) {
                Ok(ino) => kept = Some(ino),
                Err(e) => {
                    let root = self.root().map_err(|e| e.to_string())?;
                    root.discard_temp(staged.temp);
                    return Err(e.into());
                }
            },
            None => {}
        }
        let root = self.root().map_err(|e| e.to_string())?;
        // Where nothing was, nothing is replaced: a file someone created since the check
        // stays, and the change is decided again. Where something was, only what was kept
        // is replaced.
        let committed = match kept {
            None => root.commit_temp_new(staged.temp, path, meta.mode, meta.mtime),
            Some(ino) => root.commit_temp(staged.temp, path, meta.mode, meta.mtime, ino),
        };
        let stat = committed.map_err(|e| match e.kind() {
            FsErrorKind::Exists | FsErrorKind::NotAFile if current.is_none() => {
                ApplyError::Appeared
            }
            // The commit seals a temp not sealed yet, then renames it.
            _ if e.op() == crate::root::SEAL_OP => {
                ApplyError::Failed(fault_reason(FaultOp::Fsync, &e))
            }
            _ => ApplyError::Failed(fault_reason(FaultOp::Rename, &e)),
        })?;
        let record = IndexRecord::new(Identity::of(&stat), *meta, &staged.manifest);
        if !staged.manifest.links.is_empty() {
            self.to_link.push((path.clone(), staged.manifest.links));
        }
        Ok(record)
    }

    /// Links each file this transition committed to the other names its source gave it, where
    /// this side holds one with the same content and metadata (committed now or before): the
    /// share's hard links come out as hard links here too. The committed copy goes (it is the
    /// same content); nothing else is replaced. Updates the records and echoes of both names.
    /// Best effort: a name that changed meanwhile is left as it is, a plain copy.
    fn link_committed(&mut self, index_changes: &mut Vec<(RelPath, Option<IndexRecord>)>) {
        let to_link = std::mem::take(&mut self.to_link);
        let Some(root) = self.root.as_ref() else {
            return;
        };
        for (path, others) in to_link {
            let Some(mine) = index_changes
                .iter()
                .rev()
                .find(|(p, _)| *p == path)
                .and_then(|(_, r)| r.clone())
            else {
                continue;
            };
            for other in others {
                let theirs = match index_changes.iter().rev().find(|(p, _)| *p == other) {
                    Some((_, r)) => r.clone(),
                    None => self.index.get(&other),
                };
                let Some(theirs) = theirs else { continue };
                let (a, b) = (&mine.identity, &theirs.identity);
                if (a.dev, a.ino) == (b.dev, b.ino) {
                    break;
                }
                if theirs.meta != mine.meta {
                    continue;
                }
                match root.link_over(&other, b, &path, a) {
                    Ok(st) => {
                        let identity = Identity::of(&st);
                        for (name, rec) in [(&path, &mine), (&other, &theirs)] {
                            let mut rec = rec.clone();
                            rec.identity = identity;
                            index_changes.push((name.clone(), Some(rec)));
                            self.echoes.insert(name.clone(), Some(identity));
                            self.links.set(name, Some((st.dev, st.ino)));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(share = %self.name, path = %path.escaped(), other = %other.escaped(), "not linked: {e}");
                    }
                }
            }
        }
    }

    /// Appends the staged tail of an append-staged file to the file at `path` in place, if it
    /// still is the old version the plan was made against (`current`, checked against the
    /// change, has its digest, and the open file has the identity the index recorded for it)
    /// and the new bytes at the old last chunk are that chunk. `Ok(None)`: not an append
    /// (the new bytes there differ); `Appeared`: the file changed under us.
    fn append_in_place(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        current: Option<&Entry>,
        staged: &Staged,
        append: StagedAppend,
    ) -> Result<Option<IndexRecord>, ApplyError> {
        let Some(Entry::File(cur)) = current else {
            return Ok(None);
        };
        let expected = match self.index.get(path) {
            Some(rec)
                if cur.digest == append.old_digest && rec.meta.digest == append.old_digest =>
            {
                rec.identity
            }
            _ => return Ok(None),
        };
        if let Some((hash, len)) = append.verify {
            let mut buf = vec![0u8; len as usize];
            let same = staged
                .temp
                .file
                .read_exact_at(&mut buf, append.from)
                .is_ok()
                && hash_chunk(&buf) == hash;
            if !same {
                return Ok(None);
            }
        }
        // The tail to write: past the old end, zero chunks left as holes (set_len last, so a
        // reader never sees zeros ahead of data).
        let old_size = append.old_size;
        let zeros = &self.zeros;
        let ranges: Vec<(u64, u64)> = staged
            .manifest
            .chunks
            .iter()
            .filter(|c| c.offset + u64::from(c.len) > old_size && !zeros.is_zero(c))
            .map(|c| (c.offset.max(old_size), c.offset + u64::from(c.len)))
            .collect();
        let temp = &staged.temp.file;
        let size = meta.size;
        let write = |file: &File| -> std::io::Result<()> {
            let mut buf = Vec::new();
            for &(start, end) in &ranges {
                let len = usize::try_from(end - start).map_err(std::io::Error::other)?;
                buf.resize(len, 0);
                temp.read_exact_at(&mut buf, start)?;
                file.write_all_at(&buf, start)?;
            }
            if file.metadata()?.len() < size {
                file.set_len(size)?;
            }
            Ok(())
        };
        let root = self.root().map_err(|e| e.to_string())?;
        // A file with other names (hard links, or a name kept in the trash) would change
        // under those too: it is replaced instead.
        match root.stat(path) {
            Ok(Some(st)) if st.nlink == 1 => {}
            _ => return Ok(None),
        }
        let appended = root
            .append_in_place(
                path,
                |st| Identity::of(st) == expected,
                write,
                meta.mode,
                meta.mtime,
            )
            .map_err(|e| ApplyError::Failed(fault_reason(FaultOp::Write, &e)))?;
        let stat = match appended {
            Appended::Done(stat) => stat,
            Appended::Changed => return Err(ApplyError::Appeared),
            // Another program writes it: replaced instead, which keeps the inode it writes.
            Appended::Busy => return Ok(None),
        };
        Ok(Some(IndexRecord::new(
            Identity::of(&stat),
            *meta,
            &staged.manifest,
        )))
    }

    /// A metadata change to a file that has names beyond those this share knows (a hard link
    /// from outside the share, or a version kept in the trash): the file at `path` is copied
    /// into a temp, checked to be the version indexed before and after the copy, and the copy,
    /// with `meta`'s mode and mtime, replaces it. The old inode, and every other name of it,
    /// stays as it was; the old version is kept in the trash like every replaced file.
    fn replace_with_copy(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        current: Option<&Entry>,
    ) -> Result<IndexRecord, ApplyError> {
        let record = self
            .index
            .get(path)
            .ok_or("not indexed: scanned again first")?;
        let root = self.root().map_err(|e| e.to_string())?;
        let temp = root
            .create_temp_for(path)
            .map_err(|e| ApplyError::Failed(fault_reason(FaultOp::Write, &e)))?;
        let copied = (|| -> Result<(), String> {
            let (mut file, before) = root.open_file(path).map_err(|e| e.to_string())?;
            if Identity::of(&before) != record.identity {
                return Err("changed since it was scanned".into());
            }
            std::io::copy(&mut file, &mut &temp.file).map_err(|e| e.to_string())?;
            let after = root.stat(path).map_err(|e| e.to_string())?;
            if after.map(|st| Identity::of(&st)) != Some(record.identity) {
                return Err("changed while it was copied".into());
            }
            Ok(())
        })();
        if let Err(reason) = copied {
            root.discard_temp(temp);
            return Err(reason.into());
        }
        let kept = match current.map(|old| self.keep(path, old, true)) {
            Some(Ok(ino)) => Some(ino),
            Some(Err(e)) => {
                let root = self.root().map_err(|e| e.to_string())?;
                root.discard_temp(temp);
                return Err(e.into());
            }
            None => None,
        };
        let root = self.root().map_err(|e| e.to_string())?;
        let committed = match kept {
            Some(ino) => root.commit_temp(temp, path, meta.mode, meta.mtime, ino),
            None => root.commit_temp_new(temp, path, meta.mode, meta.mtime),
        };
        let stat = committed.map_err(|e| ApplyError::Failed(fault_reason(FaultOp::Rename, &e)))?;
        Ok(IndexRecord::new(
            Identity::of(&stat),
            *meta,
            &record.manifest(),
        ))
    }

    /// Completes an append-staged temp that will replace its file after all: writes the head
    /// (`[0, from)`, the old version's chunks, which are the new one's) from the file at
    /// `path`, verifying each chunk, and seals the temp again.
    fn fill_head(
        &mut self,
        path: &RelPath,
        meta: &FileMeta,
        staged: &mut Staged,
        append: StagedAppend,
    ) -> Result<(), String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let mut files = OpenFiles::default();
        for c in &staged.manifest.chunks {
            if c.offset >= append.from {
                break;
            }
            if self.zeros.is_zero(c) {
                continue;
            }
            let data = files
                .read_verified(root, path, c.offset, c.len, &c.hash)
                .ok_or("the old version changed while it was reused")?;
            write_at(&staged.temp.file, &data, c.offset)?;
        }
        root.seal_temp(&mut staged.temp, meta.mode, meta.mtime)
            .map_err(|e| fault_reason(FaultOp::Fsync, &e))
    }

    /// Keeps the file or symlink `entry` at `path` in the trash: moved there (`link` false:
    /// a deletion) or linked there (`link` true: it is about to be replaced). Returns the
    /// inode kept, which a replacement must find at the path (see `ShareRoot::commit_temp`).
    fn keep(&mut self, path: &RelPath, entry: &Entry, link: bool) -> Result<u64, String> {
        let root = self.root().map_err(|e| e.to_string())?;
        let kept = if link {
            root.trash_link(path)
        } else {
            root.trash_remove(path)
        }
        .map_err(|e| format!("could not be kept in the trash, so it was left alone: {e}"))?;
        let bytes = match entry {
            Entry::File(meta) => meta.size,
            Entry::Symlink { target, .. } => target.len() as u64,
            Entry::Dir { .. } => 0,
        };
        match self.trashed.last_mut() {
            Some((batch, files, sum)) if *batch == kept.batch => {
                *files += 1;
                *sum += bytes;
            }
            _ => self.trashed.push((kept.batch.clone(), 1, bytes)),
        }
        let ino = kept.ino;
        self.kept.record(
            std::time::Instant::now(),
            path.clone(),
            kept.batch,
            entry.clone(),
        );
        Ok(ino)
    }

    /// See [`Endpoint::put_back`](vmsync_core::endpoint::Endpoint::put_back).
    pub(super) fn put_back(
        &mut self,
        items: Vec<(RelPath, Entry)>,
    ) -> Result<Vec<Outcome>, EndpointError> {
        if self.root.is_none() {
            self.open_root()?;
        }
        let share_root = self.shared_root()?;
        let batch = share_root.batch();
        let now = std::time::Instant::now();
        let mut outcomes = Vec::with_capacity(items.len());
        // What is put back into a directory leaves it the time it had (see `ParentTimes`).
        let mut parents = ParentTimes::default();
        for (path, entry) in items {
            if let Some(root) = self.root.as_ref() {
                parents.before_write(root, &path);
            }
            let outcome = self.put_back_one(now, &path, &entry);
            if outcome == Outcome::Applied {
                // What is there now is no echo of ours: let a hint through, the scan sees it.
                self.echoes.remove(&path);
                if let Entry::Dir { mtime, .. } = entry {
                    parents.made(&path, mtime);
                }
            }
            outcomes.push(outcome);
        }
        parents.restore(self.root()?, &self.name);
        batch.finish().map_err(io_err)?;
        // What was put back left the trash: counted again by a walk.
        self.tell_pruner(outcomes.contains(&Outcome::Applied));
        Ok(outcomes)
    }

    /// Tells the pruner what was kept since the last time; with `measure`, also that the
    /// trash lost what it cannot count.
    fn tell_pruner(&mut self, measure: bool) {
        let trashed = std::mem::take(&mut self.trashed);
        if let Some(p) = &self.pruner {
            for (batch, files, bytes) in trashed {
                p.kept(batch, files, bytes);
            }
            if measure {
                p.measure();
            }
        }
    }

    fn put_back_one(&mut self, now: std::time::Instant, path: &RelPath, entry: &Entry) -> Outcome {
        let root = match self.root() {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let there = match root.stat(path) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if let Some(stat) = there {
            if stat.kind == FileKind::Dir && entry.is_dir() {
                return Outcome::Applied;
            }
            return match self.current(path) {
                Ok(now) => Outcome::Changed(now),
                Err(reason) => Outcome::Failed(reason),
            };
        }
        if let Entry::Dir { mode, mtime } = entry {
            return match root.mkdir_at(path, *mode, Some(*mtime)) {
                Ok(()) => Outcome::Applied,
                Err(e) => Outcome::Failed(e.to_string()),
            };
        }
        let Some((seq, batch)) = self.kept.find(now, path, entry) else {
            return Outcome::Failed("not found in the trash".into());
        };
        let root = match self.root() {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let kept_is_it = match (entry, root.kept_stat(&batch, path)) {
            (Entry::File(meta), Ok(Some(st))) => {
                st.kind == FileKind::File && st.size == meta.size && st.mtime == meta.mtime
            }
            (Entry::Symlink { target, .. }, Ok(Some(st))) => {
                st.kind == FileKind::Symlink
                    && root.kept_read_link(&batch, path).ok().as_ref() == Some(target)
            }
            _ => false,
        };
        if !kept_is_it {
            return Outcome::Failed("the kept version is gone or changed in the trash".into());
        }
        match root.restore_kept(&batch, path, path) {
            Ok(()) => {
                self.kept.take(path, seq);
                Outcome::Applied
            }
            Err(e) if e.kind() == FsErrorKind::Exists => match self.current(path) {
                Ok(now) => Outcome::Changed(now),
                Err(reason) => Outcome::Failed(reason),
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    fn remove(&mut self, path: &RelPath, current: Option<&Entry>) -> Result<(), String> {
        let result = match current {
            None => return Ok(()),
            Some(Entry::Dir { .. }) => self.root().map_err(|e| e.to_string())?.remove_dir(path),
            Some(entry) => return self.keep(path, entry, false).map(drop),
        };
        result.map_err(|e| match e.kind() {
            FsErrorKind::NotEmpty => {
                "directory is not empty (it holds entries not synced, such as ignored files)"
                    .to_string()
            }
            _ => e.to_string(),
        })
    }
}

/// Whether what is at a path still is what the scan saw: exactly, except that a directory's
/// mtime may have moved (a child changed since). That time holds nothing to lose, and the
/// change brings the other side's time anyway.
fn still_expected(current: Option<&Entry>, expected: Option<&Entry>) -> bool {
    match (current, expected) {
        (Some(c @ Entry::Dir { .. }), Some(e @ Entry::Dir { .. })) => c.same_content(e),
        _ => current == expected,
    }
}

/// The times of the directories a transition writes into, put back once it is done: creating,
/// replacing, renaming or removing an entry moves its parent directory's mtime, and a
/// destination directory must keep the time the source gave it (as `rsync -a` does). The
/// share root's own time is not synced and not put back (its watcher event would be a hint to
/// rescan everything).
#[derive(Debug, Default)]
struct ParentTimes {
    /// Directory → the mtime it must be left with.
    times: HashMap<RelPath, Timestamp>,
}

impl ParentTimes {
    /// Remembers the time of `path`'s parent before the first write into it.
    fn before_write(&mut self, root: &ShareRoot, path: &RelPath) {
        let Some(parent) = path.parent().filter(|p| !p.is_root()) else {
            return;
        };
        if self.times.contains_key(&parent) {
            return;
        }
        if let Ok(Some(st)) = root.stat(&parent) {
            if st.kind == FileKind::Dir {
                self.times.insert(parent, st.mtime);
            }
        }
    }

    /// A change gave the directory `path` this time: it is the one to keep.
    fn set(&mut self, path: &RelPath, mtime: Timestamp) {
        if let Some(t) = self.times.get_mut(path) {
            *t = mtime;
        }
    }

    /// The directory `path` was just made with this time: it is the one to keep when
    /// something is written into it next.
    fn made(&mut self, path: &RelPath, mtime: Timestamp) {
        self.times.insert(path.clone(), mtime);
    }

    /// Puts every time back that moved; returns the identity each such directory was left
    /// with, for echo suppression. A directory gone or replaced since is left alone.
    fn restore(self, root: &ShareRoot, share: &str) -> Vec<(RelPath, Identity)> {
        let mut restored = Vec::new();
        for (dir, mtime) in self.times {
            let Ok(Some(st)) = root.stat(&dir) else {
                continue;
            };
            if st.kind != FileKind::Dir || st.mtime == mtime {
                continue;
            }
            if let Err(e) = root.set_mtime(&dir, mtime) {
                tracing::debug!(share, dir = %dir.escaped(), "cannot put the time back: {e}");
                continue;
            }
            if let Ok(Some(st)) = root.stat(&dir) {
                restored.push((dir, Identity::of(&st)));
            }
        }
        restored
    }
}

/// Why a change was not applied.
#[derive(Debug)]
enum ApplyError {
    /// Something appeared at the path after it was found empty: the change no longer fits.
    Appeared,
    Failed(String),
}

impl From<String> for ApplyError {
    fn from(reason: String) -> Self {
        ApplyError::Failed(reason)
    }
}

impl From<&str> for ApplyError {
    fn from(reason: &str) -> Self {
        ApplyError::Failed(reason.to_owned())
    }
}

/// Threads that fsync the staged files of one transition batch that the background sealer
/// has not started on.
const SEAL_THREADS: usize = 8;

/// How the staged files of one transition got sealed (for the debug log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SealCounts {
    /// Sealed in the background before the transition asked.
    early: usize,
    /// Still being sealed in the background: waited for.
    waited: usize,
    /// Queued for the background but not started: sealed by the transition.
    claimed: usize,
    /// Never handed to the background: sealed by the transition.
    inline: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::test_support::*;
    use std::sync::{mpsc, Arc, Condvar, Mutex};

    /// A hook that holds seals one at a time until released, announcing each on `entered`,
    /// and ends the n-th with `results[n]` (`Some`: fail with that errno).
    fn holding_hook(
        results: Vec<Option<rustix::io::Errno>>,
    ) -> (crate::seal::Hook, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let results = Mutex::new(results.into_iter());
        let hook: crate::seal::Hook = Arc::new(move || {
            // One seal at a time, announced only once it holds the turn: the n-th announced
            // is the n-th released and gets the n-th result.
            let turn = release_rx.lock().unwrap();
            let _ = entered_tx.send(());
            let _ = turn.recv();
            results.lock().unwrap().next().flatten()
        });
        (hook, entered, release)
    }

    /// Open (true) or closed, and the signal that it opened.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// A hook that holds every seal, announcing each on `entered`, until the gate opens.
    fn gate_hook() -> (crate::seal::Hook, mpsc::Receiver<()>, Gate) {
        let (entered_tx, entered) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = gate.clone();
        let hook: crate::seal::Hook = Arc::new(move || {
            let _ = entered_tx.send(());
            let (open, cv) = &*g;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            None
        });
        (hook, entered, gate)
    }

    fn dir_time(share: &LocalShare, rel: &str) -> Timestamp {
        let path = RelPath::from_bytes(rel.as_bytes()).unwrap();
        share
            .root
            .as_ref()
            .unwrap()
            .stat(&path)
            .unwrap()
            .unwrap()
            .mtime
    }

    /// A transition gives new directories and symlinks their source's time before they are
    /// visible, updates a time in place, and leaves every directory it wrote into at the time
    /// it must have, not the time of the write.
    #[test]
    fn a_transition_leaves_directory_and_symlink_times_as_the_source_gave_them() {
        let mut f = fixture();
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        let (t1, t2, t3) = (
            Timestamp::new(1_000_000_000, 1),
            Timestamp::new(1_100_000_000, 2),
            Timestamp::new(1_200_000_000, 3),
        );
        let dir = |mtime| Entry::Dir { mode: 0o755, mtime };
        let link = |mtime| Entry::Symlink {
            target: b"f".to_vec(),
            mtime,
        };
        let data = content(3);
        let file = p("d/f");
        let missing = stage(&mut f.share, &file, &data);
        f.share.supply(missing).unwrap();
        let outcomes = f
            .share
            .transition(vec![
                Change {
                    path: p("d"),
                    expected: None,
                    new: Some(dir(t1)),
                },
                create(&file, &data),
                Change {
                    path: p("d/l"),
                    expected: None,
                    new: Some(link(t2)),
                },
            ])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 3]);
        assert_eq!(std::fs::read(f.share_dir.join("d/f")).unwrap(), data);
        assert_eq!(
            dir_time(&f.share, "d"),
            t1,
            "the file and the link moved it"
        );
        assert_eq!(dir_time(&f.share, "d/l"), t2);
        // Time-only updates: in place (same inode), nothing kept in the trash.
        let ino = |rel: &str| {
            std::os::unix::fs::MetadataExt::ino(
                &std::fs::symlink_metadata(f.share_dir.join(rel)).unwrap(),
            )
        };
        let link_ino = ino("d/l");
        let outcomes = f
            .share
            .transition(vec![
                Change {
                    path: p("d"),
                    expected: Some(dir(t1)),
                    new: Some(dir(t3)),
                },
                Change {
                    path: p("d/l"),
                    expected: Some(link(t2)),
                    new: Some(link(t3)),
                },
            ])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied; 2]);
        assert_eq!(
            (dir_time(&f.share, "d"), dir_time(&f.share, "d/l")),
            (t3, t3)
        );
        assert_eq!(ino("d/l"), link_ino);
        // A deletion inside puts the directory's time back too.
        let outcomes = f
            .share
            .transition(vec![Change {
                path: p("d/l"),
                expected: Some(link(t3)),
                new: None,
            }])
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert!(!f.share_dir.join("d/l").exists());
        assert_eq!(dir_time(&f.share, "d"), t3);
    }

    /// Every file, directory and symlink beneath `dir`, with a file's bytes or a link's target.
    fn listing(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                if meta.is_symlink() {
                    let target = std::fs::read_link(&p).unwrap();
                    out.push((rel, target.into_os_string().into_encoded_bytes()));
                } else if meta.is_dir() {
                    out.push((rel, b"/".to_vec()));
                    stack.push(p);
                } else {
                    out.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    /// A symlink `d` and operations beneath `d/` in one transition, in either order: whatever
    /// `d` points to (outside, absolute, the root itself, a directory inside), nothing beneath
    /// it is made, through it or anywhere; the escaping links are not made at all; the
    /// directory outside and the one inside stay as they were.
    #[test]
    fn a_symlink_and_operations_beneath_it_in_one_batch_reach_nothing_in_either_order() {
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        for target in ["../OUT", "/tmp/vmsync-no-such-dir/OUT", ".", "sub"] {
            for reversed in [false, true] {
                let mut f = fixture();
                let out = f.share_dir.parent().unwrap().join("OUT");
                std::fs::create_dir(&out).unwrap();
                std::fs::write(out.join("victim"), b"outside\n").unwrap();
                std::fs::create_dir(f.share_dir.join("sub")).unwrap();
                std::fs::write(f.share_dir.join("sub/kept"), b"inside\n").unwrap();
                full_scan(&mut f.share);
                let kept = f.share.index.get(&p("sub/kept")).unwrap().meta;
                let (out_before, share_before) = (listing(&out), listing(&f.share_dir));
                let data = content(11);
                let file = p("d/victim");
                let missing = stage(&mut f.share, &file, &data);
                f.share.supply(missing).unwrap();
                let link = Change {
                    path: p("d"),
                    expected: None,
                    new: Some(Entry::Symlink {
                        target: target.as_bytes().to_vec(),
                        mtime: MTIME,
                    }),
                };
                let mut beneath = vec![
                    create(&file, &data),
                    Change {
                        path: p("d/newdir"),
                        expected: None,
                        new: Some(Entry::Dir {
                            mode: 0o755,
                            mtime: MTIME,
                        }),
                    },
                    Change {
                        path: p("d/l"),
                        expected: None,
                        new: Some(Entry::Symlink {
                            target: b"kept".to_vec(),
                            mtime: MTIME,
                        }),
                    },
                    // What `sub/kept` is, so that only the path decides.
                    Change {
                        path: p("d/kept"),
                        expected: Some(Entry::File(kept)),
                        new: None,
                    },
                ];
                let n = beneath.len();
                let batch = if reversed {
                    beneath.push(link);
                    beneath
                } else {
                    std::iter::once(link).chain(beneath).collect()
                };
                let outcomes = f.share.transition(batch).unwrap();
                let (link_outcome, beneath) = if reversed {
                    (&outcomes[n], &outcomes[..n])
                } else {
                    (&outcomes[0], &outcomes[1..])
                };
                let case = format!("d -> {target}, reversed: {reversed}: {outcomes:?}");
                assert!(
                    beneath.iter().all(|o| *o != Outcome::Applied),
                    "an operation beneath the link applied; {case}"
                );
                assert_eq!(listing(&out), out_before, "{case}");
                let mut share_after = listing(&f.share_dir);
                share_after.retain(|(rel, _)| !rel.starts_with(".vmsync"));
                let mut want: Vec<_> = share_before
                    .iter()
                    .filter(|(rel, _)| !rel.starts_with(".vmsync"))
                    .cloned()
                    .collect();
                if *link_outcome == Outcome::Applied {
                    want.push(("d".into(), target.as_bytes().to_vec()));
                    want.sort();
                }
                assert_eq!(share_after, want, "{case}");
                if target.starts_with('/') || target.starts_with("..") {
                    assert_ne!(*link_outcome, Outcome::Applied, "{case}");
                }
                // A staged file whose change failed stays staged until the next full scan.
                full_scan(&mut f.share);
                assert_eq!(leftover_temps(&f.share_dir), 0, "{case}");
            }
        }
    }

    #[test]
    fn background_seal_failure_fails_the_change() {
        let mut f = fixture();
        f.share
            .sealer
            .set_hook(Some(Arc::new(|| Some(rustix::io::Errno::IO))));
        let pending = keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(3);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("fsync failed: I/O error".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
        assert!(!f.share.staged.contains_key(&path));
        f.share.unstage(&pending);
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    /// Stages `f.bin`, lets its seal start, stages it again (the old temp is dropped while
    /// its seal runs), then lets the two seals end with `results` (the old one's first) and
    /// transitions it.
    fn restage_during_an_inflight_seal(
        results: Vec<Option<rustix::io::Errno>>,
    ) -> (Fixture, Vec<u8>, Vec<Outcome>) {
        let mut f = fixture();
        let (hook, entered, release) = holding_hook(results);
        f.share.sealer.set_hook(Some(hook));
        let pending = keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(4);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        entered.recv().unwrap();
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        release.send(()).unwrap();
        entered.recv().unwrap();
        release.send(()).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        f.share.unstage(&pending);
        (f, data, outcomes)
    }

    #[test]
    fn restage_during_an_inflight_seal_gets_its_own_result() {
        // The first seal fails, but only after its file was staged again: the new temp's own
        // seal (which succeeds) decides.
        let (f, data, outcomes) =
            restage_during_an_inflight_seal(vec![Some(rustix::io::Errno::IO), None]);
        assert_eq!(outcomes, vec![Outcome::Applied]);
        assert_eq!(std::fs::read(f.share_dir.join("f.bin")).unwrap(), data);
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    #[test]
    fn restaged_file_is_not_credited_with_the_old_temps_seal() {
        // The first seal succeeds after its file was staged again; the new temp's fails.
        let (f, _, outcomes) =
            restage_during_an_inflight_seal(vec![None, Some(rustix::io::Errno::IO)]);
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("fsync failed: I/O error".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
    }

    #[test]
    fn full_scan_during_an_inflight_seal_discards_the_file() {
        let mut f = fixture();
        let (hook, entered, release) = holding_hook(vec![None]);
        f.share.sealer.set_hook(Some(hook));
        keep_waiting(&mut f.share);
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(6);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        entered.recv().unwrap();
        // Discards every staged file and reopens the root while the seal runs.
        full_scan(&mut f.share);
        release.send(()).unwrap();
        f.share.sealer.wait_idle();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Failed("content was not staged".into())]
        );
        assert!(!f.share_dir.join("f.bin").exists());
        assert_eq!(leftover_temps(&f.share_dir), 0);
    }

    #[test]
    fn transition_seals_what_the_background_has_not_started() {
        let mut f = fixture();
        // Every worker held in a seal of another file: this file's job stays queued.
        let (hook, entered, gate) = gate_hook();
        f.share.sealer.set_hook(Some(hook));
        keep_waiting(&mut f.share);
        let mut busy = Vec::new();
        for i in 0..crate::seal::SEAL_WORKERS {
            let p = RelPath::from_bytes(format!("busy{i}").as_bytes()).unwrap();
            let data = content(100 + i as u64);
            let missing = stage(&mut f.share, &p, &data);
            f.share.supply(missing).unwrap();
            entered.recv().unwrap();
            busy.push((p, data));
        }
        let path = RelPath::from_bytes(b"f.bin").unwrap();
        let data = content(7);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        // Taken back from the queue and sealed by the transition itself, without waiting.
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let changes = busy.iter().map(|(p, d)| create(p, d)).collect();
        let outcomes = f.share.transition(changes).unwrap();
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Applied),
            "{outcomes:?}"
        );
    }

    /// The time a transition put back on a directory is an echo for as long as the directory
    /// stays as it was left: its own watch and its parent's both report it, maybe in two takes,
    /// and both are dropped; a later change of the directory gets through.
    #[test]
    fn a_directory_time_put_back_is_an_echo_each_time_it_is_reported() {
        let mut f = fixture();
        std::fs::create_dir(f.share_dir.join("d")).unwrap();
        full_scan(&mut f.share);
        let path = RelPath::from_bytes(b"d/new").unwrap();
        let data = content(1);
        let missing = stage(&mut f.share, &path, &data);
        f.share.supply(missing).unwrap();
        let outcomes = f.share.transition(vec![create(&path, &data)]).unwrap();
        assert_eq!(outcomes, vec![Outcome::Applied]);
        let d = RelPath::from_bytes(b"d").unwrap();
        let attrs = || std::collections::BTreeSet::from([d.clone()]);
        for take in 1..=2 {
            let hints = f
                .share
                .drop_echoes(vmsync_core::endpoint::ChangeHints::default(), attrs());
            assert!(hints.paths.is_empty(), "take {take}: {hints:?}");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            f.share_dir.join("d"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let hints = f
            .share
            .drop_echoes(vmsync_core::endpoint::ChangeHints::default(), attrs());
        assert_eq!(hints.paths, vec![d]);
    }
}
