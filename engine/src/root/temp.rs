//! Temp files: new content is written to a temp (unnamed `O_TMPFILE` near its destination, or
//! named in `.vmsync/tmp/`), sealed (mode, mtime, fsync; on another thread as a [`SealJob`]),
//! then committed over its path with one rename or link, or discarded. Also the two writes that
//! reuse an old version: a clone into a temp, and an append in place.

use super::error::{fail, invalid, not_a_file, Loc};
use super::lease;
use super::resolve::open_beneath;
use super::{
    mtime_only, random_u64, FileKind, FsError, ShareRoot, Stat, TEMP_CREATE_ATTEMPTS, TMP_SHOWN,
};
use crate::faults::{self, FaultOp, Moment};
use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use vmsync_core::entry::{Timestamp, PERM_MASK};
use vmsync_core::path::RelPath;

const TEMP_MODE: u32 = 0o600;

/// A temp file in `.vmsync/tmp/`, to be written through `file` (e.g. with
/// [`std::os::unix::fs::FileExt::write_all_at`]) and then committed or discarded. Dropped
/// without either, it stays on disk until [`ShareRoot::clean_temps`].
#[derive(Debug)]
pub struct TempFile {
    pub file: File,
    /// Its name in `.vmsync/tmp/`; `None` for an unnamed (`O_TMPFILE`) inode, which gets a
    /// name only when it is committed and vanishes by itself if it never is.
    name: Option<String>,
    /// Distinct for every temp this process creates: a [`Sealed`] proof is accepted only by
    /// the temp its [`SealJob`] was made from.
    id: u64,
    /// The mode and mtime it was sealed with (set, and data fsynced), by
    /// [`ShareRoot::seal_temp`] or an accepted [`SealJob`]; `None` until then.
    sealed: Option<(u32, Timestamp)>,
    /// Where its injected faults are looked up (empty without the `faults` feature).
    fault: faults::Tag,
}

/// Source of [`TempFile`] ids.
static NEXT_TEMP_ID: AtomicU64 = AtomicU64::new(1);

impl TempFile {
    fn new(file: File, name: Option<String>) -> TempFile {
        TempFile {
            file,
            name,
            id: NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed),
            sealed: None,
            fault: faults::Tag::default(),
        }
    }

    /// The temp file's name inside `.vmsync/tmp/`.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// True once sealed with this mode and mtime: committing it with them skips the seal.
    pub fn is_sealed(&self, mode: u32, mtime: Timestamp) -> bool {
        self.sealed == Some((mode, mtime))
    }

    /// This temp's seal (what [`ShareRoot::seal_temp`] does) as a job to run on another
    /// thread while this temp stays in use here. The job owns a duplicate of the temp's
    /// descriptor, so it never touches `self.file`: the temp may be discarded (and its fd
    /// closed) while the job runs. The temp's writes must be finished: the fsync covers only
    /// what was written before it. Errors: the `dup` failed (say, out of descriptors).
    pub fn seal_job(&self, mode: u32, mtime: Timestamp) -> Result<SealJob, FsError> {
        let loc = Loc {
            base: TMP_SHOWN,
            name: Some(self.name().as_bytes()),
        };
        let file = self.file.try_clone().map_err(|e| FsError::Io {
            op: SEAL_OP,
            path: loc.shown(),
            source: e,
        })?;
        Ok(SealJob {
            file,
            id: self.id,
            name: self.name.clone(),
            mode,
            mtime,
            fault: self.fault.clone(),
        })
    }

    /// Takes the proof of a finished [`SealJob`]: the temp counts as sealed (committing it
    /// with the same mode and mtime skips the seal). Returns false, changing nothing, for a
    /// proof made from another temp.
    pub fn accept_seal(&mut self, proof: Sealed) -> bool {
        if proof.id != self.id {
            return false;
        }
        self.sealed = Some((proof.mode, proof.mtime));
        true
    }
}

/// The operation named in the errors of a temp's seal (its mode, mtime and fsync), also when
/// a commit seals it.
pub const SEAL_OP: &str = "seal temp file";

/// A temp's seal (mode, mtime, fsync) detached from the temp, to run on another thread: see
/// [`TempFile::seal_job`]. Dropping it closes its own descriptor only.
#[derive(Debug)]
pub struct SealJob {
    file: File,
    id: u64,
    name: Option<String>,
    mode: u32,
    mtime: Timestamp,
    fault: faults::Tag,
}

/// Proof that a [`SealJob`] succeeded, for [`TempFile::accept_seal`]. Only a job makes one.
#[derive(Debug)]
pub struct Sealed {
    id: u64,
    mode: u32,
    mtime: Timestamp,
}

impl SealJob {
    /// Sets the temp's permission bits and mtime and fsyncs it. An error is final for the temp
    /// (docs/security.md rule 7: no retry on it, no rename): discard it.
    pub fn run(self) -> Result<Sealed, FsError> {
        let name = self.name.as_deref().unwrap_or("");
        let loc = Loc {
            base: TMP_SHOWN,
            name: Some(name.as_bytes()),
        };
        seal_fd(SEAL_OP, loc, &self.file, &self.fault, self.mode, self.mtime)?;
        Ok(Sealed {
            id: self.id,
            mode: self.mode,
            mtime: self.mtime,
        })
    }

    /// Fails the job with `errno` instead of running it (fault injection for tests).
    #[cfg(test)]
    pub(crate) fn fail(self, errno: Errno) -> FsError {
        let name = self.name.as_deref().unwrap_or("");
        let loc = Loc {
            base: TMP_SHOWN,
            name: Some(name.as_bytes()),
        };
        fail(SEAL_OP, loc, errno)
    }
}

/// Sets a temp's mode and mtime and fsyncs its data: everything before its rename.
fn seal(
    op: &'static str,
    loc: Loc<'_>,
    temp: &TempFile,
    mode: u32,
    mtime: Timestamp,
) -> Result<(), FsError> {
    seal_fd(op, loc, &temp.file, &temp.fault, mode, mtime)
}

fn seal_fd(
    op: &'static str,
    loc: Loc<'_>,
    file: &File,
    fault: &faults::Tag,
    mode: u32,
    mtime: Timestamp,
) -> Result<(), FsError> {
    let times = mtime_only(op, loc, mtime)?;
    rfs::fchmod(file, Mode::from_raw_mode(mode & PERM_MASK)).map_err(|e| fail(op, loc, e))?;
    rfs::futimens(file, &times).map_err(|e| fail(op, loc, e))?;
    if let Some(e) = fault.injected(FaultOp::Fsync) {
        return Err(fail(op, loc, e));
    }
    rfs::fsync(file).map_err(|e| fail(op, loc, e))
}

/// What [`ShareRoot::append_in_place`] did.
#[derive(Debug)]
pub enum Appended {
    /// Appended: the file's `fstat` afterwards.
    Done(Stat),
    /// Nothing written: the file is not the version the caller expected.
    Changed,
    /// Nothing written: another program has the file open to write (or this filesystem or
    /// the file's owner allows no lease to tell): replace it instead.
    Busy,
}

/// The inodes of a swap (see `ShareRoot::swap_in`): the entry put in place, and the one it
/// may replace (held elsewhere by the caller).
pub(super) struct Inodes {
    pub(super) ours: u64,
    pub(super) kept: u64,
}

impl ShareRoot {
    /// Creates a new, empty, unnamed temp file (mode 0600) for the file that will be committed
    /// at `p`: an `O_TMPFILE` inode in `p`'s directory, so the filesystem allocates it near its
    /// final home. Every temp created in `.vmsync/tmp/` would otherwise come from that one
    /// directory's inode group, which ext4 searches ever more slowly as files come and go
    /// (20,000 small files: 5 s became 19 s). Falls back to [`ShareRoot::create_temp`] where
    /// `O_TMPFILE` is not supported or `p`'s directory does not exist yet.
    pub fn create_temp_for(&self, p: &RelPath) -> Result<TempFile, FsError> {
        let mut temp = self.create_temp_near(p)?;
        temp.fault = faults::Tag::new(self.dev_ino(), p);
        Ok(temp)
    }

    fn create_temp_near(&self, p: &RelPath) -> Result<TempFile, FsError> {
        const OP: &str = "create temp file";
        if !self.no_tmpfile.load(Ordering::Relaxed) {
            if let Ok((dir, _)) = self.parent(OP, p, OFlags::PATH) {
                let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
                match rfs::openat(&dir, ".", flags, Mode::from_raw_mode(TEMP_MODE)) {
                    Ok(fd) => return Ok(TempFile::new(File::from(fd), None)),
                    // The filesystem has no O_TMPFILE: stop asking.
                    Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                        self.no_tmpfile.store(true, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }
        self.create_temp()
    }

    /// Gives an unnamed temp a fresh name in `.vmsync/tmp/`, so it can be renamed into place.
    fn name_temp(&self, op: &'static str, temp: &mut TempFile) -> Result<(), FsError> {
        if temp.name.is_some() {
            return Ok(());
        }
        let pid = rustix::process::getpid().as_raw_pid();
        let mut last = Errno::EXIST;
        for _ in 0..TEMP_CREATE_ATTEMPTS {
            let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
            let name = format!("t.{pid}.{n}.{:016x}", random_u64(n));
            let loc = Loc {
                base: TMP_SHOWN,
                name: Some(name.as_bytes()),
            };
            match link_fd(&temp.file, &self.tmp, name.as_bytes()) {
                Ok(()) => {
                    temp.name = Some(name);
                    return Ok(());
                }
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => return Err(fail(op, loc, e)),
            }
        }
        Err(fail(
            op,
            Loc {
                base: TMP_SHOWN,
                name: None,
            },
            last,
        ))
    }

    /// Creates a new, empty temp file (mode 0600) in `.vmsync/tmp/` under a fresh unique name.
    pub fn create_temp(&self) -> Result<TempFile, FsError> {
        const OP: &str = "create temp file";
        let pid = rustix::process::getpid().as_raw_pid();
        let mut last = Errno::EXIST;
        for _ in 0..TEMP_CREATE_ATTEMPTS {
            let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
            // The random part makes names unguessable, so nobody can pre-create ours.
            let name = format!("t.{pid}.{n}.{:016x}", random_u64(n));
            match rfs::openat(
                &self.tmp,
                name.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC,
                Mode::from_raw_mode(TEMP_MODE),
            ) {
                Ok(fd) => return Ok(TempFile::new(File::from(fd), Some(name))),
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => {
                    return Err(fail(
                        OP,
                        Loc {
                            base: TMP_SHOWN,
                            name: Some(name.as_bytes()),
                        },
                        e,
                    ))
                }
            }
        }
        Err(fail(
            OP,
            Loc {
                base: TMP_SHOWN,
                name: None,
            },
            last,
        ))
    }

    /// Puts a written temp file in place at `p` instead of the regular file or symlink of
    /// inode `kept` there, which the caller has kept ([`ShareRoot::trash_link`] returns it):
    /// sets the temp's permission bits (`mode & PERM_MASK`) and mtime, fsyncs it, swaps it with
    /// what `p` holds (see `swap_in`: anything but `kept` found there is put back, an error),
    /// then fsyncs `p`'s directory. A directory or special file at `p` is an error of kind
    /// `NotAFile`. Returns the `fstat` of the placed file: its dev, ino and ctime are what the
    /// index records.
    ///
    /// Any error before the swap removes the temp (an fsync error in particular is final:
    /// the data may be lost, so it must never be renamed into place). An error after the
    /// swap (the directory fsync) means the file is in place but may not survive a crash.
    pub fn commit_temp(
        &self,
        temp: TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
        kept: u64,
    ) -> Result<Stat, FsError> {
        self.commit("commit temp file", temp, p, mode, mtime, Some(kept))
    }

    /// [`ShareRoot::commit_temp`] for a path that must not exist: if anything appeared at `p`
    /// (say a local process created it since the scan), the error is of kind `Exists` and the
    /// temp is removed. Uses `renameat2(RENAME_NOREPLACE)`, so the check has no race window.
    pub fn commit_temp_new(
        &self,
        temp: TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<Stat, FsError> {
        self.commit("create file", temp, p, mode, mtime, None)
    }

    /// Makes `p` another name of the file at `other` (a hard link), replacing what `p` holds
    /// with one rename, so `p` is never empty. Only when both are still what the caller last
    /// saw (identities `other_was` and `p_was`: device, inode, size, times); otherwise an error,
    /// and nothing is touched. What `p` held is not kept: the caller links only a copy of the
    /// same content it has just committed (see docs/hard-links.md). Returns the `fstat` of the
    /// linked inode (its ctime moved: a link was added).
    pub fn link_over(
        &self,
        other: &RelPath,
        other_was: &crate::index::Identity,
        p: &RelPath,
        p_was: &crate::index::Identity,
    ) -> Result<Stat, FsError> {
        const OP: &str = "hard link";
        let loc = Loc::path(p);
        let (file, st) = self.open_file(other)?;
        if crate::index::Identity::of(&st) != *other_was {
            return Err(invalid(
                OP,
                Loc::path(other),
                "changed since it was indexed",
            ));
        }
        match self.stat(p)? {
            Some(now)
                if now.kind == FileKind::File && crate::index::Identity::of(&now) == *p_was => {}
            _ => return Err(invalid(OP, loc, "changed since it was committed")),
        }
        let mut temp = TempFile::new(file, None);
        self.name_temp(OP, &mut temp)?;
        let (dir, name) = match self.parent(OP, p, OFlags::RDONLY) {
            Ok(found) => found,
            Err(e) => {
                self.discard_temp(temp);
                return Err(e);
            }
        };
        faults::reached(self.dev_ino(), Moment::BeforeRename, p);
        let inodes = Inodes {
            ours: st.ino,
            kept: p_was.ino,
        };
        if let Err(e) = self.swap_in(OP, p, (&dir, name), temp.name(), inodes) {
            self.discard_temp(temp);
            return Err(e);
        }
        let st = rfs::fstat(&temp.file).map_err(|e| fail(OP, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))?;
        Ok(Stat::from_raw(&st, self.dev))
    }

    /// Puts `temp` at `p`: in place of inode `kept`, or (`None`) where nothing is.
    fn commit(
        &self,
        op: &'static str,
        mut temp: TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
        kept: Option<u64>,
    ) -> Result<Stat, FsError> {
        let loc = Loc::path(p);
        let placed = if kept.is_none() && temp.name.is_none() {
            // An unnamed temp for a new file is linked straight in: linkat(2) never replaces
            // anything, and it spares a name in `.vmsync/tmp/` and a rename across directories.
            self.link_new(op, &temp, p, mode, mtime)
        } else {
            self.name_temp(op, &mut temp)
                .and_then(|()| self.prepare_and_rename(op, &temp, p, mode, mtime, kept))
        };
        let dir = match placed {
            Ok(dir) => dir,
            Err(e) => {
                self.discard_temp(temp);
                return Err(e);
            }
        };
        let st = rfs::fstat(&temp.file).map_err(|e| fail(op, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(op, loc, e))?;
        Ok(Stat::from_raw(&st, self.dev))
    }

    /// Seals an unnamed temp if needed and links it at `p`, which must not exist (an error of
    /// kind `Exists` if anything is there); returns the destination directory's fd.
    fn link_new(
        &self,
        op: &'static str,
        temp: &TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<OwnedFd, FsError> {
        let (dir, name) = self.sealed_for(op, temp, p, mode, mtime)?;
        if let Some(e) = self.injected(FaultOp::Rename, p) {
            return Err(fail(op, Loc::path(p), e));
        }
        faults::reached(self.dev_ino(), Moment::BeforeRename, p);
        link_fd(&temp.file, &dir, name).map_err(|e| fail(op, Loc::path(p), e))?;
        Ok(dir)
    }

    /// Seals `temp` unless it already is (mode, mtime, fsync), then opens the directory it is
    /// to be placed in: the first steps of every commit.
    fn sealed_for<'p>(
        &self,
        op: &'static str,
        temp: &TempFile,
        p: &'p RelPath,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(OwnedFd, &'p [u8]), FsError> {
        if !temp.is_sealed(mode, mtime) {
            seal(SEAL_OP, Loc::path(p), temp, mode, mtime)?;
        }
        self.parent(op, p, OFlags::RDONLY)
    }

    /// Everything up to and including the rename (with `kept`, the swap); returns the
    /// destination directory's fd.
    fn prepare_and_rename(
        &self,
        op: &'static str,
        temp: &TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
        kept: Option<u64>,
    ) -> Result<OwnedFd, FsError> {
        let loc = Loc::path(p);
        let (dir, name) = self.sealed_for(op, temp, p, mode, mtime)?;
        // rename(2) would replace a FIFO or socket (special files we never synced, hence never
        // saw) and an empty directory only if the source were a directory; refuse both here
        // rather than rely on the caller having looked.
        let existed = match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = Stat::from_raw(&st, self.dev).kind;
                if matches!(kind, FileKind::Dir | FileKind::Other) {
                    return Err(not_a_file(op, loc, kind));
                }
                true
            }
            Err(Errno::NOENT) => false,
            Err(e) => return Err(fail(op, loc, e)),
        };
        if let Some(e) = self.injected(FaultOp::Rename, p) {
            return Err(fail(op, loc, e));
        }
        faults::reached(self.dev_ino(), Moment::BeforeRename, p);
        if let Some(kept) = kept {
            let ours = rfs::fstat(&temp.file).map_err(|e| fail(op, loc, e))?.st_ino;
            self.swap_in(op, p, (&dir, name), temp.name(), Inodes { ours, kept })?;
            return Ok(dir);
        }
        let flags = RenameFlags::NOREPLACE;
        let renamed = match rfs::renameat_with(&self.tmp, temp.name(), &dir, name, flags) {
            // A filesystem without RENAME_NOREPLACE (some network and FUSE ones): the check
            // above, then a plain rename, narrows the window to this moment.
            Err(Errno::INVAL) => {
                if existed {
                    return Err(fail(op, loc, Errno::EXIST));
                }
                rfs::renameat(&self.tmp, temp.name(), &dir, name)
            }
            other => other,
        };
        renamed.map_err(|e| fail(op, loc, e))?;
        Ok(dir)
    }

    /// Puts the entry `temp` of `.vmsync/tmp/` (inode `ours`) at `name` in `dir` (the path
    /// `p`), in place of the inode `kept` that the caller holds elsewhere (in the trash, or
    /// as another name), with one `renameat2(RENAME_EXCHANGE)`, then looks at what came out:
    /// `kept` is unlinked from `.vmsync/tmp/`. Anything else was put at `p` by another program
    /// after the caller looked (an editor's save renames a new file over the old one): it is
    /// swapped back, and the error says the path changed, so the next cycle decides it again.
    /// What then comes out is kept too (`rescue`), unless it is ours and still has another
    /// name (a hard link's other path): while ours stood at `p`, a program may have written
    /// into it in place, and may still write through a descriptor it opened there. If it
    /// cannot go back, what came out is kept. So nothing another program wrote is ever
    /// unlinked. Where the filesystem cannot exchange, the path is looked at right before a
    /// plain rename.
    pub(super) fn swap_in(
        &self,
        op: &'static str,
        p: &RelPath,
        (dir, name): (&OwnedFd, &[u8]),
        temp: &str,
        Inodes { ours, kept }: Inodes,
    ) -> Result<(), FsError> {
        const CHANGED: &str = "replaced by another program since it was checked; left as it is";
        let loc = Loc::path(p);
        let ino_at = |d: &OwnedFd, n: &[u8]| {
            rfs::statat(d, n, AtFlags::SYMLINK_NOFOLLOW).map(|st| st.st_ino)
        };
        match rfs::renameat_with(&self.tmp, temp, dir, name, RenameFlags::EXCHANGE) {
            Ok(()) => {}
            Err(Errno::INVAL) => {
                return match ino_at(dir, name) {
                    Ok(ino) if ino == kept => {
                        rfs::renameat(&self.tmp, temp, dir, name).map_err(|e| fail(op, loc, e))
                    }
                    Ok(_) | Err(Errno::NOENT) => Err(invalid(op, loc, CHANGED)),
                    Err(e) => Err(fail(op, loc, e)),
                };
            }
            // Nothing at `p` any more: removed since the caller looked.
            Err(Errno::NOENT) => return Err(invalid(op, loc, CHANGED)),
            Err(e) => return Err(fail(op, loc, e)),
        }
        faults::reached(self.dev_ino(), Moment::AfterSwap, p);
        let tmp_name = temp.as_bytes();
        if ino_at(&self.tmp, tmp_name) == Ok(kept) {
            if let Err(e) = rfs::unlinkat(&self.tmp, temp, AtFlags::empty()) {
                // Held elsewhere anyway; a leftover temp is removed at the next start.
                tracing::warn!("{op} {}: removing what it replaced: {e}", p.escaped());
            }
            return Ok(());
        }
        if let Err(e) = rfs::renameat_with(&self.tmp, temp, dir, name, RenameFlags::EXCHANGE) {
            // It cannot go back (the path was removed meanwhile, say).
            self.rescue(op, p, (dir, name), temp)?;
            return Err(fail(op, loc, e));
        }
        match rfs::statat(&self.tmp, tmp_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_ino == ours && st.st_nlink > 1 => {
                let _ = rfs::unlinkat(&self.tmp, temp, AtFlags::empty());
            }
            _ => self.rescue(op, p, (dir, name), temp)?,
        }
        Err(invalid(op, loc, CHANGED))
    }

    /// Keeps another program's entry that a swap left under the temp's name (which the caller
    /// removes): in the trash as `p`, or, if it cannot go there (a directory, a full trash),
    /// back at `p` if `p` is free.
    fn rescue(
        &self,
        op: &'static str,
        p: &RelPath,
        (dir, name): (&OwnedFd, &[u8]),
        temp: &str,
    ) -> Result<(), FsError> {
        match self.trash_from(op, p, &self.tmp, temp.as_bytes(), false) {
            Ok(_) => Ok(()),
            Err(e) => rfs::renameat_with(&self.tmp, temp, dir, name, RenameFlags::NOREPLACE)
                .map_err(|_| e),
        }
    }

    /// Sets a written temp file's permission bits and mtime and fsyncs it, ahead of
    /// [`ShareRoot::commit_temp`] (which then skips those steps; pass it the same mode and
    /// mtime). Lets a batch fsync many temps in parallel, where the journal merges them. An
    /// error is final for this temp: discard it.
    pub fn seal_temp(
        &self,
        temp: &mut TempFile,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<(), FsError> {
        let name = temp.name().to_owned();
        let loc = Loc {
            base: TMP_SHOWN,
            name: Some(name.as_bytes()),
        };
        seal(SEAL_OP, loc, temp, mode, mtime)?;
        temp.sealed = Some((mode, mtime));
        Ok(())
    }

    /// Makes `temp` (new and empty) share the blocks of the regular file at `p` (`FICLONE`: a
    /// reflink on xfs and btrfs), so that a new version differing from the old in a few
    /// chunks costs only those chunks on disk. The old file is not changed: later writes to
    /// the temp get blocks of their own (copy on write), so the old inode, which the trash
    /// keeps when the temp replaces it, still holds the old content. Returns the `fstat` of
    /// the old file before and after the clone (the caller trusts what it knows of the old
    /// content only if both are what it expects: a write during the clone changes its
    /// ctime); `None` where the filesystem cannot clone (ext4, tmpfs), and the temp is then
    /// still empty.
    pub fn clone_into_temp(
        &self,
        p: &RelPath,
        temp: &TempFile,
    ) -> Result<Option<(Stat, Stat)>, FsError> {
        const OP: &str = "clone file";
        let (old, before) = self.open_file(p)?;
        match rfs::ioctl_ficlone(&temp.file, &old) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::NOSYS) => {
                return Ok(None)
            }
            Err(e) => return Err(fail(OP, Loc::path(p), e)),
        }
        let after = rfs::fstat(&old).map_err(|e| fail(OP, Loc::path(p), e))?;
        Ok(Some((before, Stat::from_raw(&after, self.dev))))
    }

    /// Appends to the regular file at `p` in place (same inode, so a reader following it sees
    /// it grow): opens it for writing without following anything, makes sure no other program
    /// can write it meanwhile (see `lease`: a write lease, or no writer but readers), and only
    /// if `expect` says its `fstat` is the version the caller knows (verify before writing, as
    /// before every replace) calls `write` on it, sets its permission bits and mtime and fsyncs
    /// it. `write` must only write at or past `old_size`, the size `expect` accepted: nothing
    /// that was in the file is overwritten, so nothing needs keeping in the trash. If `write`
    /// or a later step fails, the file is cut back to `old_size` and its old mtime put back
    /// (best effort), so it holds its old content again. Writes nothing and says why unless it
    /// returns [`Appended::Done`] with the file's `fstat` afterwards.
    pub fn append_in_place(
        &self,
        p: &RelPath,
        expect: impl FnOnce(&Stat) -> bool,
        write: impl FnOnce(&File) -> std::io::Result<()>,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<Appended, FsError> {
        const OP: &str = "append in place";
        let loc = Loc::path(p);
        let (dir, name) = self.parent(OP, p, OFlags::PATH)?;
        let before =
            rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(OP, loc, e))?;
        if Stat::from_raw(&before, self.dev).kind != FileKind::File {
            return Ok(Appended::Changed);
        }
        let open = |flags: OFlags| {
            let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
            match open_beneath(
                dir.as_fd(),
                self.dev,
                &[name],
                flags | OFlags::CLOEXEC,
                self.resolver,
            ) {
                Ok(fd) => Ok(Some(fd)),
                // Another program holds a lease on it.
                Err(Errno::WOULDBLOCK) => Ok(None),
                Err(e) => Err(fail(OP, loc, e)),
            }
        };
        let Some(mut fd) = open(OFlags::WRONLY)? else {
            return Ok(Appended::Busy);
        };
        match lease::lease_for_writing(fd.as_fd()) {
            Ok(true) => {}
            Ok(false) => {
                // Open elsewhere: go ahead only if nobody has it open to write.
                drop(fd);
                let Some(probe) = open(OFlags::RDONLY)? else {
                    return Ok(Appended::Busy);
                };
                if !lease::nobody_writing(probe.as_fd()) {
                    return Ok(Appended::Busy);
                }
                drop(probe);
                let Some(again) = open(OFlags::WRONLY)? else {
                    return Ok(Appended::Busy);
                };
                fd = again;
            }
            Err(_) => return Ok(Appended::Busy),
        }
        let old = Stat::from_raw(&rfs::fstat(&fd).map_err(|e| fail(OP, loc, e))?, self.dev);
        // A file with other names (hard links here, or a name kept in the trash) would change
        // under those too: it is replaced instead.
        if old.kind != FileKind::File || old.nlink != 1 || !expect(&old) {
            return Ok(Appended::Changed);
        }
        faults::reached(self.dev_ino(), Moment::BeforeAppendWrite, p);
        let file = File::from(fd);
        let done = (|| -> Result<(), FsError> {
            if let Some(e) = self.injected(FaultOp::Write, p) {
                return Err(fail(OP, loc, e));
            }
            write(&file).map_err(|e| FsError::io(OP, p, e))?;
            let times = mtime_only(OP, loc, mtime)?;
            rfs::fchmod(&file, Mode::from_raw_mode(mode & PERM_MASK))
                .map_err(|e| fail(OP, loc, e))?;
            rfs::futimens(&file, &times).map_err(|e| fail(OP, loc, e))?;
            if let Some(e) = self.injected(FaultOp::Fsync, p) {
                return Err(fail(OP, loc, e));
            }
            rfs::fsync(&file).map_err(|e| fail(OP, loc, e))
        })();
        if let Err(e) = done {
            let _ = file.set_len(old.size);
            if let Ok(times) = mtime_only(OP, loc, old.mtime) {
                let _ = rfs::futimens(&file, &times);
            }
            let _ = rfs::fchmod(&file, Mode::from_raw_mode(old.mode & PERM_MASK));
            return Err(e);
        }
        let st = rfs::fstat(&file).map_err(|e| fail(OP, loc, e))?;
        // Closing `file` lets go of the lease.
        Ok(Appended::Done(Stat::from_raw(&st, self.dev)))
    }

    /// Removes a temp file that will not be committed. Errors are ignored: a leftover is
    /// removed by the next [`ShareRoot::clean_temps`].
    pub fn discard_temp(&self, temp: TempFile) {
        // An unnamed temp has nothing to unlink: closing it frees it.
        if let Some(name) = &temp.name {
            let _ = rfs::unlinkat(&self.tmp, name.as_str(), AtFlags::empty());
        }
    }

    /// Removes every leftover in `.vmsync/tmp/` (temps of a run that crashed or was killed);
    /// returns how many. Call it at start, before any temp of this run exists. An entry that
    /// cannot be removed (a non-empty directory someone put there) is logged and left.
    pub fn clean_temps(&self) -> Result<usize, FsError> {
        const OP: &str = "clean temp files";
        let loc = Loc {
            base: TMP_SHOWN,
            name: None,
        };
        let dir = rfs::Dir::read_from(&self.tmp).map_err(|e| fail(OP, loc, e))?;
        let mut removed = 0usize;
        for entry in dir {
            let entry = entry.map_err(|e| fail(OP, loc, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let at = Loc {
                base: TMP_SHOWN,
                name: Some(name),
            };
            let result = match rfs::unlinkat(&self.tmp, name, AtFlags::empty()) {
                Err(Errno::ISDIR) => rfs::unlinkat(&self.tmp, name, AtFlags::REMOVEDIR),
                other => other,
            };
            match result {
                Ok(()) => removed += 1,
                Err(Errno::NOENT) => {}
                Err(Errno::NOTEMPTY | Errno::EXIST) => {
                    tracing::warn!(path = %at.shown(), "leftover directory in the temp area is not empty; left alone");
                }
                Err(e) => return Err(fail(OP, at, e)),
            }
        }
        if removed > 0 {
            rfs::fsync(&self.tmp).map_err(|e| fail(OP, loc, e))?;
        }
        Ok(removed)
    }
}

/// Links the open file `file` at `dir`/`name`; fails with `EEXIST` if anything is there.
/// `AT_EMPTY_PATH` needs CAP_DAC_READ_SEARCH; the /proc link works without it.
fn link_fd(file: &File, dir: &OwnedFd, name: &[u8]) -> Result<(), Errno> {
    match rfs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM | Errno::ACCESS) => {
            let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            rfs::linkat(
                rfs::CWD,
                proc_path.as_str(),
                dir,
                name,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        other => other,
    }
}
