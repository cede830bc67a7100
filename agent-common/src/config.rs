//! What both agents' configuration files share: how problems are collected and reported
//! (`FILE:LINE:COLUMN: message`, every problem in one pass), and the checks on values that
//! mean the same thing in both files (share names, absolute paths, socket paths). Each agent's
//! own `config` module owns its format and defaults.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;
use vmsync_transport::endpoint_addr::MAX_UNIX_SOCKET_PATH_BYTES;

/// Longest share name. Names travel in the handshake and name directories under `state_dir`.
pub const MAX_SHARE_NAME_BYTES: usize = 64;

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

/// `None` when `name` is a valid share name, else why not.
pub fn share_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_string());
    }
    if name.len() > MAX_SHARE_NAME_BYTES {
        return Some(format!(
            "is {} bytes; the limit is {MAX_SHARE_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "contains {bad:?}; use only letters, digits, `.`, `_` and `-`"
        ));
    }
    // The name becomes a directory name under state_dir.
    if name == "." || name == ".." {
        return Some("must not be `.` or `..`".to_string());
    }
    None
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
