//! What both agents' configuration files share: how problems are collected and reported
//! (`FILE:LINE:COLUMN: message`, every problem in one pass), and the checks on values that
//! mean the same thing in both files (share names, absolute paths, socket paths). Each agent's
//! own `config` module owns its format and defaults.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;
use vmsync_transport::endpoint_addr::MAX_UNIX_SOCKET_PATH_BYTES;

/// The share-name rule is the protocol's (names travel in the handshake): both agents' configs
/// check it with the guest's own words, so a name one side accepts the other never refuses.
pub use vmsync_protocol::handshake::share_name_error;

/// Everything that can go wrong loading a configuration. Both variants are the user's to fix;
/// `check` exits 2 on either.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type, or a value
    /// failed validation. One line per problem: `FILE:LINE:COLUMN: MESSAGE`.
    #[error("{}", render_problems(.file, .problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column (in characters) of the offending value, when known.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

pub fn render_problems(file: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|problem| match problem.location {
            Some((line, column)) => {
                format!("{}:{line}:{column}: {}", file.display(), problem.message)
            }
            None => format!("{}: {}", file.display(), problem.message),
        })
        .collect();
    lines.join("\n")
}

/// Most problems [`deserialize_all`] records before it gives up: every pass costs a full
/// deserialization of the document, and a file this wrong has been listed enough.
const MAX_DESERIALIZE_PROBLEMS: usize = 64;

/// Deserializes `text` into `T`, recording every problem instead of stopping at the first:
/// every syntax error the parser can recover from, then each unknown key, wrongly typed value
/// or missing key, one pass at a time. After each problem the key (or the `[[table]]` element
/// missing a required key) it names is dropped and the rest deserialized again, so one
/// `check` lists everything to fix. Returns the value deserialized without the dropped parts
/// (its consumer checks the values and reports more) and whether anything was dropped; `None`
/// when the document cannot be deserialized at all.
pub fn deserialize_all<T: serde::de::DeserializeOwned>(
    text: &str,
    problems: &mut Problems,
) -> Option<(T, bool)> {
    use toml::de::{DeTable, Deserializer};
    let (mut root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        for error in errors {
            problems.push(error.span(), error.message().trim_end().to_string());
        }
        return None;
    }
    // Keys dropped so far, as (span of the table that held it, key), so that the "missing
    // field" that follows dropping a wrongly typed required key is not reported twice.
    let mut dropped: Vec<(Range<usize>, String)> = Vec::new();
    for _ in 0..MAX_DESERIALIZE_PROBLEMS {
        let error = match T::deserialize(Deserializer::from(root.clone())) {
            Ok(value) => return Some((value, !dropped.is_empty())),
            Err(error) => error,
        };
        let message = error.message().trim_end().to_string();
        let Some(span) = error.span() else {
            problems.push(None, message);
            return None;
        };
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let table_span = root.span();
        match drop_at(root.get_mut(), table_span, &span, missing.is_some()) {
            Some(Dropped::Key { table, key }) => {
                problems.push(Some(span), message);
                dropped.push((table, key));
            }
            Some(Dropped::Element { table }) => {
                let again = missing
                    .as_ref()
                    .is_some_and(|m| dropped.iter().any(|(t, k)| *t == table && k == m));
                if !again {
                    problems.push(Some(span), message);
                }
            }
            None => {
                let again = missing
                    .as_ref()
                    .is_some_and(|m| dropped.iter().any(|(t, k)| *t == root.span() && k == m));
                if !again {
                    problems.push(Some(span), message);
                }
                return None;
            }
        }
    }
    None
}

enum Dropped {
    /// A key of the table at `table` (its span) was removed.
    Key { table: Range<usize>, key: String },
    /// An element of an array of tables (the table at `table`) was removed.
    Element { table: Range<usize> },
}

/// Removes what the error at `span` names from `table` (whose span is `table_span`): the
/// innermost key whose key or value covers `span`, or for a `missing` key, the table element
/// of an array whose span (its `[[header]]`) is `span`. Table spans are their headers, so
/// every table is searched, not only those whose span covers `span`.
fn drop_at(
    table: &mut toml::de::DeTable<'_>,
    table_span: Range<usize>,
    span: &Range<usize>,
    missing: bool,
) -> Option<Dropped> {
    use toml::de::{DeArray, DeValue};
    let covers = |outer: &Range<usize>| outer.start <= span.start && span.end <= outer.end;
    let mut hit: Option<String> = None;
    for (key, value) in table.iter_mut() {
        let value_span = value.span();
        match value.get_mut() {
            DeValue::Table(inner) => {
                if let Some(found) = drop_at(inner, value_span.clone(), span, missing) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                let mut remove = None;
                for (index, item) in items.iter_mut().enumerate() {
                    let item_span = item.span();
                    if let DeValue::Table(inner) = item.get_mut() {
                        if missing && item_span == *span {
                            remove = Some(index);
                            break;
                        }
                        if let Some(found) = drop_at(inner, item_span, span, missing) {
                            return Some(found);
                        }
                    }
                }
                if let Some(index) = remove {
                    let table = items.get(index).map(|item| item.span())?;
                    let mut kept = DeArray::new();
                    for (i, item) in items.iter().enumerate() {
                        if i != index {
                            kept.push(item.clone());
                        }
                    }
                    *items = kept;
                    return Some(Dropped::Element { table });
                }
            }
            _ => {}
        }
        if !missing && hit.is_none() && (covers(&key.span()) || covers(&value_span)) {
            hit = Some(key.get_ref().to_string());
        }
    }
    let key = hit?;
    table.remove(key.as_str());
    Some(Dropped::Key {
        table: table_span,
        key,
    })
}

/// How a share path (or `state_dir`) is turned into the directory it names: [`on_disk`] for a
/// file being loaded, [`as_written`] for text checked on its own (and unit tests).
pub type ResolvePath<'a> = &'a dyn Fn(&Path) -> Result<PathBuf, String>;

/// The path as written (already lexically normalized).
pub fn as_written(path: &Path) -> Result<PathBuf, String> {
    Ok(path.to_path_buf())
}

/// The path with every symlink in it resolved, once, when the configuration is loaded: the
/// agents then open the real directory, and the nesting checks compare real directories. A
/// share root is opened without following symlinks (docs/safety.md), so a root given through
/// a symlink would otherwise read as a replaced root on every scan. A path that does not exist
/// yet resolves as far as it exists (a missing root is a safety halt at run time, not a
/// configuration error). Refused: a path that exists but is not a directory, and a symlink
/// whose target does not exist.
pub fn on_disk(path: &Path) -> Result<PathBuf, String> {
    for existing in path.ancestors() {
        let real = match std::fs::canonicalize(existing) {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Unreadable (permissions): leave it as written; the agent reports what it finds.
            Err(_) => return Ok(path.to_path_buf()),
        };
        let Ok(rest) = path.strip_prefix(existing) else {
            return Ok(path.to_path_buf());
        };
        if rest.as_os_str().is_empty() {
            return match std::fs::metadata(&real) {
                Ok(meta) if !meta.is_dir() => Err(format!(
                    "{} is not a directory{}",
                    path.display(),
                    if real == path {
                        String::new()
                    } else {
                        format!(" (it resolves to {})", real.display())
                    }
                )),
                _ => Ok(real),
            };
        }
        let resolved = real.join(rest);
        if let Ok(target) = std::fs::read_link(&resolved) {
            return Err(format!(
                "{} is a symbolic link to {}, which does not exist",
                path.display(),
                target.display()
            ));
        }
        return Ok(resolved);
    }
    Ok(path.to_path_buf())
}

/// Validates an absolute path value and normalizes it lexically (`//` and `.` dropped, no
/// trailing slash). Paths are not resolved on disk: a missing share root is a safety halt at run
/// time, not a configuration error.
pub fn absolute_path(
    value: &Spanned<String>,
    key: &str,
    problems: &mut Problems,
) -> Option<PathBuf> {
    match normalize_absolute(value.get_ref()) {
        Ok(path) => Some(path),
        Err(message) => {
            problems.at(value, format!("{key}: {message}"));
            None
        }
    }
}

/// Like [`absolute_path`], and the result must fit in a Unix socket address.
pub fn socket_path(value: &Spanned<String>, key: &str, problems: &mut Problems) -> Option<PathBuf> {
    let text = value.get_ref();
    if let Some(rest) = text.strip_prefix("unix:") {
        problems.at(
            value,
            format!("{key}: a plain path is expected; write {rest:?} without `unix:`"),
        );
        return None;
    }
    match normalize_absolute(text).and_then(check_socket_length) {
        Ok(path) => Some(path),
        Err(message) => {
            problems.at(value, format!("{key}: {message}"));
            None
        }
    }
}

pub fn normalize_absolute(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("path is empty".to_string());
    }
    if text.contains('\0') {
        return Err(format!("path {text:?} contains a NUL byte"));
    }
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(format!("path {text:?} is relative; give an absolute path"));
    }
    // `..` is refused rather than resolved: lexical resolution is wrong across symlinks, and the
    // nesting checks compare paths component by component.
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("path {text:?} contains `..`; give it without"));
    }
    Ok(path.components().collect())
}

pub fn check_socket_length(path: PathBuf) -> Result<PathBuf, String> {
    let bytes = path.as_os_str().len();
    if bytes > MAX_UNIX_SOCKET_PATH_BYTES {
        return Err(format!(
            "socket path {path:?} is {bytes} bytes; a Unix socket path holds at most \
             {MAX_UNIX_SOCKET_PATH_BYTES}"
        ));
    }
    Ok(path)
}

/// Problems found so far, with the text to turn byte spans into line and column.
pub struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            list: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn at<T>(&mut self, value: &Spanned<T>, message: String) {
        self.push(Some(value.span()), message);
    }

    pub fn push(&mut self, span: Option<Range<usize>>, message: String) {
        let location = span.map(|span| self.line_column(span.start));
        self.list.push(Problem { location, message });
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // Spans come from the parser and fall on character boundaries; be safe anyway.
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |index| index + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    pub fn into_error(mut self, file: &Path) -> ConfigError {
        // File order reads best; problems without a location (missing tables) go last. The sort
        // is stable, so problems at one location keep the order they were found in.
        self.list
            .sort_by_key(|problem| problem.location.unwrap_or((usize::MAX, usize::MAX)));
        ConfigError::Invalid {
            file: file.to_path_buf(),
            problems: self.list,
        }
    }
}

/// A share's trash retention from its `keep_deleted` (a duration: `s`, `m`, `h`, `d`; default
/// 7d) and `keep_deleted_max` (a percentage of the side's share size or a size such as
/// `"5GiB"`; default 10%). Problems are recorded against the values.
pub fn retention(
    share: &str,
    keep_deleted: Option<&Spanned<String>>,
    keep_deleted_max: Option<&Spanned<String>>,
    problems: &mut Problems,
) -> vmsync_engine::trash::Retention {
    use vmsync_engine::trash::{parse_duration, Retention, SizeLimit};
    let mut retention = Retention::default();
    if let Some(value) = keep_deleted {
        match parse_duration(value.get_ref()) {
            Ok(d) => retention.max_age = d,
            Err(e) => problems.at(value, format!("share {share:?}: keep_deleted: {e}")),
        }
    }
    if let Some(value) = keep_deleted_max {
        match SizeLimit::parse(value.get_ref()) {
            Ok(l) => retention.max_size = l,
            Err(e) => problems.at(value, format!("share {share:?}: keep_deleted_max: {e}")),
        }
    }
    retention
}

/// A share's quotas: `quota_bytes` and `quota_file_bytes` (a size such as `"50GiB"`, or
/// `"none"`), `quota_files` and `quota_dirs` (counts); the defaults
/// ([`vmsync_core::quota::Quota::default`]) where unset or wrong (a problem is recorded against
/// the value).
pub fn quota(
    share: &str,
    [bytes, file_bytes]: [&Option<Spanned<String>>; 2],
    [files, dirs]: [&Option<Spanned<u64>>; 2],
    problems: &mut Problems,
) -> vmsync_core::quota::Quota {
    use vmsync_engine::trash::SizeLimit;
    let mut quota = vmsync_core::quota::Quota::default();
    let mut size = |key: &str, value: Option<&Spanned<String>>, into: &mut Option<u64>| {
        let Some(value) = value else { return };
        match value.get_ref().as_str() {
            "none" => *into = None,
            text => match SizeLimit::parse(text) {
                Ok(SizeLimit::Bytes(n)) => *into = Some(n),
                _ => problems.at(
                    value,
                    format!("share {share:?} {key}: {text:?} is not a size such as \"50GiB\" or \"none\""),
                ),
            },
        }
    };
    size("quota_bytes", bytes.as_ref(), &mut quota.bytes);
    size(
        "quota_file_bytes",
        file_bytes.as_ref(),
        &mut quota.file_bytes,
    );
    if let Some(n) = files {
        quota.files = Some(*n.get_ref());
    }
    if let Some(n) = dirs {
        quota.dirs = Some(*n.get_ref());
    }
    quota
}

/// A share's `min_free` (a size such as `"1GiB"` or a percentage); the default when unset or
/// wrong (a problem is recorded against the value).
pub fn min_free(
    share: &str,
    value: Option<&Spanned<String>>,
    problems: &mut Problems,
) -> vmsync_core::reserve::MinFree {
    use vmsync_core::reserve::MinFree;
    match value {
        None => MinFree::Default,
        Some(value) => MinFree::parse(value.get_ref()).unwrap_or_else(|message| {
            problems.at(value, format!("share {share:?} min_free: {message}"));
            MinFree::Default
        }),
    }
}

/// Where a share is: its name, resolved path, and the span of its `path` value.
struct Place<'a> {
    name: &'a str,
    path: &'a Path,
    path_span: Range<usize>,
}

/// The checks across values both agents make on where things are: a share inside another
/// would be synced twice (under other names or rules); a share holding the state directory
/// would sync vmsync's own index (and the state directory inside a share has the same
/// effect); a socket inside a share shows up in every scan as a problem entry. `shares`: each
/// accepted share's name and resolved path; `spans`: the spans of its `name` and `path` values,
/// in the same order (problems point at the path). `sockets`: each socket's key in the file and
/// its path, if it is a path.
pub fn check_places<'a>(
    shares: impl IntoIterator<Item = (&'a str, &'a Path)>,
    spans: &[(Range<usize>, Range<usize>)],
    state_dir: Option<&Path>,
    sockets: &[(&str, Option<PathBuf>)],
    problems: &mut Problems,
) {
    let shares: Vec<Place<'a>> = shares
        .into_iter()
        .zip(spans)
        .map(|((name, path), (_, path_span))| Place {
            name,
            path,
            path_span: path_span.clone(),
        })
        .collect();
    for (index, share) in shares.iter().enumerate() {
        for other in shares.iter().take(index) {
            if share.path.starts_with(other.path) || other.path.starts_with(share.path) {
                let (line, _) = problems.line_column(other.path_span.start);
                problems.push(
                    Some(share.path_span.clone()),
                    format!(
                        "share {:?} path {:?} and share {:?} path {:?} (line {line}) nest; \
                         shares must not overlap",
                        share.name, share.path, other.name, other.path
                    ),
                );
            }
        }
        if let Some(state_dir) = state_dir {
            if state_dir.starts_with(share.path) || share.path.starts_with(state_dir) {
                problems.push(
                    Some(share.path_span.clone()),
                    format!(
                        "share {:?} path {:?} and state_dir {:?} nest; keep vmsync's state \
                         outside every share",
                        share.name, share.path, state_dir
                    ),
                );
            }
        }
        for (key, socket) in sockets {
            if let Some(socket) = socket.as_ref().filter(|s| s.starts_with(share.path)) {
                problems.push(
                    Some(share.path_span.clone()),
                    format!(
                        "the {key} socket {:?} is inside share {:?} ({:?}); put sockets \
                         outside every share",
                        socket, share.name, share.path
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row: share paths, state_dir, a socket; the problems expected (substrings, in order).
    #[test]
    fn places_table() {
        let text = "0123456789012345678901234567890123456789";
        type Row<'a> = (
            &'a [&'a str],
            Option<&'a str>,
            Option<&'a str>,
            &'a [&'a str],
        );
        let rows: &[Row] = &[
            (
                &["/srv/a", "/srv/b"],
                Some("/var/lib/vmsync"),
                Some("/run/x.sock"),
                &[],
            ),
            (
                &["/srv/a", "/srv/a/b"],
                None,
                None,
                &["\"b\" path \"/srv/a/b\" and share \"a\""],
            ),
            (
                &["/srv/a/b", "/srv/a"],
                None,
                None,
                &["nest; shares must not overlap"],
            ),
            (&["/srv/ab", "/srv/a"], None, None, &[]),
            (
                &["/srv"],
                Some("/srv/state"),
                None,
                &["and state_dir \"/srv/state\" nest"],
            ),
            (
                &["/srv/a"],
                Some("/srv"),
                None,
                &["and state_dir \"/srv\" nest"],
            ),
            (
                &["/srv/a"],
                None,
                Some("/srv/a/c.sock"),
                &["the control socket"],
            ),
        ];
        for (paths, state_dir, socket, want) in rows {
            let names = ["a", "b"];
            let spans: Vec<(Range<usize>, Range<usize>)> = (0..paths.len())
                .map(|i| (0..1, i * 10..i * 10 + 5))
                .collect();
            let mut problems = Problems::new(text);
            check_places(
                names.into_iter().zip(paths.iter().map(Path::new)),
                &spans,
                state_dir.map(Path::new),
                &[("control", socket.map(PathBuf::from))],
                &mut problems,
            );
            let got: Vec<String> = problems.list.iter().map(|p| p.message.clone()).collect();
            assert_eq!(got.len(), want.len(), "{paths:?}: {got:?}");
            for (message, part) in got.iter().zip(want.iter()) {
                assert!(
                    message.contains(part),
                    "{paths:?}: {message:?} lacks {part:?}"
                );
            }
        }
    }

    #[test]
    fn min_free_defaults_and_reports() {
        use vmsync_core::reserve::MinFree;
        let text = "min_free = \"lots\"";
        let mut problems = Problems::new(text);
        assert_eq!(min_free("s", None, &mut problems), MinFree::Default);
        let value = Spanned::new(12..16, "lots".to_string());
        assert_eq!(min_free("s", Some(&value), &mut problems), MinFree::Default);
        assert_eq!(problems.list.len(), 1);
        assert!(problems.list[0].message.contains("share \"s\" min_free"));
    }
}
