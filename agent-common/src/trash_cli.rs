//! `trash` and `restore`: what a share's trash holds and putting it back, run directly on this
//! side's share directory (through the engine's confined root), whether or not the agent runs.
//!
//! Exit codes: 0 done (for `restore`: everything selected was put back, or nothing matched),
//! 1 the share or the arguments could not be used, 3 (`restore`) something was skipped: each
//! skipped path is listed with the reason.

use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;
use vmsync_core::path::escape_bytes;
use vmsync_core::RelPath;
use vmsync_engine::root::{FileKind, ShareRoot};
use vmsync_engine::trash::{self, format_rfc3339, RestoreOptions};

/// `restore` skipped something.
const EXIT_SKIPPED: u8 = 3;

#[derive(Serialize)]
struct ItemView {
    time: String,
    batch: String,
    /// Escaped.
    path: String,
    kind: &'static str,
    size: u64,
}

#[derive(Serialize)]
struct ListView {
    share: String,
    files: u64,
    bytes: u64,
    items: Vec<ItemView>,
}

fn kind_str(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Symlink => "symlink",
        FileKind::Dir => "dir",
        FileKind::Other => "other",
    }
}

fn open(share: &str, path: &Path) -> Result<ShareRoot, ExitCode> {
    ShareRoot::open(path).map_err(|e| {
        eprintln!("share {share:?}: {e}");
        ExitCode::FAILURE
    })
}

/// `trash --share NAME [--json]`.
pub fn list(share: &str, path: &Path, json: bool) -> ExitCode {
    let root = match open(share, path) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let items = match trash::list(&root) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("share {share:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let view = ListView {
        share: share.to_string(),
        files: items.len() as u64,
        bytes: items.iter().map(|i| i.size).sum(),
        items: items
            .iter()
            .map(|i| ItemView {
                time: format_rfc3339(i.time),
                batch: i.batch.clone(),
                path: i.path.escaped(),
                kind: kind_str(i.kind),
                size: i.size,
            })
            .collect(),
    };
    if json {
        match serde_json::to_string_pretty(&view) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!("{:<31} {:<8} {:>12}  PATH", "TRASHED (UTC)", "KIND", "SIZE");
    for i in &view.items {
        println!("{:<31} {:<8} {:>12}  {}", i.time, i.kind, i.size, i.path);
    }
    println!(
        "{} kept in share {:?}, {} bytes",
        view.files, view.share, view.bytes
    );
    ExitCode::SUCCESS
}

/// A PATH argument: share-relative, or absolute beneath the share's directory.
fn rel_path(share_dir: &Path, arg: &str) -> Result<RelPath, String> {
    use std::os::unix::ffi::OsStrExt;
    let p = Path::new(arg);
    let rel = if p.is_absolute() {
        p.strip_prefix(share_dir)
            .map_err(|_| format!("{arg}: not inside the share {}", share_dir.display()))?
    } else {
        p
    };
    let bytes = rel.as_os_str().as_bytes();
    let bytes = bytes.strip_suffix(b"/").unwrap_or(bytes);
    if bytes.is_empty() || bytes == b"." {
        return Ok(RelPath::root());
    }
    RelPath::from_bytes(bytes).map_err(|e| format!("{}: {e}", escape_bytes(arg.as_bytes())))
}

/// `restore --share NAME [--since TIME] [--dry-run] [PATH...]`.
pub fn restore(
    share: &str,
    path: &Path,
    since: Option<&str>,
    dry_run: bool,
    paths: &[String],
) -> ExitCode {
    let since = match since
        .map(|s| trash::parse_since(s, trash::now()))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("--since: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut selected = Vec::new();
    for arg in paths {
        match rel_path(path, arg) {
            Ok(p) => selected.push(p),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let root = match open(share, path) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let opts = RestoreOptions {
        since,
        paths: selected,
        dry_run,
    };
    let lines = match trash::restore(&root, &opts) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("share {share:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut skipped = 0usize;
    for l in &lines {
        let verb = match (l.action, dry_run) {
            ("restored", false) => "restored",
            ("restored", true) => "would restore",
            ("replaced", false) => "restored (the older file there is now in the trash)",
            ("replaced", true) => "would restore (the older file there would go to the trash)",
            _ => "skipped",
        };
        match &l.reason {
            Some(why) => {
                skipped += 1;
                println!("{verb}: {} ({why})", l.path);
            }
            None => println!("{verb}: {} (from {})", l.path, l.batch),
        }
    }
    if lines.is_empty() {
        println!("nothing in the trash matches");
    }
    if skipped > 0 {
        ExitCode::from(EXIT_SKIPPED)
    } else {
        ExitCode::SUCCESS
    }
}
