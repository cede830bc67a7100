//! The conflict store: where a losing version goes when a conflict policy (or a one-way share)
//! replaces it. It lives under the host's state directory, never in the synced tree, and
//! nothing in it is ever deleted by vmsync.
//!
//! Layout: `<state_dir>/conflicts/<share>/<unix-secs>.<nanos>-<side>/<path>`, one directory per
//! cycle and side, holding the losing files and symlinks at their share-relative paths.
//! Writes go through [`ShareRoot`] like share writes, so a hostile path cannot escape the store.

use crate::root::{FsError, ShareRoot};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use vmsync_core::reconcile::Side;
use vmsync_core::{FileMeta, RelPath};

pub struct ConflictStore {
    dir: PathBuf,
}

/// One cycle's losing versions from one side.
pub struct ConflictBatch {
    root: ShareRoot,
    pub dir: PathBuf,
}

impl ConflictStore {
    pub fn new(state_dir: &Path, share: &str) -> ConflictStore {
        ConflictStore {
            dir: state_dir.join("conflicts").join(share),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a fresh batch directory for `side`'s losing versions.
    pub fn begin(&self, side: Side) -> std::io::Result<ConflictBatch> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        for attempt in 0..100u32 {
            let dir = self.dir.join(format!(
                "{}.{:09}-{}{}",
                now.as_secs(),
                now.subsec_nanos(),
                side.as_str(),
                if attempt == 0 {
                    String::new()
                } else {
                    format!("-{attempt}")
                }
            ));
            std::fs::create_dir_all(&self.dir)?;
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let root = ShareRoot::open(&dir).map_err(std::io::Error::other)?;
                    return Ok(ConflictBatch { root, dir });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(
            "could not create a unique conflict directory",
        ))
    }
}

impl ConflictBatch {
    /// Saves a file's content (given in order, chunk by chunk) at `path` inside the batch.
    pub fn save_file<'a>(
        &self,
        path: &RelPath,
        meta: &FileMeta,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), FsError> {
        self.make_parents(path)?;
        let temp = self.root.create_temp()?;
        let mut offset = 0u64;
        for data in chunks {
            if let Err(e) = std::os::unix::fs::FileExt::write_all_at(&temp.file, data, offset) {
                self.root.discard_temp(temp);
                return Err(FsError::io("write conflict copy", path, e));
            }
            offset += data.len() as u64;
        }
        self.root.commit_temp(temp, path, meta.mode, meta.mtime)?;
        Ok(())
    }

    pub fn save_symlink(&self, path: &RelPath, target: &[u8]) -> Result<(), FsError> {
        self.make_parents(path)?;
        // The store is not a share: keep the link as data in a plain file rather than
        // re-checking containment for a link nobody will follow.
        let temp = self.root.create_temp()?;
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(&temp.file, target, 0) {
            self.root.discard_temp(temp);
            return Err(FsError::io("write conflict copy", path, e));
        }
        let name = format!(
            "{}.symlink",
            String::from_utf8_lossy(path.name().unwrap_or(b"link"))
        );
        let parent = path.parent().unwrap_or_default();
        let at = parent
            .join(name.as_bytes())
            .map_err(|e| FsError::io("name conflict copy", path, std::io::Error::other(e)))?;
        self.root
            .commit_temp(temp, &at, 0o644, vmsync_core::Timestamp::default())?;
        Ok(())
    }

    fn make_parents(&self, path: &RelPath) -> Result<(), FsError> {
        let mut parents: Vec<RelPath> = path.ancestors().filter(|p| !p.is_root()).collect();
        parents.reverse();
        for p in parents {
            if self.root.stat(&p)?.is_none() {
                self.root.mkdir(&p, 0o755)?;
            }
        }
        Ok(())
    }
}
