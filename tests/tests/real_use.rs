//! What a week of real use does to a share, across real processes: the same data renamed
//! again and again, copied, and written twice by a build, hard links. Each test asserts what
//! crossed the socket and what landed on disk (contents, inodes), not only that the trees
//! match.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;
use vmsync_tests::agents::Agents;
use vmsync_tests::fixture::{assert_same_tree, random_bytes, read, write};

const SETTLE: Duration = Duration::from_secs(30);

fn started(prepare: impl FnOnce(&Agents)) -> Agents {
    let mut a = Agents::new("");
    prepare(&a);
    a.start();
    a.wait_in_sync();
    a
}

/// Content bytes each way so far, by the host's status.
fn content(a: &Agents) -> u64 {
    let s = a.share();
    s["bytes_sent"].as_u64().unwrap() + s["bytes_received"].as_u64().unwrap()
}

fn settled(a: &Agents) {
    let code = a.wait(30);
    assert_eq!(
        code,
        0,
        "wait exited {code}; status {}\nhost log (tail):\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

/// The session never dropped: neither agent logged the end of one.
fn no_session_dropped(a: &Agents) {
    let host = a.log("host.log");
    let guest = a.log("guest.log");
    for (name, log) in [("host", &host), ("guest", &guest)] {
        assert!(
            !log.contains("session ended") && !log.contains("protocol violation"),
            "{name} dropped a session:\n{}",
            a.log_tail(&format!("{name}.log"), 40)
        );
    }
}

/// Renames and copies of data the other side already has move no content, however many times
/// in a row: each rename leaves the chunks findable at their new place.
#[test]
fn renamed_again_and_again_and_copied_sends_no_content() {
    const BIG: usize = 10 << 20;
    let a = started(|a| {
        write(&a.host_dir, "d0/big.bin", random_bytes(11, BIG));
        write(&a.guest_dir, "g0/big.bin", random_bytes(12, BIG));
    });
    for (src, prefix, label) in [
        (a.host_dir.clone(), "d", "host->guest"),
        (a.guest_dir.clone(), "g", "guest->host"),
    ] {
        let mut steps: Vec<(String, String)> = (0..4)
            .map(|i| (format!("{prefix}{i}"), format!("{prefix}{}", i + 1)))
            .collect();
        steps.push((format!("{prefix}4/big.bin"), format!("{prefix}4/moved.bin")));
        steps.push((
            format!("{prefix}4/moved.bin"),
            format!("{prefix}4/again.bin"),
        ));
        for (from, to) in steps {
            let before = content(&a);
            a.relay.reset();
            std::fs::rename(src.join(&from), src.join(&to)).unwrap();
            a.converge(SETTLE);
            settled(&a);
            assert_eq!(
                content(&a),
                before,
                "{label}: content crossed for mv {from} {to}"
            );
            let wire = a.wire_bytes();
            assert!(
                wire < 256 << 10,
                "{label}: {wire} bytes crossed for mv {from} {to}"
            );
        }
        // Copied whole, then moved in: a copy caught half written would rightly send its
        // unfinished last chunk.
        let before = content(&a);
        a.relay.reset();
        let scratch = a.tmp.path().join(format!("copy-{prefix}"));
        std::fs::copy(src.join(format!("{prefix}4/again.bin")), &scratch).unwrap();
        std::fs::rename(&scratch, src.join(format!("{prefix}4/copy.bin"))).unwrap();
        a.converge(SETTLE);
        settled(&a);
        assert_eq!(content(&a), before, "{label}: content crossed for a copy");
        assert!(
            a.wire_bytes() < 256 << 10,
            "{label}: a copy crossed the socket"
        );
    }
    no_session_dropped(&a);
}

/// A build writes two files with the same chunks, the second while the first is still
/// crossing: the second waits for the chunks already on their way instead of asking again, so
/// the session goes on and the data crosses once.
#[test]
fn identical_files_landing_during_a_transfer_cross_once_without_dropping_the_session() {
    const BIG: usize = 48 << 20;
    let a = started(|_| {});
    let data = random_bytes(21, BIG);
    for (dst_root, src_root, label) in [
        (a.host_dir.clone(), a.guest_dir.clone(), "guest->host"),
        (a.guest_dir.clone(), a.host_dir.clone(), "host->guest"),
    ] {
        // Made on the share's filesystem outside the share, then moved in: each file appears
        // whole, as a linker's output does.
        let scratch = a.tmp.path().join(format!("scratch-{}", &label[..4]));
        std::fs::create_dir_all(&scratch).unwrap();
        let (p1, p2) = (scratch.join("p1"), scratch.join("p2"));
        std::fs::write(&p1, &data).unwrap();
        std::fs::copy(&p1, &p2).unwrap();
        let before = content(&a);
        a.relay.reset();
        std::fs::rename(&p1, src_root.join("a.bin")).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        std::fs::rename(&p2, src_root.join("b.bin")).unwrap();
        a.converge(SETTLE);
        settled(&a);
        assert_eq!(read(&dst_root, "a.bin"), data, "{label}");
        assert_eq!(read(&dst_root, "b.bin"), data, "{label}");
        let crossed = content(&a) - before;
        assert!(
            crossed <= BIG as u64 + (BIG as u64 / 10),
            "{label}: {crossed} content bytes for two identical {BIG}-byte files"
        );
        std::fs::remove_file(src_root.join("a.bin")).unwrap();
        std::fs::remove_file(src_root.join("b.bin")).unwrap();
        a.converge(SETTLE);
    }
    no_session_dropped(&a);
}

fn meta(root: &Path, rel: &str) -> std::fs::Metadata {
    std::fs::symlink_metadata(root.join(rel)).unwrap()
}

/// The inode of `rel` is the inode of each of `others` (they are hard links of one file).
fn linked(root: &Path, rel: &str, others: &[&str]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = meta(root, rel).ino();
    others.iter().all(|o| meta(root, o).ino() == ino)
}

/// Hard links arrive as hard links, both ways, at the initial sync and live: one inode, one
/// copy of the data on the wire and on disk; an edit through one name shows through all.
#[test]
fn hard_links_arrive_as_hard_links() {
    use std::os::unix::fs::MetadataExt;
    const SIZE: usize = 2 << 20;
    let mut a = Agents::new("");
    let data = random_bytes(31, SIZE);
    write(&a.host_dir, "build/app", &data);
    std::fs::create_dir_all(a.host_dir.join("build/deps")).unwrap();
    std::fs::hard_link(
        a.host_dir.join("build/app"),
        a.host_dir.join("build/deps/app-1f2e"),
    )
    .unwrap();
    write(&a.host_dir, "plain.txt", "one name only");
    a.start();
    a.wait_in_sync();
    settled(&a);
    assert!(
        linked(&a.guest_dir, "build/app", &["build/deps/app-1f2e"]),
        "initial sync split a hard link"
    );
    assert_eq!(meta(&a.guest_dir, "build/app").nlink(), 2);
    assert_eq!(meta(&a.guest_dir, "plain.txt").nlink(), 1);
    let wire = a.wire_bytes();
    assert!(
        wire < (SIZE as u64) * 3 / 2,
        "{wire} bytes crossed for one {SIZE}-byte file with two names"
    );

    // A new name for a file the guest has: no content crosses, and it is the same inode.
    let before = content(&a);
    std::fs::hard_link(a.host_dir.join("build/app"), a.host_dir.join("app-copy")).unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert!(linked(
        &a.guest_dir,
        "app-copy",
        &["build/app", "build/deps/app-1f2e"]
    ));
    assert_eq!(content(&a), before, "content crossed for a new hard link");

    // A second name for a file synced while it had one (cargo links deps/x.rlib as
    // libx.rlib after writing it): the live scan sees only the new name, yet it lands as a
    // link of the file the guest has.
    std::fs::hard_link(
        a.host_dir.join("plain.txt"),
        a.host_dir.join("plain-link.txt"),
    )
    .unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert!(
        linked(&a.guest_dir, "plain.txt", &["plain-link.txt"]),
        "a link to a file synced with one name arrived as a copy"
    );

    // Written through one name on the host: every name on the guest shows the new content
    // and they are still one file.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(a.host_dir.join("build/app"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended").unwrap();
    drop(f);
    a.converge(SETTLE);
    settled(&a);
    assert!(linked(
        &a.guest_dir,
        "build/app",
        &["build/deps/app-1f2e", "app-copy"]
    ));
    assert!(read(&a.guest_dir, "app-copy").ends_with(b"appended"));

    // The other way: links made in the guest arrive linked on the host.
    write(&a.guest_dir, "out/lib.a", random_bytes(32, 300_000));
    std::fs::hard_link(
        a.guest_dir.join("out/lib.a"),
        a.guest_dir.join("out/lib-v2.a"),
    )
    .unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert!(
        linked(&a.host_dir, "out/lib.a", &["out/lib-v2.a"]),
        "guest->host split a hard link"
    );
    // One name removed: the other stays, with its content (the removed name is kept in the
    // trash, as a link of the same inode).
    std::fs::remove_file(a.guest_dir.join("out/lib-v2.a")).unwrap();
    a.converge(SETTLE);
    settled(&a);
    assert!(!a.host_dir.join("out/lib-v2.a").exists());
    assert_eq!(read(&a.host_dir, "out/lib.a"), random_bytes(32, 300_000));
    no_session_dropped(&a);
}
