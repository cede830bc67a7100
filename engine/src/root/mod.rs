//! The share root: the one module through which every file operation on share content goes.
//!
//! Its one job is to turn a validated [`RelPath`] into a file operation that cannot leave the
//! share, whatever the tree looks like and however it changes under us (docs/security.md rules 1-8,
//! docs/design.md "Filesystem confinement" and "Data path"). No other module touches share content
//! with `std::fs` and a joined path.
//!
//! The rules it keeps:
//! - **One root handle.** The root is opened once, `O_PATH|O_DIRECTORY|O_NOFOLLOW`, and its
//!   device and inode recorded. Every other call is a `*at` call relative to that fd or to a
//!   directory fd resolved from it, so renaming or replacing the root path later cannot redirect
//!   us (the caller detects a replaced root by comparing [`ShareRoot::probe`] with
//!   [`ShareRoot::dev_ino`]).
//! - **Resolution never follows and never crosses.** Directories are resolved with `openat2`
//!   (`RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV`, retried a
//!   bounded number of times on `EAGAIN`) or, where the kernel lacks `openat2`, by a
//!   component-by-component `openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)` walk that also compares
//!   each directory's device with the root's. Every directory fd handed out is checked to be on
//!   the root's device. A symlink or mount point in the way is an error of kind
//!   [`FsErrorKind::Symlink`], never a detour.
//! - **Final components are `*at` calls on the parent's fd with no-follow semantics**
//!   (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `unlinkat`, `renameat`, `symlinkat`).
//! - **Only regular files are opened for reading**, and only after an `lstat` says so (device
//!   nodes are never opened), `O_NONBLOCK` so a FIFO swapped in at the last moment cannot hang us,
//!   then `fstat`ed again.
//! - **Permission bits only.** Every mode we set is masked with [`PERM_MASK`] (no setuid,
//!   setgid or sticky) and set explicitly, so the umask does not matter.
//! - **Never write in place.** New content goes to a temp file in `.vmsync/tmp/` (same
//!   filesystem), is fsynced and renamed over the destination, then the directory is fsynced. An
//!   fsync error is final: the temp is removed, never renamed.
//! - **Symlinks are data.** They are created only with targets that are relative and stay
//!   inside the root ([`symlink_target_is_contained`]), and nothing here ever traverses one.
//! - **Durable directory changes.** Every mkdir, symlink, unlink and rename fsyncs the parent
//!   directory before returning, so an operation reported done survives a power loss.
//! - **Kept, not unlinked.** What a change deletes or replaces goes to `.vmsync/trash/`
//!   ([`ShareRoot::trash_remove`]: one rename; [`ShareRoot::trash_link`]: a second link made
//!   before the replacing rename), fsynced no later than the change; `remove_file` is for
//!   callers that own what they remove. The trash is walked and pruned through fds like the
//!   rest, never by joined paths.
//! - **No fd leaks.** Every fd is an [`OwnedFd`] opened `O_CLOEXEC`.
//!
//! Module map:
//! - this file: [`ShareRoot`] (opening a root and its reserved directories), [`Stat`] and
//!   [`FileKind`], and the helpers the parts share.
//! - `resolve`: path resolution, the confinement itself: a [`RelPath`] walked beneath the root
//!   with `openat2` or component by component, never following, never crossing ([`Resolver`]).
//! - `entry`: one entry at a path: stat, open, read a link; mkdir, symlink, remove, set mode
//!   and mtime; which symlink targets stay inside ([`symlink_target_is_contained`]).
//! - `dir`: [`DirHandle`], an open directory for walking the tree by fds.
//! - `temp`: temp files: create, seal ([`SealJob`]), commit over a path or discard; appends in
//!   place and clones.
//! - `lease`: keeping other programs' writes out of a file while an append writes into it.
//! - `batch`: directory fsyncs, at once or deferred to the end of a [`Batch`], and the pool
//!   that runs a batch's.
//! - `trash`: keeping replaced and deleted entries in `.vmsync/trash/`, and putting them back.
//! - `marker`: the share's identity marker and generation files in `.vmsync/`.
//! - `error`: [`FsError`] and its [`FsErrorKind`].

mod batch;
mod dir;
mod entry;
mod error;
mod lease;
mod lock;
mod marker;
mod resolve;
mod temp;
mod trash;

pub use batch::Batch;
pub use dir::DirHandle;
pub use entry::symlink_target_is_contained;
pub use error::{FsError, FsErrorKind};
pub use lock::AgentLock;
pub use resolve::Resolver;
pub use temp::{Appended, SealJob, Sealed, TempFile, SEAL_OP};
pub use trash::{Kept, TRASH_BATCH_SPAN};

use crate::faults::{self, FaultOp};
use error::{fail, invalid, not_a_file, Loc};
use resolve::open_beneath;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use trash::TrashBatch;
use vmsync_core::entry::{Timestamp, PERM_MASK};
use vmsync_core::path::{escape_bytes, RelPath, RESERVED_NAME};

/// The staging directory inside [`RESERVED_NAME`].
const TMP_NAME: &[u8] = b"tmp";

/// The trash inside [`RESERVED_NAME`]: one directory per batch (see [`crate::trash`]).
const TRASH_NAME: &[u8] = b"trash";

/// Shown in errors about reserved entries.
const TMP_SHOWN: &[u8] = b".vmsync/tmp";

const RESERVED_DIR_MODE: u32 = 0o700;

/// A temp name already taken means someone else made it (we never reuse a name); try others.
const TEMP_CREATE_ATTEMPTS: u32 = 16;

/// Seconds never exceed this many nanoseconds.
const NANOS_PER_SEC: u32 = 1_000_000_000;

/// What an entry is. `Other` is everything vmsync never syncs or opens: FIFOs, sockets,
/// character and block devices, and directories on another filesystem than the root (mount
/// points, btrfs subvolumes), which are never crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// What `lstat` says about an entry, in the units the index records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stat {
    pub kind: FileKind,
    pub size: u64,
    /// Every permission bit of `st_mode`, including setuid, setgid and sticky (`& 0o7777`);
    /// mask with [`PERM_MASK`] for what is synced.
    pub mode: u32,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Stat {
    /// `root_dev` turns a directory on another device into [`FileKind::Other`]: a mount point
    /// (or btrfs subvolume) is not part of the share, and a rename into it would fail anyway.
    fn from_raw(st: &rfs::Stat, root_dev: u64) -> Stat {
        let dev = to_u64(st.st_dev);
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => FileKind::File,
            FileType::Directory if dev == root_dev => FileKind::Dir,
            FileType::Symlink => FileKind::Symlink,
            _ => FileKind::Other,
        };
        Stat {
            kind,
            size: to_u64(st.st_size),
            mode: st.st_mode & 0o7777,
            mtime: Timestamp::new(to_i64(st.st_mtime), to_u32(st.st_mtime_nsec)),
            ctime: Timestamp::new(to_i64(st.st_ctime), to_u32(st.st_ctime_nsec)),
            dev,
            ino: to_u64(st.st_ino),
            nlink: to_u64(st.st_nlink),
        }
    }

    /// The synced permission bits (`mode & PERM_MASK`).
    pub fn perm(&self) -> u32 {
        self.mode & PERM_MASK
    }
}

// `struct stat` field types differ between architectures (`c_ulong`, `u32`, `i64`...); these
// generic conversions work on all of them without a lint-tripping same-type cast. A value that
// does not fit (a negative size) becomes 0 rather than a wrapped huge number.
fn to_u64<T: TryInto<u64>>(v: T) -> u64 {
    v.try_into().unwrap_or(0)
}

pub(super) fn to_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(0)
}

fn to_u32<T: TryInto<u32>>(v: T) -> u32 {
    v.try_into().unwrap_or(0)
}

/// A share root opened for confined access. See the module docs for the rules it keeps.
/// `Send + Sync`: operations take `&self` and may run on several threads at once.
#[derive(Debug)]
pub struct ShareRoot {
    /// `O_PATH|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC`.
    root: OwnedFd,
    dev: u64,
    ino: u64,
    /// `.vmsync/`, readable (it is fsynced after the marker is replaced).
    meta: OwnedFd,
    /// `.vmsync/tmp/`, readable (listed by `clean_temps`, fsynced).
    tmp: OwnedFd,
    /// `.vmsync/trash/`, readable: where replaced and deleted files are kept.
    trash: OwnedFd,
    /// The trash batch the current transition writes into, and trash directories still to be
    /// fsynced (see [`ShareRoot::trash_remove`]).
    trash_batch: std::sync::Mutex<TrashBatch>,
    resolver: Resolver,
    temp_counter: AtomicU64,
    /// While a [`Batch`] is open, directories whose entries changed
    /// and still need an fsync; `None` outside a batch (each change fsyncs its directory).
    dirty_dirs: std::sync::Mutex<Option<std::collections::BTreeSet<RelPath>>>,
    /// Set once this filesystem refused `O_TMPFILE`.
    no_tmpfile: std::sync::atomic::AtomicBool,
}

impl ShareRoot {
    /// Opens the share root at `path` (the final component must be a real directory, not a
    /// symlink) and creates `.vmsync/` and `.vmsync/tmp/` (mode 0700) inside if absent.
    /// Errors: missing root → kind `NotFound`; a symlink → `Symlink`; not a directory →
    /// `NotADirectory`; `.vmsync` or `.vmsync/tmp` a symlink, or on another filesystem →
    /// `Symlink`.
    pub fn open(path: &Path) -> Result<ShareRoot, FsError> {
        Self::open_with(path, Resolver::Auto)
    }

    /// [`ShareRoot::open`] with an explicit resolution strategy.
    pub fn open_with(path: &Path, resolver: Resolver) -> Result<ShareRoot, FsError> {
        let (root, st) = open_root_path("open share root", path)?;
        let dev = to_u64(st.st_dev);
        let ino = to_u64(st.st_ino);
        // The case probe comes before anything else is asked of the new directory: on vfat,
        // setting its mode already fails, and the reason to give is the folding.
        let (meta, created) = open_reserved_dir(root.as_fd(), dev, RESERVED_NAME, resolver, b"")?;
        refuse_case_folding(root.as_fd(), meta.as_fd())?;
        if created {
            seal_reserved_dir(root.as_fd(), &meta, RESERVED_NAME, b"")?;
        }
        ignore_for_git(meta.as_fd());
        let tmp = ensure_reserved_dir(meta.as_fd(), dev, TMP_NAME, resolver, RESERVED_NAME)?;
        let trash = ensure_reserved_dir(meta.as_fd(), dev, TRASH_NAME, resolver, RESERVED_NAME)?;
        Ok(ShareRoot {
            root,
            dev,
            ino,
            meta,
            tmp,
            trash,
            trash_batch: std::sync::Mutex::new(TrashBatch::default()),
            resolver,
            temp_counter: AtomicU64::new(0),
            dirty_dirs: std::sync::Mutex::new(None),
            no_tmpfile: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The device and inode a root path has *now*, without creating anything: compare with
    /// [`ShareRoot::dev_ino`] to detect a root that was replaced or remounted since it was
    /// opened. Same errors as [`ShareRoot::open`].
    pub fn probe(path: &Path) -> Result<(u64, u64), FsError> {
        let (_, st) = open_root_path("probe share root", path)?;
        Ok((to_u64(st.st_dev), to_u64(st.st_ino)))
    }

    /// The root directory's device and inode, as opened.
    pub fn dev_ino(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The errno a test injected for `op` on `p` under this root (always `None` without the
    /// `faults` feature).
    pub(crate) fn injected(&self, op: FaultOp, p: &RelPath) -> Option<Errno> {
        faults::injected(self.dev_ino(), op, p)
    }

    /// Bytes an unprivileged writer may still use on the root's filesystem, and its size.
    pub fn space(&self) -> std::io::Result<(u64, u64)> {
        crate::space::free_and_total(&self.root)
    }
}

/// Opens the share root path itself (`O_PATH|O_DIRECTORY|O_NOFOLLOW`), classifying failures.
fn open_root_path(op: &'static str, path: &Path) -> Result<(OwnedFd, rfs::Stat), FsError> {
    let shown = || escape_bytes(path.as_os_str().as_bytes());
    let fd = rfs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR; tell the two apart, because a root
        // replaced by a symlink is a safety halt, not a configuration mistake.
        let is_link = e == Errno::NOTDIR
            && rfs::statat(rfs::CWD, path, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
        if is_link {
            FsError::Refused {
                op,
                path: shown(),
                why: "the share root is a symlink",
                source: Some(Errno::LOOP),
            }
        } else {
            FsError::Sys {
                op,
                path: shown(),
                source: e,
            }
        }
    })?;
    let st = rfs::fstat(&fd).map_err(|e| FsError::Sys {
        op,
        path: shown(),
        source: e,
    })?;
    Ok((fd, st))
}

/// Why a share on a filesystem that folds case is refused.
const FOLDS_CASE: &str = "the share's directory folds case (vfat, ext4 casefold): not supported";

/// A root directory that folds case (vfat, ext4 `casefold`, FUSE filesystems that emulate
/// either) is refused: there, names other than `.vmsync` open the reserved directory (Unicode
/// folding has more than the ASCII ones [`vmsync_core::path::is_reserved`] refuses), and two of
/// a peer's names can be one file. Any such directory folds ASCII case, so the probe makes a
/// file of an unpredictable lower-case name in the reserved directory and looks it up by the
/// upper-cased path. Found means the names fold. Inode numbers are not compared: FUSE
/// filesystems may number each lookup afresh.
fn refuse_case_folding(root: BorrowedFd<'_>, meta: BorrowedFd<'_>) -> Result<(), FsError> {
    const OP: &str = "open share root";
    let root_path = RelPath::root();
    let here = || Loc::path(&root_path);
    let name = format!("case-probe-{:016x}", random_u64(0));
    let probe = rfs::openat(
        meta,
        name.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::RUSR | Mode::WUSR,
    );
    let Ok(probe) = probe else {
        // No file can be made (a full disk, no inodes left): a share must still open, so
        // compare inodes instead, which holds on the kernel's own case-folding filesystems.
        return refuse_case_folding_by_inode(root, meta);
    };
    drop(probe);
    let folded = format!(
        "{}/{}",
        String::from_utf8_lossy(RESERVED_NAME).to_ascii_uppercase(),
        name.to_ascii_uppercase()
    );
    let found = rfs::statat(root, folded.as_str(), AtFlags::SYMLINK_NOFOLLOW);
    rfs::unlinkat(meta, name.as_str(), AtFlags::empty()).map_err(|e| fail(OP, here(), e))?;
    if found.is_ok() {
        return Err(invalid(OP, here(), FOLDS_CASE));
    }
    Ok(())
}

/// [`refuse_case_folding`] where no probe file can be made: `.VMSYNC` is the reserved
/// directory itself.
fn refuse_case_folding_by_inode(root: BorrowedFd<'_>, meta: BorrowedFd<'_>) -> Result<(), FsError> {
    const OP: &str = "open share root";
    let root_path = RelPath::root();
    let Ok(alias) = rfs::statat(root, ".VMSYNC", AtFlags::SYMLINK_NOFOLLOW) else {
        return Ok(());
    };
    let meta = rfs::fstat(meta).map_err(|e| fail(OP, Loc::path(&root_path), e))?;
    if alias.st_dev == meta.st_dev && alias.st_ino == meta.st_ino {
        return Err(invalid(OP, Loc::path(&root_path), FOLDS_CASE));
    }
    Ok(())
}

/// Creates (if absent) and opens one of our reserved directories, owner-only.
fn ensure_reserved_dir(
    parent: BorrowedFd<'_>,
    dev: u64,
    name: &[u8],
    resolver: Resolver,
    parent_shown: &[u8],
) -> Result<OwnedFd, FsError> {
    let (fd, created) = open_reserved_dir(parent, dev, name, resolver, parent_shown)?;
    if created {
        seal_reserved_dir(parent, &fd, name, parent_shown)?;
    }
    Ok(fd)
}

/// Opens one of our reserved directories, creating it if absent: the directory and whether
/// it was created here (then [`seal_reserved_dir`] must follow).
fn open_reserved_dir(
    parent: BorrowedFd<'_>,
    dev: u64,
    name: &[u8],
    resolver: Resolver,
    parent_shown: &[u8],
) -> Result<(OwnedFd, bool), FsError> {
    const OP: &str = "open reserved directory";
    let loc = Loc {
        base: parent_shown,
        name: Some(name),
    };
    let created = match rfs::mkdirat(parent, name, Mode::from_raw_mode(RESERVED_DIR_MODE)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(fail(OP, loc, e)),
    };
    let fd = open_beneath(
        parent,
        dev,
        &[name],
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        resolver,
    )
    .map_err(|e| fail(OP, loc, e))?;
    Ok((fd, created))
}

/// A reserved directory made by [`open_reserved_dir`]: mkdirat's mode went through the umask,
/// so it is made exactly owner-only; then the new entry is made durable, or a marker written
/// next could vanish with its directory on a crash.
fn seal_reserved_dir(
    parent: BorrowedFd<'_>,
    fd: &OwnedFd,
    name: &[u8],
    parent_shown: &[u8],
) -> Result<(), FsError> {
    const OP: &str = "open reserved directory";
    let loc = Loc {
        base: parent_shown,
        name: Some(name),
    };
    rfs::fchmod(fd, Mode::from_raw_mode(RESERVED_DIR_MODE)).map_err(|e| fail(OP, loc, e))?;
    let readable = rfs::openat(
        parent,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(OP, loc, e))?;
    rfs::fsync(&readable).map_err(|e| fail(OP, loc, e))
}

/// The name of the file in the reserved directory that tells git to ignore it all.
const GIT_IGNORE_NAME: &str = ".gitignore";

/// Writes `.vmsync/.gitignore` (`*`) if there is none, so `git status` in a share that is a
/// repository does not list vmsync's own directory. Created with `O_EXCL|O_NOFOLLOW` in the
/// reserved directory's fd, never replacing anything; a failure is only logged: it costs a
/// line in `git status`, nothing else.
fn ignore_for_git(meta: BorrowedFd<'_>) {
    let created = rfs::openat(
        meta,
        GIT_IGNORE_NAME,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    );
    let written = match created {
        Ok(fd) => rustix::io::write(&fd, b"*\n").map(|_| ()),
        Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::debug!("writing .vmsync/{GIT_IGNORE_NAME}: {e}");
    }
}

/// Opens the regular file `name` in `dir`: `lstat` first so nothing else is ever opened,
/// then `O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_NOCTTY`, then `fstat` to be sure of what was opened.
fn open_regular(
    op: &'static str,
    dir: BorrowedFd<'_>,
    root_dev: u64,
    resolver: Resolver,
    name: &[u8],
    loc: Loc<'_>,
) -> Result<(File, Stat), FsError> {
    let before = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(op, loc, e))?;
    let before = Stat::from_raw(&before, root_dev);
    match before.kind {
        FileKind::File => {}
        FileKind::Symlink => return Err(fail(op, loc, Errno::LOOP)),
        kind => return Err(not_a_file(op, loc, kind)),
    }
    let fd = open_beneath(
        dir,
        root_dev,
        &[name],
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
        resolver,
    )
    .map_err(|e| fail(op, loc, e))?;
    let st = Stat::from_raw(&rfs::fstat(&fd).map_err(|e| fail(op, loc, e))?, root_dev);
    if st.kind != FileKind::File {
        return Err(not_a_file(op, loc, st.kind));
    }
    Ok((File::from(fd), st))
}

fn read_link_at(
    op: &'static str,
    dir: BorrowedFd<'_>,
    name: &[u8],
    loc: Loc<'_>,
) -> Result<Vec<u8>, FsError> {
    rfs::readlinkat(dir, name, Vec::new())
        .map(|target| target.into_bytes())
        .map_err(|e| fail(op, loc, e))
}

/// `utimensat`/`futimens` times that set only the mtime.
fn mtime_only(op: &'static str, loc: Loc<'_>, mtime: Timestamp) -> Result<Timestamps, FsError> {
    if mtime.nanos >= NANOS_PER_SEC {
        return Err(invalid(op, loc, "mtime nanoseconds out of range"));
    }
    Ok(Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime.secs,
            tv_nsec: mtime.nanos.into(),
        },
    })
}

/// 64 unpredictable bits without a new dependency: std's `RandomState` is seeded from the OS
/// RNG once per thread, and each instance differs.
fn random_u64(salt: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.finish()
}
