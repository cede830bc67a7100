//! What a share operation reports when it fails: [`FsError`], its broad [`FsErrorKind`], and
//! the helpers that build one from a failed syscall at a [`Loc`].

use super::FileKind;
use rustix::io::Errno;
use vmsync_core::path::{escape_bytes, RelPath};

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
pub(super) struct Loc<'a> {
    pub(super) base: &'a [u8],
    pub(super) name: Option<&'a [u8]>,
}

impl<'a> Loc<'a> {
    pub(super) fn path(p: &'a RelPath) -> Self {
        Loc {
            base: p.as_bytes(),
            name: None,
        }
    }
    pub(super) fn shown(&self) -> String {
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
pub(super) fn fail(op: &'static str, loc: Loc<'_>, e: Errno) -> FsError {
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

pub(super) fn invalid(op: &'static str, loc: Loc<'_>, why: &'static str) -> FsError {
    FsError::Invalid {
        op,
        path: loc.shown(),
        why,
    }
}

pub(super) fn not_a_file(op: &'static str, loc: Loc<'_>, found: FileKind) -> FsError {
    FsError::NotAFile {
        op,
        path: loc.shown(),
        found,
    }
}
