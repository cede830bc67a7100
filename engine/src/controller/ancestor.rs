//! The ancestor of one share: the last state both sides agreed on (path → entry). It lives in
//! the state database and is read from it where a cycle needs it (all of it for a full cycle,
//! the scope's subtrees for a live one), so what the host holds at rest does not grow with the
//! share (docs/performance.md, "Memory at scale"). Every write goes through here and keeps the
//! running [`Totals`] exact without walking the ancestor: redb hands back what a write replaced.

use crate::filter::Filter;
use crate::planner::scope_parents;
use crate::state::{Generation, StateDb, StateError};
use std::sync::{Arc, Mutex, MutexGuard};
use vmsync_core::endpoint::ScanScope;
use vmsync_core::quota;
use vmsync_core::{Entry, RelPath, Snapshot};

/// One share's ancestor; clones share it (the transition recorder writes through one).
#[derive(Clone)]
pub(super) struct Ancestor {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<StateDb>,
    share: String,
    /// Paths the deletion guard does not count.
    exempt: Filter,
    /// Held across each write, so the totals always match the table.
    totals: Mutex<Totals>,
}

impl Ancestor {
    /// The ancestor of `share` in `db`, its totals counted.
    pub(super) fn open(
        db: Arc<StateDb>,
        share: &str,
        exempt: Filter,
    ) -> Result<Ancestor, StateError> {
        let mut totals = Totals::default();
        db.ancestor_range(share, .., |path, entry| totals.add(&path, &entry, &exempt))?;
        Ok(Ancestor {
            inner: Arc::new(Inner {
                db,
                share: share.to_string(),
                exempt,
                totals: Mutex::new(totals),
            }),
        })
    }

    fn totals_guard(&self) -> MutexGuard<'_, Totals> {
        self.inner
            .totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn totals(&self) -> Totals {
        *self.totals_guard()
    }

    pub(super) fn get(&self, path: &RelPath) -> Result<Option<Entry>, StateError> {
        self.inner.db.ancestor_entry(&self.inner.share, path)
    }

    /// What a cycle of `scope` compares against: all of the ancestor for a full cycle; for a
    /// targeted one, the entries at and beneath its paths and those of the directories they
    /// are in (see `crate::planner::views`).
    pub(super) fn scoped(&self, scope: &ScanScope) -> Result<Snapshot, StateError> {
        let (db, share) = (&self.inner.db, self.inner.share.as_str());
        let mut snap = Snapshot::new();
        let mut keep = |path: RelPath, entry: Entry| {
            snap.insert(path, entry);
        };
        match scope {
            ScanScope::Full => db.ancestor_range(share, .., &mut keep)?,
            ScanScope::Paths(paths) => {
                for path in paths {
                    if path.is_root() {
                        db.ancestor_range(share, .., &mut keep)?;
                        continue;
                    }
                    if let Some(entry) = db.ancestor_entry(share, path)? {
                        keep(path.clone(), entry);
                    }
                    // Exactly the paths beneath: those starting with "path/".
                    let mut lo = path.as_bytes().to_vec();
                    lo.push(b'/');
                    let mut hi = path.as_bytes().to_vec();
                    hi.push(b'/' + 1);
                    db.ancestor_range(share, lo.as_slice()..hi.as_slice(), &mut keep)?;
                }
                for dir in scope_parents(paths) {
                    if let Some(entry) = db.ancestor_entry(share, &dir)? {
                        keep(dir, entry);
                    }
                }
            }
        }
        Ok(snap)
    }

    /// Records `changes` and `generation` in one durable transaction (see
    /// [`StateDb::commit_ancestor`]); with `replace`, `changes` become the whole ancestor.
    pub(super) fn commit(
        &self,
        changes: &[(&RelPath, Option<&Entry>)],
        replace: bool,
        generation: Generation,
    ) -> Result<(), StateError> {
        let mut totals = self.totals_guard();
        let olds =
            self.inner
                .db
                .commit_ancestor(&self.inner.share, changes, replace, generation)?;
        if replace {
            *totals = Totals::default();
        }
        self.count(&mut totals, changes, olds);
        Ok(())
    }

    /// Records `changes` durably, with no new generation (a conflict resolved by hand).
    pub(super) fn update(&self, changes: &[(&RelPath, Option<&Entry>)]) -> Result<(), StateError> {
        let mut totals = self.totals_guard();
        let olds = self
            .inner
            .db
            .update_ancestor(&self.inner.share, changes.iter().copied())?;
        self.count(&mut totals, changes, olds);
        Ok(())
    }

    /// Forgets the whole ancestor: the next cycle merges both sides add-only.
    pub(super) fn clear(&self) -> Result<(), StateError> {
        let mut totals = self.totals_guard();
        self.inner.db.clear_ancestor(&self.inner.share)?;
        *totals = Totals::default();
        Ok(())
    }

    fn count(
        &self,
        totals: &mut Totals,
        changes: &[(&RelPath, Option<&Entry>)],
        olds: Vec<Option<Entry>>,
    ) {
        for (&(path, new), old) in changes.iter().zip(olds) {
            totals.change(path, old.as_ref(), new, &self.inner.exempt);
        }
    }
}

/// Regular files in a snapshot, what the quotas count (their total size among it), and the
/// entries the deletion guard counts (files and symlinks at paths not exempt).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) files: u64,
    pub(super) countable: u64,
    pub(super) usage: quota::Usage,
}

impl Totals {
    #[cfg(test)]
    fn of(snap: &Snapshot, exempt: &Filter) -> Totals {
        let mut t = Totals::default();
        snap.iter().for_each(|(p, e)| t.add(p, e, exempt));
        t
    }

    fn add(&mut self, path: &RelPath, e: &Entry, exempt: &Filter) {
        self.usage.add(e);
        if e.as_file().is_some() {
            self.files += 1;
        }
        if !e.is_dir() && !exempt.is_ignored(path, false) {
            self.countable += 1;
        }
    }

    fn remove(&mut self, path: &RelPath, e: &Entry, exempt: &Filter) {
        self.usage.remove(e);
        if e.as_file().is_some() {
            self.files = self.files.saturating_sub(1);
        }
        if !e.is_dir() && !exempt.is_ignored(path, false) {
            self.countable = self.countable.saturating_sub(1);
        }
    }

    /// `path` held `old` and holds `new` now.
    fn change(
        &mut self,
        path: &RelPath,
        old: Option<&Entry>,
        new: Option<&Entry>,
        exempt: &Filter,
    ) {
        if let Some(e) = new {
            self.add(path, e, exempt);
        }
        if let Some(e) = old {
            self.remove(path, e, exempt);
        }
    }

    /// Sets (or with `None` removes) `path` in `snap`, which these are the totals of.
    #[cfg(test)]
    fn record(
        &mut self,
        snap: &mut Snapshot,
        path: RelPath,
        entry: Option<Entry>,
        exempt: &Filter,
    ) {
        if let Some(e) = &entry {
            self.add(&path, e, exempt);
        }
        let old = match entry {
            Some(e) => snap.insert(path.clone(), e),
            None => snap.remove(&path),
        };
        if let Some(old) = old {
            self.remove(&path, &old, exempt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::testing::file_entry as file;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn dir() -> Entry {
        Entry::Dir {
            mode: 0o755,
            mtime: Default::default(),
        }
    }

    /// A live cycle's scope reads the entries at and beneath its paths and those of the
    /// directories they are in, and nothing else (not "a.x" beside "a", not "a0").
    #[test]
    fn a_scope_reads_its_subtrees_and_parents_only() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(tmp.path(), "t.redb").unwrap());
        let ancestor = Ancestor::open(db.clone(), "s", Filter::new(&[]).unwrap()).unwrap();
        let rows = [
            (p("d"), dir()),
            (p("d/a"), dir()),
            (p("d/a/x"), file(1)),
            (p("d/a.x"), file(2)),
            (p("d/a0"), file(3)),
            (p("e"), file(4)),
        ];
        let changes: Vec<_> = rows.iter().map(|(p, e)| (p, Some(e))).collect();
        ancestor
            .commit(&changes, false, Generation::default())
            .unwrap();
        let scoped = ancestor.scoped(&ScanScope::Paths(vec![p("d/a")])).unwrap();
        let got: Vec<&str> = scoped
            .keys()
            .map(|k| std::str::from_utf8(k.as_bytes()).unwrap())
            .collect();
        assert_eq!(got, ["d", "d/a", "d/a/x"]);
        assert_eq!(ancestor.scoped(&ScanScope::Full).unwrap().len(), 6);
        assert_eq!(ancestor.get(&p("e")).unwrap(), Some(file(4)));
        // Reopened, the totals are counted from the table.
        let again = Ancestor::open(db, "s", Filter::new(&[]).unwrap()).unwrap();
        assert_eq!(again.totals(), ancestor.totals());
        assert_eq!(again.totals().files, 4);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Whatever is committed, updated, replaced or cleared, the running totals are a
        /// count over what the table holds.
        #[test]
        fn written_totals_match_the_table(
            ops in proptest::collection::vec((0u8..4, 0u8..8, proptest::option::of(0u64..1000)), 0..40),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let db = Arc::new(StateDb::open(tmp.path(), "t.redb").unwrap());
            let exempt = Filter::new(&["f1".to_string()]).unwrap();
            let ancestor = Ancestor::open(db.clone(), "s", exempt.clone()).unwrap();
            for (op, name, size) in ops {
                let path = p(&format!("f{name}"));
                let entry = size.map(|size| if size % 7 == 0 { dir() } else { file(size) });
                let changes = [(&path, entry.as_ref())];
                match op {
                    0 => ancestor.commit(&changes, false, Generation::default()).unwrap(),
                    1 => ancestor.update(&changes).unwrap(),
                    2 => ancestor.commit(&changes, true, Generation::default()).unwrap(),
                    _ => ancestor.clear().unwrap(),
                }
                let snap = ancestor.scoped(&ScanScope::Full).unwrap();
                proptest::prop_assert_eq!(ancestor.totals(), Totals::of(&snap, &exempt));
            }
        }
    }

    proptest::proptest! {
        /// The running totals always equal a count over the whole snapshot.
        #[test]
        fn totals_follow_every_change(
            ops in proptest::collection::vec((0u8..8, proptest::option::of(0u64..1000)), 0..60),
        ) {
            let mut snap = Snapshot::new();
            let mut totals = Totals::default();
            let exempt = Filter::new(&["f1".to_string()]).unwrap();
            for (name, size) in ops {
                let path = RelPath::from_bytes(format!("f{name}").as_bytes()).unwrap();
                let entry = size.map(|size| {
                    if size % 7 == 0 { Entry::Dir { mode: 0o755, mtime: Default::default() } } else { file(size) }
                });
                totals.record(&mut snap, path, entry, &exempt);
                proptest::prop_assert_eq!(totals, Totals::of(&snap, &exempt));
            }
        }
    }
}
