//! Ignore rules: gitignore-syntax patterns, relative to the share root, matched against
//! `RelPath`s. An ignored path is invisible to sync on both sides: never scanned, sent, deleted
//! or overwritten. Matching a path also matches everything beneath it (`target/` hides
//! `target/debug/x`), so a scan can skip ignored directories without descending.
//!
//! A filter also carries the share's `respect_gitignore` flag: whether the scanner honours the
//! tree's own `.gitignore` and `.ignore` files as well (see [`crate::gitignore`]). Those depend
//! on the tree, not on the configuration, so they are read by each scan, not compiled here.

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use vmsync_core::RelPath;

#[derive(Debug, thiserror::Error)]
#[error("ignore pattern `{pattern}`: {source}")]
pub struct FilterError {
    pub pattern: String,
    #[source]
    pub source: ignore::Error,
}

/// A compiled set of ignore patterns. Cheap to clone (shared matcher).
#[derive(Clone, Debug)]
pub struct Filter {
    patterns: Vec<String>,
    matcher: std::sync::Arc<Gitignore>,
    respect_gitignore: bool,
}

impl Filter {
    /// Compiles `patterns` (gitignore syntax, `/`-anchored to the share root).
    pub fn new(patterns: &[String]) -> Result<Filter, FilterError> {
        // The matcher's root is a virtual "/": we only ever hand it relative paths.
        let mut builder = GitignoreBuilder::new("/");
        for p in patterns {
            builder.add_line(None, p).map_err(|source| FilterError {
                pattern: p.clone(),
                source,
            })?;
        }
        let matcher = builder.build().map_err(|source| FilterError {
            pattern: patterns.join(", "),
            source,
        })?;
        Ok(Filter {
            patterns: patterns.to_vec(),
            matcher: std::sync::Arc::new(matcher),
            respect_gitignore: false,
        })
    }

    /// This filter, also honouring the tree's `.gitignore` and `.ignore` files when `yes`.
    pub fn with_gitignore(mut self, yes: bool) -> Filter {
        self.respect_gitignore = yes;
        self
    }

    /// True if scans also honour the tree's `.gitignore` and `.ignore` files.
    pub fn respects_gitignore(&self) -> bool {
        self.respect_gitignore
    }

    /// Matches nothing.
    pub fn none() -> Filter {
        Filter {
            patterns: Vec::new(),
            matcher: std::sync::Arc::new(Gitignore::empty()),
            respect_gitignore: false,
        }
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// True if `path` (a directory when `is_dir`) or any of its parents is ignored by the
    /// configured patterns (the tree's ignore files are the scanner's business).
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        if self.patterns.is_empty() || path.is_root() {
            return false;
        }
        let p = Path::new(OsStr::from_bytes(path.as_bytes()));
        self.matcher
            .matched_path_or_any_parents(p, is_dir)
            .is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &[&str]) -> Filter {
        Filter::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }
    fn rp(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn gitignore_semantics() {
        let filter = f(&["target/", "*.swp", "/build", "!keep.swp", "docs/**/*.tmp"]);
        let cases = [
            ("target", true, true),
            ("target", false, false), // `target/` matches directories only
            ("target/debug/x", false, true),
            ("sub/target/y", false, true), // unanchored: any depth
            ("a.swp", false, true),
            ("x/y/a.swp", false, true),
            ("keep.swp", false, false),
            ("build", true, true),
            ("sub/build", true, false), // anchored to the root
            ("docs/a/b/c.tmp", false, true),
            ("src/main.rs", false, false),
        ];
        for (path, is_dir, want) in cases {
            assert_eq!(
                filter.is_ignored(&rp(path), is_dir),
                want,
                "{path} dir={is_dir}"
            );
        }
    }

    #[test]
    fn bad_pattern_is_an_error() {
        for bad in ["{a,b", "a[z-a]"] {
            let err = Filter::new(&[bad.to_string()]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn empty_filter_ignores_nothing() {
        assert!(!Filter::none().is_ignored(&rp("a"), false));
    }
}
