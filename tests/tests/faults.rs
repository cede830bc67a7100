//! Filesystem faults and full disks on a destination, end to end in one process (a real
//! `Controller` over two `LocalEndpoint`s): ENOSPC and EIO injected (the engine's `faults`
//! feature) at write, fsync, mkdir, rename and the batch's directory fsync, on the host and
//! on the guest; and the free-space reserve (`min_free`) pausing a share with `disk-full`.
//! See `docs/safety.md`, "Faults and full disks".

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rustix::io::Errno;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vmsync_core::reserve::MinFree;
use vmsync_core::RelPath;
use vmsync_engine::controller::DISK_FULL_CODE;
use vmsync_engine::faults::{self, FaultOp};
use vmsync_engine::status::ShareState;
use vmsync_tests::fixture::{assert_same_tree, random_bytes, read, tree, write, Node, Pair};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Host,
    Guest,
}

impl Dest {
    fn name(self) -> &'static str {
        match self {
            Dest::Host => "host",
            Dest::Guest => "guest",
        }
    }
}

/// (source, destination) directories of a pair for a destination side.
fn dirs(p: &Pair, dest: Dest) -> (PathBuf, PathBuf) {
    match dest {
        Dest::Host => (p.guest_dir.clone(), p.host_dir.clone()),
        Dest::Guest => (p.host_dir.clone(), p.guest_dir.clone()),
    }
}

fn rel(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

/// Everything in `.vmsync/tmp` of a share: must be empty once a cycle is over.
fn temps(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join(".vmsync/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn errno_words(errno: Errno) -> &'static str {
    if errno == Errno::NOSPC {
        "no space left on device"
    } else {
        "I/O error"
    }
}

/// The reason `status` gives for `path` on `side`, if it lists it.
fn problem(p: &mut Pair, path: &str, side: Dest) -> Option<String> {
    p.status()
        .problems
        .into_iter()
        .find(|v| v.path == path && v.side == side.name())
        .map(|v| v.reason)
}

/// The rest of a batch beside the faulted file: small files, a multi-chunk one, a directory.
fn write_others(src: &Path, seed: u64) {
    write(src, "o/1.txt", format!("one {seed}"));
    write(src, "o/2.bin", random_bytes(seed + 100, 150_000));
    write(src, "o/deep/3.txt", format!("three {seed}"));
    write(src, "top.txt", format!("top {seed}"));
}

/// A fault at `op` on a file the source changed: the change fails with a typed problem, its
/// temp is gone, the destination keeps its old version whole, the rest of the batch lands
/// byte for byte, and once the fault is gone a cycle brings the file.
async fn file_fault(dest: Dest, op: FaultOp, errno: Errno) {
    let mut p = Pair::new(Default::default());
    let (src, dst) = dirs(&p, dest);
    let old = random_bytes(1, 200_000);
    write(&src, "target.bin", &old);
    p.sync().await;
    assert_eq!(read(&dst, "target.bin"), old);

    let new = random_bytes(2, 200_000);
    write(&src, "target.bin", &new);
    write_others(&src, 7);
    faults::inject(&dst, op, &rel("target.bin"), errno).unwrap();
    let report = p.cycle().await;
    assert!(report.pending >= 1, "{report:?}");

    let reason = problem(&mut p, "target.bin", dest).expect("target.bin listed as a problem");
    let want = format!("{} failed: {}", op.as_str(), errno_words(errno));
    assert!(
        reason.starts_with(&want),
        "{reason:?} should start with {want:?}"
    );
    assert_eq!(p.status().state, ShareState::Syncing);
    assert_eq!(read(&dst, "target.bin"), old, "old version intact");
    assert_eq!(temps(&dst), Vec::<String>::new(), "no temp left over");
    // Everything else is exactly the source's; nothing else appeared anywhere.
    let mut want_tree = tree(&src);
    want_tree.insert(
        b"target.bin".to_vec(),
        Node::File {
            data: old.clone(),
            mode: 0o644,
        },
    );
    assert_trees(&want_tree, &tree(&dst));

    faults::clear(&dst).unwrap();
    let report = p.sync().await;
    assert_eq!(report.pending, 0, "{report:?}");
    assert_same_tree(&src, &dst);
    assert_eq!(read(&dst, "target.bin"), new);
    assert_eq!(p.status().state, ShareState::InSync);
    assert!(p.status().problems.is_empty(), "{:?}", p.status().problems);
    assert_eq!(temps(&dst), Vec::<String>::new());
}

fn assert_trees(want: &BTreeMap<Vec<u8>, Node>, got: &BTreeMap<Vec<u8>, Node>) {
    let keys = |t: &BTreeMap<Vec<u8>, Node>| -> Vec<String> {
        t.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    assert_eq!(keys(got), keys(want), "paths differ");
    for (k, node) in want {
        let g = got.get(k);
        // Permission bits of files follow the umask on the source; compare content and kind.
        match (node, g) {
            (Node::File { data: a, .. }, Some(Node::File { data: b, .. })) => {
                assert!(a == b, "{} differs", String::from_utf8_lossy(k))
            }
            (Node::Dir { .. }, Some(Node::Dir { .. })) => {}
            (a, b) => assert_eq!(Some(a), b, "{}", String::from_utf8_lossy(k)),
        }
    }
}

/// A fault at mkdir of a new directory: it and what it holds fail, the rest lands, and once
/// the fault is gone a cycle brings them.
async fn mkdir_fault(dest: Dest, errno: Errno) {
    let mut p = Pair::new(Default::default());
    let (src, dst) = dirs(&p, dest);
    write(&src, "keep.txt", "kept");
    p.sync().await;

    write(&src, "newdir/f.txt", "in the new directory");
    write(&src, "newdir/sub/g.bin", random_bytes(3, 90_000));
    write_others(&src, 9);
    faults::inject(&dst, FaultOp::Mkdir, &rel("newdir"), errno).unwrap();
    p.cycle().await;

    let reason = problem(&mut p, "newdir", dest).expect("newdir listed as a problem");
    let want = format!("mkdir failed: {}", errno_words(errno));
    assert!(
        reason.starts_with(&want),
        "{reason:?} should start with {want:?}"
    );
    assert!(!dst.join("newdir").exists());
    assert_eq!(temps(&dst), Vec::<String>::new(), "no temp left over");
    let mut want_tree = tree(&src);
    want_tree.retain(|k, _| !k.starts_with(b"newdir"));
    assert_trees(&want_tree, &tree(&dst));

    faults::clear(&dst).unwrap();
    let report = p.sync().await;
    assert_eq!(report.pending, 0, "{report:?}");
    assert_same_tree(&src, &dst);
    assert_eq!(p.status().state, ShareState::InSync);
    assert_eq!(temps(&dst), Vec::<String>::new());
}

macro_rules! file_fault_tests {
    ($($name:ident: $dest:expr, $op:expr, $errno:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            file_fault($dest, $op, $errno).await;
        }
    )*};
}

file_fault_tests! {
    host_write_enospc: Dest::Host, FaultOp::Write, Errno::NOSPC;
    host_write_eio: Dest::Host, FaultOp::Write, Errno::IO;
    host_fsync_enospc: Dest::Host, FaultOp::Fsync, Errno::NOSPC;
    host_fsync_eio: Dest::Host, FaultOp::Fsync, Errno::IO;
    host_rename_enospc: Dest::Host, FaultOp::Rename, Errno::NOSPC;
    host_rename_eio: Dest::Host, FaultOp::Rename, Errno::IO;
    guest_write_enospc: Dest::Guest, FaultOp::Write, Errno::NOSPC;
    guest_write_eio: Dest::Guest, FaultOp::Write, Errno::IO;
    guest_fsync_enospc: Dest::Guest, FaultOp::Fsync, Errno::NOSPC;
    guest_fsync_eio: Dest::Guest, FaultOp::Fsync, Errno::IO;
    guest_rename_enospc: Dest::Guest, FaultOp::Rename, Errno::NOSPC;
    guest_rename_eio: Dest::Guest, FaultOp::Rename, Errno::IO;
}

#[tokio::test]
async fn host_mkdir_enospc() {
    mkdir_fault(Dest::Host, Errno::NOSPC).await;
}

#[tokio::test]
async fn host_mkdir_eio() {
    mkdir_fault(Dest::Host, Errno::IO).await;
}

#[tokio::test]
async fn guest_mkdir_enospc() {
    mkdir_fault(Dest::Guest, Errno::NOSPC).await;
}

#[tokio::test]
async fn guest_mkdir_eio() {
    mkdir_fault(Dest::Guest, Errno::IO).await;
}

/// A new file (no old version) whose rename fails: nothing appears at its path, no temp is
/// left, and a later cycle creates it.
#[tokio::test]
async fn new_file_rename_eio_leaves_nothing_and_is_retried() {
    let mut p = Pair::new(Default::default());
    let (src, dst) = (p.host_dir.clone(), p.guest_dir.clone());
    write(&src, "fresh.bin", random_bytes(4, 70_000));
    write_others(&src, 1);
    faults::inject(&dst, FaultOp::Rename, &rel("fresh.bin"), Errno::IO).unwrap();
    p.cycle().await;
    let reason = problem(&mut p, "fresh.bin", Dest::Guest).expect("listed");
    assert!(reason.starts_with("rename failed: I/O error"), "{reason}");
    assert!(!dst.join("fresh.bin").exists());
    assert_eq!(temps(&dst), Vec::<String>::new());
    faults::clear(&dst).unwrap();
    p.sync().await;
    assert_same_tree(&src, &dst);
    assert_eq!(p.status().state, ShareState::InSync);
}

/// The directory fsync at the end of a transition batch fails: the files renamed into that
/// directory are complete but may not be durable, so they are not recorded and are listed as
/// problems; files elsewhere are recorded; once the fault is gone a cycle records the rest.
#[tokio::test]
async fn directory_fsync_failure_fails_only_that_directorys_changes() {
    for dest in [Dest::Host, Dest::Guest] {
        let mut p = Pair::new(Default::default());
        let (src, dst) = dirs(&p, dest);
        write(&src, "o/1.txt", "old one");
        p.sync().await;
        write_others(&src, 5);
        faults::inject(&dst, FaultOp::DirFsync, &rel("o"), Errno::IO).unwrap();
        p.cycle().await;
        let reason = problem(&mut p, "o/1.txt", dest).expect("o/1.txt listed");
        assert!(
            reason.starts_with("directory fsync failed: I/O error"),
            "{reason}"
        );
        assert!(problem(&mut p, "top.txt", dest).is_none());
        // Visible files are complete versions (the new ones: the renames happened).
        assert_eq!(read(&dst, "o/1.txt"), read(&src, "o/1.txt"));
        assert_eq!(read(&dst, "top.txt"), read(&src, "top.txt"));
        assert_eq!(temps(&dst), Vec::<String>::new());
        faults::clear(&dst).unwrap();
        let report = p.sync().await;
        assert_eq!(report.pending, 0, "{dest:?}: {report:?}");
        assert_same_tree(&src, &dst);
        assert_eq!(p.status().state, ShareState::InSync);
        assert!(p.status().problems.is_empty());
    }
}

/// A destination whose reserve is above its free space refuses to stage: the share pauses
/// with `disk-full` (free space and reserve in `status`), nothing is written on that side, and
/// the first cycle after the reserve is lowered goes ahead by itself.
#[tokio::test]
async fn min_free_above_free_space_pauses_with_disk_full_and_resumes_by_itself() {
    for dest in [Dest::Host, Dest::Guest] {
        let mut p = Pair::new(Default::default());
        let (src, dst) = dirs(&p, dest);
        write(&src, "a.txt", "first");
        p.sync().await;
        let before = tree(&dst);

        write(&src, "a.txt", "second");
        write_others(&src, 3);
        set_min_free(&mut p, dest, MinFree::Basis(10_000));
        let report = p.cycle().await;
        assert!(report.pending >= 1, "{report:?}");
        let status = p.status();
        assert_eq!(status.state, ShareState::Halted);
        assert_eq!(status.halt_code.as_deref(), Some(DISK_FULL_CODE));
        let reason = status.halt_reason.unwrap_or_default();
        assert!(
            reason.starts_with(&format!("{} share: ", dest.name())) && reason.contains("reserve"),
            "{reason}"
        );
        assert!(status.disk_reserve.is_some() && status.disk_free.is_some());
        assert_eq!(tree(&dst), before, "nothing written on the full side");
        assert_eq!(temps(&dst), Vec::<String>::new());
        // Still full: still paused, still nothing written.
        p.cycle().await;
        assert_eq!(p.status().halt_code.as_deref(), Some(DISK_FULL_CODE));
        assert_eq!(tree(&dst), before);

        set_min_free(&mut p, dest, MinFree::Bytes(0));
        let report = p.sync().await;
        assert_eq!(report.pending, 0, "{report:?}");
        assert_same_tree(&src, &dst);
        let status = p.status();
        assert_eq!(status.state, ShareState::InSync);
        assert_eq!(status.halt_code, None);
        assert_eq!(status.disk_free, None);
    }
}

fn set_min_free(p: &mut Pair, dest: Dest, min_free: MinFree) {
    let s = p.sides();
    match dest {
        Dest::Host => s.host.inner.set_min_free(min_free),
        Dest::Guest => s.guest.inner.set_min_free(min_free),
    }
}

/// The host's state directory below the reserve pauses the share before anything is done,
/// and the share goes on by itself once there is room.
#[tokio::test]
async fn state_dir_below_the_reserve_pauses_the_share() {
    let mut p = Pair::new(Default::default());
    write(&p.host_dir, "a.txt", "one");
    p.sides().controller.set_min_free(MinFree::Basis(10_000));
    let report = p.cycle().await;
    assert_eq!(report.pending, 1);
    let status = p.status();
    assert_eq!(status.halt_code.as_deref(), Some(DISK_FULL_CODE));
    assert!(status
        .halt_reason
        .unwrap_or_default()
        .starts_with("host state directory "),);
    assert!(!p.guest_dir.join("a.txt").exists());
    p.sides().controller.set_min_free(MinFree::Bytes(0));
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(p.status().state, ShareState::InSync);
}

/// A small tmpfs mounted over a directory for one test (root only), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (the test is skipped) when not root or `mount` refuses.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !rustix::process::getuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs");
        }
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A real full disk: the guest share on a 4 MiB tmpfs, filled (beside the share's content, in
/// its reserved directory) past the default reserve (5 % of it). A cycle pauses with
/// `disk-full` and writes nothing there; once the filler is gone the next cycle goes ahead.
#[tokio::test]
async fn a_really_full_guest_disk_pauses_and_resumes_when_space_appears() {
    let mut p = Pair::new(Default::default());
    let Some(_mount) = Tmpfs::mount(&p.guest_dir, "4m") else {
        return;
    };
    write(&p.host_dir, "a.txt", "first");
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let before = tree(&p.guest_dir);

    let filler = p.guest_dir.join(".vmsync/filler");
    std::fs::write(&filler, vec![7u8; 3900 << 10]).unwrap();
    write(&p.host_dir, "b.bin", random_bytes(8, 60_000));
    write(&p.host_dir, "d/c.txt", "in a new directory");
    let report = p.cycle().await;
    assert_eq!(report.pending, 1, "{report:?}");
    let status = p.status();
    assert_eq!(status.halt_code.as_deref(), Some(DISK_FULL_CODE));
    assert!(status.disk_free.unwrap() < status.disk_reserve.unwrap());
    assert_eq!(
        tree(&p.guest_dir),
        before,
        "nothing written on the full disk"
    );
    assert_eq!(temps(&p.guest_dir), Vec::<String>::new());

    remove_filler(&filler);
    let report = p.sync().await;
    assert_eq!(report.pending, 0, "{report:?}");
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(p.status().state, ShareState::InSync);
    assert_eq!(p.status().halt_code, None);
}

/// Removes a filler file from a small tmpfs and waits until its space is free again. That is
/// when its last descriptor closes, which need not be at once: a child that another test
/// thread forks while the filler is being written holds a copy until it execs.
fn remove_filler(filler: &std::path::Path) {
    let dir = std::fs::File::open(filler.parent().unwrap()).unwrap();
    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vmsync_engine::space::free_and_total(&dir).unwrap().0 < 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the filler's space never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The host's state directory on a full 4 MiB tmpfs: the share pauses before the cycle writes
/// its database, and goes on once there is room.
#[tokio::test]
async fn a_really_full_state_dir_pauses_and_resumes_when_space_appears() {
    let mut p = Pair::new(Default::default());
    // The state database is reopened on the tmpfs, as an agent restart would.
    let state = p.host_state.clone();
    let Some(_mount) = Tmpfs::mount(&state, "4m") else {
        return;
    };
    p.restart();
    write(&p.host_dir, "a.txt", "one");
    let filler = state.join("filler");
    std::fs::write(&filler, vec![7u8; 3900 << 10]).unwrap();
    let report = p.cycle().await;
    assert_eq!(report.pending, 1, "{report:?}");
    let status = p.status();
    assert_eq!(status.halt_code.as_deref(), Some(DISK_FULL_CODE));
    assert!(status
        .halt_reason
        .unwrap_or_default()
        .starts_with("host state directory "));
    assert!(!p.guest_dir.join("a.txt").exists());

    remove_filler(&filler);
    let report = p.sync().await;
    // Shown if the trees differ: what the cycle after the pause said.
    eprintln!("after the pause: {report:?}\n{:?}", p.status());
    assert_same_tree(&p.host_dir, &p.guest_dir);
    assert_eq!(p.status().state, ShareState::InSync);
}

/// Across real processes and the wire: a guest whose share is below its own `min_free` answers
/// `DiskFull`; the host shows the share paused with `disk-full` (the guest's figures in the
/// reason), nothing lands in the guest share, and once the guest runs with a lower reserve the
/// share syncs without a `resume`.
#[test]
fn a_guest_below_its_min_free_pauses_the_host_share_over_the_wire() {
    use std::time::Duration;
    use vmsync_tests::agents::{eventually, Agents};
    let mut a = Agents::new("");
    let guest_toml = std::fs::read_to_string(&a.guest_toml).unwrap();
    std::fs::write(&a.guest_toml, format!("{guest_toml}min_free = \"100%\"\n")).unwrap();
    write(&a.host_dir, "a.txt", "for a full guest");
    write(&a.host_dir, "d/b.bin", random_bytes(11, 100_000));
    a.start();
    // The control socket appears a moment after the start: ask until it answers.
    let paused = eventually(Duration::from_secs(60), || {
        let out = a.host_cmd(&["status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["shares"][0]["halt_code"] == DISK_FULL_CODE)
    });
    let share = a.share();
    assert!(paused, "{share}\n{}", a.log("host.log"));
    assert_eq!(share["state"], "halted");
    let reason = share["halt_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("guest share: "), "{reason}");
    assert!(share["disk_reserve"].as_u64().unwrap() > share["disk_free"].as_u64().unwrap());
    assert!(
        tree(&a.guest_dir).is_empty(),
        "nothing written in the guest share"
    );
    assert_eq!(temps(&a.guest_dir), Vec::<String>::new());

    a.stop_guest();
    std::fs::write(&a.guest_toml, format!("{guest_toml}min_free = \"0\"\n")).unwrap();
    a.start_guest();
    // `wait` would exit 3 at once while the share still shows the pause: poll instead.
    let resumed = eventually(Duration::from_secs(60), || {
        let out = a.host_cmd(&["status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["shares"][0]["state"] == "in-sync")
    });
    assert!(resumed, "{}\n{}", a.share(), a.log("host.log"));
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let share = a.share();
    assert_eq!(share["state"], "in-sync");
    assert!(share["halt_code"].is_null(), "{share}");
}

/// Sets `path`'s mtime to `secs` seconds from the epoch, before it too.
fn set_mtime_any(path: &Path, secs: i64) {
    let epoch = std::time::UNIX_EPOCH;
    let t = if secs >= 0 {
        epoch + std::time::Duration::from_secs(secs.unsigned_abs())
    } else {
        epoch - std::time::Duration::from_secs(secs.unsigned_abs())
    };
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn mtime_secs(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().mtime()
}

/// The guest's share on a filesystem that holds any time (tmpfs: year 1 to 9999 and beyond),
/// the host's where it is (ext4 clamps to 1901-2446): files the guest dates in the year 9999
/// and the year 1 arrive whole, and the cycles after change nothing more on either side.
#[tokio::test]
async fn times_the_host_filesystem_cannot_hold_settle_without_churn() {
    let mut p = Pair::new(Default::default());
    let Some(_mount) = Tmpfs::mount(&p.guest_dir, "16m") else {
        return;
    };
    const YEAR_9999: i64 = 253_385_000_000;
    const YEAR_1: i64 = -62_120_000_000;
    write(&p.guest_dir, "future.txt", "from the year 9999");
    write(&p.guest_dir, "d/past.txt", "from the year 1");
    set_mtime_any(&p.guest_dir.join("future.txt"), YEAR_9999);
    set_mtime_any(&p.guest_dir.join("d/past.txt"), YEAR_1);
    assert_eq!(mtime_secs(&p.guest_dir.join("future.txt")), YEAR_9999);
    p.sync().await;
    assert_eq!(read(&p.host_dir, "future.txt"), b"from the year 9999");
    assert_eq!(read(&p.host_dir, "d/past.txt"), b"from the year 1");
    let settled = p.sync().await;
    let times = |dir: &Path| {
        (
            mtime_secs(&dir.join("future.txt")),
            mtime_secs(&dir.join("d/past.txt")),
        )
    };
    let (host, guest) = (times(&p.host_dir), times(&p.guest_dir));
    eprintln!("after two cycles: host {host:?}, guest {guest:?}, {settled:?}");
    for round in 0..3 {
        let report = p.sync().await;
        assert_eq!(report.applied, 0, "round {round}: {report:?}");
        assert_eq!(times(&p.host_dir), host, "round {round}");
        assert_eq!(times(&p.guest_dir), guest, "round {round}");
    }
    assert_eq!(read(&p.guest_dir, "future.txt"), b"from the year 9999");
    assert_eq!(p.status().state, ShareState::InSync);
    assert!(p.status().conflicts.is_empty());
}
