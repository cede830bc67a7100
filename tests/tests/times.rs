//! Directory and symlink times across real processes: both agents running over a Unix socket,
//! times set with `touch -d` / `touch -h -d`, entries made and removed, and every mtime on the
//! two sides compared to the nanosecond (and by `rsync -ani`) once the share has settled. A
//! directory's mtime moves whenever a child changes, so both sides moving it is never a
//! conflict: the later time wins, and vmsync's own writes into a directory leave its time as
//! the source gave it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, rsync_differences, time_differences, times, write};

const SETTLE: Duration = Duration::from_secs(30);

/// `touch -d @secs` (`-h`: the symlink itself).
fn touch(path: &Path, secs: i64, symlink: bool) {
    let mut c = Command::new("touch");
    if symlink {
        c.arg("-h");
    }
    let st = c
        .arg("-d")
        .arg(format!("@{secs}.123456789"))
        .arg(path)
        .status();
    assert!(st.unwrap().success(), "touch {}", path.display());
}

fn mtime(path: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.mtime(), m.mtime_nsec())
}

/// The share settles in sync (no conflict, no halt) with both trees identical, every mtime
/// included, and `rsync -anic` finds nothing to do in either direction.
fn identical(a: &Agents, what: &str) {
    let ok = eventually(SETTLE, || {
        time_differences(&a.host_dir, &a.guest_dir, 1).is_empty()
    });
    assert!(
        ok,
        "{what}: times differ: {:?}\nhost log (tail):\n{}",
        time_differences(&a.host_dir, &a.guest_dir, 10),
        a.log_tail("host.log", 40)
    );
    let code = a.wait(30);
    assert_eq!(code, 0, "{what}: wait exited {code}; status {}", a.status());
    assert_eq!(
        a.share()["conflicts"].as_array().map(Vec::len),
        Some(0),
        "{what}"
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert!(
        time_differences(&a.host_dir, &a.guest_dir, 10).is_empty(),
        "{what}: times moved after settling: {:?}",
        time_differences(&a.host_dir, &a.guest_dir, 10)
    );
    for (src, dst) in [(&a.host_dir, &a.guest_dir), (&a.guest_dir, &a.host_dir)] {
        let diff = rsync_differences(src, dst, &["-c"]);
        assert!(diff.is_empty(), "{what}: rsync would change {diff:?}");
    }
}

/// A tree with nested directories, files and symlinks, every time set far in the past,
/// deepest first (setting a child's time does not move its directory's).
fn old_tree(root: &Path) {
    write(root, "d/e/f/deep.txt", "deep");
    write(root, "d/e/x.txt", "x");
    write(root, "d/top.txt", "top");
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::os::unix::fs::symlink("e/x.txt", root.join("d/link")).unwrap();
    std::os::unix::fs::symlink("d", root.join("dirlink")).unwrap();
    let mut paths: Vec<(String, (i64, i64))> = times(root).into_iter().collect();
    paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('/').count()));
    for (i, (p, _)) in paths.iter().enumerate() {
        let full = root.join(p);
        let is_link = std::fs::symlink_metadata(&full)
            .unwrap()
            .file_type()
            .is_symlink();
        touch(&full, 1_000_000_000 + i as i64 * 1000, is_link);
    }
}

#[test]
fn directory_and_symlink_times_arrive_with_the_initial_sync() {
    let mut a = Agents::new("");
    old_tree(&a.host_dir);
    let before = times(&a.host_dir);
    a.start();
    a.wait_in_sync();
    identical(&a, "initial sync");
    // The source's times themselves, not whatever the writes left on both sides.
    assert_eq!(times(&a.host_dir), before, "the host's times were changed");
    assert_eq!(times(&a.guest_dir), before);
}

#[test]
fn time_only_changes_of_directories_and_symlinks_propagate_both_ways() {
    let mut a = Agents::new("");
    old_tree(&a.host_dir);
    a.start();
    a.wait_in_sync();
    identical(&a, "initial sync");

    touch(&a.host_dir.join("d/e"), 1_500_000_000, false);
    let want = mtime(&a.host_dir.join("d/e"));
    assert!(eventually(SETTLE, || mtime(&a.guest_dir.join("d/e")) == want));
    identical(&a, "touch -d on a host directory");

    touch(&a.guest_dir.join("d/link"), 1_500_000_100, true);
    let want = mtime(&a.guest_dir.join("d/link"));
    assert!(eventually(SETTLE, || mtime(&a.host_dir.join("d/link")) == want));
    identical(&a, "touch -h on a guest symlink");

    touch(&a.guest_dir.join("empty"), 1_500_000_200, false);
    identical(&a, "touch -d on a guest directory");
    assert_eq!(mtime(&a.host_dir.join("empty")).0, 1_500_000_200);
}

#[test]
fn writes_into_a_directory_leave_it_the_sources_time() {
    let mut a = Agents::new("");
    old_tree(&a.host_dir);
    a.start();
    a.wait_in_sync();
    identical(&a, "initial sync");

    // A new file moves its directory's time on the source; the destination's directory gets
    // that time, not the moment vmsync wrote the file there.
    write(&a.host_dir, "d/e/new.txt", "new");
    assert!(eventually(SETTLE, || a
        .guest_dir
        .join("d/e/new.txt")
        .exists()));
    identical(&a, "a file created on the host");

    std::fs::remove_file(a.guest_dir.join("d/e/f/deep.txt")).unwrap();
    assert!(eventually(SETTLE, || !a
        .host_dir
        .join("d/e/f/deep.txt")
        .exists()));
    identical(&a, "a file deleted on the guest");

    std::fs::rename(
        a.host_dir.join("d/top.txt"),
        a.host_dir.join("d/e/moved.txt"),
    )
    .unwrap();
    assert!(eventually(SETTLE, || a
        .guest_dir
        .join("d/e/moved.txt")
        .exists()));
    identical(&a, "a file moved between directories on the host");

    std::fs::create_dir(a.guest_dir.join("d/sub")).unwrap();
    write(&a.guest_dir, "d/sub/a.txt", "a");
    std::os::unix::fs::symlink("a.txt", a.guest_dir.join("d/sub/l")).unwrap();
    assert!(eventually(SETTLE, || a.host_dir.join("d/sub/l").exists()));
    identical(
        &a,
        "a directory with a file and a symlink made on the guest",
    );
}

#[test]
fn both_sides_moving_a_directorys_time_is_no_conflict_the_later_wins() {
    let mut a = Agents::new("");
    old_tree(&a.host_dir);
    a.start();
    a.wait_in_sync();
    identical(&a, "initial sync");

    // Certainly concurrent for the sync: the host agent is stopped while both sides change.
    a.freeze_host();
    write(&a.host_dir, "d/from-host.txt", "h");
    write(&a.guest_dir, "d/from-guest.txt", "g");
    touch(&a.host_dir.join("d"), 1_600_000_000, false);
    touch(&a.guest_dir.join("d"), 1_600_000_005, false);
    touch(&a.host_dir.join("d/link"), 1_600_000_009, true);
    touch(&a.guest_dir.join("d/link"), 1_600_000_001, true);
    a.thaw_host();
    a.sync();
    identical(&a, "both sides changed a directory and a symlink");
    assert_eq!(mtime(&a.host_dir.join("d")).0, 1_600_000_005);
    assert_eq!(mtime(&a.guest_dir.join("d/link")).0, 1_600_000_009);
    assert!(a.host_dir.join("d/from-guest.txt").exists());
    assert!(a.guest_dir.join("d/from-host.txt").exists());
}
