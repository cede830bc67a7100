//! Shared fixtures for the reconcile tests: entry builders, and a simulator that carries out a
//! `Plan` on in-memory snapshots the way the controller does (verify `expected`, removals
//! children-first, then creations parents-first, losing versions into a conflict store).

// Each test binary uses its own subset of these helpers; a malformed fixture should panic.
#![allow(dead_code, clippy::unwrap_used)]

use std::ops::Bound;
use vmsync_core::reconcile::{Action, Plan, Side};
use vmsync_core::{Entry, FileMeta, Hash, RelPath, Snapshot, Timestamp};

pub fn path(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

/// A digest standing for content `content`: distinct ids give distinct digests.
pub fn digest(content: u8) -> Hash {
    let mut bytes = [0xc0; 32];
    bytes[0] = content;
    Hash(bytes)
}

/// A regular file with content `content`, mode 0644, modified at `mtime` seconds.
pub fn file(content: u8, mtime: i64) -> Entry {
    file_mode(content, mtime, 0o644)
}

pub fn file_mode(content: u8, mtime: i64, mode: u32) -> Entry {
    Entry::File(FileMeta {
        size: u64::from(content) * 100 + 1,
        mode,
        mtime: Timestamp::new(mtime, 0),
        digest: digest(content),
    })
}

pub fn dir() -> Entry {
    dir_mode(0o755)
}

pub fn dir_mode(mode: u32) -> Entry {
    Entry::Dir {
        mode,
        mtime: Default::default(),
    }
}

/// A directory, mode 0755, modified at `mtime` seconds.
pub fn dir_at(mtime: i64) -> Entry {
    dir_mode_at(0o755, mtime)
}

pub fn dir_mode_at(mode: u32, mtime: i64) -> Entry {
    Entry::Dir {
        mode,
        mtime: Timestamp::new(mtime, 0),
    }
}

/// A symlink to `target`, modified at `mtime` seconds.
pub fn link_at(target: &str, mtime: i64) -> Entry {
    Entry::Symlink {
        target: target.as_bytes().to_vec(),
        mtime: Timestamp::new(mtime, 0),
    }
}

pub fn link(target: &str) -> Entry {
    Entry::Symlink {
        target: target.as_bytes().to_vec(),
        mtime: Default::default(),
    }
}

pub fn snapshot<'a>(entries: impl IntoIterator<Item = (&'a str, Entry)>) -> Snapshot {
    entries.into_iter().map(|(p, e)| (path(p), e)).collect()
}

/// Files and symlinks: entries with content of their own, the things a conflict store keeps.
pub fn holds_content(e: &Entry) -> bool {
    !e.is_dir()
}

/// Same content, mtime aside; two absences count as the same.
pub fn same_version(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same_content(b),
        (None, None) => true,
        _ => false,
    }
}

/// Paths whose parent is not a directory in the same snapshot.
pub fn malformed(snap: &Snapshot) -> Vec<RelPath> {
    snap.keys()
        .filter(|p| match p.parent() {
            Some(parent) if !parent.is_root() => !snap.get(&parent).is_some_and(Entry::is_dir),
            _ => false,
        })
        .cloned()
        .collect()
}

pub fn has_children(snap: &Snapshot, dir: &RelPath) -> bool {
    snap.range((Bound::Excluded(dir), Bound::Unbounded))
        .next()
        .is_some_and(|(p, _)| dir.is_ancestor_of(p))
}

fn set(snap: &mut Snapshot, path: &RelPath, entry: Option<&Entry>) {
    match entry {
        Some(e) => {
            snap.insert(path.clone(), e.clone());
        }
        None => {
            snap.remove(path);
        }
    }
}

/// Both sides, the ancestor and the conflict store of one share.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub ancestor: Snapshot,
    pub host: Snapshot,
    pub guest: Snapshot,
    /// Versions saved because of `save_loser`: (side, path, the replaced entry).
    pub store: Vec<(Side, RelPath, Entry)>,
}

/// What went wrong while carrying out a plan. Both stay empty for a consistent plan on
/// unchanging sides.
#[derive(Debug, Default)]
pub struct Applied {
    /// Actions whose `expected` did not match the side (skipped, as the endpoint would).
    pub skipped: Vec<RelPath>,
    /// Actions the filesystem would refuse: no parent directory, or a directory that still
    /// has children when it is removed or replaced.
    pub errors: Vec<String>,
}

/// The controller's split: deletions and a directory replaced by a non-directory go
/// children-first; everything else parents-first, afterwards.
pub fn is_removal(a: &Action) -> bool {
    a.new.is_none()
        || (a.expected.as_ref().is_some_and(Entry::is_dir)
            && !a.new.as_ref().is_some_and(Entry::is_dir))
}

impl World {
    pub fn new(ancestor: Snapshot, host: Snapshot, guest: Snapshot) -> Self {
        World {
            ancestor,
            host,
            guest,
            store: Vec::new(),
        }
    }

    pub fn side(&self, side: Side) -> &Snapshot {
        match side {
            Side::Host => &self.host,
            Side::Guest => &self.guest,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut Snapshot {
        match side {
            Side::Host => &mut self.host,
            Side::Guest => &mut self.guest,
        }
    }

    /// Carries out `plan`; a successful action moves the ancestor at its path to `new`, and
    /// `agreed` entries are recorded. Conflicts change nothing.
    pub fn apply(&mut self, plan: &Plan) -> Applied {
        let mut report = Applied::default();
        let (mut removals, mut creations): (Vec<&Action>, Vec<&Action>) =
            plan.actions.iter().partition(|a| is_removal(a));
        removals.sort_by(|a, b| b.path.cmp(&a.path));
        creations.sort_by(|a, b| a.path.cmp(&b.path));
        for action in removals.into_iter().chain(creations) {
            self.apply_one(action, &mut report);
        }
        for (p, e) in &plan.agreed {
            set(&mut self.ancestor, p, e.as_ref());
        }
        report
    }

    fn apply_one(&mut self, a: &Action, report: &mut Applied) {
        let side = a.target.as_str();
        let snap = self.side(a.target);
        if snap.get(&a.path) != a.expected.as_ref() {
            report.skipped.push(a.path.clone());
            return;
        }
        if a.new.is_some() {
            if let Some(parent) = a.path.parent().filter(|p| !p.is_root()) {
                if !snap.get(&parent).is_some_and(Entry::is_dir) {
                    report
                        .errors
                        .push(format!("{}: no parent directory on the {side}", a.path));
                    return;
                }
            }
        }
        let removes_dir = a.expected.as_ref().is_some_and(Entry::is_dir)
            && !a.new.as_ref().is_some_and(Entry::is_dir);
        if removes_dir && has_children(snap, &a.path) {
            report
                .errors
                .push(format!("{}: directory not empty on the {side}", a.path));
            return;
        }
        if a.save_loser {
            match &a.expected {
                Some(e) => self.store.push((a.target, a.path.clone(), e.clone())),
                None => report
                    .errors
                    .push(format!("{}: save_loser with nothing to save", a.path)),
            }
        }
        set(self.side_mut(a.target), &a.path, a.new.as_ref());
        set(&mut self.ancestor, &a.path, a.new.as_ref());
    }
}
