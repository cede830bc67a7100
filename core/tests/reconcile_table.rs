//! Reconcile as a table of named cases: inputs on three snapshots, the exact plan expected.
//! Every row is also carried out by the simulator, which must apply it cleanly and leave both
//! sides well-formed trees.

mod common;

use common::{
    dir, dir_at, dir_mode, dir_mode_at, file, file_mode, link, link_at, malformed, path, snapshot,
    World,
};
use vmsync_core::reconcile::{reconcile, ConflictPolicy, Side, SyncMode};
use vmsync_core::{Entry, RelPath, Snapshot, Timestamp};

const H: Side = Side::Host;
const G: Side = Side::Guest;
const POLICIES: [ConflictPolicy; 4] = [
    ConflictPolicy::Keep,
    ConflictPolicy::HostWins,
    ConflictPolicy::GuestWins,
    ConflictPolicy::NewerWins,
];

type Entries = Vec<(&'static str, Entry)>;

#[derive(Debug, Clone)]
struct Case {
    name: String,
    mode: SyncMode,
    policy: ConflictPolicy,
    ancestor: Snapshot,
    host: Snapshot,
    guest: Snapshot,
    /// (path, target, new, save_loser); `expected` is checked against the target's snapshot.
    actions: Vec<(RelPath, Side, Option<Entry>, bool)>,
    conflicts: Vec<RelPath>,
    agreed: Vec<(RelPath, Option<Entry>)>,
}

/// The latest guest mtime that counts as a time in these tables (their mtimes are small).
const GUEST_MTIME_LIMIT: Timestamp = Timestamp::new(1_000, 0);
/// A guest mtime past it (seconds).
const PAST_LIMIT: i64 = 1_001;

fn plan_of(c: &Case) -> vmsync_core::reconcile::Plan {
    reconcile(
        &c.ancestor,
        &c.host,
        &c.guest,
        c.mode,
        c.policy,
        GUEST_MTIME_LIMIT,
    )
}

fn case(name: impl Into<String>) -> Case {
    Case {
        name: name.into(),
        mode: SyncMode::TwoWay,
        policy: ConflictPolicy::Keep,
        ancestor: Snapshot::new(),
        host: Snapshot::new(),
        guest: Snapshot::new(),
        actions: Vec::new(),
        conflicts: Vec::new(),
        agreed: Vec::new(),
    }
}

impl Case {
    fn mode(mut self, mode: SyncMode) -> Self {
        self.mode = mode;
        self
    }
    fn policy(mut self, policy: ConflictPolicy) -> Self {
        self.policy = policy;
        self
    }
    fn anc(mut self, entries: Entries) -> Self {
        self.ancestor = snapshot(entries);
        self
    }
    fn host(mut self, entries: Entries) -> Self {
        self.host = snapshot(entries);
        self
    }
    fn guest(mut self, entries: Entries) -> Self {
        self.guest = snapshot(entries);
        self
    }
    /// Sets ancestor, host and guest alike; later `host`/`guest` calls change one side.
    fn all(self, entries: Entries) -> Self {
        let s = snapshot(entries);
        Case {
            ancestor: s.clone(),
            host: s.clone(),
            guest: s,
            ..self
        }
    }
    fn to(mut self, target: Side, p: &str, new: Option<Entry>) -> Self {
        self.actions.push((path(p), target, new, false));
        self
    }
    fn save(mut self, target: Side, p: &str, new: Option<Entry>) -> Self {
        self.actions.push((path(p), target, new, true));
        self
    }
    fn conflict(mut self, p: &str) -> Self {
        self.conflicts.push(path(p));
        self
    }
    fn agreed(mut self, p: &str, e: Option<Entry>) -> Self {
        self.agreed.push((path(p), e));
        self
    }
}

/// The same case once per policy, with `expect` filling in each policy's outcome.
fn per_policy(name: &str, base: Case, expect: impl Fn(ConflictPolicy, Case) -> Case) -> Vec<Case> {
    POLICIES
        .iter()
        .map(|&p| {
            let c = Case {
                name: format!("{name} [{p:?}]"),
                ..base.clone()
            };
            expect(p, c.policy(p))
        })
        .collect()
}

fn same_for_every_policy(name: &str, base: Case) -> Vec<Case> {
    per_policy(name, base, |_, c| c)
}

fn two_way_basics() -> Vec<Case> {
    vec![
        case("empty share"),
        case("unchanged file").all(vec![("a", file(1, 1))]),
        case("unchanged tree").all(vec![("d", dir()), ("d/l", link("x")), ("d/x", file(1, 1))]),
        case("host creates a file")
            .host(vec![("a", file(1, 1))])
            .to(G, "a", Some(file(1, 1))),
        case("guest creates a file")
            .guest(vec![("a", file(1, 1))])
            .to(H, "a", Some(file(1, 1))),
        case("both create the same file")
            .host(vec![("a", file(1, 1))])
            .guest(vec![("a", file(1, 1))])
            .agreed("a", Some(file(1, 1))),
        case("both create the same content, host's mtime newer")
            .host(vec![("a", file(1, 5))])
            .guest(vec![("a", file(1, 3))])
            .to(G, "a", Some(file(1, 5))),
        case("both create the same content, guest's mtime newer")
            .host(vec![("a", file(1, 3))])
            .guest(vec![("a", file(1, 5))])
            .to(H, "a", Some(file(1, 5))),
        case("first sync merges both sides")
            .host(vec![("a", file(1, 1)), ("b", file(2, 2))])
            .guest(vec![("a", file(1, 1)), ("c", file(3, 3))])
            .agreed("a", Some(file(1, 1)))
            .to(G, "b", Some(file(2, 2)))
            .to(H, "c", Some(file(3, 3))),
        case("host modifies")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .to(G, "a", Some(file(2, 2))),
        case("guest modifies")
            .all(vec![("a", file(1, 1))])
            .guest(vec![("a", file(2, 2))])
            .to(H, "a", Some(file(2, 2))),
        case("both modify identically")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(2, 2))])
            .agreed("a", Some(file(2, 2))),
        case("both modify to the same content with different mtimes")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 4))])
            .guest(vec![("a", file(2, 3))])
            .to(G, "a", Some(file(2, 4))),
        case("newer-wins: host's edit is newer")
            .policy(ConflictPolicy::NewerWins)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 9))])
            .guest(vec![("a", file(3, 3))])
            .save(G, "a", Some(file(2, 9))),
        case("newer-wins: equal mtimes go to the host")
            .policy(ConflictPolicy::NewerWins)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 4))])
            .guest(vec![("a", file(3, 4))])
            .save(G, "a", Some(file(2, 4))),
        case("newer-wins: a guest mtime past the limit is not newer")
            .policy(ConflictPolicy::NewerWins)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 4))])
            .guest(vec![("a", file(3, PAST_LIMIT))])
            .save(G, "a", Some(file(2, 4))),
        case("same content, a guest mtime past the limit: the host's time goes to the guest")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 4))])
            .guest(vec![("a", file(2, PAST_LIMIT))])
            .to(G, "a", Some(file(2, 4))),
        case("host deletes")
            .all(vec![("a", file(1, 1))])
            .host(vec![])
            .to(G, "a", None),
        case("guest deletes")
            .all(vec![("a", file(1, 1))])
            .guest(vec![])
            .to(H, "a", None),
        case("both delete")
            .anc(vec![("a", file(1, 1))])
            .agreed("a", None),
        case("host deletes, guest replaces the file with a symlink")
            .all(vec![("a", file(1, 1))])
            .host(vec![])
            .guest(vec![("a", link("t"))])
            .to(H, "a", Some(link("t"))),
        case("host deletes the file, guest turns it into a directory")
            .all(vec![("a", file(1, 1))])
            .host(vec![])
            .guest(vec![("a", dir()), ("a/x", file(3, 3))])
            .to(H, "a", Some(dir()))
            .to(H, "a/x", Some(file(3, 3))),
        case("one side deletes everything")
            .all(vec![
                ("a", file(1, 1)),
                ("b", link("a")),
                ("d", dir()),
                ("d/x", file(2, 2)),
            ])
            .host(vec![])
            .to(G, "a", None)
            .to(G, "b", None)
            .to(G, "d", None)
            .to(G, "d/x", None),
        case("names sorting between a directory and its children")
            .host(vec![
                ("a", dir()),
                ("a-b", file(1, 1)),
                ("a.b", file(2, 2)),
                ("a/x", file(3, 3)),
            ])
            .to(G, "a", Some(dir()))
            .to(G, "a-b", Some(file(1, 1)))
            .to(G, "a.b", Some(file(2, 2)))
            .to(G, "a/x", Some(file(3, 3))),
    ]
}

fn two_way_conflicts() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(per_policy(
        "both create different files",
        case("")
            .host(vec![("a", file(1, 3))])
            .guest(vec![("a", file(2, 5))]),
        |p, c| match p {
            ConflictPolicy::Keep => c.conflict("a"),
            ConflictPolicy::HostWins => c.save(G, "a", Some(file(1, 3))),
            ConflictPolicy::GuestWins | ConflictPolicy::NewerWins => {
                c.save(H, "a", Some(file(2, 5)))
            }
        },
    ));
    cases.extend(per_policy(
        "both modify differently",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(3, 3))]),
        |p, c| match p {
            ConflictPolicy::Keep => c.conflict("a"),
            ConflictPolicy::HostWins => c.save(G, "a", Some(file(2, 2))),
            ConflictPolicy::GuestWins | ConflictPolicy::NewerWins => {
                c.save(H, "a", Some(file(3, 3)))
            }
        },
    ));
    cases.extend(same_for_every_policy(
        "host deletes, guest modifies: the modification wins",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![])
            .guest(vec![("a", file(2, 2))])
            .to(H, "a", Some(file(2, 2))),
    ));
    cases.extend(same_for_every_policy(
        "guest deletes, host modifies: the modification wins",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![])
            .to(G, "a", Some(file(2, 2))),
    ));
    cases.extend(per_policy(
        "both retarget a symlink differently",
        case("")
            .all(vec![("a", link("x"))])
            .host(vec![("a", link("y"))])
            .guest(vec![("a", link("z"))]),
        |p, c| match p {
            ConflictPolicy::Keep => c.conflict("a"),
            // Two non-files under newer-wins: the host.
            ConflictPolicy::HostWins | ConflictPolicy::NewerWins => c.save(G, "a", Some(link("y"))),
            ConflictPolicy::GuestWins => c.save(H, "a", Some(link("z"))),
        },
    ));
    cases.extend([
        case("conflict inside an unchanged directory leaves siblings syncing")
            .all(vec![("d", dir()), ("d/x", file(1, 1)), ("d/y", file(1, 1))])
            .host(vec![("d", dir()), ("d/x", file(2, 2)), ("d/y", file(3, 3))])
            .guest(vec![("d", dir()), ("d/x", file(4, 4)), ("d/y", file(1, 1))])
            .conflict("d/x")
            .to(G, "d/y", Some(file(3, 3))),
        case("symlink retargeted identically on both sides")
            .all(vec![("a", link("x"))])
            .host(vec![("a", link("y"))])
            .guest(vec![("a", link("y"))])
            .agreed("a", Some(link("y"))),
        case("host creates a symlink")
            .host(vec![("a", link("b"))])
            .to(G, "a", Some(link("b"))),
        case("host retargets a symlink")
            .all(vec![("a", link("x"))])
            .host(vec![("a", link("y"))])
            .to(G, "a", Some(link("y"))),
    ]);
    cases
}

/// A directory's mtime moves whenever a child changes, on both sides at once during any
/// two-way edit: a time is a metadata update, the later one wins, never a conflict.
fn directory_and_symlink_times() -> Vec<Case> {
    let mut cases = vec![
        case("host touches a directory (mtime only)")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_at(5))])
            .to(G, "d", Some(dir_at(5))),
        case("guest touches a symlink (mtime only): updated in place")
            .all(vec![("l", link_at("x", 1))])
            .guest(vec![("l", link_at("x", 5))])
            .to(H, "l", Some(link_at("x", 5))),
        case("host adds a child: the new child and the directory's time go over")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_at(5)), ("d/x", file(1, 5))])
            .to(G, "d", Some(dir_at(5)))
            .to(G, "d/x", Some(file(1, 5))),
        case("both add children: each side gets the other's, the later time wins")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_at(5)), ("d/x", file(1, 5))])
            .guest(vec![("d", dir_at(7)), ("d/y", file(2, 7))])
            .to(H, "d", Some(dir_at(7)))
            .to(G, "d/x", Some(file(1, 5)))
            .to(H, "d/y", Some(file(2, 7))),
        case("both create a directory at different times")
            .host(vec![("d", dir_at(3))])
            .guest(vec![("d", dir_at(2))])
            .to(G, "d", Some(dir_at(3))),
        case("host chmods a directory, guest only touches it: the mode goes through")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_mode_at(0o700, 2))])
            .guest(vec![("d", dir_at(9))])
            .to(G, "d", Some(dir_mode_at(0o700, 2))),
        case("host touches a directory the guest deletes: it stays")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_at(5))])
            .guest(vec![])
            .to(G, "d", Some(dir_at(5))),
        case("host→guest: the guest's directory time is reset")
            .mode(SyncMode::HostToGuest)
            .all(vec![("d", dir_at(1))])
            .guest(vec![("d", dir_at(8))])
            .to(G, "d", Some(dir_at(1))),
    ];
    cases.extend(same_for_every_policy(
        "both touch a symlink, guest's later",
        case("")
            .all(vec![("l", link_at("x", 1))])
            .host(vec![("l", link_at("x", 3))])
            .guest(vec![("l", link_at("x", 4))])
            .to(H, "l", Some(link_at("x", 4))),
    ));
    cases.extend(same_for_every_policy(
        "both touch a directory, equal times: agreed",
        case("")
            .all(vec![("d", dir_at(1))])
            .host(vec![("d", dir_at(4))])
            .guest(vec![("d", dir_at(4))])
            .agreed("d", Some(dir_at(4))),
    ));
    cases
}

fn mtime_and_permissions() -> Vec<Case> {
    let mut cases = vec![
        case("host touches a file (mtime only)")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(1, 5))])
            .to(G, "a", Some(file(1, 5))),
        case("both touch, host's later")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(1, 5))])
            .guest(vec![("a", file(1, 4))])
            .to(G, "a", Some(file(1, 5))),
        case("guest touches, host edits: the edit goes through")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(1, 9))])
            .to(G, "a", Some(file(2, 2))),
        case("host touches, guest deletes: the touch counts as a modification")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(1, 5))])
            .guest(vec![])
            .to(G, "a", Some(file(1, 5))),
        case("host makes a file executable")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file_mode(1, 1, 0o755))])
            .to(G, "a", Some(file_mode(1, 1, 0o755))),
        case("both chmod a file identically")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file_mode(1, 1, 0o755))])
            .guest(vec![("a", file_mode(1, 1, 0o755))])
            .agreed("a", Some(file_mode(1, 1, 0o755))),
        case("host chmods, guest only touches")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file_mode(1, 1, 0o755))])
            .guest(vec![("a", file(1, 7))])
            .to(G, "a", Some(file_mode(1, 1, 0o755))),
        case("host changes a directory's mode")
            .all(vec![("d", dir())])
            .host(vec![("d", dir_mode(0o700))])
            .to(G, "d", Some(dir_mode(0o700))),
        case("directory mode conflict does not hold back its children")
            .all(vec![("d", dir())])
            .host(vec![("d", dir_mode(0o700)), ("d/x", file(1, 1))])
            .guest(vec![("d", dir_mode(0o750))])
            .conflict("d")
            .to(G, "d/x", Some(file(1, 1))),
        case("directory mode conflict, host wins: nothing to save")
            .policy(ConflictPolicy::HostWins)
            .all(vec![("d", dir())])
            .host(vec![("d", dir_mode(0o700))])
            .guest(vec![("d", dir_mode(0o750))])
            .to(G, "d", Some(dir_mode(0o700))),
        case("both create a directory with different modes")
            .host(vec![("d", dir_mode(0o755)), ("d/x", file(1, 1))])
            .guest(vec![("d", dir_mode(0o700)), ("d/y", file(2, 2))])
            .conflict("d")
            .to(G, "d/x", Some(file(1, 1)))
            .to(H, "d/y", Some(file(2, 2))),
    ];
    cases.extend(directory_and_symlink_times());
    cases.extend(same_for_every_policy(
        "host touches later, guest edits: the edit wins, even under newer-wins",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(1, 9))])
            .guest(vec![("a", file(2, 2))])
            .to(H, "a", Some(file(2, 2))),
    ));
    cases.extend(per_policy(
        "host chmods, guest edits content",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file_mode(1, 1, 0o755))])
            .guest(vec![("a", file(2, 2))]),
        |p, c| match p {
            ConflictPolicy::Keep => c.conflict("a"),
            ConflictPolicy::HostWins => c.save(G, "a", Some(file_mode(1, 1, 0o755))),
            ConflictPolicy::GuestWins | ConflictPolicy::NewerWins => {
                c.save(H, "a", Some(file(2, 2)))
            }
        },
    ));
    cases
}

fn type_changes() -> Vec<Case> {
    let mut cases = vec![
        case("host turns a file into a directory with a child")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", dir()), ("a/x", file(2, 2))])
            .to(G, "a", Some(dir()))
            .to(G, "a/x", Some(file(2, 2))),
        case("host turns a directory tree into a file")
            .all(vec![
                ("d", dir()),
                ("d/x", file(1, 1)),
                ("d/y", dir()),
                ("d/y/z", file(2, 2)),
            ])
            .host(vec![("d", file(3, 3))])
            .to(G, "d", Some(file(3, 3)))
            .to(G, "d/x", None)
            .to(G, "d/y", None)
            .to(G, "d/y/z", None),
        case("guest turns a file into a symlink")
            .all(vec![("a", file(1, 1))])
            .guest(vec![("a", link("b"))])
            .to(H, "a", Some(link("b"))),
        case("host turns a symlink into a file")
            .all(vec![("a", link("b"))])
            .host(vec![("a", file(1, 1))])
            .to(G, "a", Some(file(1, 1))),
        case("guest turns a directory into a symlink")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .guest(vec![("d", link("e"))])
            .to(H, "d", Some(link("e")))
            .to(H, "d/x", None),
        case("both turn a file into a directory with different children")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", dir()), ("a/x", file(2, 2))])
            .guest(vec![("a", dir()), ("a/y", file(3, 3))])
            .agreed("a", Some(dir()))
            .to(G, "a/x", Some(file(2, 2)))
            .to(H, "a/y", Some(file(3, 3))),
        case("file vs symlink: keep")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", link("t"))])
            .guest(vec![("a", file(2, 2))])
            .conflict("a"),
        case("file vs symlink: newer-wins picks the file")
            .policy(ConflictPolicy::NewerWins)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", link("t"))])
            .guest(vec![("a", file(2, 2))])
            .save(H, "a", Some(file(2, 2))),
    ];
    cases.extend(per_policy(
        "file vs directory",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", dir()), ("a/x", file(2, 2))])
            .guest(vec![("a", file(3, 3))]),
        |p, c| match p {
            ConflictPolicy::HostWins => c.save(G, "a", Some(dir())).to(G, "a/x", Some(file(2, 2))),
            // The directory would lose (newer-wins: a file beats a directory): kept instead.
            _ => c.conflict("a"),
        },
    ));
    cases.extend(per_policy(
        "symlink vs directory",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", link("t"))])
            .guest(vec![("a", dir()), ("a/x", file(2, 2))]),
        |p, c| match p {
            ConflictPolicy::GuestWins => c.save(H, "a", Some(dir())).to(H, "a/x", Some(file(2, 2))),
            // Newer-wins between two non-files picks the host, whose symlink would replace
            // the guest's directory: kept instead.
            _ => c.conflict("a"),
        },
    ));
    cases
}

fn subtrees() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(same_for_every_policy(
        "host deletes a directory, guest adds a child: the directory is re-created",
        case("")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![])
            .guest(vec![
                ("d", dir()),
                ("d/new", file(2, 2)),
                ("d/x", file(1, 1)),
            ])
            .to(H, "d", Some(dir()))
            .to(H, "d/new", Some(file(2, 2)))
            .to(G, "d/x", None),
    ));
    cases.extend(per_policy(
        "host turns a directory into a file while guest edits a child",
        case("")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![("d", file(9, 9))])
            .guest(vec![("d", dir()), ("d/x", file(2, 2))]),
        |p, c| match p {
            ConflictPolicy::GuestWins => c.save(H, "d", Some(dir())).to(H, "d/x", Some(file(2, 2))),
            _ => c.conflict("d"),
        },
    ));
    cases.extend(per_policy(
        "host turns a directory into a symlink while guest adds a child",
        case("")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![("d", link("t"))])
            .guest(vec![("d", dir()), ("d/n", file(2, 2)), ("d/x", file(1, 1))]),
        |p, c| match p {
            // The host's deletion of d/x still goes through; its new symlink is saved.
            ConflictPolicy::GuestWins => c
                .save(H, "d", Some(dir()))
                .to(H, "d/n", Some(file(2, 2)))
                .to(G, "d/x", None),
            _ => c.conflict("d"),
        },
    ));
    cases.extend(per_policy(
        "directory vs file, the directory's children untouched",
        case("")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![("d", dir_mode(0o700)), ("d/x", file(1, 1))])
            .guest(vec![("d", file(2, 2))]),
        |p, c| match p {
            // Host's directory wins; the guest's deletion of d/x still propagates.
            ConflictPolicy::HostWins => c.save(G, "d", Some(dir_mode(0o700))).to(H, "d/x", None),
            // The directory would lose, and with it d/x: kept, and d/x is held back too.
            _ => c.conflict("d"),
        },
    ));
    cases.extend(per_policy(
        "file vs empty directory",
        case("")
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", dir())]),
        |p, c| match p {
            ConflictPolicy::GuestWins => c.save(H, "a", Some(dir())),
            // Even an empty directory is never replaced as a conflict's loser.
            _ => c.conflict("a"),
        },
    ));
    cases.extend([
        case("guest deletes a directory, host modifies a child")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![("d", dir()), ("d/x", file(2, 2))])
            .guest(vec![])
            .to(G, "d", Some(dir()))
            .to(G, "d/x", Some(file(2, 2))),
        case("host deletes a deep tree, guest adds a deep child")
            .all(vec![
                ("d", dir()),
                ("d/e", dir()),
                ("d/e/x", file(1, 1)),
                ("d/y", file(1, 1)),
            ])
            .host(vec![])
            .guest(vec![
                ("d", dir()),
                ("d/e", dir()),
                ("d/e/n", file(2, 2)),
                ("d/e/x", file(1, 1)),
                ("d/y", file(1, 1)),
            ])
            .to(H, "d", Some(dir()))
            .to(H, "d/e", Some(dir()))
            .to(H, "d/e/n", Some(file(2, 2)))
            .to(G, "d/e/x", None)
            .to(G, "d/y", None),
        case("host deletes a directory the guest left alone")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![])
            .to(G, "d", None)
            .to(G, "d/x", None),
        case("both delete a directory")
            .anc(vec![("d", dir()), ("d/x", file(1, 1))])
            .agreed("d", None)
            .agreed("d/x", None),
        case("host deletes a directory, guest deletes one child")
            .all(vec![("d", dir()), ("d/x", file(1, 1)), ("d/y", file(1, 1))])
            .host(vec![])
            .guest(vec![("d", dir()), ("d/y", file(1, 1))])
            .to(G, "d", None)
            .agreed("d/x", None)
            .to(G, "d/y", None),
        case("host deletes a directory whose mode the guest changed")
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![])
            .guest(vec![("d", dir_mode(0o700)), ("d/x", file(1, 1))])
            .to(H, "d", Some(dir_mode(0o700)))
            .to(G, "d/x", None),
        case("conflict on a directory holds back its whole subtree")
            .host(vec![
                ("d", dir()),
                ("d/x", file(1, 1)),
                ("d/y", dir()),
                ("d/y/z", file(2, 2)),
            ])
            .guest(vec![("d", file(3, 3))])
            .conflict("d"),
        case("host turns a directory into a file while guest adds a child")
            .all(vec![("d", dir())])
            .host(vec![("d", file(1, 1))])
            .guest(vec![("d", dir()), ("d/n", file(2, 2))])
            .conflict("d"),
        case("deep new tree on the guest")
            .guest(vec![
                ("a", dir()),
                ("a/b", dir()),
                ("a/b/c", file(1, 1)),
                ("a/l", link("b/c")),
            ])
            .to(H, "a", Some(dir()))
            .to(H, "a/b", Some(dir()))
            .to(H, "a/b/c", Some(file(1, 1)))
            .to(H, "a/l", Some(link("b/c"))),
    ]);
    cases
}

fn one_way() -> Vec<Case> {
    let h2g = SyncMode::HostToGuest;
    let g2h = SyncMode::GuestToHost;
    let mut cases = vec![
        case("host→guest: host creates")
            .mode(h2g)
            .host(vec![("a", file(1, 1))])
            .to(G, "a", Some(file(1, 1))),
        case("host→guest: a guest-only file is removed and saved")
            .mode(h2g)
            .guest(vec![("a", file(2, 2))])
            .save(G, "a", None),
        case("host→guest: guest's edit is reverted and saved")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .guest(vec![("a", file(2, 2))])
            .save(G, "a", Some(file(1, 1))),
        case("host→guest: guest's deletion is undone")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .guest(vec![])
            .to(G, "a", Some(file(1, 1))),
        case("host→guest: guest's touch is reset, nothing to save")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .guest(vec![("a", file(1, 5))])
            .to(G, "a", Some(file(1, 1))),
        case("host→guest: guest's chmod is reverted and saved")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .guest(vec![("a", file_mode(1, 1, 0o600))])
            .save(G, "a", Some(file(1, 1))),
        case("host→guest: host deletes a file the guest edited: deleted and saved")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .host(vec![])
            .guest(vec![("a", file(2, 2))])
            .save(G, "a", None),
        case("host→guest: both made the same change")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(2, 2))])
            .agreed("a", Some(file(2, 2))),
        case("host→guest: guest already has the host's new content")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(2, 3))])
            .to(G, "a", Some(file(2, 2))),
        case("host→guest: a guest-only directory goes, its files saved")
            .mode(h2g)
            .guest(vec![("d", dir()), ("d/l", link("x")), ("d/x", file(2, 2))])
            .to(G, "d", None)
            .save(G, "d/l", None)
            .save(G, "d/x", None),
        case("host→guest: a host file replaces a guest directory")
            .mode(h2g)
            .all(vec![("d", dir())])
            .host(vec![("d", file(1, 1))])
            .guest(vec![("d", dir()), ("d/x", file(2, 2))])
            .to(G, "d", Some(file(1, 1)))
            .save(G, "d/x", None),
        case("host→guest: a guest deletion of a directory is undone")
            .mode(h2g)
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .guest(vec![])
            .to(G, "d", Some(dir()))
            .to(G, "d/x", Some(file(1, 1))),
        case("host→guest: first sync over a populated guest")
            .mode(h2g)
            .host(vec![("a", file(1, 1)), ("b", file(2, 2))])
            .guest(vec![("a", file(1, 1)), ("c", file(3, 3))])
            .agreed("a", Some(file(1, 1)))
            .to(G, "b", Some(file(2, 2)))
            .save(G, "c", None),
        case("guest→host: guest creates")
            .mode(g2h)
            .guest(vec![("a", file(1, 1))])
            .to(H, "a", Some(file(1, 1))),
        case("guest→host: host's edit is reverted and saved")
            .mode(g2h)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .save(H, "a", Some(file(1, 1))),
        case("guest→host: host's symlink edit is reverted and saved")
            .mode(g2h)
            .all(vec![("a", link("x"))])
            .host(vec![("a", link("y"))])
            .save(H, "a", Some(link("x"))),
        case("guest→host: a directory the host deleted is re-created")
            .mode(g2h)
            .all(vec![("d", dir()), ("d/x", file(1, 1))])
            .host(vec![])
            .to(H, "d", Some(dir()))
            .to(H, "d/x", Some(file(1, 1))),
        case("guest→host: both delete")
            .mode(g2h)
            .anc(vec![("a", file(1, 1))])
            .agreed("a", None),
        case("guest→host: unchanged")
            .mode(g2h)
            .all(vec![("d", dir()), ("d/x", file(1, 1))]),
        case("guest→host: host-only file never reaches the guest")
            .mode(g2h)
            .host(vec![("a", file(1, 1))])
            .save(H, "a", None),
    ];
    cases.extend(same_for_every_policy(
        "host→guest: both modify, the policy does not apply",
        case("")
            .mode(h2g)
            .all(vec![("a", file(1, 1))])
            .host(vec![("a", file(2, 2))])
            .guest(vec![("a", file(3, 9))])
            .save(G, "a", Some(file(2, 2))),
    ));
    cases
}

fn all_cases() -> Vec<Case> {
    [
        two_way_basics(),
        two_way_conflicts(),
        mtime_and_permissions(),
        type_changes(),
        subtrees(),
        one_way(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn side_of(c: &Case, side: Side) -> &Snapshot {
    match side {
        Side::Host => &c.host,
        Side::Guest => &c.guest,
    }
}

fn check(c: &Case) {
    let name = &c.name;
    for (which, snap) in [
        ("ancestor", &c.ancestor),
        ("host", &c.host),
        ("guest", &c.guest),
    ] {
        assert!(
            malformed(snap).is_empty(),
            "{name}: malformed {which} in the table"
        );
    }
    let plan = plan_of(c);

    assert!(
        plan.actions.windows(2).all(|w| w[0].path < w[1].path),
        "{name}: actions unsorted"
    );
    assert!(
        plan.conflicts.windows(2).all(|w| w[0].path < w[1].path),
        "{name}: conflicts unsorted"
    );
    assert!(
        plan.agreed.windows(2).all(|w| w[0].0 < w[1].0),
        "{name}: agreed unsorted"
    );

    let got: Vec<_> = plan
        .actions
        .iter()
        .map(|a| (a.path.clone(), a.target, a.new.clone(), a.save_loser))
        .collect();
    let mut want = c.actions.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want, "{name}: actions");
    for a in &plan.actions {
        assert_eq!(
            a.expected.as_ref(),
            side_of(c, a.target).get(&a.path),
            "{name}: expected at {}",
            a.path
        );
    }

    let got: Vec<_> = plan.conflicts.iter().map(|k| k.path.clone()).collect();
    let mut want = c.conflicts.clone();
    want.sort();
    assert_eq!(got, want, "{name}: conflicts");
    for k in &plan.conflicts {
        assert_eq!(
            k.ancestor.as_ref(),
            c.ancestor.get(&k.path),
            "{name}: conflict ancestor"
        );
        assert_eq!(
            k.host.as_ref(),
            c.host.get(&k.path),
            "{name}: conflict host"
        );
        assert_eq!(
            k.guest.as_ref(),
            c.guest.get(&k.path),
            "{name}: conflict guest"
        );
    }

    let mut want = c.agreed.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(plan.agreed, want, "{name}: agreed");

    let mut world = World::new(c.ancestor.clone(), c.host.clone(), c.guest.clone());
    let applied = world.apply(&plan);
    assert!(
        applied.skipped.is_empty(),
        "{name}: skipped {:?}",
        applied.skipped
    );
    assert!(applied.errors.is_empty(), "{name}: {:?}", applied.errors);
    assert!(
        malformed(&world.host).is_empty(),
        "{name}: host malformed after the plan"
    );
    assert!(
        malformed(&world.guest).is_empty(),
        "{name}: guest malformed after the plan"
    );
}

#[test]
fn reconcile_table() {
    let cases = all_cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "case names must be unique");
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    for c in &cases {
        check(c);
    }
}

#[test]
fn root_is_never_reconciled() {
    let root = vmsync_core::RelPath::root();
    let host: Snapshot = [(root.clone(), dir())].into_iter().collect();
    let plan = reconcile(
        &Snapshot::new(),
        &host,
        &Snapshot::new(),
        SyncMode::TwoWay,
        ConflictPolicy::Keep,
        GUEST_MTIME_LIMIT,
    );
    assert_eq!(plan, Default::default());
}

#[test]
fn out_of_scope_parents_are_left_alone() {
    // A partial scan of `d/x` does not report `d`: the plan must not invent or require it.
    let c = case("partial scan")
        .all(vec![("d/x", file(1, 1))])
        .host(vec![("d/x", file(2, 2))]);
    let plan = plan_of(&c);
    assert_eq!(plan.actions.len(), 1);
    assert_eq!(plan.actions[0].path, path("d/x"));
    assert_eq!(plan.actions[0].target, G);
    assert!(plan.conflicts.is_empty());
}
