//! Live sync across real processes: both agents
//! running, a change made on one side with plain file operations, and the other side's tree
//! checked byte for byte once it has converged.
//!
//! Synchronisation is always a bounded poll on the outcome (`Agents::converge`, `eventually`),
//! never a fixed sleep, and nothing here asserts on time: how fast changes land is the
//! benchmark's business (bench/latency-bench.sh). The bounds only turn a hang into a failure.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, random_bytes, read, tree, write};

/// Bound on convergence after a small change.
const SETTLE: Duration = Duration::from_secs(20);
/// Bound on convergence after thousands of files changed.
const SETTLE_BIG: Duration = Duration::from_secs(60);

/// Both agents started and through their first sync.
fn started(share_extra: &str, prepare: impl FnOnce(&Agents)) -> Agents {
    let mut a = Agents::new(share_extra);
    prepare(&a);
    a.start();
    a.wait_in_sync();
    a
}

/// (source root, destination root, label) for each direction a change can travel.
fn directions(a: &Agents) -> [(PathBuf, PathBuf, &'static str); 2] {
    [
        (a.host_dir.clone(), a.guest_dir.clone(), "host->guest"),
        (a.guest_dir.clone(), a.host_dir.clone(), "guest->host"),
    ]
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn content_counters(a: &Agents) -> (u64, u64) {
    let s = a.share();
    (
        s["bytes_sent"].as_u64().unwrap(),
        s["bytes_received"].as_u64().unwrap(),
    )
}

/// After a change has converged: the share settles in sync (nothing conflicted, halted or
/// ping-ponging) and both sides are still identical.
fn settled(a: &Agents) {
    let code = a.wait(20);
    assert_eq!(
        code,
        0,
        "wait exited {code}; status {}\nhost log (tail):\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

#[test]
fn create_modify_append_truncate_delete_both_ways() {
    let a = started("", |a| write(&a.host_dir, "keep.txt", "present throughout"));
    for (src, dst, dir) in directions(&a) {
        let f = format!("{dir}.txt").replace('>', "");
        write(&src, &f, "created\n");
        a.converge(SETTLE);
        assert_eq!(read(&dst, &f), b"created\n", "{dir}: create");

        // In place: same inode, same length, one byte changed.
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(src.join(&f))
                .unwrap();
            file.seek(SeekFrom::Start(0)).unwrap();
            file.write_all(b"C").unwrap();
        }
        a.converge(SETTLE);
        assert_eq!(read(&dst, &f), b"Created\n", "{dir}: modify in place");

        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(src.join(&f))
                .unwrap();
            file.write_all(b"appended\n").unwrap();
        }
        a.converge(SETTLE);
        assert_eq!(read(&dst, &f), b"Created\nappended\n", "{dir}: append");

        std::fs::OpenOptions::new()
            .write(true)
            .open(src.join(&f))
            .unwrap()
            .set_len(3)
            .unwrap();
        a.converge(SETTLE);
        assert_eq!(read(&dst, &f), b"Cre", "{dir}: truncate");

        std::fs::remove_file(src.join(&f)).unwrap();
        a.converge(SETTLE);
        assert!(
            std::fs::symlink_metadata(dst.join(&f)).is_err(),
            "{dir}: delete"
        );
        assert_eq!(read(&dst, "keep.txt"), b"present throughout");
    }
    settled(&a);
}

#[test]
fn renaming_a_file_moves_no_content_both_ways() {
    let a = started("", |a| {
        write(&a.host_dir, "from-host/big.bin", random_bytes(1, 1 << 20));
        write(&a.guest_dir, "from-guest/big.bin", random_bytes(2, 1 << 20));
    });
    for (src, dst, dir) in directions(&a) {
        let sub = if dir.starts_with("host") {
            "from-host"
        } else {
            "from-guest"
        };
        let before = content_counters(&a);
        std::fs::rename(
            src.join(format!("{sub}/big.bin")),
            src.join(format!("{sub}/renamed.bin")),
        )
        .unwrap();
        a.converge(SETTLE);
        settled(&a);
        assert!(!dst.join(format!("{sub}/big.bin")).exists(), "{dir}");
        assert_eq!(
            content_counters(&a),
            before,
            "{dir}: content crossed for a rename"
        );
    }
}

#[test]
fn renaming_a_directory_of_1000_files_moves_no_content_both_ways() {
    // 4 KiB of random bytes per file: 4 MiB that cannot compress, so any content that
    // crossed would show on the relay's counters, not only in the status counters.
    let a = started("", |a| {
        for i in 0..1000 {
            write(
                &a.host_dir,
                &format!("lib/module/f{i:04}.bin"),
                random_bytes(100 + i, 4096),
            );
        }
    });
    for (round, (src, _dst, dir)) in directions(&a).into_iter().enumerate() {
        let before = content_counters(&a);
        a.relay.reset();
        let (from, to) = if round == 0 {
            ("lib/module", "lib/module-renamed")
        } else {
            ("lib/module-renamed", "lib/module-back")
        };
        std::fs::rename(src.join(from), src.join(to)).unwrap();
        a.converge(SETTLE);
        settled(&a);
        assert_eq!(tree(&a.host_dir).len(), 1002, "{dir}");
        assert_eq!(
            content_counters(&a),
            before,
            "{dir}: content crossed for a directory rename"
        );
        let wire = a.wire_bytes();
        assert!(
            wire < 1 << 20,
            "{dir}: {wire} bytes crossed the socket for renaming a directory of 4 MiB"
        );
    }
}

#[test]
fn mkdir_p_ten_levels_and_rm_rf_a_subtree_both_ways() {
    let a = started("", |a| {
        // Enough other files that removing a subtree is not a mass deletion.
        for i in 0..100 {
            write(&a.host_dir, &format!("keep/k{i}"), format!("{i}"));
        }
    });
    for (src, dst, dir) in directions(&a) {
        let top = format!("{}-deep", &dir[..4]);
        let deep: PathBuf = (1..=10).fold(PathBuf::from(&top), |p, i| p.join(format!("l{i}")));
        // The file goes in the moment the chain exists: the watcher must catch up with ten
        // directories it has never seen and still find it.
        std::fs::create_dir_all(src.join(&deep)).unwrap();
        std::fs::write(src.join(&deep).join("bottom.txt"), b"at the bottom").unwrap();
        // An empty chain too (empty directories sync).
        std::fs::create_dir_all(src.join(format!("{top}-empty/a/b/c/d/e/f/g/h/i/j"))).unwrap();
        a.converge(SETTLE);
        assert_eq!(
            std::fs::read(dst.join(&deep).join("bottom.txt")).unwrap(),
            b"at the bottom",
            "{dir}"
        );

        // A subtree of 5 x 10 files beside the deep chain, then `rm -rf` of both.
        for d in 0..5 {
            for f in 0..10 {
                write(&src, &format!("{top}/wide/d{d}/f{f}"), format!("{d}.{f}"));
            }
        }
        a.converge(SETTLE);
        std::fs::remove_dir_all(src.join(&top)).unwrap();
        std::fs::remove_dir_all(src.join(format!("{top}-empty"))).unwrap();
        a.converge(SETTLE);
        assert!(!dst.join(&top).exists(), "{dir}: rm -rf did not land");
        assert_eq!(tree(&dst).len(), 101, "{dir}");
    }
    settled(&a);
}

#[test]
fn chmod_x_both_ways() {
    let a = started("", |a| {
        write(&a.host_dir, "h.sh", "#!/bin/sh\n");
        write(&a.host_dir, "g.sh", "#!/bin/sh\n");
        for f in ["h.sh", "g.sh"] {
            std::fs::set_permissions(a.host_dir.join(f), PermissionsExt::from_mode(0o644)).unwrap();
        }
    });
    for (src, dst, dir) in directions(&a) {
        let f = if dir.starts_with("host") {
            "h.sh"
        } else {
            "g.sh"
        };
        std::fs::set_permissions(src.join(f), PermissionsExt::from_mode(0o755)).unwrap();
        a.converge(SETTLE);
        assert_eq!(mode(&dst.join(f)), 0o755, "{dir}: chmod +x");
        std::fs::set_permissions(src.join(f), PermissionsExt::from_mode(0o644)).unwrap();
        a.converge(SETTLE);
        assert_eq!(mode(&dst.join(f)), 0o644, "{dir}: chmod -x");
    }
    settled(&a);
}

#[test]
fn symlink_create_and_retarget_both_ways() {
    let a = started("", |a| {
        write(&a.host_dir, "a.txt", "a");
        write(&a.host_dir, "b.txt", "b");
        write(&a.host_dir, "dir/c.txt", "c");
    });
    for (src, dst, dir) in directions(&a) {
        let link = format!("{}-link", &dir[..4]);
        std::os::unix::fs::symlink("a.txt", src.join(&link)).unwrap();
        a.converge(SETTLE);
        assert_eq!(
            std::fs::read_link(dst.join(&link)).unwrap(),
            Path::new("a.txt"),
            "{dir}: create"
        );

        // As `ln -sfn` does it: unlink, then a new link under the same name.
        std::fs::remove_file(src.join(&link)).unwrap();
        std::os::unix::fs::symlink("b.txt", src.join(&link)).unwrap();
        a.converge(SETTLE);
        assert_eq!(
            std::fs::read_link(dst.join(&link)).unwrap(),
            Path::new("b.txt"),
            "{dir}: retarget"
        );

        // As an atomic retarget does it: a new link renamed over the old one, here pointing
        // at a directory.
        std::os::unix::fs::symlink("dir", src.join(format!("{link}.tmp"))).unwrap();
        std::fs::rename(src.join(format!("{link}.tmp")), src.join(&link)).unwrap();
        a.converge(SETTLE);
        assert_eq!(
            std::fs::read_link(dst.join(&link)).unwrap(),
            Path::new("dir"),
            "{dir}: atomic retarget"
        );
        assert_eq!(read(&dst, &format!("{link}/c.txt")), b"c");
    }
    settled(&a);
}

fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn git_checkout_between_branches_differing_in_1000_files() {
    // `ignore_vcs` is not there yet: the repository's own .git stays on the host.
    let mut a = Agents::new("ignore = [\".git/\"]");
    let repo = a.host_dir.clone();
    git(&repo, &["init", "-q"]);
    for i in 0..1000 {
        write(
            &repo,
            &format!("src/m{}/f{i}.rs", i % 20),
            format!("// file {i}\nfn f{i}() {{}}\n").repeat(10),
        );
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "main"]);
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    // feature differs from main in 1,000 files: 600 changed, 200 deleted, 200 added.
    for i in 0..600 {
        write(
            &repo,
            &format!("src/m{}/f{i}.rs", i % 20),
            format!("// file {i}, feature\nfn f{i}() -> u32 {{ {i} }}\n").repeat(10),
        );
    }
    for i in 600..800 {
        std::fs::remove_file(repo.join(format!("src/m{}/f{i}.rs", i % 20))).unwrap();
    }
    for i in 0..200 {
        write(
            &repo,
            &format!("feature/new{}/n{i}.rs", i % 10),
            format!("// new {i}\n"),
        );
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "feature"]);
    git(&repo, &["checkout", "-q", "main"]);
    a.start();
    a.wait_in_sync();
    a.converge_except(SETTLE, &[".git"]);
    assert!(!a.guest_dir.join(".git").exists(), ".git is ignored");

    for (branch, files) in [("feature", 1000), ("main", 1000)] {
        git(&repo, &["checkout", "-q", branch]);
        a.converge_except(SETTLE_BIG, &[".git"]);
        let guest_files = tree(&a.guest_dir)
            .values()
            .filter(|n| matches!(n, vmsync_tests::fixture::Node::File { .. }))
            .count();
        assert_eq!(guest_files, files, "{branch}");
        assert_eq!(
            read(&a.guest_dir, "src/m0/f0.rs").starts_with(b"// file 0, feature"),
            branch == "feature"
        );
        let code = a.wait(20);
        assert_eq!(code, 0, "{branch}: wait exited {code}: {}", a.status());
    }
}

#[test]
fn a_build_like_burst_of_10000_files_in_the_guest_lands_on_the_host() {
    let a = started("mode = \"guest-to-host\"", |a| {
        write(&a.guest_dir, "Cargo.toml", "[package]\n");
    });
    // As a build writes its outputs: 100 directories of 100 small files, as fast as the
    // filesystem takes them (well within the two seconds).
    for d in 0..100 {
        for f in 0..100 {
            write(
                &a.guest_dir,
                &format!("target/debug/deps/d{d:03}/o{f:03}.o"),
                format!("object {d}/{f}\n").repeat(1 + (d * f) % 7),
            );
        }
    }
    a.converge(SETTLE_BIG);
    assert_eq!(
        tree(&a.host_dir)
            .values()
            .filter(|n| matches!(n, vmsync_tests::fixture::Node::File { .. }))
            .count(),
        10_001
    );
    settled(&a);
}

#[test]
fn both_sides_editing_different_files_at_once_converge_without_conflicts() {
    let a = started("", |a| {
        for i in 0..50 {
            write(&a.host_dir, &format!("shared/h{i}.txt"), "base");
            write(&a.host_dir, &format!("shared/g{i}.txt"), "base");
        }
    });
    let barrier = Arc::new(Barrier::new(2));
    let edit = |root: PathBuf, side: &'static str| {
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            let initial = &side[..1];
            barrier.wait();
            for i in 0..50 {
                write(
                    &root,
                    &format!("shared/{initial}{i}.txt"),
                    format!("edited by the {side}"),
                );
                write(
                    &root,
                    &format!("new-{side}/n{i}.txt"),
                    format!("{side} {i}"),
                );
            }
        })
    };
    let host = edit(a.host_dir.clone(), "host");
    let guest = edit(a.guest_dir.clone(), "guest");
    host.join().unwrap();
    guest.join().unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert_eq!(read(&a.host_dir, "shared/g7.txt"), b"edited by the guest");
    assert_eq!(read(&a.guest_dir, "shared/h7.txt"), b"edited by the host");
    assert_eq!(a.share()["conflicts"].as_array().map(Vec::len), Some(0));
}

#[test]
fn the_same_file_edited_on_both_sides_at_once_host_wins_and_nothing_is_lost() {
    let a = started("conflict = \"host-wins\"", |a| {
        for i in 0..5 {
            write(&a.host_dir, &format!("f{i}.txt"), "base");
        }
    });
    // Two writes a few milliseconds apart are concurrent for the sync only if neither change
    // has reached the other side in between, which live sync (and thread scheduling on a busy
    // machine) can make false. Freezing the host process pins that down: both watchers see
    // their edit at once, and the host's cycle finds both when it resumes.
    a.freeze_host();
    for i in 0..5 {
        write(&a.host_dir, &format!("f{i}.txt"), format!("host {i}"));
        write(&a.guest_dir, &format!("f{i}.txt"), format!("guest {i}"));
    }
    a.thaw_host();
    let resolved = eventually(SETTLE, || {
        (0..5).all(|i| {
            std::fs::read(a.guest_dir.join(format!("f{i}.txt"))).ok()
                == Some(format!("host {i}").into_bytes())
        })
    });
    assert!(
        resolved,
        "host-wins did not resolve: {}\nhost log (tail):\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    settled(&a);
    let copies = a.guest_trash();
    for i in 0..5 {
        assert_eq!(
            read(&a.host_dir, &format!("f{i}.txt")),
            format!("host {i}").as_bytes()
        );
        // The guest's version lost, and is kept in the guest's trash (not in the tree).
        assert!(
            copies
                .iter()
                .any(|(name, data)| name.ends_with(&format!("/f{i}.txt"))
                    && *data == format!("guest {i}").into_bytes()),
            "guest's f{i}.txt is lost; guest trash: {:?}",
            copies
                .iter()
                .map(|(n, d)| (n, String::from_utf8_lossy(d)))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(tree(&a.host_dir).len(), 5, "conflict copies in the tree");
}

#[test]
fn an_editors_atomic_save_arrives_as_one_update_both_ways() {
    let a = started("", |a| {
        write(&a.host_dir, "host-doc.txt", "v0");
        write(&a.host_dir, "guest-doc.txt", "v0");
        for f in ["host-doc.txt", "guest-doc.txt"] {
            std::fs::set_permissions(a.host_dir.join(f), PermissionsExt::from_mode(0o640)).unwrap();
        }
    });
    for (src, dst, dir) in directions(&a) {
        let name = format!("{}-doc.txt", &dir[..dir.find('-').unwrap()]);
        // Watch the destination the whole time: the file must never be missing, never be
        // anything but a regular file with the original mode.
        let stop = Arc::new(AtomicBool::new(false));
        let glitches = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (stop, glitches, path) =
                (Arc::clone(&stop), Arc::clone(&glitches), dst.join(&name));
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match std::fs::symlink_metadata(&path) {
                        Ok(m) if m.is_file() && m.permissions().mode() & 0o7777 == 0o640 => {}
                        other => {
                            glitches.fetch_add(1, Ordering::Relaxed);
                            if seen.len() < 5 {
                                seen.push(format!("{:?}", other.map(|m| m.permissions())));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                seen
            })
        };
        for save in 1..=10 {
            // As vim/VS Code save: a temp file beside the original, fsync, rename over it.
            let tmp = src.join(format!(".{name}.swp{save}"));
            let content = format!("version {save} of {name}\n").repeat(save);
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).unwrap();
                f.write_all(content.as_bytes()).unwrap();
                f.set_permissions(PermissionsExt::from_mode(0o640)).unwrap();
                f.sync_all().unwrap();
            }
            std::fs::rename(&tmp, src.join(&name)).unwrap();
            let landed = eventually(SETTLE, || {
                std::fs::read(dst.join(&name)).ok().as_deref() == Some(content.as_bytes())
            });
            assert!(
                landed,
                "{dir}: save {save} did not land\nhost log (tail):\n{}",
                a.log_tail("host.log", 60)
            );
        }
        a.converge(SETTLE);
        stop.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        assert_eq!(
            glitches.load(Ordering::Relaxed),
            0,
            "{dir}: the destination's file was missing or changed kind/mode: {seen:?}"
        );
    }
    settled(&a);
    assert_eq!(a.share()["conflicts"].as_array().map(Vec::len), Some(0));
}

/// Under a one-way mode, edits on the replica side are reverted to the source's version and
/// the reverted versions are kept in the replica's trash.
fn replica_edits_are_reverted(mode: &str) {
    let a = started(&format!("mode = \"{mode}\""), |a| {
        let source = if mode == "host-to-guest" {
            &a.host_dir
        } else {
            &a.guest_dir
        };
        write(source, "f.txt", "the source's version");
        write(source, "keep.txt", "keep");
        for i in 0..10 {
            write(source, &format!("other/o{i}"), "o");
        }
    });
    let (source, replica, replica_side) = if mode == "host-to-guest" {
        (&a.host_dir, &a.guest_dir, "guest")
    } else {
        (&a.guest_dir, &a.host_dir, "host")
    };
    write(replica, "f.txt", "edited on the replica");
    write(replica, "stray.txt", "created on the replica");
    std::fs::remove_file(replica.join("keep.txt")).unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert_eq!(read(replica, "f.txt"), b"the source's version", "{mode}");
    assert_eq!(read(replica, "keep.txt"), b"keep", "{mode}");
    assert!(!replica.join("stray.txt").exists(), "{mode}");
    assert_eq!(read(source, "f.txt"), b"the source's version", "{mode}");
    let copies = if replica_side == "host" {
        a.host_trash()
    } else {
        a.guest_trash()
    };
    assert!(
        copies
            .iter()
            .any(|(name, data)| name.ends_with("/f.txt") && data == b"edited on the replica"),
        "{mode}: the reverted edit was not saved: {copies:?}"
    );
}

#[test]
fn host_to_guest_reverts_a_guest_edit() {
    replica_edits_are_reverted("host-to-guest");
}

#[test]
fn guest_to_host_reverts_a_host_edit() {
    replica_edits_are_reverted("guest-to-host");
}

#[test]
fn wait_returns_once_edits_made_before_it_have_landed() {
    let a = started("", |a| write(&a.host_dir, "base.txt", "base"));
    for round in 0..5 {
        write(
            &a.host_dir,
            &format!("r{round}/host.txt"),
            format!("h{round}"),
        );
        write(
            &a.guest_dir,
            &format!("r{round}/guest.txt"),
            format!("g{round}"),
        );
        write(&a.host_dir, "base.txt", format!("base {round}"));
        // No polling here: `wait` itself must not return before these edits have landed.
        let code = a.wait(20);
        assert_eq!(code, 0, "round {round}: wait exited {code}");
        let (host, guest) = (tree(&a.host_dir), tree(&a.guest_dir));
        assert!(
            host == guest,
            "round {round}: wait returned 0 before the edits landed (host vs guest):\n  {}",
            vmsync_tests::fixture::tree_diff(&host, &guest, 10).join("\n  ")
        );
    }
}

/// A burst of small changes does not wait behind a big file. With the link slowed
/// to 16 MiB/s, a 48 MiB file takes about three seconds to cross; 200 small files written just
/// after it must all have landed, byte for byte, while the big one is still on its way.
#[test]
fn small_files_do_not_wait_behind_a_big_transfer_both_ways() {
    let a = started("", |_| {});
    a.relay.set_rate_limit(16 << 20);
    for (n, (src, dst, label)) in directions(&a).into_iter().enumerate() {
        let big = random_bytes(40 + n as u64, 48 << 20);
        // Made next to the share and renamed in: the file appears whole, in one event.
        let outside = a.tmp.path().join(format!("big-{n}.tmp"));
        std::fs::write(&outside, &big).unwrap();
        std::fs::rename(&outside, src.join(format!("big-{n}.bin"))).unwrap();
        for i in 0..200 {
            write(
                &src,
                &format!("burst-{n}/f{i:03}.txt"),
                format!("{label} {i}\n"),
            );
        }
        let all_small_there = || {
            (0..200).all(|i| {
                std::fs::read(dst.join(format!("burst-{n}/f{i:03}.txt")))
                    .is_ok_and(|d| d == format!("{label} {i}\n").as_bytes())
            })
        };
        assert!(
            eventually(SETTLE, all_small_there),
            "{label}: the small files did not land; status {}",
            a.status()
        );
        let big_there = std::fs::read(dst.join(format!("big-{n}.bin"))).ok();
        assert!(
            big_there.is_none(),
            "{label}: the big file landed before the small files written after it"
        );
        a.converge(SETTLE_BIG);
        assert_eq!(read(&dst, &format!("big-{n}.bin")), big, "{label}");
    }
    a.relay.set_rate_limit(0);
    settled(&a);
}

/// `respect_gitignore`: ignore files edited live, on either side, take effect at once: a line
/// removed lets what it covered sync both ways, a line added stops a path syncing without
/// deleting or overwriting it anywhere.
#[test]
fn gitignore_edits_take_effect_live_on_both_sides() {
    let a = started("respect_gitignore = true", |a| {
        // Both sides start from the same checkout: each side's rules judge its own files.
        for dir in [&a.host_dir, &a.guest_dir] {
            write(dir, ".gitignore", "*.log\n");
        }
        write(&a.host_dir, "app.log", "host log");
        write(&a.host_dir, "sub/notes", "v1");
        write(&a.guest_dir, "sub/guest.log", "guest log");
    });
    assert_eq!(read(&a.guest_dir, "sub/notes"), b"v1");
    assert!(!a.guest_dir.join("app.log").exists());
    assert!(!a.host_dir.join("sub/guest.log").exists());

    // The root's ignore file: everything is looked at again.
    write(&a.host_dir, ".gitignore", "");
    a.converge(SETTLE);
    assert_eq!(read(&a.guest_dir, "app.log"), b"host log");
    assert_eq!(read(&a.host_dir, "sub/guest.log"), b"guest log");

    // A subdirectory's ignore file, new in the guest: that directory is looked at again.
    write(&a.guest_dir, "sub/.ignore", "notes\n");
    a.converge(SETTLE);
    write(&a.host_dir, "sub/notes", "v2 on the host");
    // A later change that does sync, so there is a point after which the edit was seen.
    write(&a.host_dir, "marker", "m");
    assert!(eventually(SETTLE, || a.guest_dir.join("marker").exists()));
    a.sync();
    assert_eq!(read(&a.guest_dir, "sub/notes"), b"v1");
    std::fs::remove_file(a.guest_dir.join("sub/notes")).unwrap();
    write(&a.guest_dir, "marker", "m2");
    assert!(eventually(SETTLE, || read(&a.host_dir, "marker") == b"m2"));
    a.sync();
    assert_eq!(read(&a.host_dir, "sub/notes"), b"v2 on the host");

    // And removed again: the edit made while it was ignored wins over the deletion.
    write(&a.guest_dir, "sub/.ignore", "");
    a.converge(SETTLE);
    assert_eq!(read(&a.guest_dir, "sub/notes"), b"v2 on the host");
    let code = a.wait(20);
    assert_eq!(code, 0, "wait exited {code}; status {}", a.status());
}

/// A build writing into a directory the tree's `.gitignore` excludes costs no cycles: the
/// watcher drops events beneath a directory the last scan found ignored, as it does beneath
/// one the configured patterns exclude (before it did, 10,000 such files cost 1,358 cycles).
#[test]
fn a_burst_into_a_gitignored_directory_costs_no_cycles() {
    let a = started("respect_gitignore = true", |a| {
        for dir in [&a.host_dir, &a.guest_dir] {
            write(dir, ".gitignore", "target/\n");
            std::fs::create_dir_all(dir.join("target/debug/deps")).unwrap();
        }
        write(&a.host_dir, "src/main.rs", "fn main() {}");
    });
    let before = a.share()["cycles"].as_u64().unwrap();
    for f in 0..3000 {
        write(
            &a.guest_dir,
            &format!("target/debug/deps/o{f:05}.o"),
            "object",
        );
    }
    write(&a.guest_dir, "src/lib.rs", "pub fn f() {}");
    assert!(eventually(SETTLE, || a
        .host_dir
        .join("src/lib.rs")
        .exists()));
    assert_eq!(a.wait(20), 0);
    let cycles = a.share()["cycles"].as_u64().unwrap() - before;
    assert!(cycles <= 10, "{cycles} cycles for one synced file");
    assert_eq!(
        std::fs::read_dir(a.host_dir.join("target/debug/deps"))
            .unwrap()
            .count(),
        0
    );
}
