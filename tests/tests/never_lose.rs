//! "Never lose a host file", across real processes: whatever the guest's side of the world does
//! (a live `rm -rf` of its share or of a big part of it, deletions spread over many cycles, a
//! wipe while the host agent is down, a damaged state database, a removed root marker), the
//! host tree stays byte for byte what it was until the user lets a deletion through with
//! `resume`; and what is let through stays in the host's trash. See `docs/safety.md`.
//!
//! Synchronisation is a bounded poll on the outcome, never a fixed sleep.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, read, tree, write, Node};

/// Bound on convergence after thousands of files changed.
const SETTLE: Duration = Duration::from_secs(60);

/// Both agents started and through their first sync, with `prepare` run on the host tree first.
fn started(share_extra: &str, prepare: impl FnOnce(&Path)) -> Agents {
    let mut a = Agents::new(share_extra);
    prepare(&a.host_dir);
    a.start();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    a
}

/// `n` small files spread over `dirs` directories beneath `under`.
fn populate(root: &Path, under: &str, n: usize, dirs: usize) {
    for i in 0..n {
        write(
            root,
            &format!("{under}/d{:02}/f{i:05}.txt", i % dirs),
            format!("{under} file {i}\n"),
        );
    }
}

/// Every entry of `before` is still at `root`, as it was (more may have come).
fn assert_still_has(root: &Path, before: &BTreeMap<Vec<u8>, Node>) {
    let now = tree(root);
    for (path, node) in before {
        assert_eq!(
            now.get(path),
            Some(node),
            "{}",
            String::from_utf8_lossy(path)
        );
    }
}

/// Removes every entry of `root` except the reserved `.vmsync/` (what `rm -rf share/*` does).
fn empty_out(root: &Path) {
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        if entry.file_name() == ".vmsync" {
            continue;
        }
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// The share's halt code; `None` also while the host agent does not answer yet.
fn halt_code(a: &Agents) -> Option<String> {
    let out = a.host_cmd(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["shares"][0]["halt_code"]
        .as_str()
        .map(str::to_string)
}

/// Files kept in a share's trash.
fn trashed_files(root: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => count(&e.path()),
                Ok(_) => 1,
                Err(_) => 0,
            })
            .sum()
    }
    count(&root.join(".vmsync/trash"))
}

/// Waits until the host tree is `before` again and the share is halted with one of `codes`.
fn assert_halted_and_intact(
    a: &Agents,
    before: &std::collections::BTreeMap<Vec<u8>, vmsync_tests::fixture::Node>,
    codes: &[&str],
) {
    let restored = eventually(SETTLE, || {
        halt_code(a).is_some() && tree(&a.host_dir) == *before
    });
    let now = tree(&a.host_dir);
    assert!(
        restored,
        "host tree not restored: {} of {} entries, halt {:?}\nhost log:\n{}",
        now.len(),
        before.len(),
        halt_code(a),
        a.log_tail("host.log", 40)
    );
    let code = halt_code(a).unwrap();
    assert!(codes.contains(&code.as_str()), "halt code {code}");
    // And it stays that way: nothing more propagates while halted.
    a.host_cmd(&["sync"]);
    assert!(
        tree(&a.host_dir) == *before,
        "the host tree changed while halted"
    );
}

#[test]
fn live_rm_rf_of_the_guest_share_costs_the_host_nothing() {
    let a = started("", |h| populate(h, "src", 1500, 30));
    let before = tree(&a.host_dir);
    empty_out(&a.guest_dir);
    assert_halted_and_intact(&a, &before, &["mass-deletion", "root-emptied"]);
    let text = a.host_cmd(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("vmsync-host resume --config") && text.contains("--share src"),
        "status does not say how to resume:\n{text}"
    );
}

#[test]
fn live_rm_rf_of_the_guest_root_directory_costs_the_host_nothing() {
    let a = started("", |h| populate(h, "src", 1500, 30));
    let before = tree(&a.host_dir);
    std::fs::remove_dir_all(&a.guest_dir).unwrap();
    assert_halted_and_intact(&a, &before, &["mass-deletion", "root-missing"]);
}

#[test]
fn live_rm_rf_of_a_large_subdirectory_halts_and_resume_lets_it_through() {
    let a = started("", |h| {
        populate(h, "big", 1200, 20);
        populate(h, "small", 300, 3);
    });
    let before = tree(&a.host_dir);
    std::fs::remove_dir_all(a.guest_dir.join("big")).unwrap();
    assert_halted_and_intact(&a, &before, &["mass-deletion"]);
    assert!(
        a.share()["put_back"].as_u64().unwrap() > 0 || a.log("host.log").contains("would delete"),
        "neither put back nor judged before executing"
    );

    // The user meant it: resume lets the deletion through, and the host keeps it all in its
    // trash.
    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("host.log", 30));
    assert!(!a.host_dir.join("big").exists());
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(
        tree(&a.host_dir)
            .keys()
            .filter(|k| k.starts_with(b"small/"))
            .count(),
        303
    );
    assert!(
        trashed_files(&a.host_dir) >= 1200,
        "trash holds {}",
        trashed_files(&a.host_dir)
    );
}

#[test]
fn deleting_an_exempt_build_directory_goes_through() {
    let a = started("", |h| {
        populate(h, "target", 1600, 40);
        populate(h, "src", 200, 4);
    });
    std::fs::remove_dir_all(a.guest_dir.join("target")).unwrap();
    assert!(
        eventually(SETTLE, || !a.host_dir.join("target").exists()),
        "{}",
        a.log_tail("host.log", 30)
    );
    assert_eq!(a.wait(60), 0);
    assert_eq!(halt_code(&a), None);
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

#[test]
fn deletions_spread_over_cycles_add_up_and_are_put_back_together() {
    let a = started("", |h| populate(h, "src", 1000, 10));
    let before = tree(&a.host_dir);
    // 30 % goes through...
    for d in 0..3 {
        std::fs::remove_dir_all(a.guest_dir.join(format!("src/d{d:02}"))).unwrap();
    }
    assert!(eventually(SETTLE, || !a.host_dir.join("src/d02").exists()));
    assert_eq!(a.wait(60), 0);
    // ...and 30 % more within the minute crosses the limit: both bursts come back.
    for d in 3..6 {
        std::fs::remove_dir_all(a.guest_dir.join(format!("src/d{d:02}"))).unwrap();
    }
    assert_halted_and_intact(&a, &before, &["mass-deletion"]);
}

#[test]
fn the_same_wipe_halts_when_the_host_agent_was_down() {
    let mut a = started("", |h| populate(h, "src", 1000, 10));
    let before = tree(&a.host_dir);
    a.stop_host();
    empty_out(&a.guest_dir);
    write(&a.guest_dir, "src/new.txt", "made while the host was down");
    a.start_host();
    assert!(eventually(SETTLE, || halt_code(&a).is_some()));
    assert_eq!(halt_code(&a).as_deref(), Some("mass-deletion"));
    assert!(tree(&a.host_dir) == before, "the host tree changed");
}

#[test]
fn a_damaged_host_state_database_merges_add_only() {
    let mut a = started("", |h| populate(h, "src", 200, 4));
    a.stop_host();
    let db = a.host_state.join("host.redb");
    std::fs::write(&db, b"this is not a redb database, it was overwritten").unwrap();
    // With a good ancestor this would be a guest deletion; with lost state it must not be.
    std::fs::remove_file(a.guest_dir.join("src/d00/f00000.txt")).unwrap();
    write(&a.guest_dir, "src/guest-new.txt", "g");
    let before = tree(&a.host_dir);
    a.start_host();
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("host.log", 30));
    assert_still_has(&a.host_dir, &before);
    assert!(
        a.guest_dir.join("src/d00/f00000.txt").exists(),
        "not recreated on the guest"
    );
    assert!(a.host_dir.join("src/guest-new.txt").exists());
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let notice = a.share()["notice"].as_str().unwrap_or_default().to_string();
    assert!(notice.contains("could not be read"), "notice: {notice:?}");
    assert!(std::fs::read_dir(&a.host_state)
        .unwrap()
        .flatten()
        .any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("host.redb.damaged-")));
}

/// The host's state directory deleted while it is stopped (a reinstall, a wiped /var/lib):
/// with its ancestor gone the host cannot tell a file the guest deleted meanwhile from one it
/// never had, so the restart merges add-only: the file comes back in the guest, and nothing of
/// the host's is lost.
#[test]
fn a_deleted_host_state_directory_merges_add_only() {
    let mut a = started("", |h| populate(h, "src", 100, 3));
    a.stop_host();
    std::fs::remove_dir_all(&a.host_state).unwrap();
    std::fs::remove_file(a.guest_dir.join("src/d00/f00000.txt")).unwrap();
    write(&a.guest_dir, "src/new.txt", "made in the guest meanwhile");
    let before = tree(&a.host_dir);
    a.start_host();
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("host.log", 30));
    assert_still_has(&a.host_dir, &before);
    assert!(
        a.guest_dir.join("src/d00/f00000.txt").exists(),
        "not recreated"
    );
    assert_eq!(
        read(&a.host_dir, "src/new.txt"),
        b"made in the guest meanwhile"
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

/// The guest's state directory deleted while it is stopped: it holds only the guest's index
/// (a cache of its files' hashes), and the host's ancestor still knows what was synced, so a
/// file the user deleted in the guest meanwhile is deleted on the host too, into the host's
/// trash, and nothing else changes.
#[test]
fn a_deleted_guest_state_directory_is_a_cache_lost_not_a_reason_to_delete_more() {
    let mut a = started("", |h| populate(h, "src", 100, 3));
    a.stop_guest();
    std::fs::remove_dir_all(a.tmp.path().join("guest-state")).unwrap();
    std::fs::remove_file(a.guest_dir.join("src/d01/f00001.txt")).unwrap();
    let mut before = tree(&a.host_dir);
    a.start_guest();
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("guest.log", 30));
    let gone = before
        .remove(b"src/d01/f00001.txt".as_slice())
        .expect("the file was there");
    assert_eq!(
        tree(&a.host_dir),
        before,
        "only the guest's deletion applied"
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let kept = a.host_trash();
    assert!(
        kept.iter()
            .any(|(name, data)| name.ends_with("/src/d01/f00001.txt")
                && matches!(&gone, vmsync_tests::fixture::Node::File { data: d, .. } if d == data)),
        "the host's copy is kept in its trash: {kept:?}"
    );
}

#[test]
fn a_damaged_guest_state_database_does_not_stop_the_guest() {
    let mut a = started("", |h| populate(h, "src", 50, 2));
    a.stop_guest();
    let db = a.tmp.path().join("guest-state/guest.redb");
    let len = std::fs::metadata(&db).unwrap().len();
    // Truncated mid-file, as a crash of a copying tool leaves it.
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    a.start_guest();
    write(&a.host_dir, "src/after.txt", "after");
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("guest.log", 30));
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

#[test]
fn a_removed_root_marker_merges_add_only() {
    let mut a = started("", |h| populate(h, "src", 200, 4));
    a.stop_host();
    std::fs::remove_dir_all(a.guest_dir.join(".vmsync")).unwrap();
    std::fs::remove_file(a.guest_dir.join("src/d01/f00001.txt")).unwrap();
    let before = tree(&a.host_dir);
    a.start_host();
    assert_eq!(a.wait(60), 0, "{}", a.log_tail("host.log", 30));
    assert!(tree(&a.host_dir) == before, "the host lost something");
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let notice = a.share()["notice"].as_str().unwrap_or_default().to_string();
    assert!(notice.contains("marker"), "notice: {notice:?}");
}
