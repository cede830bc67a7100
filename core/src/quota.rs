//! Quotas: how much a guest may make the host hold in one share (see docs/security.md,
//! "Budgets"). The controller checks every plan before it runs: if the changes it would make on
//! the host take the share past a quota, the share pauses (`quota`) instead, and goes on by
//! itself once the plan fits again (the guest removed something, or the quota was raised).
//! A share already over a quota (the host's own files) still syncs whatever does not add to it.

use crate::reconcile::{Action, Side};
use crate::reserve::ShowBytes;
use crate::Entry;

/// Default `quota_files`: as many entries as one scan may list (the protocol's
/// `MAX_SCAN_ENTRIES`).
pub const DEFAULT_QUOTA_FILES: u64 = 4 << 20;
/// Default `quota_dirs`.
pub const DEFAULT_QUOTA_DIRS: u64 = 1 << 20;
/// Default `quota_file_bytes`: 64 GiB.
pub const DEFAULT_QUOTA_FILE_BYTES: u64 = 64 << 30;

/// A share's quotas; `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Bytes of regular files in the share.
    pub bytes: Option<u64>,
    /// Regular files and symlinks in the share.
    pub files: Option<u64>,
    /// Directories in the share.
    pub dirs: Option<u64>,
    /// The largest file the guest may push.
    pub file_bytes: Option<u64>,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            bytes: None,
            files: Some(DEFAULT_QUOTA_FILES),
            dirs: Some(DEFAULT_QUOTA_DIRS),
            file_bytes: Some(DEFAULT_QUOTA_FILE_BYTES),
        }
    }
}

/// What a share holds, as the quotas count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
    pub dirs: u64,
}

impl Usage {
    /// Counts `e` in.
    pub fn add(&mut self, e: &Entry) {
        match e {
            Entry::File(m) => {
                self.files = self.files.saturating_add(1);
                self.bytes = self.bytes.saturating_add(m.size);
            }
            Entry::Symlink { .. } => self.files = self.files.saturating_add(1),
            Entry::Dir { .. } => self.dirs = self.dirs.saturating_add(1),
        }
    }

    /// Counts `e` out.
    pub fn remove(&mut self, e: &Entry) {
        match e {
            Entry::File(m) => {
                self.files = self.files.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(m.size);
            }
            Entry::Symlink { .. } => self.files = self.files.saturating_sub(1),
            Entry::Dir { .. } => self.dirs = self.dirs.saturating_sub(1),
        }
    }
}

/// A plan that would take the host's share past a quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverQuota {
    #[error("the guest's {path} is {} ({size} bytes), larger than quota_file_bytes ({max} bytes)", ShowBytes(*size))]
    FileBytes { path: String, size: u64, max: u64 },
    #[error("the guest's changes would make the host's share hold {} ({would} bytes), over quota_bytes ({max} bytes)", ShowBytes(*would))]
    Bytes { would: u64, max: u64 },
    #[error("the guest's changes would make the host's share hold {would} files, over quota_files ({max})")]
    Files { would: u64, max: u64 },
    #[error("the guest's changes would make the host's share hold {would} directories, over quota_dirs ({max})")]
    Dirs { would: u64, max: u64 },
}

/// Whether the host-side actions of a plan keep the share (holding `before`) within `quota`.
/// A total over its quota is refused only if the plan makes it grow.
pub fn check(quota: &Quota, before: Usage, actions: &[Action]) -> Result<(), OverQuota> {
    let mut after = before;
    for a in actions.iter().filter(|a| a.target == Side::Host) {
        if let (Some(max), Some(Entry::File(m))) = (quota.file_bytes, &a.new) {
            if m.size > max {
                return Err(OverQuota::FileBytes {
                    path: a.path.escaped(),
                    size: m.size,
                    max,
                });
            }
        }
        if let Some(e) = &a.expected {
            after.remove(e);
        }
        if let Some(e) = &a.new {
            after.add(e);
        }
    }
    let over = |max: Option<u64>, would: u64, was: u64| max.filter(|&m| would > m && would > was);
    if let Some(max) = over(quota.bytes, after.bytes, before.bytes) {
        return Err(OverQuota::Bytes {
            would: after.bytes,
            max,
        });
    }
    if let Some(max) = over(quota.files, after.files, before.files) {
        return Err(OverQuota::Files {
            would: after.files,
            max,
        });
    }
    if let Some(max) = over(quota.dirs, after.dirs, before.dirs) {
        return Err(OverQuota::Dirs {
            would: after.dirs,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::file_entry;
    use crate::{RelPath, Timestamp};

    fn act(path: &str, target: Side, expected: Option<Entry>, new: Option<Entry>) -> Action {
        Action {
            path: RelPath::from_bytes(path.as_bytes()).unwrap(),
            target,
            expected,
            new,
            save_loser: false,
        }
    }

    fn dir() -> Entry {
        Entry::Dir {
            mode: 0o755,
            mtime: Timestamp::new(0, 0),
        }
    }

    #[test]
    fn a_plan_is_held_to_the_quotas_it_would_break() {
        let quota = Quota {
            bytes: Some(1000),
            files: Some(3),
            dirs: Some(2),
            file_bytes: Some(600),
        };
        let at = |bytes, files, dirs| Usage { bytes, files, dirs };
        use Side::{Guest, Host};
        let f = |n| Some(file_entry(n));
        // (what, usage before, actions, verdict)
        type Case = (&'static str, Usage, Vec<Action>, Result<(), OverQuota>);
        let cases: Vec<Case> = vec![
            ("nothing", at(0, 0, 0), vec![], Ok(())),
            (
                "fits exactly",
                at(400, 2, 1),
                vec![
                    act("a", Host, None, f(600)),
                    act("d", Host, None, Some(dir())),
                ],
                Ok(()),
            ),
            (
                "one byte over",
                at(401, 1, 0),
                vec![act("a", Host, None, f(600))],
                Err(OverQuota::Bytes {
                    would: 1001,
                    max: 1000,
                }),
            ),
            (
                "a file larger than the largest allowed",
                at(0, 0, 0),
                vec![act("big", Host, None, f(601))],
                Err(OverQuota::FileBytes {
                    path: "big".into(),
                    size: 601,
                    max: 600,
                }),
            ),
            (
                "the guest's own side is not counted",
                at(0, 0, 0),
                vec![act("big", Guest, None, f(5000))],
                Ok(()),
            ),
            (
                "a replacement counts the difference",
                at(900, 2, 0),
                vec![act("a", Host, f(500), f(600))],
                Ok(()),
            ),
            (
                "too many files",
                at(0, 3, 0),
                vec![act("x", Host, None, f(1))],
                Err(OverQuota::Files { would: 4, max: 3 }),
            ),
            (
                "a deletion pays for a creation",
                at(0, 3, 0),
                vec![act("x", Host, None, f(1)), act("y", Host, f(1), None)],
                Ok(()),
            ),
            (
                "too many directories",
                at(0, 0, 2),
                vec![act("d", Host, None, Some(dir()))],
                Err(OverQuota::Dirs { would: 3, max: 2 }),
            ),
            (
                "already over: shrinking goes on",
                at(5000, 10, 9),
                vec![act("a", Host, f(100), None), act("b", Host, f(10), f(5))],
                Ok(()),
            ),
            (
                "already over: growing does not",
                at(5000, 1, 0),
                vec![act("a", Host, f(100), f(101))],
                Err(OverQuota::Bytes {
                    would: 5001,
                    max: 1000,
                }),
            ),
        ];
        for (what, before, actions, want) in cases {
            assert_eq!(check(&quota, before, &actions), want, "{what}");
        }
        let none = Quota {
            bytes: None,
            files: None,
            dirs: None,
            file_bytes: None,
        };
        let huge = vec![act("a", Host, None, f(u64::MAX))];
        assert_eq!(check(&none, at(u64::MAX, u64::MAX, 0), &huge), Ok(()));
    }
}
