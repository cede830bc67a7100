//! Races at chosen moments (docs/threat-model.md, "Races" and "Crash and fault injection"): a
//! host process editing a file right before or right after the destination's final check, a
//! file changed while it is being chunked, and one file edited thousands of times from both
//! sides. In one process: a real `Controller` over two `LocalEndpoint`s (`tests/src/fixture.rs`).
//! Moments inside the engine are reached through its test-only hooks
//! (`vmsync_engine::faults::at`, cargo feature `faults`): right after a file's first chunk is
//! cut, right before a staged file is renamed into place. Moments between the calls of a cycle
//! are reached through an intercepting endpoint (`tests/src/intercept.rs`). Nothing here waits
//! on time: every edit happens at its moment, on the thread doing the work there.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use vmsync_core::endpoint::{Change, ScanReport, ScanScope};
use vmsync_core::reconcile::ConflictPolicy;
use vmsync_core::RelPath;
use vmsync_engine::controller::CycleReport;
use vmsync_engine::faults::{self, Moment};
use vmsync_engine::status::ShareState;
use vmsync_tests::fixture::{
    assert_same_tree, random_bytes, read, set_mtime, trash_files, write, Pair, PairOptions,
};
use vmsync_tests::intercept::{Hooks, Intercept, Transit};

fn rel(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

fn with_policy(policy: ConflictPolicy) -> Pair {
    Pair::new(PairOptions {
        policy,
        ..PairOptions::default()
    })
}

/// An action a hook runs once.
type Action = Box<dyn FnOnce() + Send>;

/// Hooks on one side's endpoint that run a test's actions at moments between the calls of a
/// cycle: each action once, the first time its moment comes.
#[derive(Default)]
struct Meddle {
    /// Right after this side's scan, before the controller sees its report.
    after_scan: Vec<Action>,
    /// Right before this side's transition: after the scans, the transfer and the staging,
    /// before the side checks each path against what its scan saw.
    before_transition: Vec<Action>,
    /// Right before chunks are supplied to this side (it is the destination of a file).
    before_supply: Vec<Action>,
}

impl Hooks for Meddle {
    fn scanned(&mut self, report: ScanReport) -> ScanReport {
        for action in self.after_scan.drain(..) {
            action();
        }
        report
    }
    fn supply(&mut self, _chunks: &[(vmsync_core::Hash, vmsync_core::endpoint::ChunkData)]) {
        for action in self.before_supply.drain(..) {
            action();
        }
    }
    fn transition(&mut self, _changes: &[Change]) -> Transit {
        for action in self.before_transition.drain(..) {
            action();
        }
        Transit::Pass
    }
}

/// One cycle over `scope` with each side's calls going through its `Meddle` hooks.
async fn meddled_cycle(p: &mut Pair, scope: ScanScope, host: Meddle, guest: Meddle) -> CycleReport {
    let s = p.sides();
    let mut host = Intercept {
        inner: s.host.inner.clone(),
        hooks: host,
    };
    let mut guest = Intercept {
        inner: s.guest.inner.clone(),
        hooks: guest,
    };
    s.controller
        .cycle(&mut host, &mut guest, scope)
        .await
        .expect("cycle")
}

/// A flag an action raises, to check that its moment came.
fn flag() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let f = Arc::new(AtomicBool::new(false));
    (Arc::clone(&f), f)
}

/// The contents of the files kept for `rel` in the trash of the share at `root`.
fn kept(root: &Path, rel: &str) -> Vec<Vec<u8>> {
    trash_files(root)
        .into_iter()
        .filter(|(name, _)| name.split_once('/').map(|(_, p)| p) == Some(rel))
        .map(|(_, data)| data)
        .collect()
}

fn show(data: &[u8]) -> String {
    if data.len() <= 64 {
        format!("{:?}", String::from_utf8_lossy(data))
    } else {
        format!("<{} bytes {}>", data.len(), blake3::hash(data).to_hex())
    }
}

fn show_all(versions: &[Vec<u8>]) -> String {
    versions
        .iter()
        .map(|v| show(v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything in `.vmsync/tmp` of a share: must be empty once a cycle is over.
fn temps(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join(".vmsync/tmp"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 1. A host process editing a file between the scan and the rename.
// ---------------------------------------------------------------------------------------------

/// `f.txt` holds "base" on both sides; the guest then rewrites it. Returns the pair, ready for
/// the cycle that brings the guest's version to the host.
async fn guest_rewrote(policy: ConflictPolicy) -> Pair {
    let mut p = with_policy(policy);
    write(&p.host_dir, "f.txt", "base");
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "f.txt"), b"base");
    write(&p.guest_dir, "f.txt", "guest edit");
    // Older than the host's edit to come, whatever the clock's resolution (newer-wins).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    set_mtime(&p.guest_dir.join("f.txt"), now - 60, 0);
    p
}

/// A host process rewrites `f.txt` after the host's scan, right before the host checks it
/// against that scan and replaces it with the guest's version (the transition). The check sees
/// the edit: nothing is replaced, the cycle asks for another, and that one decides the
/// conflict by the share's policy. Under every policy both contents survive: `keep` leaves
/// each side its own and lists the conflict; an automatic policy puts the winner on both sides
/// and keeps the loser, byte for byte, in the trash of the side where it lost. ("base" is
/// gone from both trees: the host process and the guest replaced it, not sync.)
#[tokio::test]
async fn a_host_edit_after_the_scan_before_the_final_check_is_a_conflict_and_both_survive() {
    for policy in [
        ConflictPolicy::Keep,
        ConflictPolicy::HostWins,
        ConflictPolicy::GuestWins,
        ConflictPolicy::NewerWins,
    ] {
        let mut p = guest_rewrote(policy).await;
        let (edited, seen) = flag();
        let dir = p.host_dir.clone();
        let host = Meddle {
            before_transition: vec![Box::new(move || {
                std::fs::write(dir.join("f.txt"), "host edit").unwrap();
                edited.store(true, Ordering::SeqCst);
            })],
            ..Meddle::default()
        };
        let first = meddled_cycle(&mut p, ScanScope::Full, host, Meddle::default()).await;
        assert!(
            seen.load(Ordering::SeqCst),
            "{policy:?}: the moment never came"
        );
        assert!(
            first.retry,
            "{policy:?}: the check did not see the edit: {first:?}"
        );
        assert_eq!(
            read(&p.host_dir, "f.txt"),
            b"host edit",
            "{policy:?}: the host's edit was replaced"
        );
        p.sync().await;
        let (host_now, guest_now) = (read(&p.host_dir, "f.txt"), read(&p.guest_dir, "f.txt"));
        let (host_kept, guest_kept) = (kept(&p.host_dir, "f.txt"), kept(&p.guest_dir, "f.txt"));
        let status = p.status();
        let what = format!(
            "{policy:?}: host {}, guest {}, host trash [{}], guest trash [{}], {status:?}",
            show(&host_now),
            show(&guest_now),
            show_all(&host_kept),
            show_all(&guest_kept)
        );
        match policy {
            ConflictPolicy::Keep => {
                assert_eq!(host_now, b"host edit", "{what}");
                assert_eq!(guest_now, b"guest edit", "{what}");
                assert_eq!(status.conflicts, vec!["f.txt".to_string()], "{what}");
                assert_eq!(status.state, ShareState::Conflicted, "{what}");
            }
            ConflictPolicy::HostWins | ConflictPolicy::NewerWins => {
                assert_same_tree(&p.host_dir, &p.guest_dir);
                assert_eq!(host_now, b"host edit", "{what}");
                assert_eq!(guest_kept, vec![b"guest edit".to_vec()], "{what}");
                assert_eq!(status.state, ShareState::InSync, "{what}");
            }
            ConflictPolicy::GuestWins => {
                assert_same_tree(&p.host_dir, &p.guest_dir);
                assert_eq!(host_now, b"guest edit", "{what}");
                assert_eq!(host_kept, vec![b"host edit".to_vec()], "{what}");
                assert_eq!(status.state, ShareState::InSync, "{what}");
            }
        }
        assert!(temps(&p.host_dir).is_empty() && temps(&p.guest_dir).is_empty());
    }
}

/// How a host process changes `f.txt` in place.
#[derive(Debug, Clone, Copy)]
enum InPlace {
    /// Truncates and rewrites it (`echo x > f`).
    Rewrite,
    /// Appends a line (`echo x >> f`).
    Append,
}

impl InPlace {
    fn apply(self, path: &Path) -> Vec<u8> {
        match self {
            InPlace::Rewrite => {
                std::fs::write(path, "host edit").unwrap();
                b"host edit".to_vec()
            }
            InPlace::Append => {
                let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(b"\nhost line").unwrap();
                b"base\nhost line".to_vec()
            }
        }
    }
}

/// A host process changes `f.txt` in place at the last moment sync gives it: after the host
/// checked the path against its scan and kept the old version in the trash (a second hard
/// link), right before the guest's version is renamed over it. The check cannot see an edit
/// made after it, but what the edit wrote went into the inode the trash already holds. So the guest's
/// version lands, and the host's edit is kept in the host's trash, byte for byte: not a
/// conflict, but nothing lost.
#[tokio::test]
async fn a_host_edit_in_place_between_the_final_check_and_the_rename_is_kept_in_the_trash() {
    for how in [InPlace::Rewrite, InPlace::Append] {
        let mut p = guest_rewrote(ConflictPolicy::Keep).await;
        let (edited, seen) = flag();
        let file = p.host_dir.join("f.txt");
        let host_edit = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&host_edit);
        faults::at(
            &p.host_dir,
            Moment::BeforeRename,
            &rel("f.txt"),
            move || {
                *out.lock().unwrap() = how.apply(&file);
                edited.store(true, Ordering::SeqCst);
            },
        )
        .unwrap();
        let first = p.cycle().await;
        assert!(
            seen.load(Ordering::SeqCst),
            "{how:?}: the moment never came"
        );
        let host_edit = host_edit.lock().unwrap().clone();
        let host_kept = kept(&p.host_dir, "f.txt");
        let what = format!(
            "{how:?}: {first:?}, host {}, host trash [{}]",
            show(&read(&p.host_dir, "f.txt")),
            show_all(&host_kept)
        );
        assert_eq!(read(&p.host_dir, "f.txt"), b"guest edit", "{what}");
        assert_eq!(
            host_kept,
            vec![host_edit],
            "{what}: the host's edit is lost"
        );
        p.sync().await;
        assert_same_tree(&p.host_dir, &p.guest_dir);
        assert_eq!(p.status().state, ShareState::InSync);
        assert_eq!(kept(&p.host_dir, "f.txt").len(), 1);
        assert!(temps(&p.host_dir).is_empty());
    }
}

/// The guest creates `new.txt`; a host process creates its own `new.txt` at the last moment,
/// right before the guest's file is linked into place on the host. A new file never replaces
/// anything (`linkat` fails on what is there): the host's file stays, the cycle asks for
/// another, and that one finds both sides created the path: a conflict (`keep`), both
/// contents where their authors left them.
#[tokio::test]
async fn a_host_file_created_right_before_a_new_file_lands_is_a_conflict_and_both_survive() {
    let mut p = with_policy(ConflictPolicy::Keep);
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    write(&p.guest_dir, "new.txt", "guest's new file");
    let (edited, seen) = flag();
    let file = p.host_dir.join("new.txt");
    faults::at(
        &p.host_dir,
        Moment::BeforeRename,
        &rel("new.txt"),
        move || {
            std::fs::write(&file, "host's new file").unwrap();
            edited.store(true, Ordering::SeqCst);
        },
    )
    .unwrap();
    let first = p.cycle().await;
    assert!(seen.load(Ordering::SeqCst), "the moment never came");
    assert!(first.retry, "{first:?}");
    assert_eq!(read(&p.host_dir, "new.txt"), b"host's new file");
    p.sync().await;
    assert_eq!(read(&p.host_dir, "new.txt"), b"host's new file");
    assert_eq!(read(&p.guest_dir, "new.txt"), b"guest's new file");
    assert_eq!(p.status().conflicts, vec!["new.txt".to_string()]);
    assert!(temps(&p.host_dir).is_empty());
}

/// Sets a host editor's atomic save of `content` over `f.txt` (written beside it, renamed over
/// it) for the last moment before sync renames its version there; `done` is set once it ran.
fn save_right_before_the_rename(host_dir: &Path, content: &'static str, done: Arc<AtomicBool>) {
    let dir = host_dir.to_path_buf();
    faults::at(host_dir, Moment::BeforeRename, &rel("f.txt"), move || {
        std::fs::write(dir.join(".f.txt.swp"), content).unwrap();
        std::fs::rename(dir.join(".f.txt.swp"), dir.join("f.txt")).unwrap();
        done.store(true, Ordering::SeqCst);
    })
    .unwrap();
}

/// An editor's atomic save (a temp file renamed over `f.txt`) at the last moment: after the
/// host kept the old version in the trash by a hard link, right before the guest's version is
/// put in its place. A plain `rename(2)` would replace the editor's new inode, which nothing
/// else names; the commit swaps instead (`renameat2(RENAME_EXCHANGE)`), finds that what came
/// out is not what the trash kept, and swaps it back: the host's edit stays where the editor
/// put it, nothing is left in `.vmsync/tmp/`, and under `keep` the path is a conflict.
#[tokio::test]
async fn an_editors_atomic_save_between_the_final_check_and_the_rename_is_not_lost() {
    let mut p = guest_rewrote(ConflictPolicy::Keep).await;
    let (edited, seen) = flag();
    save_right_before_the_rename(&p.host_dir, "host edit", edited);
    p.cycle().await;
    assert!(seen.load(Ordering::SeqCst), "the moment never came");
    assert_eq!(
        read(&p.host_dir, "f.txt"),
        b"host edit",
        "the host's edit is not where the editor put it (host trash [{}])",
        show_all(&kept(&p.host_dir, "f.txt"))
    );
    assert!(temps(&p.host_dir).is_empty());
    p.sync().await;
    assert_eq!(read(&p.host_dir, "f.txt"), b"host edit");
    assert_eq!(read(&p.guest_dir, "f.txt"), b"guest edit");
}

/// The same save, and then, in the instant the guest's version stands at `f.txt` before the
/// commit sees the save and swaps it back out, the host's program writes `f.txt` in place: into
/// the guest's version's inode, which the swap back takes out of the share. That inode now holds
/// the host's write, so it is kept in the host's trash, not unlinked as the commit's own leftover.
#[tokio::test]
async fn a_write_into_the_new_version_in_the_instant_it_stood_at_the_path_is_kept() {
    let mut p = guest_rewrote(ConflictPolicy::Keep).await;
    let (saved, _) = flag();
    save_right_before_the_rename(&p.host_dir, "host save", saved);
    let (edited, seen) = flag();
    let file = p.host_dir.join("f.txt");
    faults::at(&p.host_dir, Moment::AfterSwap, &rel("f.txt"), move || {
        std::fs::write(&file, "host write in place").unwrap();
        edited.store(true, Ordering::SeqCst);
    })
    .unwrap();
    p.cycle().await;
    assert!(seen.load(Ordering::SeqCst), "the moment never came");
    let host_kept = kept(&p.host_dir, "f.txt");
    assert_eq!(read(&p.host_dir, "f.txt"), b"host save");
    assert!(
        host_kept.contains(&b"host write in place".to_vec()),
        "the host's write in place is lost (host trash [{}])",
        show_all(&host_kept)
    );
    assert!(temps(&p.host_dir).is_empty());
    p.sync().await;
    assert_eq!(read(&p.host_dir, "f.txt"), b"host save");
    assert_eq!(read(&p.guest_dir, "f.txt"), b"guest edit");
    assert!(kept(&p.host_dir, "f.txt").contains(&b"host write in place".to_vec()));
}

/// The guest holds `f.txt` empty, as the host last sent it, and a guest program has it open to
/// write (an editor saving in place truncates, then writes). The host's new version would be
/// appended in place (an empty file only grows), but the guest program writes its own version
/// in the instant after the guest checked the file and before sync's bytes go in: those bytes
/// would land on top of the program's, and its version would be nowhere. With another writer
/// on the file the append is refused and the file replaced, which keeps the inode the program
/// writes into: its version survives, at the path or in the guest's trash.
#[tokio::test]
async fn a_write_into_a_file_while_sync_appends_to_it_is_never_overwritten() {
    let mut p = with_policy(ConflictPolicy::HostWins);
    write(&p.host_dir, "f.txt", "");
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "f.txt"), b"");
    let guest_file = p.guest_dir.join("f.txt");
    let program = Arc::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&guest_file)
            .unwrap(),
    );
    let guest_version = b"the guest program's own version, longer than the host's".to_vec();
    let wrote = Arc::new(AtomicBool::new(false));
    let (file, data, done) = (
        Arc::clone(&program),
        guest_version.clone(),
        Arc::clone(&wrote),
    );
    faults::at(
        &p.guest_dir,
        Moment::BeforeAppendWrite,
        &rel("f.txt"),
        move || {
            file.write_all_at(&data, 0).unwrap();
            done.store(true, Ordering::SeqCst);
        },
    )
    .unwrap();
    write(&p.host_dir, "f.txt", "host version");
    p.cycle().await;
    if !wrote.load(Ordering::SeqCst) {
        // Refused before the moment came: the program's write comes now, as it would.
        program.write_all_at(&guest_version, 0).unwrap();
    }
    drop(program);
    faults::clear(&p.guest_dir).unwrap();
    let guest_kept = kept(&p.guest_dir, "f.txt");
    assert!(
        read(&p.guest_dir, "f.txt") == guest_version || guest_kept.contains(&guest_version),
        "the guest program's version is lost: guest f.txt {}, guest trash [{}]",
        show(&read(&p.guest_dir, "f.txt")),
        show_all(&guest_kept)
    );
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "f.txt"), b"host version");
    assert!(kept(&p.guest_dir, "f.txt").contains(&guest_version));
}

/// A file open for reading on the destination (`tail -f` following it) does not stop an
/// append in place: the reader's file grows, same inode.
#[tokio::test]
async fn a_reader_following_the_destination_file_sees_it_grow_in_place() {
    let mut p = with_policy(ConflictPolicy::Keep);
    write(&p.host_dir, "log.txt", "line 1\n");
    p.sync().await;
    let follower = std::fs::File::open(p.guest_dir.join("log.txt")).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(p.host_dir.join("log.txt"))
        .unwrap();
    log.write_all(b"line 2\n").unwrap();
    drop(log);
    p.sync().await;
    let mut seen = vec![0u8; 14];
    follower.read_exact_at(&mut seen, 0).unwrap();
    assert_eq!(
        seen, b"line 1\nline 2\n",
        "the follower's file did not grow"
    );
    assert!(kept(&p.guest_dir, "log.txt").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 2. A file appended, truncated or rewritten while it is being chunked.
// ---------------------------------------------------------------------------------------------

/// What happens to the source's file at the chosen moment.
#[derive(Debug, Clone, Copy)]
enum Mutation {
    /// 70,000 bytes appended (`O_APPEND`).
    Append,
    /// Cut to 300,000 bytes.
    Truncate,
    /// Every byte rewritten in place: same inode, same size.
    Rewrite,
    /// Replaced by a new file renamed over it (an editor's save).
    Replace,
}

const MUTATIONS: [Mutation; 4] = [
    Mutation::Append,
    Mutation::Truncate,
    Mutation::Rewrite,
    Mutation::Replace,
];

impl Mutation {
    /// Changes the file at `path`, which holds `now`; returns what it holds afterwards.
    fn apply(self, path: &Path, now: &[u8], seed: u64) -> Vec<u8> {
        match self {
            Mutation::Append => {
                let tail = random_bytes(seed, 70_000);
                let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(&tail).unwrap();
                [now, &tail[..]].concat()
            }
            Mutation::Truncate => {
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(300_000).unwrap();
                now[..300_000].to_vec()
            }
            Mutation::Rewrite => {
                let new = random_bytes(seed, now.len());
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.write_all_at(&new, 0).unwrap();
                new
            }
            Mutation::Replace => {
                let new = random_bytes(seed, now.len() + 1000);
                let tmp = path.with_file_name(".big.bin.new");
                std::fs::write(&tmp, &new).unwrap();
                std::fs::rename(&tmp, path).unwrap();
                new
            }
        }
    }
}

/// When the source's file changes.
#[derive(Debug, Clone, Copy)]
enum When {
    /// While its scan reads and chunks it: right after its first chunk is cut, the first
    /// 64 KiB read and the rest not yet (the engine's `FirstChunkCut` hook).
    FirstChunkCut,
    /// After its scan chunked it, before any of its chunks is read to be sent.
    AfterScan,
}

/// Which side is the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Host,
    Guest,
}

impl Source {
    fn dirs(self, p: &Pair) -> (PathBuf, PathBuf) {
        match self {
            Source::Host => (p.host_dir.clone(), p.guest_dir.clone()),
            Source::Guest => (p.guest_dir.clone(), p.host_dir.clone()),
        }
    }
}

/// Names which of `versions` `data` is, or fails: a torn file (a mix of versions) is none.
fn which(data: &[u8], versions: &[(&str, &[u8])], what: &str) -> String {
    match versions.iter().find(|(_, v)| *v == data) {
        Some((name, _)) => (*name).to_string(),
        None => panic!(
            "{what}: {} is none of {}: torn",
            show(data),
            versions
                .iter()
                .map(|(n, v)| format!("{n} {}", show(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// One case: `big.bin` is v1 (1 MiB) on both sides; the source rewrites it as v2 (1 MiB); at
/// `when`, during the cycle that sends v2, `change` turns it into v3. What the destination
/// holds after that cycle must be v1, v2 or v3, whole, and so must everything it kept in its
/// trash; after the next cycle both sides hold v3 and nothing is left in `.vmsync/tmp`.
async fn changed_while_chunked(from: Source, when: When, change: Mutation) -> String {
    let what = format!("{change:?} at {when:?} from the {from:?}");
    let mut p = Pair::new(PairOptions::default());
    let v1 = random_bytes(1, 1 << 20);
    write(&p.host_dir, "big.bin", &v1);
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    let (src, dst) = from.dirs(&p);
    let v2 = random_bytes(2, 1 << 20);
    write(&src, "big.bin", &v2);
    let v3 = Arc::new(Mutex::new(Vec::new()));
    let (out, file, base) = (Arc::clone(&v3), src.join("big.bin"), v2.clone());
    let (edited, seen) = flag();
    let action = move || {
        *out.lock().unwrap() = change.apply(&file, &base, 3);
        edited.store(true, Ordering::SeqCst);
    };
    let mut meddle = Meddle::default();
    match when {
        When::FirstChunkCut => {
            faults::at(&src, Moment::FirstChunkCut, &rel("big.bin"), action).unwrap()
        }
        When::AfterScan => meddle.after_scan.push(Box::new(action)),
    }
    let first = match from {
        Source::Host => meddled_cycle(&mut p, ScanScope::Full, meddle, Meddle::default()).await,
        Source::Guest => meddled_cycle(&mut p, ScanScope::Full, Meddle::default(), meddle).await,
    };
    assert!(seen.load(Ordering::SeqCst), "{what}: the moment never came");
    let v3 = v3.lock().unwrap().clone();
    let versions = [("v1", &v1[..]), ("v2", &v2[..]), ("v3", &v3[..])];
    let landed = which(&read(&dst, "big.bin"), &versions, &what);
    for old in kept(&dst, "big.bin") {
        which(&old, &versions, &format!("{what}: kept in the trash"));
    }
    assert!(
        temps(&dst).is_empty(),
        "{what}: temps left: {:?}",
        temps(&dst)
    );
    let next = p.cycle().await;
    assert_eq!(
        read(&dst, "big.bin"),
        v3,
        "{what}: the next cycle did not bring the newest: {next:?}"
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
    for old in kept(&dst, "big.bin") {
        which(&old, &versions, &format!("{what}: kept in the trash"));
    }
    assert!(temps(&dst).is_empty() && temps(&src).is_empty(), "{what}");
    assert_eq!(p.status().state, ShareState::InSync, "{what}");
    format!("{what}: {landed} after the first cycle ({first:?})")
}

/// A file appended to, truncated, rewritten in place or replaced at a chosen moment of its
/// chunking (right after its first chunk is cut), or right after it was chunked and before
/// its chunks are sent, in both directions: the destination holds a whole version (old or
/// new) after that cycle, never a mix, and the next cycle brings the newest: the trees are
/// identical and in sync.
#[tokio::test]
async fn a_file_changed_while_it_is_chunked_lands_whole_and_then_the_newest() {
    let mut seen = Vec::new();
    for from in [Source::Guest, Source::Host] {
        for when in [When::FirstChunkCut, When::AfterScan] {
            for change in MUTATIONS {
                seen.push(changed_while_chunked(from, when, change).await);
            }
        }
    }
    eprintln!("{}", seen.join("\n"));
}

/// The source's file grows at every attempt to chunk it (a hook that re-arms itself, right
/// after the first chunk each time): the scan gives up on it with a problem, the destination
/// keeps its old version whole, nothing is taken for deleted; once the writer stops, the next
/// cycle brings the newest.
#[tokio::test]
async fn a_file_that_changes_at_every_chunking_lands_nothing_then_the_newest() {
    fn arm(root: PathBuf, file: PathBuf, stop: Arc<AtomicBool>, count: Arc<AtomicUsize>) {
        faults::at(
            &root.clone(),
            Moment::FirstChunkCut,
            &rel("big.bin"),
            move || {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .unwrap();
                f.write_all(b"+").unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                if !stop.load(Ordering::SeqCst) {
                    arm(root, file, stop, count);
                }
            },
        )
        .unwrap();
    }
    let mut p = Pair::new(PairOptions::default());
    let v1 = random_bytes(1, 1 << 20);
    write(&p.host_dir, "big.bin", &v1);
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    write(&p.guest_dir, "big.bin", random_bytes(2, 1 << 20));
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    arm(
        p.guest_dir.clone(),
        p.guest_dir.join("big.bin"),
        Arc::clone(&stop),
        Arc::clone(&count),
    );
    p.cycle().await;
    let changes = count.load(Ordering::SeqCst);
    assert!(changes >= 2, "changed at {changes} chunkings");
    assert_eq!(read(&p.host_dir, "big.bin"), v1, "the host's copy moved");
    let problems = p.status().problems;
    assert!(
        problems.iter().any(|v| v.path == "big.bin"
            && v.side == "guest"
            && v.reason.contains("kept changing")),
        "{problems:?}"
    );
    stop.store(true, Ordering::SeqCst);
    faults::clear(&p.guest_dir).unwrap();
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "big.bin"), read(&p.guest_dir, "big.bin"));
    assert_eq!(kept(&p.host_dir, "big.bin"), vec![v1]);
    assert_eq!(p.status().state, ShareState::InSync);
}

// ---------------------------------------------------------------------------------------------
// 3. Both sides editing the same file thousands of times.
// ---------------------------------------------------------------------------------------------

/// One side's writer of `f.txt`: every version it writes is new (its side, a counter, noise),
/// and before each edit it looks at what the file holds, so it knows which of its versions
/// something other than itself (sync) replaced or deleted.
struct Writer {
    dir: PathBuf,
    side: &'static str,
    seq: u64,
    /// What this writer last left at `f.txt` (`None`: it deleted it, or never wrote it).
    last: Option<Vec<u8>>,
    /// Its versions that were no longer at `f.txt` when it came back: sync replaced or deleted
    /// them, so each must be in this side's trash.
    replaced: Vec<Vec<u8>>,
    edits: usize,
    deletes: usize,
}

impl Writer {
    fn path(&self) -> PathBuf {
        self.dir.join("f.txt")
    }

    /// Notes whether its last version is still at `f.txt`.
    fn look(&mut self) -> Option<Vec<u8>> {
        let now = std::fs::read(self.path()).ok();
        if let Some(mine) = &self.last {
            if now.as_ref() != Some(mine) {
                self.replaced.push(mine.clone());
            }
        }
        now
    }

    /// One edit: mostly a new version of a few hundred bytes written in place (the file's
    /// inode stays), one in eight saved as an editor does (written beside the share, renamed
    /// over `f.txt`), now and then one of several chunks, and now and then a deletion. A new
    /// version never has the size of what is there, so its identity differs whatever the
    /// timestamp resolution.
    fn edit(&mut self, rng: &mut StdRng, written: &Mutex<HashSet<Vec<u8>>>) {
        let now = self.look();
        self.edits += 1;
        if now.is_some() && rng.random_ratio(1, 40) {
            // Live agents may have deleted it since the look (the other side deleted it).
            match std::fs::remove_file(self.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("delete f.txt: {e}"),
            }
            self.last = None;
            self.deletes += 1;
            return;
        }
        self.seq += 1;
        let mut len = if rng.random_ratio(1, 20) {
            rng.random_range(70_000..140_000)
        } else {
            rng.random_range(1..2_000)
        };
        if now.as_ref().map(Vec::len) == Some(len + 24) {
            len += 1;
        }
        let mut data = format!("{:>5} {:>8} {:>8}\n", self.side, self.seq, len).into_bytes();
        data.truncate(24);
        data.resize(24, b' ');
        data.extend_from_slice(&random_bytes(rng.random(), len));
        written.lock().unwrap().insert(data.clone());
        if rng.random_ratio(1, 8) {
            // Beside the share, on its filesystem: the save itself is one rename.
            let save = self.dir.with_extension("save");
            std::fs::write(&save, &data).unwrap();
            std::fs::rename(&save, self.path()).unwrap();
        } else {
            std::fs::write(self.path(), &data).unwrap();
        }
        self.last = Some(data);
    }
}

/// Both writers, the versions they wrote, and the random choices, shared with the hooks that
/// edit in the middle of cycles.
struct Model {
    host: Writer,
    guest: Writer,
    rng: StdRng,
    written: Mutex<HashSet<Vec<u8>>>,
}

impl Model {
    fn edit(&mut self, host: bool) {
        let Model {
            host: h,
            guest: g,
            rng,
            written,
        } = self;
        if host {
            h.edit(rng, written);
        } else {
            g.edit(rng, written);
        }
    }
    fn edits(&self) -> usize {
        self.host.edits + self.guest.edits
    }
}

/// Where in a cycle an edit made during it happens.
#[derive(Debug, Clone, Copy)]
enum Mid {
    /// Right after that side's scan.
    AfterScan,
    /// While that side's scan chunks the file (after its first chunk).
    FirstChunkCut,
    /// Right before chunks are supplied to that side.
    BeforeSupply,
    /// Right before that side's transition checks the path.
    BeforeCheck,
    /// After that side's final check, right before the rename.
    BeforeRename,
}

const MIDS: [Mid; 5] = [
    Mid::AfterScan,
    Mid::FirstChunkCut,
    Mid::BeforeSupply,
    Mid::BeforeCheck,
    Mid::BeforeRename,
];

/// `f.txt` edited `EDITS` times in all, from both sides, under `policy`: between cycles
/// (0 to 3 edits a side, in random order) and during them, at chosen moments (after a scan,
/// while a scan chunks it, before chunks are supplied, before a transition's check, between
/// the check and the rename); each cycle a targeted one (as live hints make), every 25th a
/// full one. Then quiescence: cycles until there is nothing left to do. An edit is a write in
/// place (open, truncate, write), one in eight an editor's atomic save (a rename over the
/// path), or, one in 40, a deletion.
///
/// What the product promises (docs/safety.md, "The trash"): every version that sync replaces
/// or deletes on a side is kept in that side's trash; a version its own side's writer
/// overwrites is that writer's business. So, after quiescence: both sides are equal and in
/// sync; every version a writer left that was no longer there when it came back (sync
/// replaced or deleted it) is in that side's trash, byte for byte, and so is each writer's
/// last version unless it is the final content; nothing in either trash is anything but a
/// version a writer wrote (never a torn one).
async fn edited_thousands_of_times(policy: ConflictPolicy, seed: u64) {
    const EDITS: usize = 3_000;
    let started = std::time::Instant::now();
    let mut p = with_policy(policy);
    write(&p.host_dir, "f.txt", "base");
    write(
        &p.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    p.sync().await;
    let model = Arc::new(Mutex::new(Model {
        host: Writer {
            dir: p.host_dir.clone(),
            side: "host",
            seq: 0,
            last: Some(b"base".to_vec()),
            replaced: Vec::new(),
            edits: 0,
            deletes: 0,
        },
        guest: Writer {
            dir: p.guest_dir.clone(),
            side: "guest",
            seq: 0,
            last: None,
            replaced: Vec::new(),
            edits: 0,
            deletes: 0,
        },
        rng: StdRng::seed_from_u64(seed),
        written: Mutex::new(HashSet::from([b"base".to_vec()])),
    }));
    let (mut cycles, mut retries, mut mids) = (0usize, 0usize, 0usize);
    let fired = Arc::new(AtomicUsize::new(0));
    while model.lock().unwrap().edits() < EDITS {
        let (mut host, mut guest) = (Meddle::default(), Meddle::default());
        {
            let mut m = model.lock().unwrap();
            let (nh, ng) = (m.rng.random_range(0..=3), m.rng.random_range(0..=3));
            let mut order: Vec<bool> = [vec![true; nh], vec![false; ng]].concat();
            for i in (1..order.len()).rev() {
                let j = m.rng.random_range(0..=i);
                order.swap(i, j);
            }
            for on_host in order {
                m.edit(on_host);
            }
            for _ in 0..m.rng.random_range(0..=2) {
                let on_host = m.rng.random_bool(0.5);
                let mid = MIDS[m.rng.random_range(0..MIDS.len())];
                mids += 1;
                let (model, fired) = (Arc::clone(&model), Arc::clone(&fired));
                let action = move || {
                    model.lock().unwrap().edit(on_host);
                    fired.fetch_add(1, Ordering::SeqCst);
                };
                let (root, hooks) = if on_host {
                    (&p.host_dir, &mut host)
                } else {
                    (&p.guest_dir, &mut guest)
                };
                match mid {
                    Mid::AfterScan => hooks.after_scan.push(Box::new(action)),
                    Mid::BeforeSupply => hooks.before_supply.push(Box::new(action)),
                    Mid::BeforeCheck => hooks.before_transition.push(Box::new(action)),
                    Mid::FirstChunkCut => {
                        faults::at(root, Moment::FirstChunkCut, &rel("f.txt"), action).unwrap()
                    }
                    Mid::BeforeRename => {
                        faults::at(root, Moment::BeforeRename, &rel("f.txt"), action).unwrap()
                    }
                }
            }
        }
        let scope = if cycles % 25 == 24 {
            ScanScope::Full
        } else {
            ScanScope::Paths(vec![rel("f.txt")])
        };
        let report = meddled_cycle(&mut p, scope, host, guest).await;
        assert!(!report.halted, "halted: {:?}", p.status());
        retries += usize::from(report.retry);
        cycles += 1;
        // An engine hook whose moment did not come this cycle does not carry over.
        faults::clear(&p.host_dir).unwrap();
        faults::clear(&p.guest_dir).unwrap();
    }
    let mut settle = 0;
    loop {
        let report = p.cycle().await;
        if !report.retry && report.applied == 0 && report.pending == 0 {
            break;
        }
        settle += 1;
        assert!(settle < 20, "no quiescence: {report:?} {:?}", p.status());
    }
    let status = p.status();
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(status.state, ShareState::InSync, "{status:?}");
    assert!(
        status.conflicts.is_empty() && status.problems.is_empty(),
        "{status:?}"
    );

    let mut guard = model.lock().unwrap();
    let m = &mut *guard;
    let final_content = std::fs::read(p.host_dir.join("f.txt")).ok();
    let written = m.written.lock().unwrap().clone();
    let summary = nothing_lost(
        &format!("{policy:?}"),
        &mut [(&mut m.host, &p.host_dir), (&mut m.guest, &p.guest_dir)],
        final_content.as_ref(),
        |v| written.contains(v),
    );
    assert!(
        m.edits() >= EDITS,
        "{policy:?}: only {} edits were made",
        m.edits()
    );
    // The run exercised what it claims: sync replaced versions on both sides, edits landed in
    // the middle of cycles, and some cycles found their path changed since their scan.
    assert!(
        !m.host.replaced.is_empty() && !m.guest.replaced.is_empty(),
        "{policy:?}: {}",
        summary.join("; ")
    );
    assert!(
        fired.load(Ordering::SeqCst) > 0 && retries > 0,
        "{policy:?}"
    );
    eprintln!(
        "{policy:?}: {cycles} cycles ({retries} retried, {} of {mids} mid-cycle edits made), \
         {settle} to settle, {:.1} s; {}",
        fired.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
}

/// Checks after quiescence that each writer's versions that sync replaced or deleted on its
/// side, and its last version unless it is the final content, are in that side's trash, byte
/// for byte; and that each trash holds nothing but versions `legit` accepts. Returns a line
/// per side for the log.
fn nothing_lost(
    what: &str,
    writers: &mut [(&mut Writer, &Path)],
    final_content: Option<&Vec<u8>>,
    legit: impl Fn(&[u8]) -> bool,
) -> Vec<String> {
    let mut summary = Vec::new();
    for (w, dir) in writers.iter_mut() {
        // The writer looks once more: is its last version still there?
        w.look();
        let trash: HashSet<Vec<u8>> = kept(dir, "f.txt").into_iter().collect();
        let lost: Vec<&Vec<u8>> = w.replaced.iter().filter(|v| !trash.contains(*v)).collect();
        assert!(
            lost.is_empty(),
            "{what}: {} of the {} versions sync replaced on the {} side are not in its \
             trash: {}",
            lost.len(),
            w.replaced.len(),
            w.side,
            lost.iter()
                .take(5)
                .map(|v| show(v))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(last) = &w.last {
            assert!(
                final_content == Some(last) || trash.contains(last),
                "{what}: the {} writer's last version is lost",
                w.side
            );
        }
        let strangers: Vec<&Vec<u8>> = trash.iter().filter(|v| !legit(v)).collect();
        assert!(
            strangers.is_empty(),
            "{what}: the {} trash holds versions nobody wrote (torn?): {}",
            w.side,
            strangers
                .iter()
                .take(5)
                .map(|v| show(v))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let distinct: BTreeSet<&Vec<u8>> = w.replaced.iter().collect();
        summary.push(format!(
            "{}: {} edits ({} deletions), {} of its versions replaced by sync, all kept; \
             {} versions in its trash",
            w.side,
            w.edits,
            w.deletes,
            distinct.len(),
            trash.len()
        ));
    }
    summary
}

#[tokio::test]
async fn one_file_edited_thousands_of_times_from_both_sides_host_wins_loses_nothing() {
    edited_thousands_of_times(ConflictPolicy::HostWins, 1).await;
}

#[tokio::test]
async fn one_file_edited_thousands_of_times_from_both_sides_guest_wins_loses_nothing() {
    edited_thousands_of_times(ConflictPolicy::GuestWins, 2).await;
}

#[tokio::test]
async fn one_file_edited_thousands_of_times_from_both_sides_newer_wins_loses_nothing() {
    edited_thousands_of_times(ConflictPolicy::NewerWins, 3).await;
}

/// The same with both agents running as real processes (live sync: inotify hints, pacing,
/// echo suppression), a writer thread on each side editing `f.txt` in place as fast as it
/// likes with short random pauses, `EDITS` edits in all, under `guest-wins` (the host's
/// versions lose every conflict, so the host's trash must hold each one sync replaced). Then
/// quiescence: both trees identical and the share in sync, and nothing lost, as above. Here
/// sync's scans race the writers' `write(2)`s for real: a read that caught a write midway is
/// superseded by the next cycle, so a kept version may also be the empty file or a prefix of
/// a version (what the file held at that instant), never anything else.
#[test]
fn one_file_edited_thousands_of_times_from_both_sides_by_live_agents_loses_nothing() {
    use std::time::Duration;
    use vmsync_tests::agents::{eventually, Agents};
    const EDITS: usize = 3_000;
    let started = std::time::Instant::now();
    let mut a = Agents::new("conflict = \"guest-wins\"");
    write(&a.host_dir, "f.txt", "base");
    write(
        &a.host_dir,
        "other.txt",
        "keeps the root from ever being empty",
    );
    a.start();
    a.wait_in_sync();
    assert_eq!(read(&a.guest_dir, "f.txt"), b"base");
    let written = Arc::new(Mutex::new(HashSet::from([b"base".to_vec()])));
    let spawn = |dir: PathBuf, side: &'static str, last: Option<Vec<u8>>, seed: u64| {
        let written = Arc::clone(&written);
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut w = Writer {
                dir,
                side,
                seq: 0,
                last,
                replaced: Vec::new(),
                edits: 0,
                deletes: 0,
            };
            while w.edits < EDITS / 2 {
                w.edit(&mut rng, &written);
                if rng.random_ratio(2, 3) {
                    std::thread::sleep(Duration::from_micros(rng.random_range(0..12_000)));
                }
            }
            w
        })
    };
    let host = spawn(a.host_dir.clone(), "host", Some(b"base".to_vec()), 11);
    let guest = spawn(a.guest_dir.clone(), "guest", None, 12);
    let (mut host, mut guest) = (host.join().unwrap(), guest.join().unwrap());
    let edited = started.elapsed();
    a.converge(Duration::from_secs(60));
    let code = a.wait(30);
    assert_eq!(
        code,
        0,
        "wait exited {code}; status {}\nhost log (tail):\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    // In sync and still identical (nothing ping-pongs).
    assert!(eventually(Duration::from_secs(10), || {
        a.share()["state"] == "in-sync"
    }));
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let final_content = std::fs::read(a.host_dir.join("f.txt")).ok();
    let written = written.lock().unwrap().clone();
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nothing_lost(
            "live agents",
            &mut [(&mut host, &a.host_dir), (&mut guest, &a.guest_dir)],
            final_content.as_ref(),
            |v| written.iter().any(|w| w.starts_with(v)),
        )
    }));
    // A loss here has been seen once under heavy load and not reproduced since: leave what
    // the next one needs to be understood.
    let summary = checked.unwrap_or_else(|lost| {
        for (side, dir) in [("host", &a.host_dir), ("guest", &a.guest_dir)] {
            let kept: Vec<String> = vmsync_tests::fixture::trash_files(dir)
                .iter()
                .map(|(k, v)| format!("{k} ({} bytes)", v.len()))
                .collect();
            eprintln!("{side} trash: {}", kept.join(", "));
        }
        eprintln!("host.log (tail):\n{}", a.log_tail("host.log", 200));
        eprintln!("guest.log (tail):\n{}", a.log_tail("guest.log", 200));
        std::panic::resume_unwind(lost)
    });
    assert!(
        !host.replaced.is_empty(),
        "guest-wins never replaced a host version: {}",
        summary.join("; ")
    );
    eprintln!(
        "live agents: {} edits in {:.1} s, quiet after {:.1} s; {}",
        host.edits + guest.edits,
        edited.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        summary.join("; ")
    );
}
