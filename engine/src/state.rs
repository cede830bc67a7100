//! The state database (redb, one file per agent under its `state_dir`). Per share it holds:
//! - the file index (`index:<share>`): path → identity + digest + chunk list, so a restart
//!   re-hashes only files whose size, mtime, ctime or inode changed; and beside it
//!   (`chunks:<share>`) chunk id + path → the chunk's place in that file. Read and written in
//!   place by [`crate::index::FileIndex`]. A cache: losing it costs a re-hash, never data.
//! - on the host, the ancestor (`ancestor:<share>`): path → entry, the last state both sides
//!   agreed on, and the share's meta record (root ids, safety halt), and its generation
//!   record (`generation:<share>` in the meta table, see [`Generation`]).
//!
//! redb holds an exclusive lock on the file, so a second agent on the same state directory
//! fails to start instead of racing the first.
//!
//! A database that is missing, truncated or garbage never stops an agent and never deletes
//! anything: [`StateDb::open_or_recover`] sets a damaged file aside and starts a new one, and
//! a record that cannot be read is treated as absent. On the host an empty ancestor means the
//! next cycle merges both sides add-only (see `docs/safety.md`, "Lost or damaged state").

use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vmsync_core::endpoint::RootId;
use vmsync_core::safety::HaltReason;
use vmsync_core::{Entry, RelPath};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("state database: {0}")]
    Db(#[from] redb::Error),
    #[error("state database record for `{key}` is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: postcard::Error,
    },
    #[error("creating state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StateError {
    /// True when another process holds the database (a second agent for the same state dir).
    pub fn is_locked(&self) -> bool {
        matches!(
            self,
            StateError::Open {
                source: redb::DatabaseError::DatabaseAlreadyOpen,
                ..
            }
        )
    }
}

impl From<redb::TableError> for StateError {
    fn from(e: redb::TableError) -> StateError {
        StateError::Db(e.into())
    }
}

impl From<redb::StorageError> for StateError {
    fn from(e: redb::StorageError) -> StateError {
        StateError::Db(e.into())
    }
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StateError::Db(e.into()))
    };
}

/// What the host remembers about a share between cycles besides its ancestor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMeta {
    pub host_root: Option<RootId>,
    pub guest_root: Option<RootId>,
    pub halt: Option<HaltReason>,
}

/// The host's record of a share's generation (`vmsync_core::rollback`): the value the guest
/// noted before the ancestor was last recorded, and whether the next full cycle is the
/// add-only merge that follows `resume` of a rolled-back guest. Kept apart from [`ShareMeta`]
/// so that it is written in the same transaction as the ancestor, and so that a database from
/// before generations existed still decodes (its shares are at generation 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub value: u64,
    pub merge_pending: bool,
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The generation record's key in the meta table; share names cannot hold a `:`.
fn generation_key(share: &str) -> String {
    format!("generation:{share}")
}

/// The key of the share's host directory (as the configuration named it when it was last
/// synced) in the meta table.
fn host_path_key(share: &str) -> String {
    format!("host-path:{share}")
}

fn ancestor_table(share: &str) -> String {
    format!("ancestor:{share}")
}

pub struct StateDb {
    db: Database,
    /// Index commits made without fsync since the last durable commit (see
    /// [`MAX_NON_DURABLE_COMMITS`]).
    non_durable: std::sync::atomic::AtomicU32,
}

/// Index commits skip the fsync, but redb keeps what such a commit wrote in memory, and frees
/// no page, until a durable commit: a side whose index is all it writes (the guest) would grow
/// without bound. Every this many, the index commit is made durable.
pub const MAX_NON_DURABLE_COMMITS: u32 = 64;

/// The state database's page cache. redb's default (1 GiB) let it keep every page of a big
/// share's index and ancestor in memory: about 430 bytes a file on the host at 200,000 files
/// (docs/performance.md, "Memory at scale"). Index lookups read through it; a scan looks
/// files up in path order, the order of the table's pages, so a small cache serves it, and a
/// page it misses is read from the kernel's page cache. At 16 MiB it filled up in the
/// standard benchmark's initial sync (20,000 files) and stayed full: 15-16 MiB of each
/// agent's RSS at rest and at every peak after, for lookups that gain little from it.
pub const STATE_CACHE_BYTES: usize = 4 << 20;

impl StateDb {
    /// Opens (creating) `<dir>/<file_name>`, creating `dir` with mode 0700 if needed, with a page
    /// cache of [`STATE_CACHE_BYTES`].
    pub fn open(dir: &Path, file_name: &str) -> Result<StateDb, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(file_name);
        let db = redb::Builder::new()
            .set_cache_size(STATE_CACHE_BYTES)
            .create(&path)
            .map_err(|source| StateError::Open { path, source })?;
        Ok(StateDb {
            db,
            non_durable: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Opens the database like [`StateDb::open`]; when the file exists but cannot be opened
    /// as a database (truncated, garbage, written by something else), renames it to
    /// `<file_name>.damaged-<unix seconds>` beside it and starts a new one. Returns, with the
    /// database, what was done, for the agent to show. A database another process holds is
    /// still an error: that is a second agent, not damage.
    pub fn open_or_recover(
        dir: &Path,
        file_name: &str,
    ) -> Result<(StateDb, Option<String>), StateError> {
        match StateDb::open(dir, file_name) {
            Ok(db) => Ok((db, None)),
            Err(e) if e.is_locked() || matches!(e, StateError::Dir { .. }) => Err(e),
            Err(e) => {
                let path = dir.join(file_name);
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.join(format!("{file_name}.damaged-{secs}"));
                std::fs::rename(&path, &aside).map_err(|source| StateError::Dir {
                    path: aside.clone(),
                    source,
                })?;
                let notice = format!(
                    "the state database {} could not be read ({e}); it was moved to {} and a \
                     new one started: the next cycle merges both sides add-only (nothing is \
                     deleted anywhere)",
                    path.display(),
                    aside.display()
                );
                tracing::warn!("{notice}");
                Ok((StateDb::open(dir, file_name)?, Some(notice)))
            }
        }
    }

    /// A read transaction (the file index reads through it).
    pub(crate) fn read(&self) -> Result<redb::ReadTransaction, redb::Error> {
        Ok(self.db.begin_read()?)
    }

    /// Runs `write` in one write transaction of the file index and commits it. Not fsynced
    /// (the index is a cache, and the ancestor commit that follows a cycle makes it durable),
    /// except every [`MAX_NON_DURABLE_COMMITS`]th, which bounds what redb holds in memory.
    pub(crate) fn write_index<R>(
        &self,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        use std::sync::atomic::Ordering;
        let made = self.non_durable.fetch_add(1, Ordering::Relaxed) + 1;
        let durability = if made >= MAX_NON_DURABLE_COMMITS {
            Durability::Immediate
        } else {
            Durability::None
        };
        let mut txn = db_err!(self.db.begin_write())?;
        db_err!(txn.set_durability(durability))?;
        let out = write(&txn)?;
        db_err!(txn.commit())?;
        if matches!(durability, Durability::Immediate) {
            self.non_durable.store(0, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Calls `each` with the ancestor's entries whose paths fall in `range` (of path bytes),
    /// in order. A row that cannot be read is skipped: the path counts as new on both sides
    /// (add-only), never as deleted.
    pub fn ancestor_range<'r>(
        &self,
        share: &str,
        range: impl std::ops::RangeBounds<&'r [u8]>,
        mut each: impl FnMut(RelPath, Entry),
    ) -> Result<(), StateError> {
        let name = ancestor_table(share);
        let txn = db_err!(self.db.begin_read())?;
        let table = match txn.open_table(TableDefinition::<&[u8], &[u8]>::new(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for row in table.range(range)? {
            let (k, v) = row?;
            let (Ok(path), Ok(entry)) = (
                RelPath::from_bytes(k.value()),
                postcard::from_bytes(v.value()),
            ) else {
                continue;
            };
            each(path, entry);
        }
        Ok(())
    }

    /// The ancestor's entry at `path`.
    pub fn ancestor_entry(&self, share: &str, path: &RelPath) -> Result<Option<Entry>, StateError> {
        let name = ancestor_table(share);
        let txn = db_err!(self.db.begin_read())?;
        let table = match txn.open_table(TableDefinition::<&[u8], &[u8]>::new(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table
            .get(path.as_bytes())?
            .and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    /// Applies ancestor changes durably (fsync before returning). Returns what each changed
    /// path held before (`None`: nothing, or nothing readable).
    pub fn update_ancestor<'a>(
        &self,
        share: &str,
        changes: impl IntoIterator<Item = (&'a RelPath, Option<&'a Entry>)>,
    ) -> Result<Vec<Option<Entry>>, StateError> {
        let name = ancestor_table(share);
        let txn = db_err!(self.db.begin_write())?;
        let olds = {
            let mut table = db_err!(txn.open_table(TableDefinition::<&[u8], &[u8]>::new(&name)))?;
            write_rows(&mut table, changes)?
        };
        db_err!(txn.commit())?;
        Ok(olds)
    }

    /// Forgets a share's ancestor entirely (after `resume` of a replaced root: the next cycle
    /// then merges both sides add-only).
    pub fn clear_ancestor(&self, share: &str) -> Result<(), StateError> {
        let name = ancestor_table(share);
        let txn = db_err!(self.db.begin_write())?;
        db_err!(txn.delete_table(TableDefinition::<&[u8], &[u8]>::new(&name)))?;
        db_err!(txn.commit())
    }

    /// A share's generation record; the default (generation 0) when there is none.
    pub fn load_generation(&self, share: &str) -> Result<Generation, StateError> {
        let key = generation_key(share);
        let txn = db_err!(self.db.begin_read())?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Generation::default()),
            Err(e) => return Err(StateError::Db(e.into())),
        };
        match db_err!(table.get(key.as_str()))? {
            None => Ok(Generation::default()),
            Some(v) => postcard::from_bytes(v.value())
                .map_err(|source| StateError::Corrupt { key, source }),
        }
    }

    /// Records a share's generation on its own (durably).
    pub fn store_generation(&self, share: &str, generation: Generation) -> Result<(), StateError> {
        self.commit_ancestor(share, &[], false, generation)
            .map(drop)
    }

    /// Applies ancestor changes and records the generation in one durable transaction; with
    /// `replace`, the ancestor is first emptied (so `changes` become the whole of it). Returns
    /// what each changed path held before (`None`: nothing, or nothing readable).
    pub fn commit_ancestor<'a>(
        &self,
        share: &str,
        changes: &[(&'a RelPath, Option<&'a Entry>)],
        replace: bool,
        generation: Generation,
    ) -> Result<Vec<Option<Entry>>, StateError> {
        let key = generation_key(share);
        let record = postcard::to_allocvec(&generation).map_err(|source| StateError::Corrupt {
            key: key.clone(),
            source,
        })?;
        let name = ancestor_table(share);
        let def = TableDefinition::<&[u8], &[u8]>::new(&name);
        let mut txn = db_err!(self.db.begin_write())?;
        db_err!(txn.set_durability(Durability::Immediate))?;
        if replace {
            db_err!(txn.delete_table(def))?;
        }
        let olds = {
            let mut table = db_err!(txn.open_table(def))?;
            let olds = write_rows(&mut table, changes.iter().copied())?;
            let mut meta = db_err!(txn.open_table(META))?;
            db_err!(meta.insert(key.as_str(), record.as_slice()))?;
            olds
        };
        db_err!(txn.commit())?;
        Ok(olds)
    }

    pub fn load_meta(&self, share: &str) -> Result<ShareMeta, StateError> {
        let txn = db_err!(self.db.begin_read())?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(ShareMeta::default()),
            Err(e) => return Err(StateError::Db(e.into())),
        };
        match db_err!(table.get(share))? {
            None => Ok(ShareMeta::default()),
            Some(v) => postcard::from_bytes(v.value()).map_err(|source| StateError::Corrupt {
                key: format!("meta {share}"),
                source,
            }),
        }
    }

    /// The host directory the share had when it last started (`None`: never recorded).
    pub fn load_host_path(&self, share: &str) -> Result<Option<Vec<u8>>, StateError> {
        let key = host_path_key(share);
        let txn = db_err!(self.db.begin_read())?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(StateError::Db(e.into())),
        };
        Ok(db_err!(table.get(key.as_str()))?.map(|v| v.value().to_vec()))
    }

    pub fn store_host_path(&self, share: &str, path: &[u8]) -> Result<(), StateError> {
        let key = host_path_key(share);
        let txn = db_err!(self.db.begin_write())?;
        {
            let mut table = db_err!(txn.open_table(META))?;
            db_err!(table.insert(key.as_str(), path))?;
        }
        db_err!(txn.commit())
    }

    pub fn store_meta(&self, share: &str, meta: &ShareMeta) -> Result<(), StateError> {
        let bytes = postcard::to_allocvec(meta).map_err(|source| StateError::Corrupt {
            key: format!("meta {share}"),
            source,
        })?;
        let txn = db_err!(self.db.begin_write())?;
        {
            let mut table = db_err!(txn.open_table(META))?;
            db_err!(table.insert(share, bytes.as_slice()))?;
        }
        db_err!(txn.commit())
    }
}

/// Writes `changes` (`Some` upserts, `None` removes) to an ancestor table; returns what each
/// path held before.
fn write_rows<'a>(
    table: &mut redb::Table<&'static [u8], &'static [u8]>,
    changes: impl IntoIterator<Item = (&'a RelPath, Option<&'a Entry>)>,
) -> Result<Vec<Option<Entry>>, StateError> {
    let decode = |old: Option<redb::AccessGuard<&'static [u8]>>| {
        old.and_then(|v| postcard::from_bytes::<Entry>(v.value()).ok())
    };
    let mut olds = Vec::new();
    for (path, value) in changes {
        let old = match value {
            Some(v) => {
                let bytes = postcard::to_allocvec(v).map_err(|source| StateError::Corrupt {
                    key: path.escaped(),
                    source,
                })?;
                decode(table.insert(path.as_bytes(), bytes.as_slice())?)
            }
            None => decode(table.remove(path.as_bytes())?),
        };
        olds.push(old);
    }
    Ok(olds)
}

/// The changes a host is applying in a cycle and has not recorded in the ancestor yet, noted
/// beside the database before each transition is sent (appended, one frame per batch) and
/// removed once all of them are recorded. A host agent killed in between finds them at start:
/// each may have landed on its destination, and the next full cycle records those its scans
/// find in place there (see `Controller`'s `unconfirmed`), so that a later deletion of such a
/// file on the other side is not read as a creation. Written without fsync: it guards against
/// a killed process, whose page cache survives; after a power loss the destination may have
/// lost the batch as well.
pub struct PendingBatch {
    path: PathBuf,
}

/// One change in flight: the side it changes, the path, the entry it leaves there.
pub type InFlight = (vmsync_core::reconcile::Side, RelPath, Option<Entry>);

impl PendingBatch {
    pub fn new(state_dir: &Path, share: &str) -> PendingBatch {
        PendingBatch {
            path: state_dir.join(format!("pending-{share}.postcard")),
        }
    }

    /// Notes `changes` as possibly landing, after those noted since the last `clear`.
    pub fn append(&self, changes: &[InFlight]) {
        use std::io::Write;
        let written = postcard::to_allocvec(changes)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let len = u32::try_from(bytes.len()).map_err(|e| e.to_string())?;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| e.to_string())?;
                let mut frame = len.to_le_bytes().to_vec();
                frame.extend_from_slice(&bytes);
                file.write_all(&frame).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), "noting changes in flight: {e}");
        }
    }

    /// Forgets what was in flight (it was recorded, or found in place).
    pub fn clear(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), "{e}"),
        }
    }

    /// What a previous run left in flight. A torn or unreadable frame ends the list.
    pub fn load(&self) -> Vec<InFlight> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let mut out = Vec::new();
        let mut rest = bytes.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let Some(frame) = tail.get(..len) else { break };
            match postcard::from_bytes::<Vec<InFlight>>(frame) {
                Ok(items) => out.extend(items),
                Err(_) => break,
            }
            rest = tail.get(len..).unwrap_or_default();
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod pending_tests {
    use super::*;
    use vmsync_core::reconcile::Side;

    #[test]
    fn pending_changes_append_load_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingBatch::new(dir.path(), "s");
        assert!(pending.load().is_empty());
        let p = |s: &str| RelPath::from_bytes(s.as_bytes()).unwrap();
        pending.append(&[(Side::Guest, p("a"), None)]);
        pending.append(&[(
            Side::Host,
            p("b"),
            Some(Entry::Dir {
                mode: 0o755,
                mtime: Default::default(),
            }),
        )]);
        assert_eq!(
            pending.load(),
            [
                (Side::Guest, p("a"), None),
                (
                    Side::Host,
                    p("b"),
                    Some(Entry::Dir {
                        mode: 0o755,
                        mtime: Default::default()
                    })
                )
            ]
        );
        // A frame torn by a crash ends the list; what came before it stands.
        let mut bytes = std::fs::read(dir.path().join("pending-s.postcard")).unwrap();
        bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
        std::fs::write(dir.path().join("pending-s.postcard"), bytes).unwrap();
        assert_eq!(pending.load().len(), 2);
        pending.clear();
        assert!(pending.load().is_empty());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod durability_tests {
    use super::*;
    use crate::index::{test_record, FileIndex, IndexRecord};

    /// A record that differs for every `i` below 256.
    fn record(i: u64) -> IndexRecord {
        test_record(&[(i as u8, 1 + i as u32)])
    }

    /// redb writes a commit made without fsync only at the next durable one, holding it in
    /// memory until then: index commits alone must reach the file every
    /// `MAX_NON_DURABLE_COMMITS`, or a guest's memory grows for as long as it runs.
    #[test]
    fn index_commits_reach_the_file_every_so_often() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(StateDb::open(dir.path(), "t.redb").unwrap());
        let mut index = FileIndex::open(db.clone(), "s").unwrap();
        let file = dir.path().join("t.redb");
        let path = RelPath::from_bytes(b"f").unwrap();
        let mut writes = Vec::new();
        // What the file holds, without the zeros redb adds when it grows the file.
        let read = || {
            let mut bytes = std::fs::read(&file).unwrap();
            let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            bytes.truncate(end);
            bytes
        };
        let mut before = read();
        for i in 0..3 * u64::from(MAX_NON_DURABLE_COMMITS) {
            index.apply([(&path, Some(&record(i)))]).unwrap();
            let now = read();
            if now != before {
                writes.push(i + 1);
                before = now;
            }
        }
        let every = u64::from(MAX_NON_DURABLE_COMMITS);
        assert_eq!(writes, [every, 2 * every, 3 * every]);
        // And what the last one wrote is what a restart reads.
        drop((index, db));
        let db = std::sync::Arc::new(StateDb::open(dir.path(), "t.redb").unwrap());
        let loaded: Vec<_> = FileIndex::open(db, "s")
            .unwrap()
            .reader()
            .records()
            .collect();
        assert_eq!(loaded, [(path, record(3 * every - 1))]);
    }
}
