//! `resolve --keep both`: the host's version of a conflicting path kept under a sibling
//! name (`NAME.host-conflict-STAMP[.EXT]`) before the other side's version wins the path.

use crate::root::{FsErrorKind, ShareRoot};
use crate::trash::{format_rfc3339, now};
use std::path::Path;
use vmsync_core::RelPath;

/// Sibling names tried before giving up.
const ATTEMPTS: u32 = 16;

/// Links `path` in the share at `share_dir` under a sibling name no file has, through the
/// trash, so that the link is made by the root-confined calls and never replaces anything.
/// Returns the sibling. The file keeps a name throughout: the trash's link is made first.
pub fn keep_aside(share_dir: &Path, path: &RelPath) -> Result<RelPath, String> {
    let root = ShareRoot::open(share_dir)
        .map_err(|e| format!("opening the host share {}: {e}", share_dir.display()))?;
    let kept = root
        .trash_link(path)
        .map_err(|e| format!("keeping the host's {}: {e}", path.escaped()))?;
    let stamp = format_rfc3339(now()).replace([':', '-'], "");
    for attempt in 1..=ATTEMPTS {
        let Some(sibling) = sibling_name(path, &stamp, attempt) else {
            break;
        };
        match root.restore_kept(&kept.batch, &kept.path, &sibling) {
            Ok(()) => return Ok(sibling),
            Err(e) if e.kind() == FsErrorKind::Exists => continue,
            Err(e) => return Err(format!("keeping the host's {}: {e}", path.escaped())),
        }
    }
    Err(format!(
        "no free sibling name for the host's {} (it stays in the host's trash)",
        path.escaped()
    ))
}

/// `dir/report.txt` → `dir/report.host-conflict-STAMP.txt` (`-N` added from the second
/// attempt); a name with no extension (or only a leading dot) gets the suffix at its end.
fn sibling_name(path: &RelPath, stamp: &str, attempt: u32) -> Option<RelPath> {
    let name = path.name()?;
    let split = name
        .iter()
        .rposition(|&b| b == b'.')
        .filter(|&i| i > 0)
        .unwrap_or(name.len());
    let (stem, ext) = name.split_at(split);
    let mut new = stem.to_vec();
    new.extend_from_slice(format!(".host-conflict-{stamp}").as_bytes());
    if attempt > 1 {
        new.extend_from_slice(format!("-{attempt}").as_bytes());
    }
    new.extend_from_slice(ext);
    match path.parent() {
        Some(parent) => parent.join(&new).ok(),
        None => RelPath::root().join(&new).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_names() {
        let cases = [
            ("report.txt", 1, "report.host-conflict-S.txt"),
            ("dir/report.txt", 1, "dir/report.host-conflict-S.txt"),
            ("dir/report.txt", 2, "dir/report.host-conflict-S-2.txt"),
            ("Makefile", 1, "Makefile.host-conflict-S"),
            (".bashrc", 1, ".bashrc.host-conflict-S"),
            ("a/archive.tar.gz", 3, "a/archive.tar.host-conflict-S-3.gz"),
        ];
        for (path, attempt, want) in cases {
            let path = RelPath::from_bytes(path.as_bytes()).unwrap();
            let got = sibling_name(&path, "S", attempt).unwrap();
            assert_eq!(
                got.as_bytes(),
                want.as_bytes(),
                "{path:?} attempt {attempt}"
            );
        }
        assert!(sibling_name(&RelPath::root(), "S", 1).is_none());
    }
}
