//! What a changed file costs on the destination's disk: zero runs stay holes (block counts), a
//! file that only grew is appended in place (same inode, readers see it grow), a small change
//! to a big file leaves the replaced version byte for byte in the trash, and a version that
//! rewrote bytes is never written in place. In-process pairs over real directories, and the
//! real agents for a log written line by line.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;
use vmsync_tests::agents::Agents;
use vmsync_tests::fixture::{
    assert_same_tree, random_bytes, read, text_bytes, write, Pair, PairOptions,
};

const MIB: u64 = 1 << 20;

fn pair() -> Pair {
    Pair::new(PairOptions::default())
}

fn ino(root: &Path, rel: &str) -> u64 {
    std::fs::metadata(root.join(rel)).unwrap().ino()
}

/// Bytes the file's blocks take on disk (`st_blocks` × 512).
fn allocated(root: &Path, rel: &str) -> u64 {
    std::fs::metadata(root.join(rel)).unwrap().blocks() * 512
}

fn append(root: &Path, rel: &str, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join(rel))
        .unwrap();
    f.write_all(data).unwrap();
}

/// A sparse file: `size` bytes, data only at each (offset, bytes).
fn write_sparse(root: &Path, rel: &str, size: u64, pieces: &[(u64, &[u8])]) {
    let f = std::fs::File::create(root.join(rel)).unwrap();
    f.set_len(size).unwrap();
    for (offset, data) in pieces {
        f.write_all_at(data, *offset).unwrap();
    }
}

#[tokio::test]
async fn a_file_that_only_grew_is_appended_in_place_on_the_other_side() {
    let mut p = pair();
    let mut log = text_bytes(1, 300_000);
    write(&p.host_dir, "app.log", &log);
    p.sync().await;
    let inode = ino(&p.guest_dir, "app.log");
    for round in 0..5u64 {
        let more = text_bytes(100 + round, 5_000 + 3_000 * round as usize);
        append(&p.host_dir, "app.log", &more);
        log.extend_from_slice(&more);
        p.guest_counters.reset();
        p.sync().await;
        assert_eq!(read(&p.guest_dir, "app.log"), log, "round {round}");
        assert_eq!(
            ino(&p.guest_dir, "app.log"),
            inode,
            "round {round}: same inode"
        );
        // About the appended bytes crossed (plus the old last chunk, cut by the old end).
        let supplied = p.guest_counters.supplied();
        assert!(
            supplied <= more.len() as u64 + 64 * 1024,
            "round {round}: {supplied} bytes supplied for {} appended",
            more.len()
        );
    }
    // Nothing was overwritten, so nothing was kept.
    assert!(p.guest_trash().is_empty());
    assert_same_tree(&p.host_dir, &p.guest_dir);

    // The other way too.
    let inode = ino(&p.host_dir, "app.log");
    let more = text_bytes(7, 20_000);
    append(&p.guest_dir, "app.log", &more);
    log.extend_from_slice(&more);
    p.sync().await;
    assert_eq!(read(&p.host_dir, "app.log"), log);
    assert_eq!(ino(&p.host_dir, "app.log"), inode);
    assert!(p.host_trash().is_empty());
}

/// A file of the share hard-linked to a file outside it only grew on the other side: the
/// append in place would write through the link, so the grown version lands on a new inode
/// instead, and the outside name keeps its inode and content.
#[tokio::test]
async fn a_grown_file_hard_linked_outside_the_share_is_replaced_not_appended_through() {
    let mut p = pair();
    let out = p.tmp.path().join("OUT");
    std::fs::create_dir_all(&out).unwrap();
    let log = text_bytes(7, 100_000);
    write(&p.host_dir, "app.log", &log);
    p.sync().await;
    std::fs::hard_link(p.host_dir.join("app.log"), out.join("app.log")).unwrap();
    let outside_ino = std::fs::metadata(out.join("app.log")).unwrap().ino();
    let more = text_bytes(8, 20_000);
    append(&p.guest_dir, "app.log", &more);
    p.sync().await;
    let mut grown = log.clone();
    grown.extend_from_slice(&more);
    assert!(
        read(&p.host_dir, "app.log") == grown,
        "the grown version landed"
    );
    assert_ne!(
        ino(&p.host_dir, "app.log"),
        outside_ino,
        "written through the link"
    );
    assert!(
        std::fs::read(out.join("app.log")).unwrap() == log,
        "the outside name's content changed"
    );
    assert_eq!(
        std::fs::metadata(out.join("app.log")).unwrap().ino(),
        outside_ino
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[tokio::test]
async fn an_empty_file_that_grows_is_appended_in_place() {
    let mut p = pair();
    write(&p.host_dir, "empty.log", b"");
    p.sync().await;
    let inode = ino(&p.guest_dir, "empty.log");
    write(&p.host_dir, "empty.log", b"first line\n");
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "empty.log"), b"first line\n");
    assert_eq!(ino(&p.guest_dir, "empty.log"), inode);
}

#[tokio::test]
async fn a_grown_file_whose_last_bytes_changed_replaces_it_and_keeps_the_old_one() {
    let mut p = pair();
    let old = text_bytes(2, 200_000);
    write(&p.host_dir, "f.txt", &old);
    p.sync().await;
    let inode = ino(&p.guest_dir, "f.txt");
    // The last byte rewritten and more added: longer, but the old content is no prefix.
    let mut new = old.clone();
    *new.last_mut().unwrap() ^= 0x55;
    new.extend_from_slice(&text_bytes(3, 10_000));
    write(&p.host_dir, "f.txt", &new);
    p.sync().await;
    assert_eq!(read(&p.guest_dir, "f.txt"), new);
    assert_ne!(
        ino(&p.guest_dir, "f.txt"),
        inode,
        "rewritten bytes: not in place"
    );
    let kept = p.guest_trash();
    assert_eq!(
        kept.len(),
        1,
        "{:?}",
        kept.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
    assert_eq!(
        kept[0].1, old,
        "the trash holds the old version byte for byte"
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[tokio::test]
async fn a_file_edited_on_the_destination_before_the_append_lands_is_a_conflict_not_appended() {
    let mut p = pair();
    let old = text_bytes(4, 100_000);
    write(&p.host_dir, "c.log", &old);
    p.sync().await;
    append(&p.host_dir, "c.log", b"host line\n");
    append(&p.guest_dir, "c.log", b"guest line\n");
    p.sync().await;
    let mut host = old.clone();
    host.extend_from_slice(b"host line\n");
    let mut guest = old;
    guest.extend_from_slice(b"guest line\n");
    assert_eq!(read(&p.host_dir, "c.log"), host);
    assert_eq!(read(&p.guest_dir, "c.log"), guest);
    assert_eq!(p.status().conflicts.len(), 1);
}

#[tokio::test]
async fn a_sparse_file_stays_sparse_and_a_small_write_into_it_keeps_the_old_version() {
    let mut p = pair();
    let size = 256 * MIB;
    let a = random_bytes(10, MIB as usize);
    write_sparse(&p.host_dir, "disk.img", size, &[(10 * MIB, &a)]);
    p.sync().await;
    let guest = p.guest_dir.clone();
    assert_eq!(
        std::fs::metadata(guest.join("disk.img")).unwrap().len(),
        size
    );
    let used = allocated(&guest, "disk.img");
    assert!(used <= 2 * MIB, "{used} bytes allocated for 1 MiB of data");
    let first = read(&guest, "disk.img");
    assert_eq!(first, read(&p.host_dir, "disk.img"));

    // 1 MiB written into a hole.
    let b = random_bytes(11, MIB as usize);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.host_dir.join("disk.img"))
        .unwrap();
    f.write_all_at(&b, 100 * MIB).unwrap();
    drop(f);
    p.guest_counters.reset();
    p.sync().await;
    assert_eq!(read(&guest, "disk.img"), read(&p.host_dir, "disk.img"));
    let used = allocated(&guest, "disk.img");
    assert!(used <= 3 * MIB, "{used} bytes allocated for 2 MiB of data");
    let supplied = p.guest_counters.supplied();
    assert!(supplied <= MIB + 128 * 1024, "{supplied} bytes supplied");
    // The replaced version is in the trash, byte for byte, and sparse too.
    let kept = p.guest_trash();
    assert_eq!(kept.len(), 1);
    assert!(
        kept[0].1 == first,
        "the trash holds the old version byte for byte"
    );
}

#[tokio::test]
async fn a_small_change_to_a_big_file_lands_and_the_trash_keeps_the_old_content() {
    // On a filesystem with reflinks the temp is a clone of the old file: the old inode, kept
    // in the trash, must still hold the old bytes after the temp's chunks are rewritten.
    let mut p = pair();
    let old = random_bytes(20, 8 * MIB as usize);
    write(&p.host_dir, "big.bin", &old);
    p.sync().await;
    let mut new = old.clone();
    new[3 * MIB as usize..3 * MIB as usize + 100_000].copy_from_slice(&random_bytes(21, 100_000));
    // A zero run where data was: a hole in the new version.
    new[6 * MIB as usize..7 * MIB as usize].fill(0);
    write(&p.host_dir, "big.bin", &new);
    p.sync().await;
    assert!(read(&p.guest_dir, "big.bin") == new);
    let kept = p.guest_trash();
    assert_eq!(kept.len(), 1);
    assert!(
        kept[0].1 == old,
        "the trash holds the old version byte for byte"
    );
    // The zero run is a hole (a few KiB of its edges ride in chunks shared with data). Asked
    // with SEEK_HOLE/SEEK_DATA rather than st_blocks: XFS counts its copy-on-write
    // reservations there for a while after writes into a clone.
    let f = std::fs::File::open(p.guest_dir.join("big.bin")).unwrap();
    let probe = 6 * MIB + 128 * 1024;
    let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(probe)).unwrap();
    assert_eq!(hole, probe, "no hole inside the zero run");
    let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(probe)).unwrap();
    assert!(
        data >= 7 * MIB - 128 * 1024,
        "data at {data}, inside the zero run"
    );
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

#[test]
fn a_log_written_line_by_line_grows_on_one_inode_in_the_guest_and_its_last_line_lands() {
    let mut a = Agents::new("");
    write(&a.host_dir, "app.log", "start\n");
    a.start();
    a.wait_in_sync();
    let inode = ino(&a.guest_dir, "app.log");
    let mut log = b"start\n".to_vec();
    // Many more writes than the pacing lets cycles through: each path is held, not dropped.
    for i in 0..2_000 {
        let line = format!("{i:05} {}\n", "x".repeat(60));
        append(&a.host_dir, "app.log", line.as_bytes());
        log.extend_from_slice(line.as_bytes());
    }
    a.converge(Duration::from_secs(60));
    assert_eq!(a.wait(30), 0);
    assert!(read(&a.guest_dir, "app.log") == log, "the last line landed");
    assert_eq!(ino(&a.guest_dir, "app.log"), inode, "appended in place");
    assert!(
        a.guest_trash().is_empty(),
        "nothing overwritten, nothing kept"
    );
    assert_eq!(a.share()["state"], "in-sync");
}
