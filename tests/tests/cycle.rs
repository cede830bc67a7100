//! Sync cycles end to end in one process: a real `Controller` over two `LocalEndpoint`s on
//! temp directories, each with its own state database. Everything but the wire: the agents'
//! tests (`agents.rs`) repeat the key scenarios across real processes and a real socket.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use vmsync_core::endpoint::ChunkData;
use vmsync_core::reconcile::{ConflictPolicy, SyncMode};
use vmsync_engine::status::ShareState;
use vmsync_tests::fixture::{
    assert_same_tree, changed_chunk_bytes, mtime_ns, patch_in_place, random_bytes, read, set_mtime,
    text_bytes, tree, write, Node, Pair, PairOptions,
};

fn pair() -> Pair {
    Pair::new(PairOptions::default())
}

fn with_policy(policy: ConflictPolicy) -> Pair {
    Pair::new(PairOptions {
        policy,
        ..PairOptions::default()
    })
}

#[tokio::test]
async fn host_only_tree_reaches_guest() {
    let mut p = pair();
    write(&p.host_dir, "a.txt", "alpha");
    write(&p.host_dir, "dir/b.bin", random_bytes(1, 300_000));
    write(&p.host_dir, "dir/sub/c", "");
    std::fs::create_dir_all(p.host_dir.join("empty/nested")).unwrap();
    let report = p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(p.status().state, ShareState::InSync);
    assert!(report.applied >= 6, "{report:?}");
    // A second cycle has nothing to do.
    assert_eq!(p.sync().await.applied, 0);
}

/// A mode or mtime change from the guest never writes through to a name outside the share: a
/// host file hard-linked into the share from elsewhere is replaced there by a copy with the
/// new metadata, and the outside name keeps its inode, mode and mtime.
#[tokio::test]
async fn a_metadata_change_never_reaches_a_hard_link_outside_the_share() {
    use std::os::unix::fs::MetadataExt;
    let mut p = pair();
    let out = p.tmp.path().join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    write(&p.host_dir, "a.txt", "shared with a file outside");
    let host_file = p.host_dir.join("a.txt");
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    set_mtime(&host_file, 1_600_000_000, 0);
    std::fs::hard_link(&host_file, out.join("a")).unwrap();
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "a.txt"), b"shared with a file outside");

    let guest_file = p.guest_dir.join("a.txt");
    std::fs::set_permissions(&guest_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    set_mtime(&guest_file, 1_700_000_000, 0);
    p.sync().await;

    let host_meta = std::fs::metadata(&host_file).unwrap();
    assert_eq!(host_meta.mode() & 0o777, 0o600);
    assert_eq!(mtime_ns(&host_file), (1_700_000_000, 0));
    assert_eq!(read(&p.host_dir, "a.txt"), b"shared with a file outside");
    let outside = std::fs::metadata(out.join("a")).unwrap();
    assert_eq!(
        outside.mode() & 0o777,
        0o644,
        "the outside name's mode changed"
    );
    assert_eq!(mtime_ns(&out.join("a")), (1_600_000_000, 0));
    assert_ne!(outside.ino(), host_meta.ino(), "still the same inode");
    assert_eq!(
        std::fs::read(out.join("a")).unwrap(),
        b"shared with a file outside"
    );
    assert_eq!(p.status().state, ShareState::InSync);
}

/// Owners and extended attributes are not synced (the wire has no field for them): a host file
/// owned by another user, with a big `user.` xattr, arrives owned by the agent's user and with
/// no xattr; the host's stays as it was. Needs root to give a file away (skipped otherwise).
#[tokio::test]
async fn owners_and_extended_attributes_stay_on_their_side() {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let mut p = pair();
    write(&p.host_dir, "owned.txt", "someone else's");
    let host_file = p.host_dir.join("owned.txt");
    std::os::unix::fs::chown(&host_file, Some(65534), Some(65534)).unwrap();
    let big = vec![b'x'; 3000];
    let xattr = rustix::fs::setxattr(
        &host_file,
        "user.big",
        &big,
        rustix::fs::XattrFlags::empty(),
    );
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "owned.txt"), b"someone else's");
    let guest = std::fs::metadata(p.guest_dir.join("owned.txt")).unwrap();
    assert_eq!((guest.uid(), guest.gid()), (0, 0), "the owner crossed");
    let host = std::fs::metadata(&host_file).unwrap();
    assert_eq!((host.uid(), host.gid()), (65534, 65534));
    match xattr {
        Ok(()) => {
            let mut names = vec![0u8; 1024];
            let n = rustix::fs::listxattr(p.guest_dir.join("owned.txt"), &mut names).unwrap();
            assert_eq!(n, 0, "an xattr crossed: {:?}", &names[..n]);
        }
        Err(e) => eprintln!("xattr part skipped: this filesystem refuses user xattrs: {e}"),
    }
    assert_eq!(p.status().state, ShareState::InSync);
}

/// A name at the root that a case-folding filesystem would open as the reserved `.vmsync`
/// (`.VMSYNC`, `.VmSync`) is never share content: not synced from either side, and the other
/// side's reserved directory is never reached through it.
#[tokio::test]
async fn names_that_fold_to_the_reserved_directory_are_not_content() {
    let mut p = pair();
    write(&p.host_dir, ".VMSYNC/id", "forged marker");
    write(&p.guest_dir, ".VmSync/tmp/x", "forged staging");
    write(&p.host_dir, "a/.VMSYNC", "an ordinary name below the root");
    p.sync().await;
    assert!(!p.guest_dir.join(".VMSYNC").exists());
    assert!(!p.host_dir.join(".VmSync").exists());
    assert_eq!(
        read(&p.guest_dir, "a/.VMSYNC"),
        b"an ordinary name below the root"
    );
    assert_ne!(read(&p.guest_dir, ".vmsync/id"), b"forged marker");
    assert_eq!(p.status().state, ShareState::InSync);
    assert!(p.status().problems.is_empty(), "{:?}", p.status().problems);
}

#[tokio::test]
async fn guest_only_tree_reaches_host() {
    let mut p = pair();
    write(&p.guest_dir, "x/y/z.txt", "from the guest");
    write(&p.guest_dir, "big", random_bytes(2, 1 << 20));
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "x/y/z.txt"), b"from the guest");
}

#[tokio::test]
async fn disjoint_edits_while_down_converge_after_restart() {
    let mut p = pair();
    write(&p.host_dir, "shared.txt", "v1");
    write(&p.host_dir, "h/old.txt", "old");
    p.sync().await;
    p.restart();
    write(&p.host_dir, "h/new.txt", "host new");
    write(&p.guest_dir, "g/new.txt", "guest new");
    write(&p.guest_dir, "shared.txt", "v2 from guest");
    std::fs::remove_file(p.host_dir.join("h/old.txt")).unwrap();
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "shared.txt"), b"v2 from guest");
    assert!(!p.guest_dir.join("h/old.txt").exists());
    assert!(p.status().conflicts.is_empty());
}

async fn both_edited(policy: ConflictPolicy) -> Pair {
    both_edited_at(policy, 1_750_000_000).await
}

/// Both sides edit `f.txt`, the host's dated 2023-11, the guest's `guest_secs`.
async fn both_edited_at(policy: ConflictPolicy, guest_secs: i64) -> Pair {
    let mut p = with_policy(policy);
    write(&p.host_dir, "f.txt", "base");
    p.sync().await;
    write(&p.host_dir, "f.txt", "host edit");
    write(&p.guest_dir, "f.txt", "guest edit, newer");
    set_mtime(&p.host_dir.join("f.txt"), 1_700_000_000, 0);
    set_mtime(&p.guest_dir.join("f.txt"), guest_secs, 0);
    p.restart();
    p.sync().await;
    p
}

#[tokio::test]
async fn same_file_edited_on_both_sides_keep() {
    let mut p = both_edited(ConflictPolicy::Keep).await;
    assert_eq!(read(&p.host_dir, "f.txt"), b"host edit");
    assert_eq!(read(&p.guest_dir, "f.txt"), b"guest edit, newer");
    let st = p.status();
    assert_eq!(st.state, ShareState::Conflicted);
    assert_eq!(st.conflicts, vec!["f.txt".to_string()]);
    assert!(
        p.host_trash().is_empty() && p.guest_trash().is_empty(),
        "keep moves nothing"
    );
    // Still conflicted on the next cycle, and still nothing touched.
    p.sync().await;
    assert_eq!(p.status().conflicts, vec!["f.txt".to_string()]);
    assert_eq!(read(&p.host_dir, "f.txt"), b"host edit");
}

#[tokio::test]
async fn same_file_edited_on_both_sides_host_wins() {
    let mut p = both_edited(ConflictPolicy::HostWins).await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.guest_dir, "f.txt"), b"host edit");
    // The losing version is kept in the trash of the side where it lost.
    let saved = p.guest_trash();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(saved[0].0.ends_with("/f.txt"), "{saved:?}");
    assert_eq!(saved[0].1, b"guest edit, newer");
    assert!(p.host_trash().is_empty());
    assert_eq!(p.status().state, ShareState::InSync);
}

#[tokio::test]
async fn same_file_edited_on_both_sides_guest_wins() {
    let p = both_edited(ConflictPolicy::GuestWins).await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "f.txt"), b"guest edit, newer");
    let saved = p.host_trash();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(saved[0].0.ends_with("/f.txt"), "{saved:?}");
    assert_eq!(saved[0].1, b"host edit");
    assert!(p.guest_trash().is_empty());
}

#[tokio::test]
async fn same_file_edited_on_both_sides_newer_wins() {
    let p = both_edited(ConflictPolicy::NewerWins).await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "f.txt"), b"guest edit, newer");
    let saved = p.host_trash();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].1, b"host edit");
    assert!(p.guest_trash().is_empty());
}

/// A guest file dated more than a day ahead of the host's clock (here 2096) is not newer:
/// under `newer-wins` the host's edit wins, and the guest's version is kept in its trash.
#[tokio::test]
async fn a_guest_file_dated_in_the_future_does_not_win_newer_wins() {
    let p = both_edited_at(ConflictPolicy::NewerWins, 4_000_000_000).await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "f.txt"), b"host edit");
    let saved = p.guest_trash();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].1, b"guest edit, newer");
    assert!(p.host_trash().is_empty());
}

#[tokio::test]
async fn delete_vs_modify_keeps_the_modification() {
    for policy in [
        ConflictPolicy::Keep,
        ConflictPolicy::HostWins,
        ConflictPolicy::GuestWins,
        ConflictPolicy::NewerWins,
    ] {
        let mut p = with_policy(policy);
        write(&p.host_dir, "d/f.txt", "base");
        write(&p.host_dir, "g.txt", "base");
        p.sync().await;
        // f: deleted on the host, modified on the guest; g: the reverse.
        std::fs::remove_file(p.host_dir.join("d/f.txt")).unwrap();
        write(&p.guest_dir, "d/f.txt", "guest modified");
        write(&p.host_dir, "g.txt", "host modified");
        std::fs::remove_file(p.guest_dir.join("g.txt")).unwrap();
        p.sync().await;
        assert_same_tree(&p.host_dir, &p.guest_dir);
        assert_eq!(
            read(&p.host_dir, "d/f.txt"),
            b"guest modified",
            "{policy:?}"
        );
        assert_eq!(read(&p.guest_dir, "g.txt"), b"host modified", "{policy:?}");
    }
}

#[tokio::test]
async fn rename_of_a_large_file_sends_no_content() {
    let mut p = pair();
    write(&p.host_dir, "big.bin", random_bytes(3, 40 << 20));
    p.sync().await;
    p.guest_counters.reset();
    std::fs::rename(
        p.host_dir.join("big.bin"),
        p.host_dir.join("moved/renamed.bin"),
    )
    .unwrap_or_else(|_| {
        std::fs::create_dir_all(p.host_dir.join("moved")).unwrap();
        std::fs::rename(
            p.host_dir.join("big.bin"),
            p.host_dir.join("moved/renamed.bin"),
        )
        .unwrap();
    });
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(
        p.guest_counters.supplied(),
        0,
        "a rename moved content bytes"
    );
    assert!(
        p.status().chunks_reused > 600,
        "{}",
        p.status().chunks_reused
    );
}

#[tokio::test]
async fn insertion_in_the_middle_sends_about_the_insertion() {
    let mut p = pair();
    let data = random_bytes(4, 64 << 20);
    write(&p.host_dir, "f.img", &data);
    p.sync().await;
    p.guest_counters.reset();
    let mut edited = data[..32 << 20].to_vec();
    edited.extend_from_slice(&random_bytes(5, 1 << 20));
    edited.extend_from_slice(&data[32 << 20..]);
    write(&p.host_dir, "f.img", &edited);
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let sent = p.guest_counters.supplied();
    assert!(
        ((1 << 20)..(1 << 20) + 256 * 1024).contains(&sent),
        "{sent} bytes sent for a 1 MiB insertion"
    );
}

#[tokio::test]
async fn restart_with_nothing_changed_rehashes_nothing() {
    let mut p = pair();
    for i in 0..50 {
        write(
            &p.host_dir,
            &format!("d{}/f{i}", i % 5),
            random_bytes(i, 10_000),
        );
    }
    p.sync().await;
    p.restart();
    p.sync().await;
    assert_eq!(p.sides().host.inner.files_hashed(), 0);
    assert_eq!(p.sides().guest.inner.files_hashed(), 0);
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[tokio::test]
async fn metadata_types_and_odd_names() {
    let mut p = pair();
    write(&p.host_dir, "exec.sh", "#!/bin/sh\n");
    std::fs::set_permissions(
        p.host_dir.join("exec.sh"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    write(&p.host_dir, "ro.txt", "read only");
    std::fs::set_permissions(
        p.host_dir.join("ro.txt"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    set_mtime(&p.host_dir.join("ro.txt"), 1_600_000_000, 123_456_789);
    std::os::unix::fs::symlink("exec.sh", p.host_dir.join("link")).unwrap();
    std::os::unix::fs::symlink("../outside", p.host_dir.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", p.host_dir.join("absolute")).unwrap();
    let odd =
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"new\nline \xff\\name");
    std::fs::write(p.host_dir.join(odd), "odd").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.host_dir.join("fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    p.sync().await;

    let g = tree(&p.guest_dir);
    assert_eq!(
        g.get(&b"exec.sh"[..]),
        Some(&Node::File {
            data: b"#!/bin/sh\n".to_vec(),
            mode: 0o755
        }),
        "setuid stripped"
    );
    assert_eq!(
        g.get(&b"ro.txt"[..]),
        Some(&Node::File {
            data: b"read only".to_vec(),
            mode: 0o444
        })
    );
    assert_eq!(
        mtime_ns(&p.guest_dir.join("ro.txt")),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(
        g.get(&b"link"[..]),
        Some(&Node::Symlink(b"exec.sh".to_vec()))
    );
    assert!(!g.contains_key(&b"escape"[..]), "escaping symlink created");
    assert!(
        !g.contains_key(&b"absolute"[..]),
        "absolute symlink created"
    );
    assert!(!g.contains_key(&b"fifo"[..]), "fifo synced");
    assert_eq!(
        g.get(&b"new\nline \xff\\name"[..]),
        Some(&Node::File {
            data: b"odd".to_vec(),
            mode: 0o644
        })
    );
    let problems: Vec<String> = p.status().problems.iter().map(|p| p.path.clone()).collect();
    for expected in ["escape", "absolute", "fifo"] {
        assert!(
            problems.iter().any(|p| p == expected),
            "{expected} not listed in {problems:?}"
        );
    }
    assert!(
        problems.iter().all(|p| !p.contains('\n')),
        "unescaped name in {problems:?}"
    );
}

#[tokio::test]
async fn ignored_paths_are_never_sent_deleted_or_overwritten() {
    let mut p = Pair::new(PairOptions {
        ignore: vec!["target/".into(), "*.swp".into()],
        ..PairOptions::default()
    });
    write(&p.host_dir, "src/main.rs", "fn main() {}");
    write(&p.host_dir, "target/debug/app", "host build");
    write(&p.host_dir, "src/.main.rs.swp", "host swap");
    write(&p.guest_dir, "target/debug/app", "guest build");
    write(&p.guest_dir, "notes.swp", "guest swap");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "src/main.rs"), b"fn main() {}");
    assert_eq!(read(&p.guest_dir, "target/debug/app"), b"guest build");
    assert_eq!(read(&p.host_dir, "target/debug/app"), b"host build");
    assert!(!p.guest_dir.join("src/.main.rs.swp").exists());
    assert!(!p.host_dir.join("notes.swp").exists());
    // Deleting the source tree on the host does not touch ignored files on the guest.
    std::fs::remove_dir_all(p.host_dir.join("target")).unwrap();
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "target/debug/app"), b"guest build");
}

fn gitignore_pair() -> Pair {
    Pair::new(PairOptions {
        respect_gitignore: true,
        ..PairOptions::default()
    })
}

#[tokio::test]
async fn gitignored_paths_are_never_sent_deleted_or_overwritten_on_either_side() {
    let mut p = gitignore_pair();
    write(&p.host_dir, ".gitignore", "*.log\nbuild/\n");
    write(&p.host_dir, "src/main.rs", "fn main() {}");
    write(&p.host_dir, "src/.gitignore", "!keep.log\n");
    write(&p.host_dir, "src/keep.log", "re-included");
    write(&p.host_dir, "app.log", "host log");
    write(&p.host_dir, "build/out.bin", "host build");
    write(&p.host_dir, "cache/data", "host cache");
    // The guest has a file where the host's rules ignore one, and a directory whose own rules
    // ignore everything in it (the ignore file too, so the host never gets it).
    write(&p.guest_dir, "app.log", "guest log");
    write(&p.guest_dir, "cache/.gitignore", "*\n");
    write(&p.guest_dir, "cache/data", "guest cache");
    let report = p.sync().await;
    assert_eq!(report.conflicts, 0, "{report:?}");
    assert_eq!(p.status().state, ShareState::InSync, "{:?}", p.status());
    assert_eq!(read(&p.guest_dir, ".gitignore"), b"*.log\nbuild/\n");
    assert_eq!(read(&p.guest_dir, "src/main.rs"), b"fn main() {}");
    assert_eq!(read(&p.guest_dir, "src/keep.log"), b"re-included");
    assert!(
        !p.guest_dir.join("build").exists(),
        "ignored directory sent"
    );
    assert_eq!(read(&p.guest_dir, "app.log"), b"guest log");
    assert_eq!(read(&p.guest_dir, "cache/data"), b"guest cache");
    assert_eq!(read(&p.host_dir, "app.log"), b"host log");
    assert_eq!(read(&p.host_dir, "build/out.bin"), b"host build");
    assert_eq!(read(&p.host_dir, "cache/data"), b"host cache");
    assert!(!p.host_dir.join("cache/.gitignore").exists());

    // Edits and deletions of ignored paths on one side never reach the other.
    write(&p.host_dir, "app.log", "host log, later");
    write(&p.host_dir, "cache/data", "host cache, later");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "app.log"), b"guest log");
    assert_eq!(read(&p.guest_dir, "cache/data"), b"guest cache");
    for gone in ["app.log", "cache/data"] {
        std::fs::remove_file(p.host_dir.join(gone)).unwrap();
    }
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "app.log"), b"guest log");
    assert_eq!(read(&p.guest_dir, "cache/data"), b"guest cache");
    write(&p.guest_dir, "app.log", "guest log, later");
    write(&p.guest_dir, "cache/data", "guest cache, later");
    p.sync().await;
    assert!(!p.host_dir.join("app.log").exists());
    assert!(!p.host_dir.join("cache/data").exists());
    // What is not ignored still syncs both ways.
    write(&p.guest_dir, "src/lib.rs", "pub fn f() {}");
    p.sync().await;
    assert_eq!(read(&p.host_dir, "src/lib.rs"), b"pub fn f() {}");
    assert_eq!(p.status().state, ShareState::InSync);
}

/// What the live hint for an edited ignore file (its directory) makes a cycle do.
#[tokio::test]
async fn an_edited_ignore_file_syncs_what_it_releases_and_freezes_what_it_covers() {
    let mut p = gitignore_pair();
    write(&p.host_dir, "d/.gitignore", "*.tmp\n");
    write(&p.host_dir, "d/a.tmp", "A");
    write(&p.host_dir, "d/notes", "v1");
    p.sync().await;
    assert!(!p.guest_dir.join("d/a.tmp").exists());
    assert_eq!(read(&p.guest_dir, "d/notes"), b"v1");

    // A line removed: what it covered syncs.
    write(&p.host_dir, "d/.gitignore", "");
    p.cycle_paths(&["d"]).await;
    assert_eq!(read(&p.guest_dir, "d/.gitignore"), b"");
    assert_eq!(read(&p.guest_dir, "d/a.tmp"), b"A");

    // A line added: from then on the path is left alone on both sides, nothing is deleted.
    write(&p.host_dir, "d/.gitignore", "notes\n");
    p.cycle_paths(&["d"]).await;
    assert_eq!(read(&p.guest_dir, "d/.gitignore"), b"notes\n");
    assert_eq!(read(&p.guest_dir, "d/notes"), b"v1");
    write(&p.host_dir, "d/notes", "v2 on the host");
    p.cycle_paths(&["d/notes"]).await;
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "d/notes"), b"v1");
    std::fs::remove_file(p.host_dir.join("d/notes")).unwrap();
    p.cycle_paths(&["d/notes"]).await;
    p.sync().await;
    assert_eq!(
        read(&p.guest_dir, "d/notes"),
        b"v1",
        "an ignored file was deleted"
    );
    write(&p.guest_dir, "d/notes", "v3 on the guest");
    p.cycle_paths(&["d/notes"]).await;
    p.sync().await;
    assert!(
        !p.host_dir.join("d/notes").exists(),
        "an ignored file was sent"
    );
    assert_eq!(read(&p.guest_dir, "d/notes"), b"v3 on the guest");
    assert_eq!(p.status().state, ShareState::InSync);
}

#[tokio::test]
async fn an_unusable_ignore_file_freezes_its_directory_and_says_why() {
    let mut p = gitignore_pair();
    write(&p.host_dir, "ok/file", "synced");
    write(&p.host_dir, "d/.gitignore", "secret\n");
    write(&p.host_dir, "d/file", "d v1");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "d/file"), b"d v1");
    // A pattern that does not compile: what it meant to exclude cannot be known, so nothing
    // in the directory moves, in either direction, until it is fixed.
    write(&p.host_dir, "d/.gitignore", "secret\nbroken{\n");
    write(&p.host_dir, "d/secret", "never to leave the host");
    write(&p.host_dir, "d/file", "d v2");
    std::fs::remove_file(p.guest_dir.join("ok/file")).unwrap();
    p.sync().await;
    assert!(!p.guest_dir.join("d/secret").exists());
    assert_eq!(read(&p.guest_dir, "d/file"), b"d v1");
    assert_eq!(read(&p.guest_dir, "d/.gitignore"), b"secret\n");
    assert!(!p.host_dir.join("ok/file").exists(), "the rest still syncs");
    let problems = p.status().problems;
    assert!(
        problems
            .iter()
            .any(|q| q.path == "d" && q.side == "host" && q.reason.contains(".gitignore line 2")),
        "{problems:?}"
    );
    write(&p.host_dir, "d/.gitignore", "secret\n");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "d/file"), b"d v2");
    assert!(!p.guest_dir.join("d/secret").exists());
    assert!(p.status().problems.is_empty());
}

/// A directory deleted on one side while the other side's ignore files keep something in
/// it: the ignored content stays, the directory with it, and the share settles in sync (the
/// emptied directory comes back on the side that deleted it) instead of retrying forever.
#[tokio::test]
async fn a_deleted_directory_holding_ignored_files_on_the_other_side_settles() {
    let mut p = gitignore_pair();
    write(&p.host_dir, ".gitignore", "target/\n");
    write(&p.host_dir, "crates/a/src/lib.rs", "pub fn a() {}");
    p.sync().await;
    write(
        &p.guest_dir,
        "crates/a/target/debug/liba.rlib",
        "guest build output",
    );
    p.sync().await;
    std::fs::remove_dir_all(p.host_dir.join("crates/a")).unwrap();
    let report = p.sync().await;
    assert!(!report.retry && report.pending == 0, "{report:?}");
    assert_eq!(
        read(&p.guest_dir, "crates/a/target/debug/liba.rlib"),
        b"guest build output"
    );
    assert!(
        !p.guest_dir.join("crates/a/src").exists(),
        "the synced files went"
    );
    assert!(
        p.host_dir.join("crates/a").is_dir(),
        "the directory came back, empty"
    );
    assert!(
        !p.host_dir.join("crates/a/target").exists(),
        "nothing ignored was sent"
    );
    assert_eq!(p.status().state, ShareState::InSync);
    let report = p.cycle().await;
    assert_eq!((report.applied, report.retry), (0, false), "{report:?}");
}

#[tokio::test]
async fn without_respect_gitignore_ignore_files_are_ordinary_files() {
    let mut p = pair();
    write(&p.host_dir, ".gitignore", "*\n");
    write(&p.host_dir, "x.log", "log");
    write(&p.guest_dir, "sub/.ignore", "*\n");
    write(&p.guest_dir, "sub/y", "y");
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.guest_dir, "x.log"), b"log");
    assert_eq!(read(&p.host_dir, "sub/y"), b"y");
}

#[tokio::test]
async fn replaced_guest_root_halts_and_costs_the_host_nothing() {
    let mut p = pair();
    for i in 0..20 {
        write(&p.host_dir, &format!("f{i}"), format!("file {i}"));
    }
    p.sync().await;
    let before = tree(&p.host_dir);
    // The VM is rebuilt: a fresh, empty guest directory.
    std::fs::remove_dir_all(&p.guest_dir).unwrap();
    std::fs::create_dir_all(&p.guest_dir).unwrap();
    write(&p.guest_dir, "fresh.txt", "new vm");
    let report = p.sync().await;
    assert!(report.halted);
    let st = p.status();
    assert_eq!(st.state, ShareState::Halted);
    assert_eq!(st.halt_code.as_deref(), Some("root-replaced"));
    assert_eq!(
        tree(&p.host_dir),
        before,
        "the host lost or gained something"
    );
    // Still halted after a restart.
    p.restart();
    assert!(p.sync().await.halted);
    // resume: add-only merge repopulates the guest and keeps the guest's new file.
    assert!(p.sides().controller.resume().unwrap());
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.host_dir, "fresh.txt"), b"new vm");
    assert_eq!(tree(&p.host_dir).len(), before.len() + 1);
}

/// The guest's share root renamed away and replaced by a symlink to a directory outside it
/// (holding a tree of its own), while the pair runs: the next cycle halts with
/// `root-replaced`; nothing is read from or written through the link, the host's tree is
/// unchanged, and a restart keeps the halt.
#[tokio::test]
async fn a_guest_root_replaced_by_a_symlink_halts_and_nothing_goes_through_it() {
    let mut p = pair();
    for i in 0..20 {
        write(&p.host_dir, &format!("f{i}"), format!("file {i}"));
    }
    p.sync().await;
    let before = tree(&p.host_dir);
    let out = p.tmp.path().join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    write(&out, "secret.txt", "not the share's");
    write(&out, "f0", "an outside f0");
    let out_before = tree(&out);
    std::fs::rename(&p.guest_dir, p.tmp.path().join("guest-away")).unwrap();
    std::os::unix::fs::symlink(&out, &p.guest_dir).unwrap();
    write(&p.host_dir, "f1", "edited on the host meanwhile");
    let host_now = tree(&p.host_dir);
    let report = p.sync().await;
    assert!(report.halted, "{report:?}");
    let st = p.status();
    assert_eq!(st.state, ShareState::Halted);
    assert_eq!(st.halt_code.as_deref(), Some("root-replaced"), "{st:?}");
    assert_eq!(tree(&p.host_dir), host_now, "the host changed");
    assert_ne!(host_now, before);
    assert_eq!(tree(&out), out_before, "something went through the link");
    assert!(
        !out.join(".vmsync").exists(),
        "the link's target was made a share"
    );
    p.restart();
    assert!(p.sync().await.halted);
    assert_eq!(tree(&out), out_before);
    assert_eq!(tree(&p.host_dir), host_now);
}

#[tokio::test]
async fn missing_root_halts_then_recovers_when_it_returns() {
    let mut p = pair();
    write(&p.host_dir, "a", "a");
    p.sync().await;
    let moved = p.tmp.path().join("guest-away");
    std::fs::rename(&p.guest_dir, &moved).unwrap();
    assert!(p.sync().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("root-missing"));
    assert_eq!(read(&p.host_dir, "a"), b"a");
    std::fs::rename(&moved, &p.guest_dir).unwrap();
    assert!(!p.sync().await.halted);
    assert_eq!(p.status().state, ShareState::InSync);
}

#[tokio::test]
async fn emptied_root_halts_without_deleting() {
    let mut p = pair();
    for i in 0..5 {
        write(&p.host_dir, &format!("f{i}"), "x");
    }
    p.sync().await;
    for i in 0..5 {
        std::fs::remove_file(p.guest_dir.join(format!("f{i}"))).unwrap();
    }
    assert!(p.sync().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("root-emptied"));
    assert_eq!(tree(&p.host_dir).len(), 5);
}

#[tokio::test]
async fn mass_deletion_halts_above_the_threshold() {
    let mut p = pair();
    for i in 0..200 {
        write(&p.host_dir, &format!("d/f{i}"), "x");
    }
    write(&p.host_dir, "keep", "k");
    p.sync().await;
    for i in 0..150 {
        std::fs::remove_file(p.guest_dir.join(format!("d/f{i}"))).unwrap();
    }
    assert!(p.sync().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("mass-deletion"));
    assert_eq!(tree(&p.host_dir).len(), 202);
    // resume lets the deletion through once.
    assert!(p.sides().controller.resume().unwrap());
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(tree(&p.host_dir).len(), 52);
}

/// Deletions spread over several cycles add up within the window; crossing the limit halts
/// and puts back everything the window removed from the host, from its trash.
#[tokio::test]
async fn deletions_spread_over_cycles_are_judged_together_and_put_back() {
    let mut p = pair();
    for i in 0..300 {
        write(
            &p.host_dir,
            &format!("d{}/f{i}", i % 10),
            format!("file {i}"),
        );
    }
    p.sync().await;
    let before = tree(&p.host_dir);
    for d in 0..4 {
        std::fs::remove_dir_all(p.guest_dir.join(format!("d{d}"))).unwrap();
    }
    let report = p.sync().await;
    assert!(!report.halted, "40 % alone is under the limit");
    assert!(!p.host_dir.join("d0").exists());
    for d in 4..6 {
        std::fs::remove_dir_all(p.guest_dir.join(format!("d{d}"))).unwrap();
    }
    assert!(p.sync().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("mass-deletion"));
    assert_eq!(
        p.status().put_back,
        4 * 30 + 4,
        "files and their directories"
    );
    assert!(
        tree(&p.host_dir) == before,
        "the host tree was not put back"
    );
    // resume lets the whole deletion through.
    assert!(p.sides().controller.resume().unwrap());
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(tree(&p.host_dir).len(), 4 * 31);
}

#[tokio::test]
async fn a_guest_replacing_every_file_by_a_directory_halts_and_costs_the_host_nothing() {
    let mut p = pair();
    for i in 0..150 {
        write(&p.host_dir, &format!("d/f{i}"), format!("file {i}"));
    }
    p.sync().await;
    let before = tree(&p.host_dir);
    for i in 0..150 {
        let path = p.guest_dir.join(format!("d/f{i}"));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
    }
    assert!(p.sync().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("mass-deletion"));
    assert!(tree(&p.host_dir) == before, "the host tree changed");
}

/// A compromised guest that reports every file as moved to a new name, then refuses to serve
/// any of them: the moves excuse the deletions in the plan, but a removal that a move excused
/// waits for the move's new copy, which never lands. The host keeps every file.
#[tokio::test]
async fn a_guest_reporting_moves_it_will_not_serve_deletes_nothing() {
    use std::collections::BTreeMap;
    use vmsync_core::endpoint::{Problem, ScanReport, ScanScope};
    use vmsync_core::{Entry, FileMeta, Manifest, RelPath};
    use vmsync_tests::intercept::{Hooks, Intercept};
    /// Every file "moved" under `moved/`, and nothing served.
    struct Mover;
    impl Hooks for Mover {
        fn scanned(&mut self, mut report: ScanReport) -> ScanReport {
            let mut entries: BTreeMap<RelPath, Entry> = BTreeMap::new();
            entries.insert(
                RelPath::from_bytes(b"moved").unwrap(),
                Entry::Dir {
                    mode: 0o755,
                    mtime: Default::default(),
                },
            );
            for (path, entry) in report.entries {
                let mut moved = b"moved/".to_vec();
                moved.extend_from_slice(path.as_bytes());
                entries.insert(RelPath::from_bytes(&moved).unwrap(), entry);
            }
            report.entries = entries.into_iter().collect();
            report
        }
        fn manifests(
            &mut self,
            files: &[(RelPath, FileMeta)],
        ) -> Option<Vec<Result<Manifest, Problem>>> {
            Some(
                files
                    .iter()
                    .map(|(path, _)| {
                        Err(Problem {
                            path: path.clone(),
                            reason: "not today".into(),
                        })
                    })
                    .collect(),
            )
        }
        fn chunks_read(&mut self, chunks: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
            chunks.iter().map(|_| None).collect()
        }
        fn deltas_read(&mut self, chunks: Vec<Option<ChunkData>>) -> Vec<Option<ChunkData>> {
            chunks.iter().map(|_| None).collect()
        }
    }

    let mut p = pair();
    for i in 0..300 {
        write(&p.host_dir, &format!("d/f{i}"), format!("file {i}"));
    }
    p.sync().await;
    let before = tree(&p.host_dir);
    let host_dir = p.host_dir.clone();
    let sides = p.sides();
    let mut mover = Intercept {
        inner: sides.guest.inner.clone(),
        hooks: Mover,
    };
    for _ in 0..3 {
        let report = sides
            .controller
            .cycle(&mut sides.host, &mut mover, ScanScope::Full)
            .await
            .unwrap();
        assert!(report.pending > 0, "{report:?}");
        // Every host entry is still there, byte for byte (the forged move's empty directories
        // are all the host gained).
        let now = tree(&host_dir);
        let lost = before
            .iter()
            .filter(|(k, v)| now.get(*k) != Some(v))
            .count();
        assert_eq!(lost, 0, "{lost} host entries lost or changed");
    }
}

#[tokio::test]
async fn one_way_host_to_guest_reverts_guest_edits_and_keeps_them() {
    let mut p = Pair::new(PairOptions {
        mode: SyncMode::HostToGuest,
        ..PairOptions::default()
    });
    write(&p.host_dir, "f", "host");
    p.sync().await;
    write(&p.guest_dir, "f", "guest edit");
    write(&p.guest_dir, "extra", "guest only");
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(read(&p.guest_dir, "f"), b"host");
    let saved: Vec<Vec<u8>> = p.guest_trash().into_iter().map(|(_, d)| d).collect();
    assert!(
        saved.contains(&b"guest edit".to_vec()) && saved.contains(&b"guest only".to_vec()),
        "{saved:?}"
    );
}

#[tokio::test]
async fn type_changes_propagate() {
    let mut p = pair();
    write(&p.host_dir, "x", "file");
    write(&p.host_dir, "d/child", "c");
    p.sync().await;
    std::fs::remove_file(p.host_dir.join("x")).unwrap();
    write(&p.host_dir, "x/inner", "now a dir");
    std::fs::remove_dir_all(p.host_dir.join("d")).unwrap();
    write(&p.host_dir, "d", "now a file");
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[tokio::test]
async fn a_path_a_scan_cannot_read_is_frozen_not_deleted() {
    let mut p = pair();
    write(&p.host_dir, "x", "host data");
    write(&p.host_dir, "y", "other");
    p.sync().await;
    // The guest's x becomes a FIFO: the guest scan cannot report it as a file. That must not
    // read as "deleted on the guest".
    std::fs::remove_file(p.guest_dir.join("x")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.guest_dir.join("x").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    p.sync().await;
    assert_eq!(read(&p.host_dir, "x"), b"host data");
    assert!(p
        .status()
        .problems
        .iter()
        .any(|q| q.path == "x" && q.side == "guest"));
    // Once the FIFO is gone the ordinary rules apply again: the guest deleted x.
    std::fs::remove_file(p.guest_dir.join("x")).unwrap();
    p.sync().await;
    assert!(!p.host_dir.join("x").exists());
}

/// A compromised guest that serves bytes other than the chunk ids it listed: nothing it sent
/// may land on the host, and the host's existing data stays as it was.
/// A destination asking, in its answers to `stage`, for chunks no file of the batch holds (the
/// content of a host file it is not being sent, of a file outside the share): the host reads
/// and sends only chunks of the manifests it is transferring, so none of that content ever
/// crosses, and the batch's own files land.
#[tokio::test]
async fn a_guest_asking_for_chunks_it_is_not_being_sent_gets_none_of_them() {
    use vmsync_core::endpoint::{MissingChunk, NotStaged};
    use vmsync_core::Hash;
    use vmsync_tests::intercept::{Hooks, Intercept};
    struct Greedy {
        foreign: Vec<Hash>,
        supplied: Vec<Hash>,
    }
    impl Hooks for Greedy {
        fn restage(
            &mut self,
            answers: Vec<Result<Vec<MissingChunk>, NotStaged>>,
        ) -> Vec<Result<Vec<MissingChunk>, NotStaged>> {
            answers
                .into_iter()
                .map(|a| {
                    a.map(|mut missing| {
                        missing.extend(
                            self.foreign
                                .iter()
                                .map(|&hash| MissingChunk { hash, base: None }),
                        );
                        missing
                    })
                })
                .collect()
        }
        fn supply(&mut self, chunks: &[(Hash, ChunkData)]) {
            self.supplied.extend(chunks.iter().map(|(h, _)| *h));
        }
    }
    let mut p = pair();
    let private = b"the host's private notes, already in sync".to_vec();
    write(&p.host_dir, "private.txt", &private);
    p.sync().await;
    let out = p.tmp.path().join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    let secret = b"a host file outside every share".to_vec();
    write(&out, "secret.txt", &secret);
    // Small files are one chunk each: their chunk ids are their BLAKE3 hashes.
    let foreign = vec![
        Hash(*blake3::hash(&private).as_bytes()),
        Hash(*blake3::hash(&secret).as_bytes()),
    ];
    write(&p.host_dir, "new.txt", "the one file this cycle sends");
    let sides = p.sides();
    let mut greedy = Intercept {
        inner: sides.guest.inner.clone(),
        hooks: Greedy {
            foreign: foreign.clone(),
            supplied: Vec::new(),
        },
    };
    sides
        .controller
        .cycle(
            &mut sides.host,
            &mut greedy,
            vmsync_core::endpoint::ScanScope::Full,
        )
        .await
        .unwrap();
    let supplied = &greedy.hooks.supplied;
    assert!(!supplied.is_empty(), "nothing was supplied at all");
    assert!(
        foreign.iter().all(|h| !supplied.contains(h)),
        "foreign content crossed: {supplied:?}"
    );
    assert_eq!(
        read(&p.guest_dir, "new.txt"),
        b"the one file this cycle sends"
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[tokio::test]
async fn a_guest_serving_forged_chunk_data_gets_nothing_written() {
    use vmsync_tests::intercept::{Hooks, Intercept};
    /// Chunks of the right lengths and the wrong bytes; deltas that rebuild something else.
    struct Forger;
    impl Hooks for Forger {
        fn chunks_read(&mut self, chunks: Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>> {
            chunks
                .into_iter()
                .map(|d| d.map(|d| vec![0x41; d.len()]))
                .collect()
        }
        fn deltas_read(&mut self, chunks: Vec<Option<ChunkData>>) -> Vec<Option<ChunkData>> {
            chunks
                .into_iter()
                .map(|d| {
                    d.map(|d| match d {
                        ChunkData::Whole(d) => ChunkData::Whole(vec![0x41; d.len()]),
                        ChunkData::Delta(mut d) => {
                            if let Some(b) = d.last_mut() {
                                *b ^= 0x41;
                            }
                            ChunkData::Delta(d)
                        }
                    })
                })
                .collect()
        }
    }

    let mut p = pair();
    write(&p.host_dir, "keep.txt", "host data");
    p.sync().await;
    write(
        &p.guest_dir,
        "keep.txt",
        "guest edit the forger will corrupt",
    );
    write(&p.guest_dir, "new.bin", random_bytes(6, 100_000));
    let sides = p.sides();
    let mut forger = Intercept {
        inner: sides.guest.inner.clone(),
        hooks: Forger,
    };
    let result = sides
        .controller
        .cycle(
            &mut sides.host,
            &mut forger,
            vmsync_core::endpoint::ScanScope::Full,
        )
        .await;
    assert!(result.is_err(), "forged chunks were accepted: {result:?}");
    assert_eq!(read(&p.host_dir, "keep.txt"), b"host data");
    assert!(!p.host_dir.join("new.bin").exists());
    // An honest guest afterwards syncs normally.
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// Regression (live bug A): the hint for a renamed directory's old name can be handled before
/// the one for its new name. That partial cycle looks like a mass deletion; it must lead to a
/// full look, never a halt.
#[tokio::test]
async fn a_targeted_cycle_never_halts_a_move_that_it_sees_only_half_of() {
    let mut p = pair();
    for i in 0..300 {
        write(&p.host_dir, &format!("lib/module/f{i}"), format!("{i}"));
    }
    write(&p.host_dir, "other", "x");
    p.sync().await;
    let before = tree(&p.host_dir);
    std::fs::rename(
        p.guest_dir.join("lib/module"),
        p.guest_dir.join("lib/renamed"),
    )
    .unwrap();
    let old_name_only =
        vmsync_core::endpoint::ScanScope::Paths(vec![vmsync_core::RelPath::from_bytes(
            b"lib/module",
        )
        .unwrap()]);
    let sides = p.sides();
    let report = sides
        .controller
        .cycle(&mut sides.host, &mut sides.guest, old_name_only)
        .await
        .unwrap();
    assert!(!report.halted && report.retry, "{report:?}");
    assert_eq!(
        tree(&p.host_dir),
        before,
        "nothing may change on the partial view"
    );
    let report = p.sync().await;
    assert!(!report.halted, "{report:?}");
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

fn paths(list: &[&str]) -> vmsync_core::endpoint::ScanScope {
    vmsync_core::endpoint::ScanScope::Paths(
        list.iter()
            .map(|p| vmsync_core::RelPath::from_bytes(p.as_bytes()).unwrap())
            .collect(),
    )
}

/// In a live (targeted) cycle a big new file does not hold up the small ones
/// hinted with it: they land in that cycle, the big one in bulk steps afterwards, and a cycle
/// that runs in between leaves the file in flight alone.
#[tokio::test]
async fn a_live_cycle_lands_small_files_first_and_finishes_a_big_one_in_bulk_steps() {
    let mut p = pair();
    p.sync().await;
    let big = random_bytes(7, 20 << 20);
    write(&p.host_dir, "big.bin", &big);
    for i in 0..10 {
        write(&p.host_dir, &format!("small/{i}.txt"), format!("small {i}"));
    }
    let sides = p.sides();
    let report = sides
        .controller
        .cycle(
            &mut sides.host,
            &mut sides.guest,
            paths(&["big.bin", "small"]),
        )
        .await
        .unwrap();
    assert!(!report.halted, "{report:?}");
    for i in 0..10 {
        assert_eq!(
            read(&p.guest_dir, &format!("small/{i}.txt")),
            format!("small {i}").as_bytes()
        );
    }
    assert!(
        !p.guest_dir.join("big.bin").exists(),
        "the big file is still crossing"
    );
    let sides = p.sides();
    assert!(sides.controller.has_bulk());
    assert_eq!(
        p.status().state,
        vmsync_engine::status::ShareState::Syncing,
        "not in sync while a bulk transfer is pending"
    );

    // One bulk step moves a bounded part (at most 64 chunks), then a live cycle of another
    // path runs and also one that names the big file: it is frozen, nothing is restaged.
    let sides = p.sides();
    sides
        .controller
        .bulk_step(&mut sides.host, &mut sides.guest)
        .await
        .unwrap();
    let after_one_step = p.host_counters.served();
    assert!(
        after_one_step > 0 && after_one_step <= 64 * 64 * 1024,
        "{after_one_step}"
    );
    write(&p.host_dir, "during.txt", "edited during the bulk transfer");
    let sides = p.sides();
    sides
        .controller
        .cycle(
            &mut sides.host,
            &mut sides.guest,
            paths(&["during.txt", "big.bin"]),
        )
        .await
        .unwrap();
    assert_eq!(
        read(&p.guest_dir, "during.txt"),
        b"edited during the bulk transfer"
    );
    assert!(!p.guest_dir.join("big.bin").exists());

    let mut steps = 0;
    while p.sides().controller.has_bulk() {
        let sides = p.sides();
        sides
            .controller
            .bulk_step(&mut sides.host, &mut sides.guest)
            .await
            .unwrap();
        steps += 1;
        assert!(steps < 10_000, "bulk transfer does not finish");
    }
    assert!(steps > 2, "the transfer took {steps} steps: not split");
    assert_eq!(read(&p.guest_dir, "big.bin"), big);
    let sides = p.sides();
    let rehint = sides.controller.take_rehints();
    assert_eq!(
        rehint,
        vec![vmsync_core::RelPath::from_bytes(b"big.bin").unwrap()]
    );
    // Only the new data crossed, once; and the ancestor knows the file: a full cycle after it
    // moves nothing.
    let served = p.host_counters.served();
    assert!(
        served >= big.len() as u64 && served < big.len() as u64 + (1 << 20),
        "{served}"
    );
    p.host_counters.reset();
    let report = p.sync().await;
    assert_eq!(report.applied, 0, "{report:?}");
    assert_eq!(p.host_counters.served(), 0);
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// A full cycle while a bulk transfer is in flight takes the file over (both sides drop their
/// staged files at a full scan) and lands it itself.
#[tokio::test]
async fn a_full_cycle_takes_over_a_bulk_transfer_in_flight() {
    let mut p = pair();
    p.sync().await;
    let big = random_bytes(8, 12 << 20);
    write(&p.guest_dir, "out/big.bin", &big);
    let sides = p.sides();
    sides
        .controller
        .cycle(&mut sides.host, &mut sides.guest, paths(&["out"]))
        .await
        .unwrap();
    let sides = p.sides();
    assert!(sides.controller.has_bulk());
    sides
        .controller
        .bulk_step(&mut sides.host, &mut sides.guest)
        .await
        .unwrap();
    let report = p.sync().await;
    assert!(!p.sides().controller.has_bulk());
    assert!(!report.halted, "{report:?}");
    assert_eq!(read(&p.host_dir, "out/big.bin"), big);
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(p.status().state, vmsync_engine::status::ShareState::InSync);
}

/// The source changes while its bulk transfer runs: nothing torn lands, and the next cycle
/// (the path is hinted again) sends the new version.
#[tokio::test]
async fn a_bulk_transfer_whose_source_changes_lands_nothing_torn() {
    let mut p = pair();
    p.sync().await;
    write(&p.host_dir, "big.bin", random_bytes(9, 10 << 20));
    let sides = p.sides();
    sides
        .controller
        .cycle(&mut sides.host, &mut sides.guest, paths(&["big.bin"]))
        .await
        .unwrap();
    let newer = random_bytes(10, 11 << 20);
    write(&p.host_dir, "big.bin", &newer);
    let mut steps = 0;
    while p.sides().controller.has_bulk() {
        let sides = p.sides();
        sides
            .controller
            .bulk_step(&mut sides.host, &mut sides.guest)
            .await
            .unwrap();
        steps += 1;
        assert!(steps < 10_000);
    }
    assert!(
        !p.guest_dir.join("big.bin").exists(),
        "a torn or stale file landed"
    );
    let sides = p.sides();
    let rehint = sides.controller.take_rehints();
    let scope = vmsync_core::endpoint::ScanScope::Paths(rehint);
    sides
        .controller
        .cycle(&mut sides.host, &mut sides.guest, scope)
        .await
        .unwrap();
    while p.sides().controller.has_bulk() {
        let sides = p.sides();
        sides
            .controller
            .bulk_step(&mut sides.host, &mut sides.guest)
            .await
            .unwrap();
    }
    assert_eq!(read(&p.guest_dir, "big.bin"), newer);
}

/// 200 files (text and random, 8-40 KiB) each get 256 random bytes in place. Returns
/// the file names and what sending every changed chunk whole would cost (raw bytes).
fn patch_200_files(p: &Pair, from_host: bool) -> (Vec<String>, u64) {
    let root = if from_host { &p.host_dir } else { &p.guest_dir };
    let mut names = Vec::new();
    for i in 0..200u64 {
        let name = format!("d{}/f{i}.dat", i % 7);
        let len = 8 * 1024 + (i as usize * 7919) % (32 * 1024);
        let data = if i % 2 == 0 {
            text_bytes(100 + i, len)
        } else {
            random_bytes(100 + i, len)
        };
        write(root, &name, &data);
        names.push(name);
    }
    (names, 0)
}

/// Runs the patch scenario in one direction; returns (bytes with deltas, whole-chunk bytes).
async fn two_hundred_patches(from_host: bool) -> (u64, u64) {
    let mut p = pair();
    let (names, _) = patch_200_files(&p, from_host);
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let root = if from_host {
        p.host_dir.clone()
    } else {
        p.guest_dir.clone()
    };
    let mut whole = 0;
    for (i, name) in names.iter().enumerate() {
        let before = read(&root, name);
        patch_in_place(&root, name, 1000 + i as u64, (i * 4099) % before.len());
        whole += changed_chunk_bytes(&before, &read(&root, name));
    }
    p.host_counters.reset();
    p.guest_counters.reset();
    let report = p.sync().await;
    assert_eq!(report.applied, 200, "{report:?}");
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let (dst, src) = if from_host {
        (&p.guest_counters, &p.host_counters)
    } else {
        (&p.host_counters, &p.guest_counters)
    };
    assert_eq!(dst.supplied(), src.served());
    assert!(
        dst.deltas() >= 190,
        "only {} chunks crossed as deltas",
        dst.deltas()
    );
    let sent = dst.supplied() + dst.signatures();
    eprintln!(
        "200 patches {}: deltas {} B + signatures {} B = {sent} B; whole chunks {whole} B",
        if from_host {
            "host -> guest"
        } else {
            "guest -> host"
        },
        dst.supplied(),
        dst.signatures()
    );
    (sent, whole)
}

/// In-process: 256-byte patches in 200 files cross as deltas against the old file, a
/// small fraction of the whole chunks they touch, in both directions.
#[tokio::test]
async fn two_hundred_small_patches_cross_as_deltas_both_ways() {
    for from_host in [true, false] {
        let (sent, whole) = two_hundred_patches(from_host).await;
        assert!(
            sent * 6 < whole,
            "{sent} bytes with deltas vs {whole} bytes of whole chunks"
        );
    }
}

/// Hooks that run `hook` on every `supply` (before it passes on), to change the destination's
/// files between `stage` and `supply`; with `no_room`, the destination refuses to stage
/// anything, as one out of descriptors does.
struct Hooked<F> {
    hook: F,
    no_room: bool,
}

impl<F> vmsync_tests::intercept::Hooks for Hooked<F>
where
    F: FnMut(&[(vmsync_core::Hash, ChunkData)]) + Send,
{
    fn stage(
        &mut self,
        files: &[vmsync_core::endpoint::StageRequest],
    ) -> Option<
        Vec<Result<Vec<vmsync_core::endpoint::MissingChunk>, vmsync_core::endpoint::NotStaged>>,
    > {
        self.no_room.then(|| {
            files
                .iter()
                .map(|_| Err(vmsync_core::endpoint::NotStaged::NoRoom))
                .collect()
        })
    }
    fn supply(&mut self, chunks: &[(vmsync_core::Hash, ChunkData)]) {
        (self.hook)(chunks);
    }
}

/// The base a delta was made against changes on the destination between `stage` and `supply`
/// (someone rewrites the guest's copy): the delta no longer rebuilds its chunk, the chunk comes
/// again whole, and the mirror ends up with the host's content.
#[tokio::test]
async fn a_base_that_changes_between_stage_and_supply_still_converges() {
    let mut p = Pair::new(PairOptions {
        mode: SyncMode::HostToGuest,
        ..PairOptions::default()
    });
    let old = text_bytes(1, 40_000);
    write(&p.host_dir, "doc.txt", &old);
    p.sync().await;
    patch_in_place(&p.host_dir, "doc.txt", 2, 20_000);
    let guest_dir = p.guest_dir.clone();
    let sides = p.sides();
    let mut meddled = 0;
    let mut guest = vmsync_tests::intercept::Intercept {
        inner: sides.guest.inner.clone(),
        hooks: Hooked {
            hook: |chunks: &[(vmsync_core::Hash, ChunkData)]| {
                if meddled == 0 && chunks.iter().any(|(_, d)| matches!(d, ChunkData::Delta(_))) {
                    // Same size, other bytes: the base window now holds something else.
                    write(&guest_dir, "doc.txt", text_bytes(3, 40_000));
                    meddled += 1;
                }
            },
            no_room: false,
        },
    };
    sides
        .controller
        .cycle(
            &mut sides.host,
            &mut guest,
            vmsync_core::endpoint::ScanScope::Full,
        )
        .await
        .unwrap();
    drop(guest);
    assert_eq!(meddled, 1, "no delta was supplied");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "doc.txt"), read(&p.host_dir, "doc.txt"));
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// A source whose deltas do not rebuild their chunks (a bug, a checksum collision, a hostile
/// peer): the destination refuses each, and the same cycle sends those chunks whole.
#[tokio::test]
async fn deltas_that_do_not_rebuild_their_chunk_fall_back_to_whole_chunks() {
    use vmsync_tests::intercept::{Hooks, Intercept};
    /// Deltas with a literal byte flipped: well-formed, they rebuild the wrong bytes.
    struct Garbling;
    impl Hooks for Garbling {
        fn deltas_read(&mut self, chunks: Vec<Option<ChunkData>>) -> Vec<Option<ChunkData>> {
            chunks
                .into_iter()
                .map(|d| {
                    d.map(|d| match d {
                        ChunkData::Delta(mut d) => {
                            let n = d.len();
                            d[n - 2] ^= 1;
                            ChunkData::Delta(d)
                        }
                        whole => whole,
                    })
                })
                .collect()
        }
    }

    let mut p = pair();
    for i in 0..5 {
        write(&p.host_dir, &format!("f{i}"), random_bytes(i, 30_000));
    }
    p.sync().await;
    for i in 0..5 {
        patch_in_place(&p.host_dir, &format!("f{i}"), 50 + i, 10_000);
    }
    p.guest_counters.reset();
    let sides = p.sides();
    let mut host = Intercept {
        inner: sides.host.inner.clone(),
        hooks: Garbling,
    };
    let report = sides
        .controller
        .cycle(
            &mut host,
            &mut sides.guest,
            vmsync_core::endpoint::ScanScope::Full,
        )
        .await
        .unwrap();
    assert_eq!(report.applied, 5, "{report:?}");
    assert!(!report.retry && report.pending == 0, "{report:?}");
    assert_same_tree(&p.host_dir, &p.guest_dir);
    // Every chunk went twice: a delta that failed, then whole.
    assert!(p.guest_counters.deltas() >= 5);
    assert!(p.guest_counters.supplied() > 5 * 16 * 1024);
}

/// A live cycle's bulk job (a big file with many scattered edits) sends deltas too.
#[tokio::test]
async fn a_bulk_job_sends_deltas() {
    let mut p = pair();
    let big = random_bytes(20, 24 << 20);
    write(&p.host_dir, "big.bin", &big);
    p.sync().await;
    // 800 patches 30 KiB apart: about 800 changed chunks, well over the bulk threshold.
    for i in 0..800 {
        patch_in_place(&p.host_dir, "big.bin", 3000 + i as u64, i * 30 * 1024 + 777);
    }
    let edited = read(&p.host_dir, "big.bin");
    let whole = changed_chunk_bytes(&big, &edited);
    assert!(
        whole >= vmsync_engine::controller::BULK_MIN_BYTES,
        "{whole}"
    );
    p.guest_counters.reset();
    let sides = p.sides();
    sides
        .controller
        .cycle(&mut sides.host, &mut sides.guest, paths(&["big.bin"]))
        .await
        .unwrap();
    assert!(p.sides().controller.has_bulk(), "not deferred to bulk");
    let mut steps = 0;
    while p.sides().controller.has_bulk() {
        let sides = p.sides();
        sides
            .controller
            .bulk_step(&mut sides.host, &mut sides.guest)
            .await
            .unwrap();
        steps += 1;
        assert!(steps < 10_000);
    }
    assert_eq!(read(&p.guest_dir, "big.bin"), edited);
    let sent = p.guest_counters.supplied() + p.guest_counters.signatures();
    eprintln!("bulk: {sent} B with deltas for {whole} B of changed chunks");
    assert!(sent * 5 < whole, "{sent} vs {whole}");
}

/// A side's own writes (a cycle's transition) are not hinted back to the controller: they
/// would only cost a rescan round trip. Someone else's write right after still is. That
/// includes the time the transition put back on the directory: a hint for a directory stands
/// for everything beneath it, so one such echo made the next cycle rescan the whole directory
/// (the kernel reports a change of the mtime alone as a content change, of both times as an
/// attribute change, which is what the echo suppression knows).
#[tokio::test]
async fn a_sides_own_writes_are_not_hinted_back_but_others_writes_are() {
    use std::time::Duration;
    use vmsync_core::endpoint::Endpoint;
    let mut p = pair();
    write(&p.host_dir, "a/keep.txt", "v1");
    write(&p.host_dir, "a/gone.txt", "bye");
    p.sync().await;
    let mut guest = p.sides().guest.inner.clone();
    // The first call starts the watch and asks for a rescan of everything.
    assert!(guest.changes().await.unwrap().rescan);
    write(
        &p.host_dir,
        "a/keep.txt",
        "v2, written on the guest by the cycle",
    );
    write(&p.host_dir, "a/new.txt", "new");
    std::fs::remove_file(p.host_dir.join("a/gone.txt")).unwrap();
    let report = p.sync().await;
    // The three files, and the time of the directory they are in.
    assert_eq!(report.applied, 4, "{report:?}");
    loop {
        let Ok(hints) = tokio::time::timeout(Duration::from_millis(500), guest.changes()).await
        else {
            break;
        };
        let hints = hints.unwrap();
        assert!(
            !hints.rescan && hints.paths.is_empty(),
            "own writes were hinted: {hints:?}"
        );
    }
    // An edit by someone else, of a path the cycle wrote, gets through.
    write(&p.guest_dir, "a/new.txt", "edited in the guest");
    let hints = tokio::time::timeout(Duration::from_secs(10), guest.changes())
        .await
        .expect("a hint for the guest's own edit")
        .unwrap();
    let edited = vmsync_core::RelPath::from_bytes(b"a/new.txt").unwrap();
    assert!(
        hints.rescan
            || hints
                .paths
                .iter()
                .any(|p| *p == edited || p.is_ancestor_of(&edited)),
        "{hints:?}"
    );
}

/// A destination that never has room to stage (its staged files are at its descriptor cap and
/// nothing this cycle could free them): the cycle gives those files up and ends, it does not
/// spin asking again; what it could do (directories) is done, and the next cycle, with room,
/// brings the files.
#[tokio::test]
async fn a_destination_with_no_room_to_stage_ends_the_cycle_with_files_pending() {
    let mut p = pair();
    for i in 0..300 {
        write(
            &p.host_dir,
            &format!("d{}/f{i}.txt", i % 7),
            format!("{i}\n"),
        );
    }
    let sides = p.sides();
    let mut guest = vmsync_tests::intercept::Intercept {
        inner: sides.guest.inner.clone(),
        hooks: Hooked {
            hook: |_: &[(vmsync_core::Hash, ChunkData)]| {},
            no_room: true,
        },
    };
    let cycle = sides.controller.cycle(
        &mut sides.host,
        &mut guest,
        vmsync_core::endpoint::ScanScope::Full,
    );
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), cycle)
        .await
        .expect("the cycle ended")
        .unwrap();
    drop(guest);
    assert_eq!(report.pending, 300, "{report:?}");
    assert!(p.guest_dir.join("d6").is_dir(), "directories were made");
    assert!(!p.guest_dir.join("d0/f0.txt").exists());
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// The guest notes the next generation before the host records a new ancestor; when it
/// cannot, the host records nothing, and the next cycle finds both sides agreeing instead of
/// taking the guest for one that went back in time.
#[tokio::test]
async fn a_cycle_whose_generation_note_fails_records_nothing() {
    let mut p = Pair::new(PairOptions::default());
    write(&p.host_dir, "a", "first");
    p.sync().await;
    let generation = || std::fs::read(p.guest_dir.join(".vmsync/generation")).unwrap();
    assert_eq!(generation(), b"1\n");
    p.guest_counters
        .refuse_marks
        .store(true, std::sync::atomic::Ordering::Relaxed);
    write(&p.host_dir, "b", "second");
    let s = p.sides();
    let failed = s
        .controller
        .cycle(
            &mut s.host,
            &mut s.guest,
            vmsync_core::endpoint::ScanScope::Full,
        )
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        read(&p.guest_dir, "b"),
        b"second",
        "the transfer itself went through"
    );
    assert_eq!(
        std::fs::read(p.guest_dir.join(".vmsync/generation")).unwrap(),
        b"1\n"
    );
    p.guest_counters
        .refuse_marks
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let report = p.sync().await;
    assert!(!report.halted, "{report:?}");
    assert_eq!(p.status().halt_code, None);
    assert_eq!(
        std::fs::read(p.guest_dir.join(".vmsync/generation")).unwrap(),
        b"2\n"
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
}
