//! Watching a share for changes: inotify (through `notify`) turns file events into
//! [`ChangeHints`] for the controller. Events are hints, never facts (HOSTILE rule 17): they
//! are coalesced into a bounded set of paths, and whatever cannot be described that way (an
//! overflowed event queue, too many paths, a directory that could not be watched) becomes
//! "rescan everything".
//!
//! Coalescing needs no timer: hints accumulate while the controller is busy with a cycle and
//! are taken all at once when it asks again, so a burst of thousands of events costs one
//! targeted cycle, and a single edit is handed over the moment it happens.

use crate::filter::Filter;
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vmsync_core::endpoint::ChangeHints;
use vmsync_core::path::RESERVED_NAME;
use vmsync_core::RelPath;

/// More pending paths than this and the hint becomes "rescan everything": a rescan is cheaper
/// than a scope list that long, and memory stays bounded whatever the event storm.
pub const MAX_HINT_PATHS: usize = 4096;

/// The hints gathered since they were last taken.
#[derive(Debug, Default)]
pub struct HintSet {
    paths: BTreeSet<RelPath>,
    rescan: bool,
}

impl HintSet {
    /// Adds a changed path, keeping the set free of paths beneath other paths in it.
    pub fn add(&mut self, path: RelPath) {
        if self.rescan {
            return;
        }
        if path.is_root() {
            return self.add_rescan();
        }
        if path.ancestors().any(|a| self.paths.contains(&a)) || self.paths.contains(&path) {
            return;
        }
        let beneath: Vec<RelPath> = self
            .paths
            .range(path.clone()..)
            .take_while(|p| p.as_bytes().starts_with(path.as_bytes()))
            .filter(|p| path.is_ancestor_of(p))
            .cloned()
            .collect();
        for p in beneath {
            self.paths.remove(&p);
        }
        self.paths.insert(path);
        if self.paths.len() > MAX_HINT_PATHS {
            self.add_rescan();
        }
    }

    pub fn add_rescan(&mut self) {
        self.rescan = true;
        self.paths.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.rescan
    }

    pub fn take(&mut self) -> ChangeHints {
        let taken = std::mem::take(self);
        ChangeHints {
            paths: taken.paths.into_iter().collect(),
            rescan: taken.rescan,
        }
    }
}

/// Shared between the notify callback thread and the consumer.
#[derive(Default)]
struct Shared {
    hints: Mutex<HintSet>,
    wake: tokio::sync::Notify,
}

/// A running watch on one share root. Dropping it stops watching.
pub struct ShareWatcher {
    shared: Arc<Shared>,
    _watcher: notify::RecommendedWatcher,
}

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    #[source]
    pub source: notify::Error,
}

impl WatchError {
    /// The inotify watch limit (`fs.inotify.max_user_watches`) was reached.
    pub fn is_watch_limit(&self) -> bool {
        matches!(self.source.kind, notify::ErrorKind::MaxFilesWatch)
            || matches!(&self.source.kind, notify::ErrorKind::Io(e) if e.raw_os_error() == Some(28))
    }
}

impl ShareWatcher {
    /// Starts watching `root` recursively. Paths the filter ignores are dropped.
    pub fn start(root: &Path, filter: Filter) -> Result<ShareWatcher, WatchError> {
        let shared = Arc::new(Shared::default());
        let cb_shared = shared.clone();
        let cb_root = root.to_path_buf();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let mut hints = match cb_shared.hints.lock() {
                    Ok(h) => h,
                    Err(poisoned) => poisoned.into_inner(),
                };
                match event {
                    Ok(event) => {
                        if event.need_rescan() {
                            hints.add_rescan();
                        } else if !matches!(event.kind, EventKind::Access(_)) {
                            for path in &event.paths {
                                if let Some(rel) = relative(&cb_root, path) {
                                    if !filter.is_ignored(&rel, false) {
                                        hints.add(rel);
                                    }
                                }
                            }
                        }
                    }
                    // A watch that failed (a new directory past the watch limit, a queue overflow):
                    // the only safe hint left is "rescan everything".
                    Err(e) => {
                        tracing::warn!(root = %cb_root.display(), "watch error: {e}");
                        hints.add_rescan();
                    }
                }
                if !hints.is_empty() {
                    cb_shared.wake.notify_one();
                }
            })
            .map_err(|source| WatchError {
                path: root.to_path_buf(),
                source,
            })?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|source| WatchError {
                path: root.to_path_buf(),
                source,
            })?;
        Ok(ShareWatcher {
            shared,
            _watcher: watcher,
        })
    }

    /// Waits until there are hints, then takes them all.
    /// Puts hints taken with [`ShareWatcher::next`] back, for a consumer that could not finish
    /// handling them (it was cancelled): they come out again, merged with newer ones.
    pub fn requeue(&self, taken: ChangeHints) {
        let mut hints = match self.shared.hints.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        if taken.rescan {
            hints.add_rescan();
        }
        for path in taken.paths {
            hints.add(path);
        }
        if !hints.is_empty() {
            self.shared.wake.notify_one();
        }
    }

    pub async fn next(&self) -> ChangeHints {
        loop {
            let notified = self.shared.wake.notified();
            if let Ok(mut hints) = self.shared.hints.lock() {
                if !hints.is_empty() {
                    return hints.take();
                }
            }
            notified.await;
        }
    }
}

/// `path` relative to `root` as a `RelPath`; `None` outside the root, inside the reserved
/// directory, or not a valid share path.
fn relative(root: &Path, path: &Path) -> Option<RelPath> {
    let rel = path.strip_prefix(root).ok()?;
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Some(RelPath::root());
    }
    let first = bytes.split(|&b| b == b'/').next()?;
    if first == RESERVED_NAME {
        return None;
    }
    RelPath::from_bytes(OsStr::from_bytes(bytes).as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn coalesces_paths_beneath_others() {
        let mut h = HintSet::default();
        for s in ["a/b/c", "a/b/d", "x", "a/b", "a/bc", "x/y"] {
            h.add(p(s));
        }
        let got: Vec<String> = h.take().paths.iter().map(|p| p.escaped()).collect();
        assert_eq!(got, ["a/b", "a/bc", "x"]);
        assert!(h.is_empty());
    }

    #[test]
    fn too_many_paths_become_a_rescan() {
        let mut h = HintSet::default();
        for i in 0..=MAX_HINT_PATHS {
            h.add(p(&format!("f{i}")));
        }
        let taken = h.take();
        assert!(taken.rescan);
        assert!(taken.paths.is_empty());
    }

    #[test]
    fn the_root_or_the_reserved_dir() {
        let mut h = HintSet::default();
        h.add(RelPath::root());
        assert!(h.take().rescan);
        let root = Path::new("/s");
        assert_eq!(relative(root, Path::new("/s/.vmsync/tmp/t.1")), None);
        assert_eq!(relative(root, Path::new("/other/x")), None);
        assert_eq!(relative(root, Path::new("/s/a/b")), Some(p("a/b")));
    }

    #[tokio::test]
    async fn real_events_become_hints() {
        let dir = tempfile::tempdir().unwrap();
        let w = ShareWatcher::start(dir.path(), Filter::new(&["*.swp".into()]).unwrap()).unwrap();
        std::fs::write(dir.path().join("x.swp"), "ignored").unwrap();
        std::fs::create_dir_all(dir.path().join("new/deeper")).unwrap();
        std::fs::write(dir.path().join("file"), "data").unwrap();
        let mut seen = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(seen.contains("file") && seen.contains("new")) {
            let hints = tokio::time::timeout_at(deadline, w.next())
                .await
                .expect("hints in time");
            assert!(!hints.rescan);
            seen.extend(hints.paths.iter().map(|p| p.escaped()));
        }
        assert!(!seen.contains("x.swp"), "{seen:?}");
    }
}
