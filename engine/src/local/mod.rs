//! The local side of a share: implements [`Endpoint`](vmsync_core::endpoint::Endpoint) over a
//! directory on this machine. The host uses it for its own share; the guest serves it to the
//! host over the wire.
//!
//! Staging: `stage` builds each incoming file in a temp file in the share's reserved directory
//! from chunks found locally (verified on read), `supply` writes the rest (verified against
//! their ids), and `transition` checks the target still is what the scan saw, then renames the
//! temp into place (see [`ShareRoot::commit_temp`]). A staged file's digest is verified by
//! construction: its manifest must hash to the file digest and every chunk to its id.
//!
//! Deltas: when a file being staged replaces one this side already has at that path, `stage`
//! offers, for each missing chunk where the old file probably holds similar bytes, a base: the
//! signature of those old bytes ([`vmsync_core::delta::base_windows`] picks them). As a source,
//! `read_deltas` answers such a read with a delta when that is smaller than the chunk. `supply`
//! re-reads the base (it is not kept in memory), applies the delta and verifies the result
//! against the chunk id; one that does not verify stays missing, for the controller to send
//! whole.
//!
//! Early sealing: the moment a staged file is complete (`stage` found every chunk locally, or
//! `supply` wrote its last missing one), its seal (mode, mtime, fsync) goes to the share's
//! background [`Sealer`], so the disk flush overlaps the rest of the transfer; except for a
//! lone file that completes the transfer (a live edit), which its transition seals without a
//! thread hand-off. `transition`
//! then only waits for seals still running (and runs itself those not yet started), and renames
//! a temp only once its seal succeeded. Dropping a staged file drops its
//! [`SealHandle`](crate::seal::SealHandle), which cancels the seal (or throws its result away).
//!
//! The trash: nothing a transition deletes or replaces is unlinked. A file or symlink being
//! deleted is moved into the share's trash, one being replaced is linked there first
//! ([`ShareRoot::trash_remove`], [`ShareRoot::trash_link`]); if it cannot be kept, the change
//! fails. Recent moves are remembered for `put_back`, and a background [`Pruner`] applies the
//! share's retention (see [`crate::trash`] and docs/safety.md).
//!
//! All filesystem work is blocking; each call runs on tokio's blocking pool.
//!
//! Module map:
//! - this file: [`LocalShare`] (one share's state) and what every part uses: opening the root,
//!   scans, the generation mark, manifests, the free-space check, remembered faults.
//! - `endpoint`: [`LocalEndpoint`], the `Endpoint` over a [`LocalShare`]: runs each call on
//!   the blocking pool, and its watch loop (`changes`).
//! - `source`: serving reads as a source: chunks, and deltas against offered bases.
//! - `stage`: building incoming files in temp files (`stage`, `supply`), early sealing, and
//!   batched `pwritev` writes.
//! - `transition`: putting staged files and other changes in place, sealing what is not sealed
//!   yet, keeping what they replace in the trash, and `put_back`.
//! - `echo`: watcher hints made fit for the controller: this side's own echoes dropped,
//!   hard-linked files' other names added.

mod echo;
mod endpoint;
mod source;
mod stage;
#[cfg(test)]
mod test_support;
mod transition;

pub use endpoint::{LocalEndpoint, SyncObserver};

use crate::echoes::Echoes;
use crate::filter::Filter;
use crate::gitignore::RulesCache;
use crate::index::FileIndex;
use crate::links::LinkMap;
use crate::reuse::ZeroChunks;
use crate::root::{AgentLock, FsErrorKind, ShareRoot};
use crate::scan::scan;
use crate::seal::Sealer;
use crate::trash::{KeptLog, Pruner, TrashTotals};
use crate::watch::SharedRules;
use stage::{Base, Staged};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use vmsync_core::endpoint::{EndpointError, Problem, RootId, ScanOptions, ScanReport, ScanScope};
use vmsync_core::reserve::MinFree;
use vmsync_core::{FileMeta, Hash, Manifest, RelPath};

/// Whether [`Endpoint::mark`](vmsync_core::endpoint::Endpoint::mark) fdatasyncs the generation
/// file (and fsyncs `.vmsync/`): see `docs/safety.md`, "Snapshot reverts", for what a guest
/// crash does either way.
const MARK_FSYNC: bool = false;

/// One share directory on this machine.
pub struct LocalShare {
    name: String,
    path: PathBuf,
    /// Shared so that a transition's [`Batch`](crate::root::Batch) can hold it while the
    /// transition changes the rest of the share.
    root: Option<Arc<ShareRoot>>,
    /// This agent's hold on the share directory (`crate::root::AgentLock`): taken at the first
    /// scan that opens the root, and again if the reserved directory was replaced.
    lock: Option<AgentLock>,
    filter: Filter,
    /// The tree's compiled ignore files, kept between scans.
    rules: RulesCache,
    /// What the watcher knows of the ignore rules; scans keep it current.
    watch_rules: SharedRules,
    index: FileIndex,
    /// Which files here are hard links of each other, as scans and transitions saw them.
    links: LinkMap,
    /// Files the current transition committed whose source has other names for them: linked
    /// to those names here once the transition's changes are all in place.
    to_link: Vec<(RelPath, Vec<RelPath>)>,
    staged: HashMap<RelPath, Staged>,
    /// Chunk id → staged paths waiting for it.
    wanted: HashMap<Hash, Vec<RelPath>>,
    /// Chunk id → the base offered for it (only for wanted chunks).
    bases: HashMap<Hash, Base>,
    /// What this side's own transitions left at a path: a file of this identity, or (`None`)
    /// nothing. A watcher hint for such a path that still finds exactly that is our own echo,
    /// and is not passed on (see [`LocalShare::drop_echoes`]).
    /// Remembered for a short while only (see `engine/src/echoes.rs`).
    echoes: Echoes,
    /// Directories whose time this side's own transitions put back (see `ParentTimes` in
    /// `transition.rs`), with the identity they were left with: a watcher hint for only their
    /// attributes that still finds them so is an echo too. Remembered like `echoes`, for a
    /// short while: one whose hint never comes (the directory was removed, or its hint came
    /// with a content hint that covers it) is forgotten, not kept for the agent's life.
    dir_echoes: Echoes,
    /// Files read and hashed by scans since start (a restart with nothing changed adds none).
    files_hashed: u64,
    /// Seals complete staged files in the background (see the module docs).
    sealer: Sealer,
    /// Recent trash moves, for `put_back`.
    kept: KeptLog,
    /// What the running transition kept in the trash, by batch (files, bytes): told to the
    /// pruner after it.
    trashed: Vec<(String, u64, u64)>,
    /// The share's trash pruner, once retention is set ([`LocalEndpoint::set_retention`]).
    pruner: Option<Pruner>,
    /// The bytes of the indexed files, for the pruner's percentage limit.
    share_bytes: Arc<AtomicU64>,
    /// What the trash holds, as the pruner last measured it.
    trash_totals: Arc<TrashTotals>,
    /// Staged files dropped by a filesystem fault (a failed write or fsync), and why: their
    /// transition fails with that reason, and their temp is already gone.
    faulted: HashMap<RelPath, String>,
    /// The free space this side keeps on the share's filesystem (`min_free`).
    min_free: MinFree,
    /// Ids of all-zero chunks, which are never written (they stay holes).
    zeros: ZeroChunks,
    /// Most files staged at once (each holds a temp file open): past it, `stage` answers
    /// [`NotStaged::NoRoom`](vmsync_core::endpoint::NotStaged::NoRoom). Set when the endpoint
    /// is opened; the agent sets it from its fd limit (see [`LocalEndpoint::set_max_staged`]).
    max_staged: usize,
}

fn not_scanned() -> EndpointError {
    EndpointError::Protocol("share used before its first scan".into())
}

fn io_err(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Io(e.to_string())
}

impl LocalShare {
    fn root(&self) -> Result<&ShareRoot, EndpointError> {
        self.root.as_deref().ok_or_else(not_scanned)
    }

    /// [`LocalShare::root`], as a handle of its own (for a [`Batch`](crate::root::Batch)).
    fn shared_root(&self) -> Result<Arc<ShareRoot>, EndpointError> {
        self.root.clone().ok_or_else(not_scanned)
    }

    fn open_root(&mut self) -> Result<(), EndpointError> {
        let shown = self.path.display().to_string();
        match ShareRoot::open(&self.path) {
            Ok(root) => {
                // Before anything else: the temps it would clean could be another agent's.
                if !self.lock.as_ref().is_some_and(|l| root.is_locked_by(l)) {
                    self.lock = None;
                    match root.lock_for_agent() {
                        Ok(Some(lock)) => self.lock = Some(lock),
                        Ok(None) => {
                            self.root = None;
                            return Err(EndpointError::Io(format!(
                                "{shown}: another vmsync agent serves this directory (it holds \
                                 .vmsync/agent.lock); one agent per share directory"
                            )));
                        }
                        Err(e) => {
                            self.root = None;
                            return Err(EndpointError::Io(format!("{shown}: {e}")));
                        }
                    }
                }
                if let Err(e) = root.clean_temps() {
                    tracing::warn!(share = %self.name, "cleaning stale temp files: {e}");
                }
                self.root = Some(Arc::new(root));
                Ok(())
            }
            Err(e) => {
                self.root = None;
                Err(match e.kind() {
                    FsErrorKind::NotFound => EndpointError::RootMissing(shown),
                    FsErrorKind::Symlink | FsErrorKind::NotADirectory => {
                        EndpointError::RootNotDir(shown)
                    }
                    _ => EndpointError::Io(format!("{shown}: {e}")),
                })
            }
        }
    }

    fn scan(
        &mut self,
        scope: &ScanScope,
        options: &ScanOptions,
    ) -> Result<ScanReport, EndpointError> {
        // Re-open the root on every full scan: a root replaced or remounted since must be seen
        // as such, not through an old directory fd.
        if self.root.is_none() || *scope == ScanScope::Full {
            self.discard_staged();
            self.open_root()?;
        }
        let root = self.root()?;
        let (dev, ino) = root.dev_ino();
        let marker = match root.read_marker().map_err(io_err)? {
            Some(m) => Some(m),
            None if options.create_marker => {
                let mut id = [0u8; 16];
                rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())
                    .map_err(io_err)?;
                root.write_marker(id).map_err(io_err)?;
                Some(id)
            }
            None => None,
        };
        let generation = root.read_generation().map_err(io_err)?;
        if let Ok(mut w) = self.watch_rules.write() {
            w.rescanning(scope);
        }
        let out = scan(root, &self.filter, &self.index.reader(), &self.rules, scope);
        let out = out.map_err(|e| match e.kind() {
            FsErrorKind::NotFound => EndpointError::RootMissing(self.path.display().to_string()),
            _ => io_err(e),
        })?;
        if let Ok(mut w) = self.watch_rules.write() {
            w.ignored_dirs_found(&out.ignored_dirs);
        }
        match scope {
            ScanScope::Full => self.links.clear(),
            ScanScope::Paths(paths) => paths.iter().for_each(|p| self.links.forget_under(p)),
        }
        for (path, inode) in &out.linked {
            self.links.set(path, Some(*inode));
        }
        self.files_hashed += out.hashed.len() as u64;
        let changes = out
            .gone
            .iter()
            .map(|p| (p, None))
            .chain(out.hashed.iter().map(|(p, r)| (p, Some(r))));
        self.index.apply(changes).map_err(io_err)?;
        self.find_other_names(&out.linked);
        Ok(ScanReport {
            root: Some(RootId {
                marker: marker.unwrap_or(RootId::NO_MARKER),
                dev,
                ino,
            }),
            entries: out.entries,
            problems: out.problems,
            ignored: out.ignored,
            generation,
        })
    }

    fn mark(&mut self, generation: u64) -> Result<(), EndpointError> {
        self.root()?
            .write_generation(generation, MARK_FSYNC)
            .map_err(io_err)
    }

    fn manifests(&mut self, files: Vec<(RelPath, FileMeta)>) -> Vec<Result<Manifest, Problem>> {
        files
            .into_iter()
            .map(|(path, meta)| match self.index.get(&path) {
                Some(rec) if rec.meta.digest == meta.digest && rec.meta.size == meta.size => {
                    let mut manifest = rec.manifest();
                    manifest.links = self.links.others(&path);
                    Ok(manifest)
                }
                _ => Err(Problem {
                    path,
                    reason: "changed since it was scanned".into(),
                }),
            })
            .collect()
    }

    /// Refuses new content that would take the share's filesystem below its reserve.
    fn check_room(&self, incoming: u64) -> Result<(), EndpointError> {
        let root = self.root()?;
        let Ok((free, total)) = root.space() else {
            return Ok(());
        };
        let left = free.saturating_sub(incoming);
        match self.min_free.shortfall(left, total) {
            Some(reserve) => Err(EndpointError::DiskFull {
                free: left,
                reserve,
            }),
            None => Ok(()),
        }
    }

    /// Remembers why a staged file was dropped, for its transition to say.
    fn fault(&mut self, path: RelPath, reason: String) {
        if self.faulted.len() >= MAX_ECHOES {
            self.faulted.clear();
        }
        self.faulted.insert(path, reason);
    }
}

/// Most paths remembered as this side's own writes (see [`LocalShare::drop_echoes`]); past it
/// the memory starts over, and echoes are rescanned as before.
const MAX_ECHOES: usize = 65_536;
