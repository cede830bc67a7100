//! A guest VM reverted to a snapshot (libvirt `snapshot-revert`, a Firecracker snapshot
//! restore, a disk image copied back), with real processes: the guest's share and its agent's
//! state directory are copied aside at some moment and put back later, under a guest that was
//! killed as a VM reset kills it. The host must halt with `guest-rolled-back` and change
//! nothing; `resume` then merges add-only, the host's newer versions winning and a file the
//! guest changed after the revert going through the conflict policy (`keep` here).

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, copy_contents, empty, read, tree, write};

/// A copy of the guest's disk at one instant: its share and its agent's state directory.
struct Snapshot {
    dir: tempfile::TempDir,
}

fn guest_state(a: &Agents) -> PathBuf {
    a.tmp.path().join("guest-state")
}

/// Takes a snapshot of the running guest: frozen while its disk is copied.
fn snapshot(a: &Agents) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    a.freeze_guest();
    copy_contents(&a.guest_dir, &dir.path().join("share"));
    copy_contents(&guest_state(a), &dir.path().join("state"));
    a.thaw_guest();
    Snapshot { dir }
}

/// Kills the guest (a VM reset), puts the snapshot back, lets `after_revert` change the
/// guest's share (what the reverted guest does before its agent starts), and starts it.
fn revert(a: &mut Agents, snap: &Snapshot, after_revert: impl FnOnce(&Path)) {
    a.kill_guest();
    empty(&a.guest_dir);
    copy_contents(&snap.dir.path().join("share"), &a.guest_dir);
    std::fs::remove_dir_all(guest_state(a)).unwrap();
    copy_contents(&snap.dir.path().join("state"), &guest_state(a));
    after_revert(&a.guest_dir);
    a.start_guest();
}

/// Waits until the share is halted with `guest-rolled-back` and returns its status.
fn halted_rolled_back(a: &Agents) -> serde_json::Value {
    let halted = eventually(Duration::from_secs(60), || {
        a.share()["halt_code"] == "guest-rolled-back"
    });
    assert!(
        halted,
        "no guest-rolled-back halt; status: {}\n--- host.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    a.share()
}

/// What every scenario checks once the snapshot is back and the guest changed `edited` (to
/// `guest_version`): the host halts and keeps its tree byte for byte; after `resume` the host
/// tree is still the same, the guest has every host version, and `edited` is a conflict with
/// both versions untouched.
fn halts_then_resume_merges(
    a: &Agents,
    host_before: &std::collections::BTreeMap<Vec<u8>, vmsync_tests::fixture::Node>,
    edited: &str,
    guest_version: &[u8],
) {
    let share = halted_rolled_back(a);
    assert_eq!(share["state"], "halted");
    let reason = share["halt_reason"].as_str().unwrap();
    assert!(reason.contains("went back in time"), "{reason}");
    assert_eq!(
        &tree(&a.host_dir),
        host_before,
        "the host tree changed under the halt"
    );
    assert_eq!(
        a.host_cmd(&["sync"]).status.code(),
        Some(3),
        "sync of a halted share"
    );
    assert_eq!(
        &tree(&a.host_dir),
        host_before,
        "the host tree changed under the halt"
    );

    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conflicted = eventually(Duration::from_secs(60), || {
        a.share()["state"] == "conflicted"
    });
    assert!(
        conflicted,
        "no conflict after resume; status: {}\n--- host.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    a.converge_except(Duration::from_secs(60), &[edited]);
    assert_eq!(a.share()["conflicts"], serde_json::json!([edited]));
    assert_eq!(
        &tree(&a.host_dir),
        host_before,
        "the host lost or reverted something"
    );
    assert_eq!(
        read(&a.guest_dir, edited),
        guest_version,
        "the guest's own edit was touched"
    );
}

fn started_with(files: usize) -> Agents {
    let mut a = Agents::new("conflict = \"keep\"");
    for i in 0..files {
        write(
            &a.host_dir,
            &format!("f{i:03}"),
            format!("file {i} as first synced\n"),
        );
    }
    a.start();
    a.wait_in_sync();
    a
}

const GUEST_EDIT: &[u8] = b"edited in the guest after the revert\n";

fn guest_edits(path: &'static str) -> impl FnOnce(&Path) {
    move |share| write(share, path, GUEST_EDIT)
}

/// The reproduction: a snapshot of an idle guest; the host then creates 40 files and edits 5;
/// the guest goes back. Without generations the host lost the 40 files and its 5 edits.
#[test]
fn a_guest_reverted_to_an_earlier_snapshot_halts_and_resume_keeps_the_hosts_work() {
    let mut a = started_with(30);
    a.stop_guest();
    let snap = snapshot_stopped(&a);
    a.start_guest();
    a.wait_in_sync();
    for i in 0..40 {
        write(&a.host_dir, &format!("new/n{i:02}"), format!("new {i}\n"));
    }
    for i in 0..5 {
        write(
            &a.host_dir,
            &format!("f{i:03}"),
            format!("file {i} edited on the host\n"),
        );
    }
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let host_before = tree(&a.host_dir);
    revert(&mut a, &snap, guest_edits("f020"));
    halts_then_resume_merges(&a, &host_before, "f020", GUEST_EDIT);
    assert_eq!(read(&a.guest_dir, "f000"), b"file 0 edited on the host\n");
    assert_eq!(read(&a.guest_dir, "new/n39"), b"new 39\n");
}

/// A snapshot taken the instant after a live edit landed on the guest, then more edits on
/// both sides: every later state the host recorded was stamped on the guest first.
#[test]
fn a_revert_to_right_after_a_live_edit_halts_and_resume_keeps_the_hosts_work() {
    let mut a = started_with(30);
    write(&a.host_dir, "f000", "live edit on the host\n");
    a.wait_in_sync();
    let snap = snapshot(&a);
    write(&a.host_dir, "f001", "later host edit\n");
    write(&a.host_dir, "later/h", "created on the host later\n");
    write(&a.guest_dir, "f002", "later guest edit\n");
    write(&a.guest_dir, "later-guest", "created on the guest later\n");
    a.wait_in_sync();
    a.converge(Duration::from_secs(60));
    let host_before = tree(&a.host_dir);
    revert(&mut a, &snap, guest_edits("f003"));
    halts_then_resume_merges(&a, &host_before, "f003", GUEST_EDIT);
    assert_eq!(read(&a.guest_dir, "f000"), b"live edit on the host\n");
    assert_eq!(read(&a.guest_dir, "f001"), b"later host edit\n");
    assert_eq!(read(&a.guest_dir, "f002"), b"later guest edit\n");
    assert_eq!(
        read(&a.guest_dir, "later-guest"),
        b"created on the guest later\n"
    );
}

/// A snapshot before a mass edit on the host (most files of the share rewritten).
#[test]
fn a_revert_to_before_a_mass_edit_halts_and_resume_keeps_every_host_edit() {
    let mut a = started_with(300);
    a.stop_guest();
    let snap = snapshot_stopped(&a);
    a.start_guest();
    a.wait_in_sync();
    for i in 0..250 {
        write(
            &a.host_dir,
            &format!("f{i:03}"),
            format!("file {i} rewritten by a tool\n"),
        );
    }
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let host_before = tree(&a.host_dir);
    revert(&mut a, &snap, guest_edits("f299"));
    halts_then_resume_merges(&a, &host_before, "f299", GUEST_EDIT);
    for i in [0, 125, 249] {
        assert_eq!(
            read(&a.guest_dir, &format!("f{i:03}")),
            format!("file {i} rewritten by a tool\n").into_bytes()
        );
    }
}

/// A guest whose agent crashed and restarted (no revert) is not a rolled-back guest.
#[test]
fn a_guest_agent_killed_and_restarted_does_not_halt() {
    let mut a = started_with(30);
    write(&a.host_dir, "f000", "edit before the crash\n");
    a.wait_in_sync();
    a.kill_guest();
    write(&a.host_dir, "f001", "edit while the guest is down\n");
    a.start_guest();
    a.wait_in_sync();
    write(&a.guest_dir, "f002", "edit after the restart\n");
    a.wait_in_sync();
    a.converge(Duration::from_secs(60));
    let share = a.share();
    assert_eq!(share["state"], "in-sync");
    assert_eq!(share["halt_code"], serde_json::Value::Null);
    assert_eq!(
        read(&a.guest_dir, "f001"),
        b"edit while the guest is down\n"
    );
    assert_eq!(read(&a.host_dir, "f002"), b"edit after the restart\n");
}

/// A snapshot of a guest whose agent is stopped (a VM snapshot of a powered-off guest).
fn snapshot_stopped(a: &Agents) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    copy_contents(&a.guest_dir, &dir.path().join("share"));
    copy_contents(&guest_state(a), &dir.path().join("state"));
    Snapshot { dir }
}
