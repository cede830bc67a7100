//! Which files of one share side are hard links of each other: the paths of every regular file
//! seen with more than one link, grouped by inode. The source names a file's other links in its
//! manifest; the destination links its copies the same way (see docs/hard-links.md).
//!
//! Only files with a link count above one are held, so a share without hard links costs
//! nothing. Rebuilt by every full scan; a targeted scan updates the paths it looked at.

use std::collections::HashMap;
use vmsync_core::limits::MAX_MANIFEST_LINKS;
use vmsync_core::RelPath;

/// A file's inode: device and inode number.
pub type Inode = (u64, u64);

#[derive(Debug, Default)]
pub struct LinkMap {
    by_path: HashMap<RelPath, Inode>,
    by_inode: HashMap<Inode, Vec<RelPath>>,
}

impl LinkMap {
    /// Records what `path` is now: a file with several links (`Some` inode), or anything else.
    pub fn set(&mut self, path: &RelPath, inode: Option<Inode>) {
        if self.by_path.get(path).copied() == inode {
            return;
        }
        if let Some(old) = self.by_path.remove(path) {
            if let Some(paths) = self.by_inode.get_mut(&old) {
                paths.retain(|p| p != path);
                if paths.is_empty() {
                    self.by_inode.remove(&old);
                }
            }
        }
        if let Some(inode) = inode {
            self.by_path.insert(path.clone(), inode);
            self.by_inode.entry(inode).or_default().push(path.clone());
        }
    }

    /// Forgets every path at `scope` or beneath it (before a targeted scan re-adds them).
    pub fn forget_under(&mut self, scope: &RelPath) {
        let gone: Vec<RelPath> = self
            .by_path
            .keys()
            .filter(|p| *p == scope || scope.is_ancestor_of(p))
            .cloned()
            .collect();
        for p in gone {
            self.set(&p, None);
        }
    }

    pub fn clear(&mut self) {
        self.by_path.clear();
        self.by_inode.clear();
    }

    /// The other known paths of the file at `path` (at most [`MAX_MANIFEST_LINKS`]), sorted.
    pub fn others(&self, path: &RelPath) -> Vec<RelPath> {
        let Some(inode) = self.by_path.get(path) else {
            return Vec::new();
        };
        let mut out: Vec<RelPath> = self
            .by_inode
            .get(inode)
            .into_iter()
            .flatten()
            .filter(|p| *p != path)
            .cloned()
            .collect();
        out.sort();
        out.truncate(MAX_MANIFEST_LINKS);
        out
    }

    /// How many paths of the share are known to be the inode at `path` (itself included; 1
    /// for a path with no other names known). A link count above this means names outside
    /// the share, or in its trash.
    pub fn names_in_share(&self, path: &RelPath) -> u64 {
        self.by_path
            .get(path)
            .and_then(|inode| self.by_inode.get(inode))
            .map_or(1, |paths| paths.len() as u64)
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn groups_follow_the_paths_as_they_change() {
        let mut m = LinkMap::default();
        m.set(&p("a"), Some((1, 10)));
        m.set(&p("b"), Some((1, 10)));
        m.set(&p("c"), Some((1, 11)));
        assert_eq!(m.others(&p("a")), vec![p("b")]);
        assert_eq!(m.others(&p("c")), Vec::<RelPath>::new());
        // b is replaced by a file of its own.
        m.set(&p("b"), None);
        assert_eq!(m.others(&p("a")), Vec::<RelPath>::new());
        m.set(&p("d/x"), Some((1, 10)));
        m.set(&p("d/y"), Some((1, 10)));
        assert_eq!(m.others(&p("a")), vec![p("d/x"), p("d/y")]);
        m.forget_under(&p("d"));
        assert_eq!(m.others(&p("a")), Vec::<RelPath>::new());
        assert_eq!(m.len(), 2);
        m.set(&p("a"), None);
        m.set(&p("c"), None);
        assert!(m.is_empty() && m.by_inode.is_empty());
    }

    #[test]
    fn at_most_the_manifest_limit_is_named() {
        let mut m = LinkMap::default();
        for i in 0..(MAX_MANIFEST_LINKS + 10) {
            m.set(&p(&format!("f{i:03}")), Some((1, 1)));
        }
        assert_eq!(m.others(&p("f000")).len(), MAX_MANIFEST_LINKS);
    }
}
