//! The trash on disk (`.vmsync/trash/<batch>/<original path>`, see `crate::trash` and
//! docs/safety.md): what a change deletes is moved there and what it replaces linked there
//! first, a batch directory a second; kept entries are looked at, put back, and batches
//! listed, walked and removed, all through fds.

use super::error::{fail, invalid, not_a_file, Loc};
use super::resolve::{is_single_component, open_beneath};
use super::{
    mtime_only, read_link_at, DirHandle, FileKind, FsError, Resolver, ShareRoot, Stat,
    RESERVED_DIR_MODE,
};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use std::time::{Duration, Instant};
use vmsync_core::entry::Timestamp;
use vmsync_core::path::{escape_bytes, RelPath};

/// Shown in errors about the trash.
const TRASH_SHOWN: &[u8] = b".vmsync/trash";

/// The trash batch of the running transition.
#[derive(Debug, Default)]
pub(super) struct TrashBatch {
    /// While a [`Batch`](super::Batch) is open: one batch directory serves every trashing
    /// until it ends. Outside, each trashing is its own batch.
    pub(super) in_batch: bool,
    /// The batch being written into: its name, its directory and when it was made.
    current: Option<(String, OwnedFd, Instant)>,
    /// The last batch written into, and when it was made: the next trashing within
    /// [`TRASH_BATCH_SPAN`] of that goes into it too.
    recent: Option<(String, Instant)>,
    /// Batches opened since the last close, registered as open (the pruner leaves them alone).
    opened: Vec<String>,
    /// Trash directories whose entries changed and still need an fsync.
    dirty: Vec<OwnedFd>,
}

/// Where a trashed file or symlink went: `.vmsync/trash/<batch>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub batch: String,
    pub path: RelPath,
    /// The inode kept: what a replacement must find at the path to put its new version
    /// there (see `ShareRoot::commit_temp`).
    pub ino: u64,
}

/// Batch names tried before giving up when they are taken (by another process).
const TRASH_BATCH_ATTEMPTS: u32 = 16;

/// A batch takes what is trashed for this long after it was made, over as many transitions:
/// under churn, one batch a second instead of one per transition (fewer directories to make,
/// fsync, count and prune). A path kept twice in that time goes into a new batch.
pub const TRASH_BATCH_SPAN: Duration = Duration::from_secs(1);

impl ShareRoot {
    /// Moves the file or symlink at `p` into the trash with one `renameat` (same filesystem,
    /// never a copy), under its own path in the current batch; `p` is empty afterwards. A
    /// directory at `p` is refused (kind `NotAFile`): directories are removed, not kept.
    /// Durable when the [`Batch`](super::Batch) ends (outside a batch: before this returns).
    pub fn trash_remove(&self, p: &RelPath) -> Result<Kept, FsError> {
        self.trash_entry("move to trash", p, false)
    }

    /// Keeps the file or symlink at `p` in the trash as a second hard link, leaving `p` in
    /// place: the first step of replacing it, so that the path is never empty and the old
    /// inode is never unlinked. The link is made before the replacing rename; both directories
    /// are fsynced before the transition answers (see docs/safety.md on power loss).
    pub fn trash_link(&self, p: &RelPath) -> Result<Kept, FsError> {
        self.trash_entry("keep in trash", p, true)
    }

    fn trash_entry(&self, op: &'static str, p: &RelPath, link: bool) -> Result<Kept, FsError> {
        let (dir, name) = self.parent(op, p, OFlags::RDONLY)?;
        self.trash_from(op, p, &dir, name, link)
    }

    /// Keeps the entry `src` of `dir` in the trash as `p` (moved, or with `link` linked): the
    /// entry at `p` itself, or one that has to leave `.vmsync/tmp/` (see `swap_in`).
    pub(super) fn trash_from(
        &self,
        op: &'static str,
        p: &RelPath,
        dir: &OwnedFd,
        src: &[u8],
        link: bool,
    ) -> Result<Kept, FsError> {
        let loc = Loc::path(p);
        let name = p.name().unwrap_or(src);
        match rfs::statat(dir, src, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = Stat::from_raw(&st, self.dev).kind;
                if matches!(kind, FileKind::Dir | FileKind::Other) {
                    return Err(not_a_file(op, loc, kind));
                }
            }
            Err(e) => return Err(fail(op, loc, e)),
        }
        let mut guard = self
            .trash_batch
            .lock()
            .map_err(|_| invalid(op, loc, "the trash state was poisoned by a panic"))?;
        let mut fresh = false;
        let kept = loop {
            let (batch, slot) = self.trash_slot(op, &mut guard, p, fresh)?;
            let Some(slot) = slot else {
                if fresh {
                    return Err(invalid(
                        op,
                        loc,
                        "no free place for it in a new trash batch",
                    ));
                }
                fresh = true;
                continue;
            };
            let moved = if link {
                rfs::linkat(dir, src, &slot, name, AtFlags::empty())
            } else {
                rename_noreplace(dir, src, &slot, name)
            };
            match moved {
                Ok(()) => {
                    let ino = rfs::statat(&slot, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| fail(op, loc, e))?
                        .st_ino;
                    guard.dirty.push(slot);
                    break Kept {
                        batch,
                        path: p.clone(),
                        ino,
                    };
                }
                Err(Errno::EXIST) if !fresh => fresh = true,
                Err(e) => return Err(fail(op, loc, e)),
            }
        };
        if !link {
            self.sync_parent(dir, p).map_err(|e| fail(op, loc, e))?;
        }
        if !guard.in_batch {
            self.close_trash_locked(&mut guard)?;
        }
        Ok(kept)
    }

    /// The directory in the current batch (opened, or a new one if `fresh` or none is open)
    /// where `p` goes, its parents created as needed; `None` in second place when `p` cannot
    /// go there (its name or a parent's is taken by something else in that batch).
    fn trash_slot(
        &self,
        op: &'static str,
        state: &mut TrashBatch,
        p: &RelPath,
        fresh: bool,
    ) -> Result<(String, Option<OwnedFd>), FsError> {
        let recent = state
            .recent
            .take()
            .filter(|(_, made)| !fresh && made.elapsed() < TRASH_BATCH_SPAN);
        if let (None, Some((name, made))) = (&state.current, recent) {
            state.current = self.reopen_trash_batch(&name).map(|fd| (name, fd, made));
        }
        if fresh || state.current.is_none() {
            let (name, fd) = self.open_trash_batch_dir(op)?;
            state.opened.push(name.clone());
            state
                .dirty
                .push(self.trash.try_clone().map_err(|e| FsError::Io {
                    op,
                    path: escape_bytes(TRASH_SHOWN),
                    source: e,
                })?);
            state.current = Some((name, fd, Instant::now()));
        } else if let Some((name, _, _)) = &state.current {
            if !state.opened.contains(name) {
                state.opened.push(name.clone());
            }
        }
        let Some((batch, batch_fd, _)) = state.current.as_ref() else {
            return Err(invalid(op, Loc::path(p), "no trash batch"));
        };
        let batch = batch.clone();
        let shown = Loc {
            base: TRASH_SHOWN,
            name: Some(batch.as_bytes()),
        };
        let comps: Vec<&[u8]> = p.components().collect();
        let parents = comps.split_last().map_or(&[][..], |(_, d)| d);
        let mut cur = batch_fd.try_clone().map_err(|e| FsError::Io {
            op,
            path: shown.shown(),
            source: e,
        })?;
        for comp in parents {
            match rfs::mkdirat(&cur, *comp, Mode::from_raw_mode(RESERVED_DIR_MODE)) {
                Ok(()) => state.dirty.push(cur.try_clone().map_err(|e| FsError::Io {
                    op,
                    path: shown.shown(),
                    source: e,
                })?),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(fail(op, shown, e)),
            }
            match rfs::openat(
                &cur,
                *comp,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(next) => cur = next,
                Err(Errno::NOTDIR | Errno::LOOP) => return Ok((batch, None)),
                Err(e) => return Err(fail(op, shown, e)),
            }
        }
        let name = comps.last().copied().unwrap_or_default();
        match rfs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok((batch, Some(cur))),
            Ok(_) => Ok((batch, None)),
            Err(e) => Err(fail(op, shown, e)),
        }
    }

    /// Opens the batch `name` again (registered as open first, so the pruner leaves it);
    /// `None` if it is gone.
    fn reopen_trash_batch(&self, name: &str) -> Option<OwnedFd> {
        crate::trash::register_open(name);
        let fd = rfs::openat(
            &self.trash,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        if fd.is_err() {
            crate::trash::unregister_open(name);
        }
        fd.ok()
    }

    /// Creates a new batch directory named by the time now (see [`crate::trash::batch_name`]).
    fn open_trash_batch_dir(&self, op: &'static str) -> Result<(String, OwnedFd), FsError> {
        let mut last = Errno::EXIST;
        for _ in 0..TRASH_BATCH_ATTEMPTS {
            let name = crate::trash::new_batch_name();
            let loc = Loc {
                base: TRASH_SHOWN,
                name: Some(name.as_bytes()),
            };
            match rfs::mkdirat(
                &self.trash,
                name.as_str(),
                Mode::from_raw_mode(RESERVED_DIR_MODE),
            ) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    last = Errno::EXIST;
                    continue;
                }
                Err(e) => return Err(fail(op, loc, e)),
            }
            crate::trash::register_open(&name);
            let fd = rfs::openat(
                &self.trash,
                name.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail(op, loc, e))?;
            return Ok((name, fd));
        }
        Err(fail(
            op,
            Loc {
                base: TRASH_SHOWN,
                name: None,
            },
            last,
        ))
    }

    /// Ends the current trash batch, returning the trash directories changed since the last
    /// close: the caller fsyncs them ([`sync_trash`]).
    pub(super) fn take_trash_batch(&self) -> Result<Vec<OwnedFd>, FsError> {
        let mut guard = self.trash_batch.lock().map_err(|_| {
            invalid(
                "fsync trash",
                Loc {
                    base: TRASH_SHOWN,
                    name: None,
                },
                "the trash state was poisoned by a panic",
            )
        })?;
        guard.in_batch = false;
        Ok(Self::take_trash_locked(&mut guard))
    }

    fn take_trash_locked(state: &mut TrashBatch) -> Vec<OwnedFd> {
        if let Some((name, _, made)) = state.current.take() {
            state.recent = Some((name, made));
        }
        for name in state.opened.drain(..) {
            crate::trash::unregister_open(&name);
        }
        std::mem::take(&mut state.dirty)
    }

    /// Fsyncs the trash directories changed since the last close and ends the current batch.
    fn close_trash_locked(&self, state: &mut TrashBatch) -> Result<(), FsError> {
        sync_trash(&Self::take_trash_locked(state))
    }

    /// `lstat` of `.vmsync/trash/<batch>/<rel>`; `None` if it is not there.
    pub fn kept_stat(&self, batch: &str, rel: &RelPath) -> Result<Option<Stat>, FsError> {
        let Some((dir, name)) = self.kept_parent("stat kept entry", batch, rel)? else {
            return Ok(None);
        };
        match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat::from_raw(&st, self.dev))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(fail("stat kept entry", Loc::path(rel), e)),
        }
    }

    /// Removes the kept file or symlink `.vmsync/trash/<batch>/<rel>`; nothing if it is gone.
    pub fn remove_kept(&self, batch: &str, rel: &RelPath) -> Result<(), FsError> {
        const OP: &str = "remove kept version";
        let Some((dir, name)) = self.kept_parent(OP, batch, rel)? else {
            return Ok(());
        };
        match rfs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(fail(OP, Loc::path(rel), e)),
        }
    }

    /// The target of the kept symlink `.vmsync/trash/<batch>/<rel>`.
    pub fn kept_read_link(&self, batch: &str, rel: &RelPath) -> Result<Vec<u8>, FsError> {
        const OP: &str = "read kept symlink";
        let Some((dir, name)) = self.kept_parent(OP, batch, rel)? else {
            return Err(fail(OP, Loc::path(rel), Errno::NOENT));
        };
        read_link_at(OP, dir.as_fd(), name, Loc::path(rel))
    }

    /// Moves the kept `.vmsync/trash/<batch>/<rel>` back to `p` with one rename that never
    /// replaces anything (kind `Exists` if something is at `p`). `p`'s parent must exist.
    pub fn restore_kept(&self, batch: &str, rel: &RelPath, p: &RelPath) -> Result<(), FsError> {
        const OP: &str = "put back from trash";
        let loc = Loc::path(p);
        let Some((src, src_name)) = self.kept_parent(OP, batch, rel)? else {
            return Err(fail(OP, loc, Errno::NOENT));
        };
        let (dir, name) = self.parent(OP, p, OFlags::RDONLY)?;
        rename_noreplace(&src, src_name, &dir, name).map_err(|e| fail(OP, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))?;
        let mut guard = self
            .trash_batch
            .lock()
            .map_err(|_| invalid(OP, loc, "the trash state was poisoned by a panic"))?;
        if guard.in_batch {
            guard.dirty.push(src);
            Ok(())
        } else {
            rfs::fsync(&src).map_err(|e| fail(OP, loc, e))
        }
    }

    fn kept_parent<'r>(
        &self,
        op: &'static str,
        batch: &str,
        rel: &'r RelPath,
    ) -> Result<Option<(OwnedFd, &'r [u8])>, FsError> {
        let mut comps: Vec<&[u8]> = vec![batch.as_bytes()];
        comps.extend(rel.components());
        let Some(name) = rel.name() else {
            return Err(invalid(op, Loc::path(rel), "not a kept entry"));
        };
        comps.pop();
        match open_beneath(
            self.trash.as_fd(),
            self.dev,
            &comps,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        ) {
            Ok(fd) => Ok(Some((fd, name))),
            Err(Errno::NOENT | Errno::NOTDIR) => Ok(None),
            Err(e) => Err(fail(op, Loc::path(rel), e)),
        }
    }

    /// The names of the entries of `.vmsync/trash/`, unsorted.
    pub fn trash_batches(&self) -> Result<Vec<Vec<u8>>, FsError> {
        const OP: &str = "list trash";
        let loc = Loc {
            base: TRASH_SHOWN,
            name: None,
        };
        let dir = rfs::Dir::read_from(&self.trash).map_err(|e| fail(OP, loc, e))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| fail(OP, loc, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(name.to_vec());
            }
        }
        Ok(out)
    }

    /// The modification time of the batch directory `.vmsync/trash/<name>`: when it was last
    /// given an entry, or what [`ShareRoot::stamp_trash_batch`] set. `None` if it is gone or
    /// not a directory.
    pub fn trash_batch_mtime(&self, name: &[u8]) -> Result<Option<Timestamp>, FsError> {
        const OP: &str = "stat trash batch";
        let loc = Loc {
            base: TRASH_SHOWN,
            name: Some(name),
        };
        if !is_single_component(name) {
            return Err(invalid(OP, loc, "not a single file name"));
        }
        match rfs::statat(&self.trash, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let st = Stat::from_raw(&st, self.dev);
                Ok((st.kind == FileKind::Dir).then_some(st.mtime))
            }
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(fail(OP, loc, e)),
        }
    }

    /// Sets the modification time of the batch directory `.vmsync/trash/<name>` to `t`: the
    /// pruner's note of when the batch was made, for the next run (engine/src/trash.rs,
    /// `TrashUsage`).
    pub fn stamp_trash_batch(&self, name: &[u8], t: Timestamp) -> Result<(), FsError> {
        const OP: &str = "stamp trash batch";
        let loc = Loc {
            base: TRASH_SHOWN,
            name: Some(name),
        };
        if !is_single_component(name) {
            return Err(invalid(OP, loc, "not a single file name"));
        }
        let times = mtime_only(OP, loc, t)?;
        rfs::utimensat(&self.trash, name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| fail(OP, loc, e))
    }

    /// Opens the batch directory `.vmsync/trash/<name>` for walking.
    pub fn open_trash_batch(&self, name: &[u8]) -> Result<DirHandle, FsError> {
        let mut shown = TRASH_SHOWN.to_vec();
        shown.push(b'/');
        shown.extend_from_slice(name);
        if !is_single_component(name) {
            return Err(invalid(
                "open trash batch",
                Loc {
                    base: &shown,
                    name: None,
                },
                "not a single file name",
            ));
        }
        let fd = open_beneath(
            self.trash.as_fd(),
            self.dev,
            &[name],
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| {
            fail(
                "open trash batch",
                Loc {
                    base: &shown,
                    name: None,
                },
                e,
            )
        })?;
        Ok(DirHandle {
            fd,
            root_dev: self.dev,
            is_root: false,
            path: shown.into(),
            resolver: self.resolver,
        })
    }

    /// Removes the entry `name` of `.vmsync/trash/` and everything beneath it, walking
    /// directory fds (never following a symlink), then fsyncs the trash directory.
    pub fn remove_trash_batch(&self, name: &[u8]) -> Result<(), FsError> {
        const OP: &str = "remove trash batch";
        let loc = Loc {
            base: TRASH_SHOWN,
            name: Some(name),
        };
        if !is_single_component(name) {
            return Err(invalid(OP, loc, "not a single file name"));
        }
        remove_tree(self.trash.as_fd(), name, self.dev, self.resolver, 0)
            .map_err(|e| fail(OP, loc, e))?;
        rfs::fsync(&self.trash).map_err(|e| fail(OP, loc, e))
    }
}

/// `renameat2(RENAME_NOREPLACE)`, or where the filesystem lacks it, a check and a plain rename.
fn rename_noreplace(
    from: &OwnedFd,
    from_name: &[u8],
    to: &OwnedFd,
    to_name: &[u8],
) -> Result<(), Errno> {
    match rfs::renameat_with(from, from_name, to, to_name, RenameFlags::NOREPLACE) {
        Err(Errno::INVAL) => match rfs::statat(to, to_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(Errno::EXIST),
            Err(Errno::NOENT) => rfs::renameat(from, from_name, to, to_name),
            Err(e) => Err(e),
        },
        other => other,
    }
}

/// Removes `parent`/`name` recursively through directory fds.
fn remove_tree(
    parent: BorrowedFd<'_>,
    name: &[u8],
    dev: u64,
    resolver: Resolver,
    depth: usize,
) -> Result<(), Errno> {
    match rfs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e),
    }
    if depth > vmsync_core::limits::MAX_PATH_DEPTH {
        return Err(Errno::LOOP);
    }
    let fd = open_beneath(
        parent,
        dev,
        &[name],
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        resolver,
    )?;
    let names: Vec<Vec<u8>> = rfs::Dir::read_from(&fd)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n.as_slice() != b"." && n.as_slice() != b"..")
        .collect();
    for child in names {
        remove_tree(fd.as_fd(), &child, dev, resolver, depth + 1)?;
    }
    match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Fsyncs trash directories (see [`Batch::finish_each`](super::Batch::finish_each)).
pub(super) fn sync_trash(dirs: &[OwnedFd]) -> Result<(), FsError> {
    dirs.iter().try_for_each(|fd| {
        rfs::fsync(fd).map_err(|e| {
            fail(
                "fsync trash",
                Loc {
                    base: TRASH_SHOWN,
                    name: None,
                },
                e,
            )
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::root::FsErrorKind;
    use std::path::Path;

    fn p(s: &[u8]) -> RelPath {
        RelPath::from_bytes(s).unwrap()
    }

    fn kept_paths(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let trash = dir.join(".vmsync/trash");
        for batch in std::fs::read_dir(&trash).unwrap().flatten() {
            let mut stack = vec![batch.path()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    let ft = e.file_type().unwrap();
                    if ft.is_dir() {
                        stack.push(e.path());
                    } else {
                        let rel = e.path().strip_prefix(&trash).unwrap().to_owned();
                        out.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn trash_layout_one_batch_a_second_and_a_fresh_one_on_a_collision() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("a"), b"a as a file").unwrap();
        std::fs::create_dir(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/x"), b"x").unwrap();
        std::fs::write(dir.join("d/y"), b"y").unwrap();
        let root = ShareRoot::open(dir).unwrap();
        let ino = std::fs::metadata(dir.join("d/y")).unwrap().ino();
        let batch = root.batch();
        let a = root.trash_remove(&p(b"a")).unwrap();
        let x = root.trash_remove(&p(b"d/x")).unwrap();
        let y = root.trash_link(&p(b"d/y")).unwrap();
        // `a` is now a directory holding `b`: `a/b` cannot go where `a` the file went.
        std::fs::create_dir(dir.join("a")).unwrap();
        std::fs::write(dir.join("a/b"), b"b").unwrap();
        let b = root.trash_remove(&p(b"a/b")).unwrap();
        batch.finish().unwrap();
        assert_eq!(a.batch, x.batch);
        assert_eq!(a.batch, y.batch);
        assert_ne!(a.batch, b.batch);
        assert!(crate::trash::parse_batch_name(a.batch.as_bytes()).is_some());
        assert_eq!(
            kept_paths(dir),
            vec![
                format!("{}/a", a.batch),
                format!("{}/d/x", a.batch),
                format!("{}/d/y", a.batch),
                format!("{}/a/b", b.batch),
            ]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        // Moved, not copied; linked, and still in place.
        assert!(!dir.join("d/x").exists());
        assert_eq!(std::fs::read(dir.join("d/y")).unwrap(), b"y");
        let kept_y = dir.join(".vmsync/trash").join(&y.batch).join("d/y");
        assert_eq!(std::fs::metadata(kept_y).unwrap().ino(), ino);
        // A directory is never trashed.
        let err = root.trash_remove(&p(b"d")).unwrap_err();
        assert_eq!(err.kind(), FsErrorKind::NotAFile);
        // Soon after, the last batch takes more (here outside a begin/end batch); a path it
        // holds already goes into a new one.
        std::fs::write(dir.join("z"), b"z").unwrap();
        let z = root.trash_remove(&p(b"z")).unwrap();
        assert_eq!(z.batch, b.batch);
        std::fs::write(dir.join("z"), b"z again").unwrap();
        let z2 = root.trash_remove(&p(b"z")).unwrap();
        assert_ne!(z2.batch, b.batch);
        // Later, a new batch.
        std::thread::sleep(TRASH_BATCH_SPAN);
        std::fs::write(dir.join("w"), b"w").unwrap();
        let w = root.trash_remove(&p(b"w")).unwrap();
        assert_ne!(w.batch, z2.batch);
        assert_ne!(w.batch, b.batch);
    }

    #[test]
    fn a_symlink_is_replaced_in_one_rename_and_put_back_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("t"), b"t").unwrap();
        std::os::unix::fs::symlink("t", dir.join("l")).unwrap();
        let root = ShareRoot::open(dir).unwrap();
        let kept = root.trash_link(&p(b"l")).unwrap();
        root.replace_with_symlink(&p(b"l"), b"x/../t", kept.ino)
            .unwrap_err();
        root.replace_with_symlink(&p(b"l"), b"other", kept.ino)
            .unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("l")).unwrap(),
            std::path::PathBuf::from("other")
        );
        assert_eq!(root.kept_read_link(&kept.batch, &p(b"l")).unwrap(), b"t");
        let err = root
            .restore_kept(&kept.batch, &p(b"l"), &p(b"l"))
            .unwrap_err();
        assert_eq!(err.kind(), FsErrorKind::Exists);
        std::fs::remove_file(dir.join("l")).unwrap();
        root.restore_kept(&kept.batch, &p(b"l"), &p(b"l")).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("l")).unwrap(),
            std::path::PathBuf::from("t")
        );
        assert!(root.kept_stat(&kept.batch, &p(b"l")).unwrap().is_none());
        // No temp left behind.
        assert_eq!(
            std::fs::read_dir(dir.join(".vmsync/tmp")).unwrap().count(),
            0
        );
    }
}
