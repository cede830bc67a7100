//! The tree's own ignore files, for shares with `respect_gitignore = true`: each directory's
//! `.gitignore` and `.ignore`, with gitignore semantics (`ignore::gitignore`).
//!
//! Precedence: a path is asked of its own directory's rules first, then its parent's, up to
//! the share root, and the first rule that matches decides (a `!` line re-includes). Within one
//! directory `.ignore` is read after `.gitignore`, so where both match, `.ignore` wins (ripgrep
//! differs here: its `.ignore` files win over `.gitignore` files at any depth). A
//! directory that is ignored is never entered, so nothing beneath it can be re-included (as in
//! git). The share's configured `ignore` patterns ([`crate::filter`]) are applied before these
//! and cannot be undone by them.
//!
//! Ignore files are read through the directory's handle ([`DirHandle::open_file`]: never
//! followed when a symlink, never opened when a FIFO or device), at most
//! [`MAX_IGNORE_FILE_BYTES`]. One that cannot be used (a symlink, a special file, too large,
//! unreadable, not UTF-8, a pattern that does not compile) is an error for its directory: the
//! scanner reports that directory as a problem, and nothing in it is synced until the file is
//! fixed, because what the file meant to keep out of the other side cannot be known.

use crate::root::{DirHandle, FileKind, FsError, Stat};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use vmsync_core::{RelPath, Timestamp};

/// The ignore files of a directory, in the order they are read (later lines win).
pub const IGNORE_FILE_NAMES: [&[u8]; 2] = [b".gitignore", b".ignore"];

/// Largest ignore file read; a larger one is an error for its directory.
pub const MAX_IGNORE_FILE_BYTES: u64 = 1024 * 1024;

/// True if `name` is one of [`IGNORE_FILE_NAMES`].
pub fn is_ignore_file_name(name: &[u8]) -> bool {
    IGNORE_FILE_NAMES.contains(&name)
}

/// Compiled ignore files by directory, reused by later scans while the files are unchanged
/// (same inode, size, mtime and ctime, as the file index judges files): a targeted scan reads
/// the rules of every directory above its paths, and compiling a long ignore file costs far
/// more than the `fstatat` that tells it has not changed.
#[derive(Debug, Default)]
pub struct RulesCache {
    dirs: Mutex<HashMap<RelPath, Cached>>,
}

#[derive(Debug)]
struct Cached {
    /// Per name in [`IGNORE_FILE_NAMES`], the identity of the file compiled (`None`: absent).
    ids: [Option<FileId>; 2],
    matcher: Option<Arc<Gitignore>>,
}

/// What must not change for a file's content to be taken as unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Timestamp,
    ctime: Timestamp,
}

impl FileId {
    fn of(stat: &Stat) -> FileId {
        FileId {
            dev: stat.dev,
            ino: stat.ino,
            size: stat.size,
            mtime: stat.mtime,
            ctime: stat.ctime,
        }
    }
}

/// Directories whose rules the cache holds at most; past this it starts afresh.
const MAX_CACHED_DIRS: usize = 16 * 1024;

/// A file changed less than this long ago is not cached: a second write within the same
/// timestamp tick would leave its identity unchanged (git's "racily clean" problem).
const SETTLE_SECS: i64 = 2;

/// Reads and compiles the ignore files of `dir` (at `dir_path`), or takes them from `cache`
/// when unchanged. `stat_of` tells what each name is in that directory (the scanner answers
/// from its listing). `Ok(None)`: no rules (no files, or only blank and comment lines). A
/// directory named like an ignore file is not one and is skipped, as git does.
pub fn read_dir_rules(
    dir: &DirHandle,
    dir_path: &RelPath,
    stat_of: impl Fn(&[u8]) -> Result<Option<Stat>, FsError>,
    cache: &RulesCache,
) -> Result<Option<Arc<Gitignore>>, String> {
    let mut ids: [Option<FileId>; 2] = [None, None];
    for (id, name) in ids.iter_mut().zip(IGNORE_FILE_NAMES) {
        let shown = String::from_utf8_lossy(name);
        let stat = stat_of(name).map_err(|e| format!("cannot stat {shown}: {e}"))?;
        let Some(stat) = stat else { continue };
        match stat.kind {
            FileKind::Dir => continue,
            FileKind::File => *id = Some(FileId::of(&stat)),
            FileKind::Symlink => {
                return Err(format!(
                    "{shown} is a symlink, which is never followed; make it a regular file"
                ))
            }
            FileKind::Other => return Err(format!("{shown} is not a regular file")),
        }
    }
    if ids.iter().all(Option::is_none) {
        return Ok(None);
    }
    if let Some(hit) = cache.get(dir_path, &ids) {
        return Ok(hit);
    }
    let mut files: Vec<(&[u8], Vec<u8>)> = Vec::new();
    let mut read_ids: [Option<FileId>; 2] = [None, None];
    for ((name, listed), read_id) in IGNORE_FILE_NAMES.iter().zip(&ids).zip(&mut read_ids) {
        if listed.is_none() {
            continue;
        }
        let (content, stat) = read_capped(dir, name, &String::from_utf8_lossy(name))?;
        *read_id = Some(FileId::of(&stat));
        files.push((name, content));
    }
    let matcher = compile(&files)?.map(Arc::new);
    // Only what was read as listed, and has settled, may stand for later scans.
    if read_ids == ids && ids.iter().flatten().all(settled) {
        cache.put(dir_path, ids, matcher.clone());
    }
    Ok(matcher)
}

fn settled(id: &FileId) -> bool {
    let nanos = |t: Timestamp| i128::from(t.secs) * 1_000_000_000 + i128::from(t.nanos);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
    let limit = now - i128::from(SETTLE_SECS) * 1_000_000_000;
    nanos(id.ctime) < limit && nanos(id.mtime) < limit
}

impl RulesCache {
    /// Directories whose rules are held.
    pub fn len(&self) -> usize {
        self.dirs.lock().map_or(0, |d| d.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, dir: &RelPath, ids: &[Option<FileId>; 2]) -> Option<Option<Arc<Gitignore>>> {
        let dirs = self.dirs.lock().ok()?;
        let cached = dirs.get(dir)?;
        (cached.ids == *ids).then(|| cached.matcher.clone())
    }

    fn put(&self, dir: &RelPath, ids: [Option<FileId>; 2], matcher: Option<Arc<Gitignore>>) {
        if let Ok(mut dirs) = self.dirs.lock() {
            if dirs.len() >= MAX_CACHED_DIRS {
                dirs.clear();
            }
            dirs.insert(dir.clone(), Cached { ids, matcher });
        }
    }
}

/// Reads the regular file `name` of `dir`, refusing one larger than the cap. Returns its
/// content and the `fstat` of what was read.
fn read_capped(dir: &DirHandle, name: &[u8], shown: &str) -> Result<(Vec<u8>, Stat), String> {
    let too_large =
        || format!("{shown} is larger than {MAX_IGNORE_FILE_BYTES} bytes; vmsync does not read it");
    let (file, stat) = dir
        .open_file(name)
        .map_err(|e| format!("cannot open {shown}: {e}"))?;
    if stat.size > MAX_IGNORE_FILE_BYTES {
        return Err(too_large());
    }
    let mut data = Vec::new();
    file.take(MAX_IGNORE_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if data.len() as u64 > MAX_IGNORE_FILE_BYTES {
        return Err(too_large());
    }
    Ok((data, stat))
}

/// Compiles ignore files given as (name, content), in order. Lines are split as git splits
/// them (`\n`, with a `\r` before it dropped; a UTF-8 byte order mark at the start dropped).
pub fn compile(files: &[(&[u8], Vec<u8>)]) -> Result<Option<Gitignore>, String> {
    // Patterns are matched against paths relative to the directory; the builder's root is a
    // virtual "/" that such paths never start with, so nothing is stripped from them.
    let mut builder = GitignoreBuilder::new("/");
    let mut any = false;
    for (name, content) in files {
        let shown = String::from_utf8_lossy(name);
        let content = content.strip_prefix(b"\xef\xbb\xbf").unwrap_or(content);
        for (i, line) in content.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line)
                .map_err(|_| format!("{shown} line {} is not valid UTF-8", i + 1))?;
            builder
                .add_line(None, line)
                .map_err(|e| format!("{shown} line {}: {e}", i + 1))?;
            any = true;
        }
    }
    if !any {
        return Ok(None);
    }
    let matcher = builder
        .build()
        .map_err(|e| format!("ignore files do not compile: {e}"))?;
    Ok((!matcher.is_empty()).then_some(matcher))
}

/// The ignore rules in force in one directory: its own and every ancestor's. Cheap to clone
/// (a shared list, deepest first).
#[derive(Clone, Debug, Default)]
pub struct Rules(Option<Arc<Level>>);

#[derive(Debug)]
struct Level {
    dir: RelPath,
    matcher: Arc<Gitignore>,
    parent: Rules,
}

impl Rules {
    /// The rules in force in `dir`, a subdirectory of the directory `self` is for (or the root,
    /// with `self` empty), whose own ignore files compiled to `own`.
    pub fn within(&self, dir: &RelPath, own: Option<Arc<Gitignore>>) -> Rules {
        match own {
            None => self.clone(),
            Some(matcher) => Rules(Some(Arc::new(Level {
                dir: dir.clone(),
                matcher,
                parent: self.clone(),
            }))),
        }
    }

    /// True if these rules ignore `path` (a directory when `is_dir`), an entry of the
    /// directory they are for or beneath it. The deepest directory with a matching rule
    /// decides. Parents are not consulted: a walk never gets below an ignored directory.
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        let mut level = self.0.as_deref();
        while let Some(l) = level {
            if let Some(rel) = relative_to(&l.dir, path) {
                match l.matcher.matched(Path::new(OsStr::from_bytes(rel)), is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
            level = l.parent.0.as_deref();
        }
        false
    }

    /// True if no directory has rules here.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// `path` relative to `dir`, if it lies beneath it.
fn relative_to<'a>(dir: &RelPath, path: &'a RelPath) -> Option<&'a [u8]> {
    if dir.is_root() {
        return (!path.is_root()).then_some(path.as_bytes());
    }
    if !dir.is_ancestor_of(path) {
        return None;
    }
    path.as_bytes().get(dir.as_bytes().len() + 1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    fn rules(levels: &[(&str, &[(&str, &str)])]) -> Rules {
        let mut r = Rules::default();
        for (dir, files) in levels {
            let files: Vec<(&[u8], Vec<u8>)> = files
                .iter()
                .map(|(n, c)| (n.as_bytes(), c.as_bytes().to_vec()))
                .collect();
            let dir = if dir.is_empty() {
                RelPath::root()
            } else {
                p(dir)
            };
            r = r.within(&dir, compile(&files).unwrap().map(Arc::new));
        }
        r
    }

    #[test]
    fn deeper_directories_and_ignore_files_win() {
        let r = rules(&[
            ("", &[(".gitignore", "*.log\n/build\nsecret\n")]),
            (
                "a",
                &[(".gitignore", "!keep.log\n"), (".ignore", "secret2\n")],
            ),
            (
                "a/b",
                &[(".gitignore", "x\r\n"), (".ignore", "!x\n*.tmp\n")],
            ),
        ]);
        let cases = [
            ("a/b/c.log", false, true),     // root rule
            ("a/b/keep.log", false, false), // a's negation beats the root's rule
            ("a/b/x", false, false),        // .ignore beats .gitignore in the same directory
            ("a/b/y.tmp", false, true),
            ("a/b/secret2", false, true),
            ("a/b/build", true, false), // `/build` is anchored to the root
            ("a/b/secret", true, true),
            ("a/b/ok.rs", false, false),
        ];
        for (path, is_dir, want) in cases {
            assert_eq!(r.is_ignored(&p(path), is_dir), want, "{path}");
        }
        let root = rules(&[("", &[(".gitignore", "/build\n")])]);
        assert!(root.is_ignored(&p("build"), true));
    }

    #[test]
    fn a_rule_in_a_subdirectory_is_relative_to_it() {
        let r = rules(&[("", &[]), ("sub", &[(".gitignore", "/only-here\nout/\n")])]);
        assert!(r.is_ignored(&p("sub/only-here"), false));
        assert!(!r.is_ignored(&p("sub/deeper/only-here"), false));
        assert!(r.is_ignored(&p("sub/deeper/out"), true));
        assert!(
            !r.is_ignored(&p("sub/deeper/out"), false),
            "dir-only pattern"
        );
        // Rules of another directory never apply.
        assert!(!r.is_ignored(&p("subway/only-here"), false));
    }

    #[test]
    fn comments_blanks_and_bom_compile_to_nothing() {
        let files: Vec<(&[u8], Vec<u8>)> = vec![(
            b".gitignore",
            b"\xef\xbb\xbf# just a comment\n\n   \n".to_vec(),
        )];
        assert!(compile(&files).unwrap().is_none());
        let files: Vec<(&[u8], Vec<u8>)> = vec![(b".gitignore", b"\xef\xbb\xbfa\n".to_vec())];
        let r = Rules::default().within(&RelPath::root(), compile(&files).unwrap().map(Arc::new));
        assert!(
            r.is_ignored(&p("a"), false),
            "BOM stripped from the first pattern"
        );
    }

    #[test]
    fn unusable_content_is_an_error_naming_the_line() {
        let bad_utf8: Vec<(&[u8], Vec<u8>)> = vec![(b".ignore", b"ok\n\xff\xfe\n".to_vec())];
        let err = compile(&bad_utf8).unwrap_err();
        assert!(err.contains(".ignore line 2"), "{err}");
        let bad_glob: Vec<(&[u8], Vec<u8>)> = vec![(b".gitignore", b"a{b\n".to_vec())];
        let err = compile(&bad_glob).unwrap_err();
        assert!(err.contains(".gitignore line 1"), "{err}");
    }
}
