//! Watcher hints made fit for the controller: what this side's own transitions wrote is
//! dropped (an echo: the controller that asked for it knows it already), and a hard-linked
//! file's other names are added (a write through one name changes them all).

use super::LocalShare;
use crate::index::Identity;
use crate::root::FileKind;
use vmsync_core::endpoint::ChangeHints;
use vmsync_core::RelPath;

impl LocalShare {
    /// A targeted scan sees only the names it looked at: a file just linked to one scanned
    /// before (`ln old new`, as cargo does) shows up with more links than names known. Its
    /// other names are looked up in the index by inode (a hint only: the destination links
    /// nothing it has not checked).
    pub(super) fn find_other_names(&mut self, linked: &[(RelPath, crate::links::Inode)]) {
        let lonely: std::collections::HashSet<crate::links::Inode> = linked
            .iter()
            .filter(|(path, _)| self.links.others(path).is_empty())
            .map(|(_, inode)| *inode)
            .collect();
        if lonely.is_empty() {
            return;
        }
        let found: Vec<(RelPath, crate::links::Inode)> = self
            .index
            .reader()
            .identities()
            .map(|(path, id)| (path, (id.dev, id.ino)))
            .filter(|(_, inode)| lonely.contains(inode))
            .collect();
        for (path, inode) in found {
            self.links.set(&path, Some(inode));
        }
    }

    /// Adds to watcher hints the other names of a hard-linked file among them: a write through
    /// one name changes them all, and inotify tells only of the one written through.
    pub(super) fn with_other_names(&self, mut hints: ChangeHints) -> ChangeHints {
        if hints.rescan || self.links.is_empty() {
            return hints;
        }
        let others: Vec<RelPath> = hints
            .paths
            .iter()
            .flat_map(|p| self.links.others(p))
            .collect();
        if others.is_empty() {
            return hints;
        }
        hints.paths.extend(others);
        let all: std::collections::HashSet<RelPath> = hints.paths.drain(..).collect();
        // Coalesced again: none beneath another.
        hints.paths = all
            .iter()
            .filter(|p| !p.ancestors().any(|a| all.contains(&a)))
            .cloned()
            .collect();
        hints.paths.sort();
        hints
    }

    /// Drops from watcher hints the paths that hold exactly what this side's own transitions
    /// left there (a file of the identity it committed, or nothing where it deleted): the
    /// controller that asked for those changes knows them already, and a hint would only cost a
    /// round trip to rescan them. The identity test is the scan's own (inode, size, mtime,
    /// ctime), so any later write by someone else still gets through; so do directory hints,
    /// which may stand for many children.
    pub(super) fn drop_echoes(
        &mut self,
        hints: ChangeHints,
        mut attrs: std::collections::BTreeSet<RelPath>,
    ) -> ChangeHints {
        self.echoes.expire(std::time::Instant::now());
        // The times this side put back, and nothing else: only a hint for a directory's own
        // attributes (a directory hint may stand for changes beneath it), while the directory
        // is exactly as this side left it.
        if let Some(root) = self.root.as_ref() {
            let dir_echoes = &mut self.dir_echoes;
            dir_echoes.expire(std::time::Instant::now());
            attrs.retain(|path| {
                let Some(left) = dir_echoes.get(path).filter(|e| e.left_something()) else {
                    return true;
                };
                let now = root.stat(path).ok().flatten();
                let echo = now.is_some_and(|st| {
                    st.kind == FileKind::Dir && left.is(Some(&Identity::of(&st)))
                });
                // Kept while it matches: the directory's own watch and its parent's report the
                // same change, maybe in two takes; any later change moves its ctime.
                if !echo {
                    dir_echoes.remove(path);
                }
                !echo
            });
        }
        let mut hints = self.drop_file_echoes(hints);
        crate::watch::merge_attrs(&mut hints, attrs);
        hints
    }

    fn drop_file_echoes(&mut self, mut hints: ChangeHints) -> ChangeHints {
        if hints.rescan || self.echoes.is_empty() {
            return hints;
        }
        let Some(root) = self.root.as_ref() else {
            return hints;
        };
        let echoes = &mut self.echoes;
        hints.paths.retain(|path| {
            let Some(left) = echoes.get(path) else {
                return true;
            };
            let echo = match root.stat(path).ok() {
                Some(Some(stat)) => {
                    stat.kind == FileKind::File && left.is(Some(&Identity::of(&stat)))
                }
                Some(None) => left.is(None),
                None => false,
            };
            if !echo {
                // Changed since: not ours any more.
                echoes.remove(path);
            }
            !echo
        });
        hints
    }
}
