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

use crate::faults::{self, FaultOp};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Timespec, Timestamps,
};
use rustix::io::Errno;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmsync_core::entry::{Timestamp, PERM_MASK};
use vmsync_core::limits::{MAX_NAME_BYTES, MAX_SYMLINK_TARGET_BYTES};
use vmsync_core::path::{escape_bytes, RelPath, RESERVED_NAME};

/// The staging directory inside [`RESERVED_NAME`].
const TMP_NAME: &[u8] = b"tmp";
/// The identity marker inside [`RESERVED_NAME`].
const MARKER_NAME: &[u8] = b"id";
/// The trash inside [`RESERVED_NAME`]: one directory per batch (see [`crate::trash`]).
const TRASH_NAME: &[u8] = b"trash";
/// The share generation inside [`RESERVED_NAME`]: decimal digits and a newline.
const GENERATION_NAME: &[u8] = b"generation";
/// Read at most this much of a generation file: `u64::MAX` has 20 digits, then a newline and
/// one byte to spot junk.
const GENERATION_READ_LIMIT: usize = 22;
/// Shown in errors about reserved entries.
const TMP_SHOWN: &[u8] = b".vmsync/tmp";
const TRASH_SHOWN: &[u8] = b".vmsync/trash";
const RESERVED_DIR_MODE: u32 = 0o700;
const TEMP_MODE: u32 = 0o600;
/// The owner's write bit, which moving a directory between parents needs.
const OWNER_WRITE: u32 = 0o200;
const MARKER_MODE: u32 = 0o644;
/// Hex digits in the marker file (16 bytes).
const MARKER_HEX_LEN: usize = 32;
/// Read at most this much of a marker file: a valid one, its newline, and one byte to spot junk.
const MARKER_READ_LIMIT: usize = MARKER_HEX_LEN + 2;
/// `openat2` fails with `EAGAIN` when a rename or mount raced the resolution; it is safe to
/// retry, but a tree being renamed in a loop must not keep us spinning forever.
const EAGAIN_RETRIES: u32 = 64;
/// A temp name already taken means someone else made it (we never reuse a name); try others.
const TEMP_CREATE_ATTEMPTS: u32 = 16;
/// Seconds never exceed this many nanoseconds.
const NANOS_PER_SEC: u32 = 1_000_000_000;

const RESOLVE_FLAGS: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Set once `openat2` has answered `ENOSYS`: the kernel (or a seccomp filter) lacks it, so
/// every later resolution goes straight to the walk instead of paying a failing syscall.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

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
fn to_i64<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(0)
}
fn to_u32<T: TryInto<u32>>(v: T) -> u32 {
    v.try_into().unwrap_or(0)
}

/// The broad class of an [`FsError`], for callers that decide on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsErrorKind {
    /// The entry (or an ancestor) does not exist.
    NotFound,
    /// `remove_dir` on a directory that still has entries.
    NotEmpty,
    /// Something already exists where we would create.
    Exists,
    /// A path component (or the share root) is not a directory.
    NotADirectory,
    /// Resolution refused: a symlink or a mount point in the way, a symlink where the operation
    /// never acts on one, or a symlink target that escapes the root.
    Symlink,
    /// The entry is not of a kind the operation accepts: not a regular file for `open_file`, a
    /// directory or special file where `commit_temp` would replace it, a directory for
    /// `remove_file`.
    NotAFile,
    /// Anything else: permissions, I/O errors, no space, a corrupt marker...
    Io,
}

/// An error from a share operation: what was attempted, on which path (escaped, printable),
/// and the underlying cause.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A system call failed.
    #[error("{op} `{path}`: {source}")]
    Sys {
        op: &'static str,
        path: String,
        #[source]
        source: Errno,
    },
    /// An I/O error from outside this module (e.g. writing a temp file), attributed to a path.
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Refused by the confinement rules (a symlink or mount point in the way, an escaping
    /// symlink target). `source` is the kernel's answer when the kernel refused.
    #[error("{op} `{path}`: refused: {why}")]
    Refused {
        op: &'static str,
        path: String,
        why: &'static str,
        #[source]
        source: Option<Errno>,
    },
    /// The entry is of a kind this operation does not act on.
    #[error("{op} `{path}`: is a {found:?}, not what this operation accepts")]
    NotAFile {
        op: &'static str,
        path: String,
        found: FileKind,
    },
    /// A bad argument or bad content: the root given where a name is needed, an invalid name,
    /// a corrupt marker file.
    #[error("{op} `{path}`: {why}")]
    Invalid {
        op: &'static str,
        path: String,
        why: &'static str,
    },
}

impl FsError {
    /// Wraps an I/O error from outside this module (writing a temp file...) with its context.
    pub fn io(op: &'static str, path: &RelPath, source: std::io::Error) -> FsError {
        FsError::Io {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// The operation that failed, as the error's message names it.
    pub fn op(&self) -> &'static str {
        match self {
            FsError::Sys { op, .. }
            | FsError::Io { op, .. }
            | FsError::Refused { op, .. }
            | FsError::NotAFile { op, .. }
            | FsError::Invalid { op, .. } => op,
        }
    }

    pub fn kind(&self) -> FsErrorKind {
        match self {
            FsError::Sys { source, .. } => kind_of_errno(*source),
            FsError::Io { source, .. } => source.raw_os_error().map_or(FsErrorKind::Io, |n| {
                kind_of_errno(Errno::from_raw_os_error(n))
            }),
            FsError::Refused { .. } => FsErrorKind::Symlink,
            FsError::NotAFile { .. } => FsErrorKind::NotAFile,
            FsError::Invalid { .. } => FsErrorKind::Io,
        }
    }

    /// The OS error number behind this error, if there is one (e.g. to tell `ENOSPC` or
    /// `EDQUOT` apart for a quota error).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            FsError::Sys { source, .. } => Some(*source),
            FsError::Io { source, .. } => source.raw_os_error().map(Errno::from_raw_os_error),
            FsError::Refused { source, .. } => *source,
            FsError::NotAFile { .. } | FsError::Invalid { .. } => None,
        }
    }
}

fn kind_of_errno(e: Errno) -> FsErrorKind {
    match e {
        Errno::NOENT => FsErrorKind::NotFound,
        Errno::NOTEMPTY => FsErrorKind::NotEmpty,
        Errno::EXIST => FsErrorKind::Exists,
        Errno::NOTDIR => FsErrorKind::NotADirectory,
        // ELOOP: a symlink met with no-follow resolution; EXDEV: a mount point met with
        // RESOLVE_NO_XDEV (or a rename that would have crossed one).
        Errno::LOOP | Errno::XDEV => FsErrorKind::Symlink,
        Errno::ISDIR => FsErrorKind::NotAFile,
        _ => FsErrorKind::Io,
    }
}

/// Where an error happened, formatted only when an error is actually built.
#[derive(Clone, Copy)]
struct Loc<'a> {
    base: &'a [u8],
    name: Option<&'a [u8]>,
}

impl<'a> Loc<'a> {
    fn path(p: &'a RelPath) -> Self {
        Loc {
            base: p.as_bytes(),
            name: None,
        }
    }
    fn shown(&self) -> String {
        match (self.base.is_empty(), self.name) {
            (true, None) => ".".to_string(),
            (true, Some(n)) => escape_bytes(n),
            (false, None) => escape_bytes(self.base),
            (false, Some(n)) => {
                let mut joined = Vec::with_capacity(self.base.len() + 1 + n.len());
                joined.extend_from_slice(self.base);
                joined.push(b'/');
                joined.extend_from_slice(n);
                escape_bytes(&joined)
            }
        }
    }
}

/// Maps a failed syscall to an error. The confinement refusals get their own variant so the
/// message says why instead of "Too many levels of symbolic links".
fn fail(op: &'static str, loc: Loc<'_>, e: Errno) -> FsError {
    let path = loc.shown();
    match e {
        Errno::LOOP => FsError::Refused {
            op,
            path,
            why: "a symlink is in the way (symlinks are never followed)",
            source: Some(e),
        },
        Errno::XDEV => FsError::Refused {
            op,
            path,
            why: "a mount point is in the way (other filesystems are never crossed)",
            source: Some(e),
        },
        _ => FsError::Sys {
            op,
            path,
            source: e,
        },
    }
}

fn invalid(op: &'static str, loc: Loc<'_>, why: &'static str) -> FsError {
    FsError::Invalid {
        op,
        path: loc.shown(),
        why,
    }
}

fn not_a_file(op: &'static str, loc: Loc<'_>, found: FileKind) -> FsError {
    FsError::NotAFile {
        op,
        path: loc.shown(),
        found,
    }
}

/// How paths are resolved. `Auto` uses `openat2` where the kernel has it and the walk
/// otherwise; `Walk` always uses the walk (it exists so tests cover both, and as an escape
/// hatch should a kernel's `openat2` misbehave).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolver {
    #[default]
    Auto,
    Walk,
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
    /// While a batch is open ([`ShareRoot::begin_batch`]), directories whose entries changed
    /// and still need an fsync; `None` outside a batch (each change fsyncs its directory).
    dirty_dirs: std::sync::Mutex<Option<std::collections::BTreeSet<RelPath>>>,
    /// Set once this filesystem refused `O_TMPFILE`.
    no_tmpfile: std::sync::atomic::AtomicBool,
}

/// Threads that fsync a batch's changed directories.
const DIR_SYNC_THREADS: usize = 8;
const DIR_FSYNC_OP: &str = "fsync directory";

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

/// An open directory of the share, for walking it by fds (the scanner) rather than by
/// re-resolving paths from the root.
#[derive(Debug)]
pub struct DirHandle {
    /// `O_RDONLY|O_DIRECTORY|O_CLOEXEC`, on the root's device.
    fd: OwnedFd,
    root_dev: u64,
    /// The root directory hides `.vmsync` from its listing and refuses to open it.
    is_root: bool,
    /// For error messages only.
    path: Box<[u8]>,
    resolver: Resolver,
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
        let meta = ensure_reserved_dir(root.as_fd(), dev, RESERVED_NAME, resolver, b"")?;
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
    pub fn replace_with_symlink(&self, p: &RelPath, target: &[u8]) -> Result<(), FsError> {
        self.replace_with_symlink_at(p, target, None)
    }

    /// [`ShareRoot::replace_with_symlink`], the new link also given `mtime` (when set) before
    /// the rename puts it in place (a rename keeps it).
    pub fn replace_with_symlink_at(
        &self,
        p: &RelPath,
        target: &[u8],
        mtime: Option<Timestamp>,
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
        if let Err(e) = rfs::renameat(&self.tmp, temp.as_str(), &dir, name) {
            let _ = rfs::unlinkat(&self.tmp, temp.as_str(), AtFlags::empty());
            return Err(fail(OP, loc, e));
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

    /// Sets the modification time of `p` (not following a symlink at `p`); the access time is
    /// left alone.
    pub fn set_mtime(&self, p: &RelPath, mtime: Timestamp) -> Result<(), FsError> {
        const OP: &str = "set mtime";
        let loc = Loc::path(p);
        let times = mtime_only(OP, loc, mtime)?;
        if p.is_root() {
            return rfs::utimensat(&self.root, ".", &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| fail(OP, loc, e));
        }
        let (dir, name) = self.parent(OP, p, OFlags::PATH)?;
        rfs::utimensat(&dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(OP, loc, e))
    }

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

    /// Puts a written temp file in place at `p`: sets its permission bits (`mode & PERM_MASK`)
    /// and mtime, fsyncs it, renames it over `p` (replacing a regular file or symlink there;
    /// a directory or special file at `p` is an error of kind `NotAFile`), then fsyncs `p`'s
    /// directory. Returns the `fstat` of the placed file: its dev, ino and ctime are what the
    /// index records.
    ///
    /// Any error before the rename removes the temp (an fsync error in particular is final:
    /// the data may be lost, so it must never be renamed into place). An error after the
    /// rename (the directory fsync) means the file is in place but may not survive a crash.
    pub fn commit_temp(
        &self,
        temp: TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<Stat, FsError> {
        self.commit(
            "commit temp file",
            temp,
            p,
            mode,
            mtime,
            RenameFlags::empty(),
        )
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
        self.commit("create file", temp, p, mode, mtime, RenameFlags::NOREPLACE)
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
        if let Err(e) = rfs::renameat(&self.tmp, temp.name(), &dir, name) {
            self.discard_temp(temp);
            return Err(fail(OP, loc, e));
        }
        let st = rfs::fstat(&temp.file).map_err(|e| fail(OP, loc, e))?;
        self.sync_parent(&dir, p).map_err(|e| fail(OP, loc, e))?;
        Ok(Stat::from_raw(&st, self.dev))
    }

    fn commit(
        &self,
        op: &'static str,
        mut temp: TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
        flags: RenameFlags,
    ) -> Result<Stat, FsError> {
        let loc = Loc::path(p);
        let placed = if flags == RenameFlags::NOREPLACE && temp.name.is_none() {
            // An unnamed temp for a new file is linked straight in: linkat(2) never replaces
            // anything, and it spares a name in `.vmsync/tmp/` and a rename across directories.
            self.link_new(op, &temp, p, mode, mtime)
        } else {
            self.name_temp(op, &mut temp)
                .and_then(|()| self.prepare_and_rename(op, &temp, p, mode, mtime, flags))
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

    /// Everything up to and including the rename; returns the destination directory's fd.
    fn prepare_and_rename(
        &self,
        op: &'static str,
        temp: &TempFile,
        p: &RelPath,
        mode: u32,
        mtime: Timestamp,
        flags: RenameFlags,
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
        let renamed = if flags.is_empty() {
            rfs::renameat(&self.tmp, temp.name(), &dir, name)
        } else {
            match rfs::renameat_with(&self.tmp, temp.name(), &dir, name, flags) {
                // A filesystem without RENAME_NOREPLACE (some network and FUSE ones): the check
                // above, then a plain rename, narrows the window to this moment.
                Err(Errno::INVAL) if flags == RenameFlags::NOREPLACE => {
                    if existed {
                        return Err(fail(op, loc, Errno::EXIST));
                    }
                    rfs::renameat(&self.tmp, temp.name(), &dir, name)
                }
                other => other,
            }
        };
        renamed.map_err(|e| fail(op, loc, e))?;
        Ok(dir)
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

    /// The errno a test injected for `op` on `p` under this root (always `None` without the
    /// `faults` feature).
    pub(crate) fn injected(&self, op: FaultOp, p: &RelPath) -> Option<Errno> {
        faults::injected(self.dev_ino(), op, p)
    }

    /// Bytes an unprivileged writer may still use on the root's filesystem, and its size.
    pub fn space(&self) -> std::io::Result<(u64, u64)> {
        crate::space::free_and_total(&self.root)
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
    fn sync_parent(&self, dir: &OwnedFd, p: &RelPath) -> Result<(), Errno> {
        if let Ok(mut d) = self.dirty_dirs.lock() {
            if let Some(set) = d.as_mut() {
                set.insert(p.parent().unwrap_or_default());
                return Ok(());
            }
        }
        rfs::fsync(dir)
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
    /// it grow): opens it for writing without following anything, and only if `expect` says
    /// its `fstat` is the version the caller knows (verify before writing, as before every
    /// replace) calls `write` on it, sets its permission bits and mtime and fsyncs it.
    /// `write` must only write at or past `old_size`, the size `expect` accepted: nothing
    /// that was in the file is overwritten, so nothing needs keeping in the trash. If `write`
    /// or a later step fails, the file is cut back to `old_size` and its old mtime put back
    /// (best effort), so it holds its old content again. Returns `Ok(None)`, writing nothing,
    /// if the file is not the expected version; else its `fstat` afterwards.
    pub fn append_in_place(
        &self,
        p: &RelPath,
        expect: impl FnOnce(&Stat) -> bool,
        write: impl FnOnce(&File) -> std::io::Result<()>,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<Option<Stat>, FsError> {
        const OP: &str = "append in place";
        let loc = Loc::path(p);
        let (dir, name) = self.parent(OP, p, OFlags::PATH)?;
        let before =
            rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fail(OP, loc, e))?;
        if Stat::from_raw(&before, self.dev).kind != FileKind::File {
            return Ok(None);
        }
        let fd = open_beneath(
            dir.as_fd(),
            self.dev,
            &[name],
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            self.resolver,
        )
        .map_err(|e| fail(OP, loc, e))?;
        let old = Stat::from_raw(&rfs::fstat(&fd).map_err(|e| fail(OP, loc, e))?, self.dev);
        // A file with other names (hard links here, or a name kept in the trash) would change
        // under those too: it is replaced instead.
        if old.kind != FileKind::File || old.nlink != 1 || !expect(&old) {
            return Ok(None);
        }
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
        Ok(Some(Stat::from_raw(&st, self.dev)))
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

    /// The share's identity marker (`.vmsync/id`, 32 hex digits), or `None` if there is none.
    /// A marker that is not a regular file or not 32 hex digits is an error (the caller must
    /// halt the share, not silently mint a new identity).
    pub fn read_marker(&self) -> Result<Option<[u8; 16]>, FsError> {
        const OP: &str = "read marker";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(MARKER_NAME),
        };
        let (mut file, _) = match open_regular(
            OP,
            self.meta.as_fd(),
            self.dev,
            self.resolver,
            MARKER_NAME,
            loc,
        ) {
            Ok(x) => x,
            Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // One byte more than a valid marker with its newline: enough to tell "too long".
        let mut buf = Vec::with_capacity(MARKER_READ_LIMIT);
        (&mut file)
            .take(MARKER_READ_LIMIT as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
        parse_marker(&buf)
            .map(Some)
            .ok_or_else(|| invalid(OP, loc, "the marker is not 32 hex digits"))
    }

    /// Writes the identity marker atomically: temp file, fsync, rename over `.vmsync/id`,
    /// fsync `.vmsync/`. Content: 32 lowercase hex digits and a newline.
    pub fn write_marker(&self, id: [u8; 16]) -> Result<(), FsError> {
        const OP: &str = "write marker";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(MARKER_NAME),
        };
        let temp = self.create_temp()?;
        let result = (|| {
            let mut text = format_marker(&id).into_bytes();
            text.push(b'\n');
            (&temp.file).write_all(&text).map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
            rfs::fchmod(&temp.file, Mode::from_raw_mode(MARKER_MODE))
                .map_err(|e| fail(OP, loc, e))?;
            rfs::fsync(&temp.file).map_err(|e| fail(OP, loc, e))?;
            rfs::renameat(&self.tmp, temp.name(), &self.meta, MARKER_NAME)
                .map_err(|e| fail(OP, loc, e))
        })();
        if let Err(e) = result {
            self.discard_temp(temp);
            return Err(e);
        }
        rfs::fsync(&self.meta).map_err(|e| fail(OP, loc, e))
    }

    /// The share generation last written with [`ShareRoot::write_generation`], or `None` if
    /// there is none or it is not a decimal number (a share without a trustworthy generation
    /// is treated as one that went back in time, never as a current one).
    pub fn read_generation(&self) -> Result<Option<u64>, FsError> {
        const OP: &str = "read generation";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(GENERATION_NAME),
        };
        let (mut file, _) = match open_regular(
            OP,
            self.meta.as_fd(),
            self.dev,
            self.resolver,
            GENERATION_NAME,
            loc,
        ) {
            Ok(x) => x,
            Err(e) if e.kind() == FsErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::with_capacity(GENERATION_READ_LIMIT);
        (&mut file)
            .take(GENERATION_READ_LIMIT as u64)
            .read_to_end(&mut buf)
            .map_err(|e| FsError::Io {
                op: OP,
                path: loc.shown(),
                source: e,
            })?;
        Ok(parse_generation(&buf))
    }

    /// Replaces the share generation atomically: temp file, rename over
    /// `.vmsync/generation`. With `durable`, the temp's data is fdatasynced before the rename
    /// and `.vmsync/` fsynced after it; without, a crash of the whole guest may bring back the
    /// previous value (a false alarm, never a missed revert: see `docs/safety.md`).
    pub fn write_generation(&self, generation: u64, durable: bool) -> Result<(), FsError> {
        const OP: &str = "write generation";
        let loc = Loc {
            base: RESERVED_NAME,
            name: Some(GENERATION_NAME),
        };
        let temp = self.create_temp()?;
        let result = (|| {
            let text = format!("{generation}\n");
            (&temp.file)
                .write_all(text.as_bytes())
                .map_err(|e| FsError::Io {
                    op: OP,
                    path: loc.shown(),
                    source: e,
                })?;
            rfs::fchmod(&temp.file, Mode::from_raw_mode(MARKER_MODE))
                .map_err(|e| fail(OP, loc, e))?;
            if durable {
                rfs::fdatasync(&temp.file).map_err(|e| fail(OP, loc, e))?;
            }
            rfs::renameat(&self.tmp, temp.name(), &self.meta, GENERATION_NAME)
                .map_err(|e| fail(OP, loc, e))
        })();
        if let Err(e) = result {
            self.discard_temp(temp);
            return Err(e);
        }
        if durable {
            rfs::fsync(&self.meta).map_err(|e| fail(OP, loc, e))?;
        }
        Ok(())
    }

    /// Resolves `p`'s parent directory (opened with `access`: `PATH` to act on the final
    /// component, `RDONLY` when the directory will be fsynced) and returns it with `p`'s name.
    fn parent<'p>(
        &self,
        op: &'static str,
        p: &'p RelPath,
        access: OFlags,
    ) -> Result<(OwnedFd, &'p [u8]), FsError> {
        let loc = Loc::path(p);
        let comps: Vec<&[u8]> = p.components().collect();
        let Some((name, dirs)) = comps.split_last() else {
            return Err(invalid(op, loc, "not applicable to the share root itself"));
        };
        let dir = open_beneath(
            self.root.as_fd(),
            self.dev,
            dirs,
            access | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            self.resolver,
        )
        .map_err(|e| fail(op, loc, e))?;
        Ok((dir, name))
    }
}

// ---------------------------------------------------------------------------------------------
// The trash (`.vmsync/trash/<batch>/<original path>`, see `crate::trash` and docs/safety.md)

/// The trash batch of the running transition.
#[derive(Debug, Default)]
struct TrashBatch {
    /// Between [`ShareRoot::begin_batch`] and [`ShareRoot::end_batch`]: one batch directory
    /// serves every trashing until then. Outside, each trashing is its own batch.
    in_batch: bool,
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
    /// Durable at [`ShareRoot::end_batch`] (outside a batch: before this returns).
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
        let loc = Loc::path(p);
        let (dir, name) = self.parent(op, p, OFlags::RDONLY)?;
        match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
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
                rfs::linkat(&dir, name, &slot, name, AtFlags::empty())
            } else {
                rename_noreplace(&dir, name, &slot, name)
            };
            match moved {
                Ok(()) => {
                    guard.dirty.push(slot);
                    break Kept {
                        batch,
                        path: p.clone(),
                    };
                }
                Err(Errno::EXIST) if !fresh => fresh = true,
                Err(e) => return Err(fail(op, loc, e)),
            }
        };
        if !link {
            self.sync_parent(&dir, p).map_err(|e| fail(op, loc, e))?;
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
    fn take_trash_batch(&self) -> Result<Vec<OwnedFd>, FsError> {
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

/// Links the open file `file` at `dir`/`name`; fails with `EEXIST` if anything is there.
/// `AT_EMPTY_PATH` needs CAP_DAC_READ_SEARCH; the /proc link works without it.
/// Fsyncs trash directories (see [`ShareRoot::end_batch_each`]).
fn sync_trash(dirs: &[OwnedFd]) -> Result<(), FsError> {
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
            if name == b"." || name == b".." || (self.is_root && name == RESERVED_NAME) {
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

    /// Opens the regular file `name`, as [`ShareRoot::open_file`].
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
        } else if self.is_root && name == RESERVED_NAME {
            "the reserved directory is not share content"
        } else {
            return Ok(());
        };
        Err(invalid(op, self.loc(name), why))
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
                if depth == 0 && name == RESERVED_NAME {
                    return false;
                }
                seen_name = true;
                depth += 1;
            }
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Resolution

/// Opens `comps` (each a single validated component; empty means `base` itself) beneath
/// `base`, never following a symlink and never crossing a mount point, with `oflags` (plus
/// `O_CLOEXEC`). A symlink in the way is `ELOOP`; a mount point or another device is `EXDEV`.
/// A directory result is checked to be on `root_dev`.
fn open_beneath(
    base: BorrowedFd<'_>,
    root_dev: u64,
    comps: &[&[u8]],
    oflags: OFlags,
    resolver: Resolver,
) -> Result<OwnedFd, Errno> {
    let fd = if resolver == Resolver::Auto && !OPENAT2_MISSING.load(Ordering::Relaxed) {
        match openat2_beneath(base, comps, oflags) {
            Err(Errno::NOSYS) => {
                OPENAT2_MISSING.store(true, Ordering::Relaxed);
                tracing::info!("openat2 is unavailable; resolving paths component by component");
                walk_beneath(base, root_dev, comps, oflags)?
            }
            other => other?,
        }
    } else {
        walk_beneath(base, root_dev, comps, oflags)?
    };
    // RESOLVE_NO_XDEV stops at mount points, but a btrfs subvolume is a new device without
    // being a mount; renames into it would fail, and it is not the share's filesystem.
    if oflags.contains(OFlags::DIRECTORY) {
        same_dev(&fd, root_dev)?;
    }
    Ok(fd)
}

/// The `openat2` resolution: one syscall for the whole path.
pub(crate) fn openat2_beneath(
    base: BorrowedFd<'_>,
    comps: &[&[u8]],
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    if !comps.iter().all(|c| is_single_component(c)) {
        return Err(Errno::INVAL);
    }
    let path: Vec<u8> = if comps.is_empty() {
        b".".to_vec()
    } else {
        comps.join(&b'/')
    };
    let mut flags = oflags | OFlags::CLOEXEC;
    if flags.contains(OFlags::DIRECTORY) {
        // RESOLVE_NO_SYMLINKS already refuses a final symlink, with ELOOP; O_NOFOLLOW on top
        // of O_DIRECTORY would make the kernel say ENOTDIR instead, hiding why.
        flags.remove(OFlags::NOFOLLOW);
    }
    let mut retries = 0;
    loop {
        match rfs::openat2(base, path.as_slice(), flags, Mode::empty(), RESOLVE_FLAGS) {
            Err(Errno::AGAIN) if retries < EAGAIN_RETRIES => retries += 1,
            other => return other,
        }
    }
}

/// The fallback resolution: one `openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)` per directory
/// component, each checked to be on the root's device and not a mount root, then the final
/// component opened with `oflags|O_NOFOLLOW` relative to the last one and checked not to be a
/// mount root. Same answers as [`openat2_beneath`].
pub(crate) fn walk_beneath(
    base: BorrowedFd<'_>,
    root_dev: u64,
    comps: &[&[u8]],
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    if !comps.iter().all(|c| is_single_component(c)) {
        return Err(Errno::INVAL);
    }
    let Some((last, dirs)) = comps.split_last() else {
        return rfs::openat(base, ".", oflags | OFlags::CLOEXEC, Mode::empty());
    };
    let mut cur: Option<OwnedFd> = None;
    for name in dirs {
        let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
        let next = rfs::openat(
            at,
            *name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| symlink_or(at, name, e))?;
        not_crossing(&next, root_dev)?;
        cur = Some(next);
    }
    let at = cur.as_ref().map_or(base, |fd| fd.as_fd());
    let fd = rfs::openat(
        at,
        *last,
        oflags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| symlink_or(at, last, e))?;
    // A bind-mounted file is a mount root too; directories also get the device check from
    // open_beneath.
    if is_mount_root(&fd) {
        return Err(Errno::XDEV);
    }
    Ok(fd)
}

/// The walk's stand-in for RESOLVE_NO_XDEV: a directory on another device, or the root of a
/// mount (a bind mount of the same filesystem keeps the device, so the device alone is not
/// enough where statx can tell).
fn not_crossing(fd: &OwnedFd, root_dev: u64) -> Result<(), Errno> {
    same_dev(fd, root_dev)?;
    if is_mount_root(fd) {
        return Err(Errno::XDEV);
    }
    Ok(())
}

/// `STATX_ATTR_MOUNT_ROOT` (Linux 5.8). Where statx cannot say, false: the device comparison
/// is then the only mount check, which catches every mount but a same-filesystem bind mount.
fn is_mount_root(fd: &OwnedFd) -> bool {
    match rfs::statx(fd, "", AtFlags::EMPTY_PATH, rfs::StatxFlags::empty()) {
        Ok(stx) => {
            stx.stx_attributes_mask
                .contains(rfs::StatxAttributes::MOUNT_ROOT)
                && stx
                    .stx_attributes
                    .contains(rfs::StatxAttributes::MOUNT_ROOT)
        }
        Err(_) => false,
    }
}

/// `O_DIRECTORY|O_NOFOLLOW` on a symlink fails with ENOTDIR; turn that into the ELOOP that
/// `openat2` gives, so both resolutions report a symlink the same way. A directory found there
/// now means the entry was swapped between the open and this look (typically a symlink
/// swapped out again): also reported as a refusal, since what we met was not a directory.
fn symlink_or(at: BorrowedFd<'_>, name: &[u8], e: Errno) -> Errno {
    if e == Errno::NOTDIR {
        if let Ok(st) = rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
            if matches!(
                FileType::from_raw_mode(st.st_mode),
                FileType::Symlink | FileType::Directory
            ) {
                return Errno::LOOP;
            }
        }
    }
    e
}

fn same_dev(fd: &OwnedFd, root_dev: u64) -> Result<(), Errno> {
    if to_u64(rfs::fstat(fd)?.st_dev) == root_dev {
        Ok(())
    } else {
        Err(Errno::XDEV)
    }
}

fn is_single_component(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

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

/// Creates (if absent) and opens one of our reserved directories, owner-only.
fn ensure_reserved_dir(
    parent: BorrowedFd<'_>,
    dev: u64,
    name: &[u8],
    resolver: Resolver,
    parent_shown: &[u8],
) -> Result<OwnedFd, FsError> {
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
    if created {
        // mkdirat's mode went through the umask; make it exactly owner-only. Then make the new
        // entry durable, or a marker written next could vanish with its directory on a crash.
        rfs::fchmod(&fd, Mode::from_raw_mode(RESERVED_DIR_MODE)).map_err(|e| fail(OP, loc, e))?;
        let readable = rfs::openat(
            parent,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(OP, loc, e))?;
        rfs::fsync(&readable).map_err(|e| fail(OP, loc, e))?;
    }
    Ok(fd)
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

fn format_marker(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// 1 to 20 decimal digits that fit a `u64`, optionally followed by one newline.
fn parse_generation(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    // Checked up front: `parse` alone would accept a sign (`+7`).
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// 32 hex digits (either case), optionally followed by one newline.
fn parse_marker(bytes: &[u8]) -> Option<[u8; 16]> {
    let hex = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    // Checked up front: `from_str_radix` alone would accept a sign (`+f`).
    if hex.len() != MARKER_HEX_LEN || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut id = [0u8; 16];
    for (out, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *out = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
        root.begin_batch();
        let a = root.trash_remove(&p(b"a")).unwrap();
        let x = root.trash_remove(&p(b"d/x")).unwrap();
        let y = root.trash_link(&p(b"d/y")).unwrap();
        // `a` is now a directory holding `b`: `a/b` cannot go where `a` the file went.
        std::fs::create_dir(dir.join("a")).unwrap();
        std::fs::write(dir.join("a/b"), b"b").unwrap();
        let b = root.trash_remove(&p(b"a/b")).unwrap();
        root.end_batch().unwrap();
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
        root.replace_with_symlink(&p(b"l"), b"x/../t").unwrap_err();
        root.replace_with_symlink(&p(b"l"), b"other").unwrap();
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

    #[test]
    fn generation_format() {
        let cases: [(&[u8], Option<u64>); 10] = [
            (b"0\n", Some(0)),
            (b"7", Some(7)),
            (b"18446744073709551615\n", Some(u64::MAX)),
            (b"18446744073709551616\n", None),
            (b"+7\n", None),
            (b"-1\n", None),
            (b"7\n\n", None),
            (b" 7\n", None),
            (b"\n", None),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_generation(text), want, "{}", escape_bytes(text));
        }
    }

    #[test]
    fn generation_round_trips_through_the_reserved_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(dir.path()).unwrap();
        assert_eq!(root.read_generation().unwrap(), None);
        for (generation, durable) in [(1, false), (2, true), (u64::MAX, false)] {
            root.write_generation(generation, durable).unwrap();
            assert_eq!(root.read_generation().unwrap(), Some(generation));
            let text = std::fs::read(dir.path().join(".vmsync/generation")).unwrap();
            assert_eq!(text, format!("{generation}\n").into_bytes());
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join(".vmsync/tmp"))
                .unwrap()
                .count(),
            0
        );
        std::fs::write(dir.path().join(".vmsync/generation"), b"junk\n").unwrap();
        assert_eq!(root.read_generation().unwrap(), None);
    }

    #[test]
    fn marker_format() {
        let id: [u8; 16] = *b"\x00\x01\x7f\x80\xff0123456789a";
        let text = format_marker(&id);
        assert_eq!(text.len(), 32);
        assert_eq!(parse_marker(text.as_bytes()), Some(id));
        assert_eq!(parse_marker(format!("{text}\n").as_bytes()), Some(id));
        assert_eq!(parse_marker(text.to_uppercase().as_bytes()), Some(id));
        assert_eq!(parse_marker(format!("{text}\n\n").as_bytes()), None);
        assert_eq!(parse_marker(&text.as_bytes()[..31]), None);
        assert_eq!(parse_marker(b"zz000000000000000000000000000000"), None);
        assert_eq!(parse_marker(b"+f000000000000000000000000000000"), None);
        assert_eq!(parse_marker(b""), None);
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

    /// Both resolutions give the same answer (success, or the same errno) on a tree with
    /// every kind of obstacle.
    #[test]
    fn walk_and_openat2_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        std::fs::write(d.join("a/f"), b"x").unwrap();
        std::os::unix::fs::symlink("b", d.join("a/l")).unwrap();
        std::os::unix::fs::symlink("/", d.join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", d.join("loop")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", d.join("proc")).unwrap();
        let root = rfs::open(
            d,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let dev = to_u64(rfs::fstat(&root).unwrap().st_dev);
        let paths: &[&[u8]] = &[
            b"",
            b"a",
            b"a/b",
            b"a/b/c",
            b"a/f",
            b"a/l",
            b"a/l/c",
            b"abs",
            b"abs/etc",
            b"loop",
            b"loop/x",
            b"proc",
            b"proc/etc",
            b"missing",
            b"missing/x",
            b"a/f/x",
            b"a/b/missing",
        ];
        let flag_sets = [
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            OFlags::PATH | OFlags::NOFOLLOW,
        ];
        let mut saw_openat2 = false;
        for path in paths {
            let comps: Vec<&[u8]> = if path.is_empty() {
                vec![]
            } else {
                path.split(|&b| b == b'/').collect()
            };
            for flags in flag_sets {
                let walked = walk_beneath(root.as_fd(), dev, &comps, flags).map(|_| ());
                match openat2_beneath(root.as_fd(), &comps, flags).map(|_| ()) {
                    Err(Errno::NOSYS) => {}
                    direct => {
                        saw_openat2 = true;
                        assert_eq!(walked, direct, "{} with {flags:?}", escape_bytes(path));
                    }
                }
                // Through a symlink is never a success, whichever resolution.
                if path.starts_with(b"a/l/")
                    || path.starts_with(b"abs/")
                    || path.starts_with(b"proc/")
                    || path.starts_with(b"loop/")
                {
                    assert_eq!(walked, Err(Errno::LOOP), "{}", escape_bytes(path));
                }
            }
        }
        // This test is only meaningful where the kernel has openat2 (Linux >= 5.6).
        assert!(saw_openat2 || OPENAT2_MISSING.load(Ordering::Relaxed));
        // Names that are not single components are refused by both, never resolved.
        for bad in [&b"a/b"[..], b"..", b".", b"", b"a\0"] {
            assert_eq!(
                walk_beneath(root.as_fd(), dev, &[bad], OFlags::PATH).map(|_| ()),
                Err(Errno::INVAL)
            );
            assert_eq!(
                openat2_beneath(root.as_fd(), &[bad], OFlags::PATH).map(|_| ()),
                Err(Errno::INVAL)
            );
        }
    }
}
