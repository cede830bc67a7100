//! Faults that take more than one test process to stage, with both agents running as real
//! processes (docs/threat-model.md, "Crash and fault injection" and "Paths and symlinks"):
//!
//! - a share root unmounted under a running agent (the guest's, then the host's), and mounted
//!   back;
//! - a running guest agent whose wall clock jumps years back and forward (libfaketime);
//! - a VM reset in the middle of a transfer that is also a rollback: the guest agent killed and
//!   its share and state put back to a copy taken seconds earlier, at once;
//! - a directory chain 10,000 deep in the guest's share.
//!
//! Synchronisation is a bounded poll on the outcome, never a fixed sleep; no assertion is on
//! how long anything took.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, copy_contents, empty, read, tree, write, Node};

/// Bound on every wait for an outcome.
const SETTLE: Duration = Duration::from_secs(60);

/// Held by the tests that make tens of thousands of files or directories, so that they do not
/// run at once on a small machine (each has its own waits to meet).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The share's halt code; `None` also while the host agent does not answer yet.
fn halt_code(a: &Agents) -> Option<String> {
    let out = a.host_cmd(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["shares"][0]["halt_code"]
        .as_str()
        .map(str::to_string)
}

/// Waits until the share is halted with `code`; returns its status object.
fn wait_halted(a: &Agents, code: &str) -> serde_json::Value {
    let halted = eventually(SETTLE, || halt_code(a).as_deref() == Some(code));
    assert!(
        halted,
        "no {code} halt; status: {}\n--- host.log (tail)\n{}\n--- guest.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 60),
        a.log_tail("guest.log", 30)
    );
    a.share()
}

/// A mount this test made, unmounted (lazily) when dropped if it still is.
struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Runs `mount args... target`; `None` (the caller skips its test) when not root or
    /// `mount` refuses.
    fn new(args: &[&str], source: &Path, target: &Path) -> Option<Mount> {
        if !rustix::process::getuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return None;
        }
        let out = Command::new("mount")
            .args(args)
            .arg(source)
            .arg(target)
            .output()
            .expect("run mount");
        if !out.status.success() {
            eprintln!(
                "skipped: mount {args:?} {} {} failed: {}",
                source.display(),
                target.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Mount {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    /// A tmpfs of `size` at `target`.
    fn tmpfs(target: &Path, size: &str) -> Option<Mount> {
        Mount::new(
            &["-t", "tmpfs", "-o", &format!("size={size},mode=0755")],
            Path::new("tmpfs"),
            target,
        )
    }

    /// `source` bind-mounted at `target`.
    fn bind(source: &Path, target: &Path) -> Option<Mount> {
        Mount::new(&["--bind"], source, target)
    }

    /// Unmounts it: plainly, or lazily (`umount -l`) when it is busy, as it is while an agent
    /// holds the root open. Returns whether the plain unmount had to give way to a lazy one.
    fn unmount(&mut self) -> bool {
        assert!(self.mounted, "{} is not mounted", self.target.display());
        let plain = Command::new("umount")
            .arg(&self.target)
            .output()
            .expect("run umount");
        let lazy = !plain.status.success();
        if lazy {
            let out = Command::new("umount")
                .arg("-l")
                .arg(&self.target)
                .output()
                .expect("run umount -l");
            assert!(
                out.status.success(),
                "umount -l {}: {}",
                self.target.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.mounted = false;
        lazy
    }

    /// Binds `source` at the target again (the same filesystem mounted back).
    fn bind_again(&mut self, source: &Path) {
        assert!(!self.mounted);
        let out = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(&self.target)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount --bind {}: {}",
            self.target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// Which side's root the unmount test takes away.
#[derive(Clone, Copy)]
enum Which {
    Guest,
    Host,
}

/// A share root that is a filesystem of its own (a tmpfs, bind-mounted at the share's path so
/// that it can be mounted back with its content), unmounted under the running agents once they
/// are in sync. The path then names the mount point's own directory, on another device, with
/// no marker, holding a file left there beneath the mount. The share must halt with
/// `root-replaced` for that side (its identity changed; the marker is gone), nothing may
/// propagate in either direction (the other side's tree and trash stay as they were, the
/// file beneath the mount point does not travel, an edit made on the other side meanwhile does
/// not land in the mount point), and once the same filesystem is mounted back the share syncs
/// again by itself, the edit made meanwhile landing.
fn unmounted_root(which: Which) {
    let mut a = Agents::new("");
    let disk = a.tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let (root, other) = match which {
        Which::Guest => (a.guest_dir.clone(), a.host_dir.clone()),
        Which::Host => (a.host_dir.clone(), a.guest_dir.clone()),
    };
    // Declared after `a`: dropped (unmounted) before the agents stop and the temp dir goes.
    let Some(_disk) = Mount::tmpfs(&disk, "64m") else {
        return;
    };
    // What the mount point directory holds beneath the mount, seen once it is unmounted. With
    // it the unmounted root is not empty, so only the root's identity stands between it and a
    // plan that deletes every file on the other side (too few for the mass-deletion limit).
    write(
        &root,
        "beneath-the-mount-point.txt",
        "the mount point's own file\n",
    );
    let Some(mut root_mount) = Mount::bind(&disk, &root) else {
        return;
    };
    for i in 0..40 {
        write(
            &other,
            &format!("d{}/f{i:02}.txt", i % 4),
            format!("file {i}\n"),
        );
    }
    a.start();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let other_before = tree(&other);
    assert_eq!(other_before.len(), 44);

    let lazy = root_mount.unmount();
    eprintln!("unmounted {} (lazily: {lazy})", root.display());
    let side = match which {
        Which::Guest => "guest",
        Which::Host => "host",
    };
    let share = wait_halted(&a, "root-replaced");
    let reason = share["halt_reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("{side} share root was replaced")),
        "{reason}"
    );
    assert_eq!(share["state"], "halted");
    // An edit on the other side while the root is away: it must not land in the mount point.
    write(&other, "edited-while-unmounted.txt", "made meanwhile\n");
    assert_eq!(
        a.host_cmd(&["sync"]).status.code(),
        Some(3),
        "sync of a halted share"
    );
    let mut other_now = other_before.clone();
    other_now.insert(
        b"edited-while-unmounted.txt".to_vec(),
        Node::File {
            data: b"made meanwhile\n".to_vec(),
            mode: 0o644,
        },
    );
    assert_eq!(
        tree(&other),
        other_now,
        "the {side} root's absence cost the other side"
    );
    assert!(
        vmsync_tests::fixture::trash_files(&other).is_empty(),
        "something on the other side was deleted or replaced"
    );
    let beneath: Vec<Vec<u8>> = tree(&root).into_keys().collect();
    assert_eq!(
        beneath,
        vec![b"beneath-the-mount-point.txt".to_vec()],
        "something landed in the mount point's directory"
    );

    // The same filesystem mounted back: the share syncs again by itself.
    root_mount.bind_again(&disk);
    let back = eventually(SETTLE, || {
        halt_code(&a).is_none() && root.join("edited-while-unmounted.txt").exists()
    });
    assert!(
        back,
        "the share did not recover once the root was mounted back; status: {}\n\
         --- host.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    a.converge(SETTLE);
    assert_eq!(tree(&other), other_now, "the other side changed");
    assert_eq!(
        read(&root, "edited-while-unmounted.txt"),
        b"made meanwhile\n"
    );
    assert!(vmsync_tests::fixture::trash_files(&other).is_empty());
}

#[test]
fn an_unmounted_guest_root_halts_costs_the_host_nothing_and_recovers_when_mounted_back() {
    unmounted_root(Which::Guest);
}

#[test]
fn an_unmounted_host_root_halts_costs_the_guest_nothing_and_recovers_when_mounted_back() {
    unmounted_root(Which::Host);
}

/// The controller's side of it, in process: a `root-replaced` halt lifts by itself once a full
/// cycle finds the very root it recorded (marker, device and inode) at the share's path again,
/// and only then: a targeted cycle (which keeps the directory it opened) never lifts it, and a
/// root that is still another directory keeps it. Before, only `resume` lifted it, and resume
/// forgets the ancestor (an add-only merge), although nothing had changed.
#[tokio::test]
async fn a_root_replaced_halt_lifts_once_a_full_cycle_finds_the_recorded_root_again() {
    use vmsync_engine::status::ShareState;
    use vmsync_tests::fixture::Pair;
    let mut p = Pair::new(Default::default());
    for i in 0..5 {
        write(&p.host_dir, &format!("f{i}"), format!("file {i}"));
    }
    p.sync().await;
    let away = p.tmp.path().join("guest-away");
    std::fs::rename(&p.guest_dir, &away).unwrap();
    std::fs::create_dir(&p.guest_dir).unwrap();
    write(&p.guest_dir, "stray", "the mount point's own file");
    assert!(p.cycle().await.halted);
    assert_eq!(p.status().halt_code.as_deref(), Some("root-replaced"));
    assert!(p.cycle().await.halted, "another directory is still there");
    std::fs::remove_dir_all(&p.guest_dir).unwrap();
    std::fs::rename(&away, &p.guest_dir).unwrap();
    write(&p.host_dir, "f0", "edited on the host meanwhile");
    assert!(
        p.cycle_paths(&["f0"]).await.halted,
        "a targeted cycle lifted it"
    );
    assert_eq!(p.status().halt_code.as_deref(), Some("root-replaced"));
    let report = p.cycle().await;
    assert!(!report.halted, "{report:?}");
    assert_eq!(p.status().halt_code, None);
    assert_eq!(p.status().state, ShareState::InSync);
    assert_eq!(read(&p.guest_dir, "f0"), b"edited on the host meanwhile");
    assert!(!p.host_dir.join("stray").exists());
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// libfaketime's multithreaded preload library, as Debian's `faketime` package installs it.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// Twenty years, as libfaketime counts them (`y` is 365 days).
const TWENTY_YEARS: i64 = 20 * 365 * 86_400;

/// The real wall clock, in seconds since the epoch.
fn real_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The year a trash batch name (`YYYYMMDD...`) was made in, by its maker's clock.
fn batch_year(entry: &str) -> i64 {
    entry[..4].parse().unwrap()
}

/// The UTC year of `secs` since the epoch (the civil calendar, as the trash names batches).
fn year_of(secs: i64) -> i64 {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let march_based_month = (5 * doy + 2) / 153;
    yoe + era * 400 + i64::from(march_based_month >= 10)
}

/// A guest edit as the guest's kernel would stamp it: `data` at `rel`, with an mtime that is
/// the guest's (moved) clock, `offset` seconds from the real one.
fn guest_edit(a: &Agents, rel: &str, data: &str, offset: i64) {
    write(&a.guest_dir, rel, data);
    vmsync_tests::fixture::set_mtime(&a.guest_dir.join(rel), real_now() + offset, 0);
}

/// Waits until `dir/rel` holds `want`.
fn lands(a: &Agents, dir: &Path, rel: &str, want: &str) {
    let ok = eventually(SETTLE, || {
        std::fs::read(dir.join(rel)).is_ok_and(|d| d == want.as_bytes())
    });
    assert!(
        ok,
        "{rel} never became {want:?} in {}: it holds {:?}; status: {}\n--- host.log (tail)\n{}\n\
         --- guest.log (tail)\n{}",
        dir.display(),
        std::fs::read(dir.join(rel)).map(|d| String::from_utf8_lossy(&d).into_owned()),
        a.status(),
        a.log_tail("host.log", 40),
        a.log_tail("guest.log", 20)
    );
}

/// The trash entries of the share at `root` that hold `rel` with content `data`.
fn kept_as(root: &Path, rel: &str, data: &str) -> Vec<String> {
    vmsync_tests::fixture::trash_files(root)
        .into_iter()
        .filter(|(k, d)| k.split_once('/').is_some_and(|(_, p)| p == rel) && d == data.as_bytes())
        .map(|(k, _)| k)
        .collect()
}

/// A guest agent on a clock of its own: `vmsync-guest` runs under libfaketime, which moves
/// its `CLOCK_REALTIME` by what [`FakeClock::set`] last wrote (read at every clock call, so the
/// clock moves while the agent runs). Its monotonic clock does not move, as on a real machine
/// whose clock is set, and file times stay the kernel's. `None` (the test is skipped) when
/// libfaketime is not installed, outside CI.
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    fn for_guest(a: &mut Agents) -> Option<FakeClock> {
        let Some(lib) = LIBFAKETIME.iter().map(Path::new).find(|p| p.exists()) else {
            // CI installs it (.ci/run): there, a missing library is a failure, not a skip.
            assert!(
                std::env::var_os("CI").is_none_or(|v| v != "true"),
                "libfaketime is not installed (apt-get install faketime)"
            );
            eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
            return None;
        };
        let clock = FakeClock {
            file: a.tmp.path().join("guest-clock"),
        };
        clock.set("+0");
        for (k, v) in [
            ("LD_PRELOAD", lib.to_path_buf()),
            ("FAKETIME_TIMESTAMP_FILE", clock.file.clone()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
            ("NO_FAKE_STAT", "1".into()),
        ] {
            a.guest_env.push((k.to_string(), v));
        }
        Some(clock)
    }

    /// Moves the guest's clock to `spec` from the real one (`-20y`, `+20y`, `+0`).
    fn set(&self, spec: &str) {
        std::fs::write(&self.file, format!("{spec}\n")).unwrap();
    }
}

/// Lines of `log` stamped in `year` (the agents' log lines start with their clock's time).
fn lines_stamped_in(log: &str, year: i64) -> usize {
    let prefix = format!("{year}-");
    log.lines().filter(|l| l.starts_with(&prefix)).count()
}

/// Both sides edit while the running guest agent's clock jumps 20 years back, then 20 years
/// forward, then back to the truth ([`FakeClock`]; the guest's own edits are stamped with its
/// clock, as its kernel would). Every edit made on one side only lands on the other, whatever
/// its mtime says (a host edit whose mtime is 20 years older than the guest's copy included);
/// an edit made on both sides at once under `newer-wins` never lets the guest's version
/// overwrite the host's, whether its mtime is 20 years behind or 20 years ahead (rule 22); the
/// host ends with the last version of every file, and every version sync replaced is kept in
/// the trash of the side it was replaced on. The guest's trash batch names and log lines, made
/// by its clock, show that the agent ran on the moved clock.
///
/// The guest's trash ages its batches by that clock too (the next test); its `keep_deleted` is
/// set out of reach here, so that this test judges sync's decisions only.
#[test]
fn a_running_guests_clock_moved_years_back_and_forward_decides_nothing() {
    let mut a = Agents::new("conflict = \"newer-wins\"");
    let Some(clock) = FakeClock::for_guest(&mut a) else {
        return;
    };
    let mut config = std::fs::read_to_string(&a.guest_toml).unwrap();
    config.push_str("keep_deleted = \"36500d\"\n");
    std::fs::write(&a.guest_toml, config).unwrap();
    for f in ["a", "b", "c", "d", "e", "f", "g"] {
        write(&a.host_dir, f, format!("{f} as first synced\n"));
    }
    a.start();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);

    // 20 years back.
    clock.set("-20y");
    write(&a.host_dir, "b", "b edited on the host\n");
    lands(&a, &a.guest_dir, "b", "b edited on the host\n");
    let kept = kept_as(&a.guest_dir, "b", "b as first synced\n");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        batch_year(&kept[0]),
        year_of(real_now() - TWENTY_YEARS),
        "the guest agent does not run on the moved clock: {kept:?}"
    );
    // An edit on the guest dated 20 years before the host's copy still lands: it is the change.
    guest_edit(&a, "a", "a edited on the guest\n", -TWENTY_YEARS);
    lands(&a, &a.host_dir, "a", "a edited on the guest\n");
    assert_eq!(kept_as(&a.host_dir, "a", "a as first synced\n").len(), 1);
    // Both sides at once: the host's is newer by the mtimes and wins; the guest's is kept.
    let guest_c = "c edited on the guest, dated 20 years back\n";
    a.freeze_host();
    write(&a.host_dir, "c", "c edited on the host\n");
    guest_edit(&a, "c", guest_c, -TWENTY_YEARS);
    a.thaw_host();
    lands(&a, &a.guest_dir, "c", "c edited on the host\n");
    assert_eq!(kept_as(&a.guest_dir, "c", guest_c).len(), 1);

    // 20 years forward.
    clock.set("+20y");
    let guest_d = "d edited on the guest, dated 20 years ahead\n";
    guest_edit(&a, "d", guest_d, TWENTY_YEARS);
    lands(&a, &a.host_dir, "d", guest_d);
    assert_eq!(kept_as(&a.host_dir, "d", "d as first synced\n").len(), 1);
    // A host edit whose mtime is 20 years older than the guest's copy: still the change.
    write(&a.host_dir, "d", "d edited on the host after that\n");
    lands(&a, &a.guest_dir, "d", "d edited on the host after that\n");
    assert_eq!(kept_as(&a.guest_dir, "d", guest_d).len(), 1);
    write(&a.host_dir, "a", "a edited on the host after that\n");
    lands(&a, &a.guest_dir, "a", "a edited on the host after that\n");
    assert_eq!(
        kept_as(&a.guest_dir, "a", "a edited on the guest\n").len(),
        1
    );
    // Both sides at once: the guest's mtime is 20 years ahead of the host's clock, so it
    // never wins (rule 22); it is kept on the guest.
    let guest_e = "e edited on the guest, dated 20 years ahead\n";
    a.freeze_host();
    write(&a.host_dir, "e", "e edited on the host\n");
    guest_edit(&a, "e", guest_e, TWENTY_YEARS);
    a.thaw_host();
    lands(&a, &a.guest_dir, "e", "e edited on the host\n");
    assert_eq!(kept_as(&a.guest_dir, "e", guest_e).len(), 1);

    // The clock put right.
    clock.set("+0");
    guest_edit(&a, "f", "f edited on the guest\n", 0);
    lands(&a, &a.host_dir, "f", "f edited on the guest\n");
    write(&a.host_dir, "g", "g edited on the host\n");
    lands(&a, &a.guest_dir, "g", "g edited on the host\n");
    a.converge(SETTLE);
    assert_eq!(halt_code(&a), None);

    // The host holds the last version of every file: none was overwritten by an older one.
    let want = [
        ("a", "a edited on the host after that\n"),
        ("b", "b edited on the host\n"),
        ("c", "c edited on the host\n"),
        ("d", "d edited on the host after that\n"),
        ("e", "e edited on the host\n"),
        ("f", "f edited on the guest\n"),
        ("g", "g edited on the host\n"),
    ];
    for (f, data) in want {
        assert_eq!(read(&a.host_dir, f), data.as_bytes(), "{f}");
    }
    assert_eq!(tree(&a.host_dir).len(), want.len());
    // Nothing is lost: what sync replaced on either side is in that side's trash.
    let host_lost = [
        ("a", "a as first synced\n"),
        ("d", "d as first synced\n"),
        ("f", "f as first synced\n"),
    ];
    let guest_lost = [
        ("b", "b as first synced\n"),
        ("c", guest_c),
        ("d", guest_d),
        ("a", "a edited on the guest\n"),
        ("e", guest_e),
        ("g", "g as first synced\n"),
    ];
    for (root, lost) in [
        (&a.host_dir, &host_lost[..]),
        (&a.guest_dir, &guest_lost[..]),
    ] {
        for (f, data) in lost {
            assert_eq!(
                kept_as(root, f, data).len(),
                1,
                "{f} ({data:?}) is not in the trash of {}",
                root.display()
            );
        }
    }
    // The agent ran on the moved clock, both ways.
    let log = a.log("guest.log");
    for year in [
        year_of(real_now() - TWENTY_YEARS),
        year_of(real_now() + TWENTY_YEARS),
    ] {
        assert!(
            lines_stamped_in(&log, year) > 0,
            "no guest log line stamped in {year}"
        );
    }
}

/// A trash batch's name carries the time the guest's clock gave when it was made. A version
/// sync replaced while that clock was 20 years behind must still stay `keep_deleted` (7 days
/// by default) once the clock is put right, not be pruned at the pruner's next run as if it
/// were 20 years old, nor once the guest agent restarts. The version here is the guest's own
/// edit that lost a `newer-wins` conflict because its clock was behind: the trash was its only
/// copy.
#[test]
fn a_version_kept_while_the_guests_clock_was_behind_stays_once_the_clock_is_put_right() {
    let mut a = Agents::new("conflict = \"newer-wins\"");
    let Some(clock) = FakeClock::for_guest(&mut a) else {
        return;
    };
    write(&a.host_dir, "x", "x as first synced\n");
    a.start();
    a.wait_in_sync();
    clock.set("-20y");
    let guest_x = "x edited on the guest while its clock was behind\n";
    a.freeze_host();
    write(&a.host_dir, "x", "x edited on the host\n");
    guest_edit(&a, "x", guest_x, -TWENTY_YEARS);
    a.thaw_host();
    lands(&a, &a.guest_dir, "x", "x edited on the host\n");
    let kept = kept_as(&a.guest_dir, "x", guest_x);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(batch_year(&kept[0]), year_of(real_now() - TWENTY_YEARS));

    // The clock put right; the guest keeps something else (in a batch of its own, made more
    // than a batch's span later), which runs the pruner.
    clock.set("+0");
    let mut n = 0;
    let fresh_batch = eventually(SETTLE, || {
        n += 1;
        let data = format!("y {n}\n");
        write(&a.host_dir, "y", &data);
        lands(&a, &a.guest_dir, "y", &data);
        let year = year_of(real_now());
        vmsync_tests::fixture::trash_files(&a.guest_dir)
            .iter()
            .any(|(k, _)| k.ends_with("/y") && batch_year(k) == year)
    });
    assert!(fresh_batch, "no batch made by the corrected clock");
    // The pruner runs right after something is kept (at most every 5 s): watch it for longer.
    let pruned = eventually(Duration::from_secs(15), || {
        kept_as(&a.guest_dir, "x", guest_x).is_empty()
    });
    assert!(
        !pruned,
        "the guest's only copy of its edit, kept seconds ago, was pruned as 20 years old"
    );

    // The guest agent restarted with the clock right: the new run ages the batch from what
    // the last one wrote on its directory, not from its name.
    a.terminate_guest();
    a.start_guest();
    a.wait_in_sync();
    for n in 0..3 {
        let data = format!("y after the restart {n}\n");
        write(&a.host_dir, "y", &data);
        lands(&a, &a.guest_dir, "y", &data);
    }
    let pruned = eventually(Duration::from_secs(15), || {
        kept_as(&a.guest_dir, "x", guest_x).is_empty()
    });
    assert!(
        !pruned,
        "after a restart, the guest's copy of its edit was pruned as 20 years old"
    );
}

/// Whether `dir/rel` holds exactly `want`.
fn whole(dir: &Path, rel: &str, want: &[u8]) -> bool {
    std::fs::read(dir.join(rel)).is_ok_and(|d| d == want)
}

/// The host agent's view of its peer: `connected` or why not.
fn peer(a: &Agents) -> String {
    a.status()["agent"]["peer"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A VM reset in the middle of a transfer that is also a rollback, as one event: while a
/// 48 MiB file crosses from the host (slowed to 4 MiB/s so that it is in flight all along),
/// the guest's disk (share and agent state) is copied aside, as a snapshot. The guest then
/// edits files, and the host syncs and records them; the guest edits more (in flight) and at
/// once its agent is killed with SIGKILL and its disk put back to the snapshot, the transfer
/// still under way; the reverted guest edits one more file before its agent starts again. The
/// host must halt with `guest-rolled-back` and change nothing; after `resume` the host still
/// holds every file with the content it had (its newest), the guest's older files (its own
/// edits, lost with the revert; files the host edited since the snapshot) are given the
/// host's versions, the file the guest changed after the revert is a conflict with both
/// versions untouched, the big file lands whole, and no temp is left.
///
/// The kill comes after the host recorded the guest's first edits, so the host's generation is
/// past the snapshot's; a reset between a guest change landing on the host and that record is
/// the next test.
#[test]
fn a_vm_reset_mid_transfer_with_a_rollback_costs_the_host_nothing() {
    let mut a = Agents::new("conflict = \"keep\"");
    for i in 0..30 {
        write(
            &a.host_dir,
            &format!("f{i:03}"),
            format!("file {i} as first synced\n"),
        );
    }
    a.start();
    a.wait_in_sync();
    let state = a.tmp.path().join("guest-state");

    // The transfer, and host edits with it.
    a.relay.set_rate_limit(4 << 20);
    let big = vmsync_tests::fixture::random_bytes(7, 48 << 20);
    write(&a.host_dir, "big/disk.img", &big);
    for i in 0..5 {
        let edit = format!("file {i} edited on the host\n");
        write(&a.host_dir, &format!("f{i:03}"), &edit);
        lands(&a, &a.guest_dir, &format!("f{i:03}"), &edit);
    }
    a.relay.reset();
    let under_way = eventually(SETTLE, || a.wire_bytes() >= 2 << 20);
    assert!(under_way, "the transfer never started");

    // The snapshot, mid-transfer: the guest frozen while its disk is copied.
    let snap = tempfile::tempdir().unwrap();
    a.freeze_guest();
    copy_contents(&a.guest_dir, &snap.path().join("share"));
    copy_contents(&state, &snap.path().join("state"));
    a.thaw_guest();
    assert!(
        !whole(&snap.path().join("share"), "big/disk.img", &big),
        "the snapshot was taken after the transfer"
    );

    // Guest edits, synced and recorded by the host (the new file is last: once the host's
    // agreed file count has it, the cycles that brought the edits were recorded).
    let agreed = |a: &Agents| a.share()["files"].as_u64().unwrap();
    let agreed_before = agreed(&a);
    for i in 10..13 {
        write(
            &a.guest_dir,
            &format!("f{i:03}"),
            format!("file {i} edited on the guest after the snapshot\n"),
        );
    }
    write(
        &a.guest_dir,
        "guest-new.txt",
        "made on the guest after the snapshot\n",
    );
    let recorded = eventually(SETTLE, || agreed(&a) > agreed_before);
    assert!(recorded, "{}", a.log_tail("host.log", 30));
    assert_eq!(
        read(&a.host_dir, "f012"),
        b"file 12 edited on the guest after the snapshot\n"
    );
    // More guest edits, in flight, and the reset with the rollback.
    for i in 13..16 {
        write(
            &a.guest_dir,
            &format!("f{i:03}"),
            format!("file {i} edited on the guest right before the reset\n"),
        );
    }
    a.kill_guest();
    assert!(
        !whole(&a.guest_dir, "big/disk.img", &big),
        "killed after the transfer, not during it"
    );
    empty(&a.guest_dir);
    copy_contents(&snap.path().join("share"), &a.guest_dir);
    std::fs::remove_dir_all(&state).unwrap();
    copy_contents(&snap.path().join("state"), &state);
    let after_revert = "file 20 edited on the guest after the revert\n";
    write(&a.guest_dir, "f020", after_revert);
    // What the host holds once its session has ended (whatever of the edits in flight landed).
    let ended = eventually(SETTLE, || peer(&a) != "connected");
    assert!(ended, "the host did not see the guest go");
    let host_before = tree(&a.host_dir);
    assert_eq!(
        host_before.get(b"big/disk.img".as_slice()),
        Some(&Node::File {
            data: big.clone(),
            mode: 0o644
        })
    );
    a.relay.set_rate_limit(0);
    a.start_guest();

    let share = wait_halted(&a, "guest-rolled-back");
    assert_eq!(share["state"], "halted");
    assert!(
        share["halt_reason"]
            .as_str()
            .unwrap()
            .contains("went back in time"),
        "{share}"
    );
    assert_eq!(
        a.host_cmd(&["sync"]).status.code(),
        Some(3),
        "sync of a halted share"
    );
    assert_eq!(
        tree(&a.host_dir),
        host_before,
        "the host changed under the halt"
    );

    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.converge_except(SETTLE, &["f020"]);
    let conflicted = eventually(SETTLE, || a.share()["state"] == "conflicted");
    assert!(
        conflicted,
        "no conflict after resume; status: {}\n--- host.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 60)
    );
    assert_eq!(a.share()["conflicts"], serde_json::json!(["f020"]));
    assert_eq!(
        tree(&a.host_dir),
        host_before,
        "the host lost or reverted something"
    );
    assert_eq!(read(&a.guest_dir, "f020"), after_revert.as_bytes());
    assert_eq!(
        read(&a.guest_dir, "f010"),
        b"file 10 edited on the guest after the snapshot\n"
    );
    assert_eq!(read(&a.guest_dir, "f000"), b"file 0 edited on the host\n");
    assert!(whole(&a.guest_dir, "big/disk.img", &big));
    let leftovers: Vec<_> = std::fs::read_dir(a.guest_dir.join(".vmsync/tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// The reset and rollback at the worst moment: a guest edit has landed on the host, but the
/// cycle that brought it ended before its generation note reached the guest (the VM went
/// away), so the host's recorded generation is still the snapshot's. Nothing can then tell the
/// reverted guest from one that never moved; but the host must still not take the guest's
/// older file for a change and overwrite its newest version with it: the host's version is
/// its own edit, copied to the guest. The file the guest made before the reset cannot be told
/// from one the guest made and deleted: its deletion reaches the host, whose copy goes to the
/// trash.
/// (In process, for the exact moment: the note is refused as a lost connection would refuse
/// it.)
#[tokio::test]
async fn a_rollback_between_a_guest_change_landing_and_its_record_costs_the_host_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    use vmsync_tests::fixture::Pair;
    let mut p = Pair::new(Default::default());
    write(&p.host_dir, "a", "a as first synced\n");
    write(&p.host_dir, "b", "b as first synced\n");
    p.sync().await;
    // The snapshot: the guest's share, its generation note included.
    let snap = tempfile::tempdir().unwrap();
    copy_contents(&p.guest_dir, snap.path());
    // The guest edits `a` and makes `new`; the host applies both, the note fails.
    write(&p.guest_dir, "a", "a edited on the guest\n");
    write(&p.guest_dir, "new", "made on the guest\n");
    p.guest_counters.refuse_marks.store(true, Relaxed);
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
    assert_eq!(read(&p.host_dir, "a"), b"a edited on the guest\n");
    p.guest_counters.refuse_marks.store(false, Relaxed);
    // The rollback: the guest's files and note as they were in the snapshot.
    std::fs::remove_file(p.guest_dir.join("new")).unwrap();
    for f in ["a", ".vmsync/generation"] {
        let out = Command::new("cp")
            .arg("-a")
            .arg(snap.path().join(f))
            .arg(p.guest_dir.join(f))
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let mut host_before = tree(&p.host_dir);
    host_before.remove(&b"new"[..]);
    let report = p.sync().await;
    assert_eq!(
        tree(&p.host_dir),
        host_before,
        "the host lost its newest versions to the reverted guest (status {:?})",
        p.status()
    );
    assert!(!report.halted, "{report:?}");
    assert_eq!(read(&p.guest_dir, "a"), b"a edited on the guest\n");
    assert!(!p.guest_dir.join("new").exists());
    assert_eq!(read(&p.guest_dir, "b"), b"b as first synced\n");
    // In the host's trash: the version the guest's edit replaced before the revert, and the
    // guest's file.
    let mut trashed: Vec<Vec<u8>> = vmsync_tests::fixture::trash_files(&p.host_dir)
        .into_iter()
        .map(|(_, data)| data)
        .collect();
    trashed.sort();
    assert_eq!(
        trashed,
        [
            b"a as first synced\n".to_vec(),
            b"made on the guest\n".to_vec()
        ]
    );
}

/// Directories in the deep chain: `deep` at the share's root, then `d`, `d`, ... The file at
/// depth 10 is in the 9th; the one at depth 10,000 in the last.
const CHAIN_DIRS: usize = 9_999;

fn dir_flags() -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// The name of the chain's `k`th directory (1-based).
fn chain_name(k: usize) -> &'static str {
    if k == 1 {
        "deep"
    } else {
        "d"
    }
}

/// Writes `data` as a new file `name` in the directory `dir`.
fn write_at(dir: &rustix::fd::OwnedFd, name: &str, data: &[u8]) {
    use rustix::fs::{Mode, OFlags};
    use std::io::Write;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    std::fs::File::from(fd).write_all(data).unwrap();
}

/// Builds the chain beneath `root` with `*at` calls, one directory fd at a time (its paths are
/// far past `PATH_MAX`), with `shallow.txt` at depth 10 and `bottom.txt` at depth 10,000.
fn build_chain(root: &Path) {
    use rustix::fs::Mode;
    let mut dir = rustix::fs::openat(rustix::fs::CWD, root, dir_flags(), Mode::empty()).unwrap();
    for k in 1..=CHAIN_DIRS {
        rustix::fs::mkdirat(&dir, chain_name(k), Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(&dir, chain_name(k), dir_flags(), Mode::empty()).unwrap();
        if k == 9 {
            write_at(&dir, "shallow.txt", b"ten components deep\n");
        }
    }
    write_at(&dir, "bottom.txt", b"ten thousand components deep\n");
}

/// What `bottom.txt` at the chain's end holds, read with `*at` calls; `None` if the chain or
/// the file is not there.
fn read_bottom(root: &Path) -> Option<Vec<u8>> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    let mut dir = rustix::fs::openat(rustix::fs::CWD, root, dir_flags(), Mode::empty()).ok()?;
    for k in 1..=CHAIN_DIRS {
        dir = rustix::fs::openat(&dir, chain_name(k), dir_flags(), Mode::empty()).ok()?;
    }
    let fd = rustix::fs::openat(
        &dir,
        "bottom.txt",
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut data = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut data).ok()?;
    Some(data)
}

/// How many directories deep the chain goes beneath `root`, counted with `*at` calls.
fn chain_depth(root: &Path) -> usize {
    use rustix::fs::Mode;
    let Ok(mut dir) = rustix::fs::openat(rustix::fs::CWD, root, dir_flags(), Mode::empty()) else {
        return 0;
    };
    let mut k = 0;
    while let Ok(next) = rustix::fs::openat(&dir, chain_name(k + 1), dir_flags(), Mode::empty()) {
        dir = next;
        k += 1;
    }
    k
}

/// The path of the chain's first `k` directories, `/`-joined.
fn chain_path(k: usize) -> String {
    (1..=k).map(chain_name).collect::<Vec<_>>().join("/")
}

/// The share's problems, as (path, side, reason).
fn problems(a: &Agents) -> Vec<(String, String, String)> {
    let share = a.share();
    share["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let field = |k: &str| p[k].as_str().unwrap().to_string();
            (field("path"), field("side"), field("reason"))
        })
        .collect()
}

/// The problem the guest's scan reports for the chain: the last directory within the bound
/// lists an entry that would be its 1,025th component.
fn too_deep(a: &Agents) -> bool {
    problems(a).iter().any(|(path, side, reason)| {
        *path == chain_path(1024)
            && side == "guest"
            && reason == "entry `d` skipped: path deeper than 1024 components"
    })
}

/// Waits for `vmsync-host wait` to report the share in sync.
fn settles(a: &Agents, what: &str) {
    let code = a.wait(60);
    assert_eq!(
        code,
        0,
        "{what}: the share did not settle; status: {}\n--- host.log (tail)\n{}",
        a.status(),
        a.log_tail("host.log", 40)
    );
}

/// A directory chain 10,000 deep made in the guest's share while both agents run (its paths
/// are past `PATH_MAX` many times over), with a file at depth 10 and one at depth 10,000:
///
/// - the guest's scan reports the entry past the 1,024-component bound (`MAX_PATH_DEPTH`) as a
///   problem and goes on; the file at depth 10 lands on the host, and nothing deeper than the
///   bound does (the host's chain stops above the directory whose listing was cut short); the
///   file at depth 10,000 stays on the guest;
/// - files elsewhere keep syncing both ways, and the share settles in sync;
/// - the host deleting its copy of the chain: the guest deletes what was synced (the depth-10
///   file goes to its trash) and keeps the directories that hold what it could not sync, and
///   the share settles, giving the host the emptied directories back, instead of retrying the
///   removal forever;
/// - the guest removing the chain (`rm -rf`): the host's copy goes too, and the problem with it;
/// - neither agent crashed (the host never had to reconnect), and a directory beside the share
///   is untouched.
#[test]
fn a_chain_10000_directories_deep_in_the_guest_syncs_up_to_the_bound_and_goes_away() {
    let _heavy = heavy();
    let mut a = Agents::new("");
    let out = a.tmp.path().join("OUT");
    write(&out, "keep.txt", "beside the share\n");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    let out_before = tree(&out);
    write(&a.host_dir, "before.txt", "synced before the chain\n");
    a.start();
    a.wait_in_sync();

    build_chain(&a.guest_dir);
    let bottom = b"ten thousand components deep\n";
    assert_eq!(read_bottom(&a.guest_dir).as_deref(), Some(&bottom[..]));
    let shallow = format!("{}/shallow.txt", chain_path(9));
    lands(&a, &a.host_dir, &shallow, "ten components deep\n");
    let reported = eventually(SETTLE, || too_deep(&a));
    assert!(
        reported,
        "the entry past the bound is not reported: {:?}",
        problems(&a)
    );
    settles(&a, "after the chain was made");
    assert_eq!(chain_depth(&a.host_dir), 1023, "the host's chain");
    assert_eq!(chain_depth(&a.guest_dir), CHAIN_DIRS);
    assert_eq!(read_bottom(&a.guest_dir).as_deref(), Some(&bottom[..]));

    // Files elsewhere keep syncing both ways.
    write(
        &a.host_dir,
        "host-after.txt",
        "from the host, after the chain\n",
    );
    write(
        &a.guest_dir,
        "guest-after.txt",
        "from the guest, after the chain\n",
    );
    lands(
        &a,
        &a.guest_dir,
        "host-after.txt",
        "from the host, after the chain\n",
    );
    lands(
        &a,
        &a.host_dir,
        "guest-after.txt",
        "from the guest, after the chain\n",
    );
    settles(&a, "after edits elsewhere");

    // The host deletes its copy of the chain.
    let rm = Command::new("rm")
        .arg("-rf")
        .arg(a.host_dir.join("deep"))
        .output()
        .unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let trashed = eventually(SETTLE, || {
        !kept_as(&a.guest_dir, &shallow, "ten components deep\n").is_empty()
    });
    assert!(
        trashed,
        "the guest's depth-10 file was not deleted into its trash"
    );
    settles(&a, "after the host deleted its copy of the chain");
    assert!(!a.guest_dir.join(&shallow).exists());
    assert_eq!(read_bottom(&a.guest_dir).as_deref(), Some(&bottom[..]));
    assert_eq!(
        chain_depth(&a.host_dir),
        1023,
        "the emptied directories came back"
    );
    assert!(!a.host_dir.join(&shallow).exists());
    a.sync();
    assert!(too_deep(&a), "{:?}", problems(&a));

    // The guest removes the chain.
    let rm = Command::new("rm")
        .arg("-rf")
        .arg(a.guest_dir.join("deep"))
        .output()
        .unwrap();
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let gone = eventually(SETTLE, || !a.host_dir.join("deep").exists());
    assert!(
        gone,
        "the host's copy of the chain is still {} deep; status: {}\n--- host.log (tail)\n{}\n\
         --- guest.log (tail)\n{}",
        chain_depth(&a.host_dir),
        a.status(),
        a.log_tail("host.log", 20),
        a.log_tail("guest.log", 60)
    );
    settles(&a, "after the guest removed the chain");
    a.sync();
    assert_eq!(problems(&a), vec![]);
    a.converge(SETTLE);
    assert_eq!(tree(&a.host_dir).len(), 3);
    assert_eq!(a.status()["agent"]["reconnects"], 0, "the guest went away");
    assert_eq!(
        a.guest_status()["shares"][0]["halt_code"],
        serde_json::Value::Null
    );
    assert_eq!(tree(&out), out_before, "something beside the share changed");
}

/// A directory deleted on one side while the other side's copy holds an entry sync leaves
/// alone because its scan reported it as a problem (here a FIFO, never synced): the synced
/// files go, the directory stays with the FIFO, and the share settles in sync, the side that
/// deleted it getting the emptied directory back (as for ignored files), instead of retrying
/// the removal forever (`directory is not empty`).
#[tokio::test]
async fn a_directory_deleted_while_the_other_side_holds_an_unsynced_fifo_in_it_settles() {
    use vmsync_engine::status::ShareState;
    use vmsync_tests::fixture::Pair;
    let mut p = Pair::new(Default::default());
    write(&p.host_dir, "x/a.txt", "a");
    write(&p.host_dir, "keep.txt", "k");
    p.sync().await;
    let fifo = p.guest_dir.join("x/fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    p.sync().await;
    std::fs::remove_dir_all(p.host_dir.join("x")).unwrap();
    let report = p.sync().await;
    assert!(!report.retry && report.pending == 0, "{report:?}");
    let st = p.status();
    assert_eq!(st.state, ShareState::InSync, "{st:?}");
    assert!(
        std::fs::symlink_metadata(&fifo).is_ok_and(|m| !m.is_file() && !m.is_dir()),
        "the FIFO went"
    );
    assert!(
        !p.guest_dir.join("x/a.txt").exists(),
        "the synced file stayed"
    );
    assert_eq!(kept_as(&p.guest_dir, "x/a.txt", "a").len(), 1);
    assert!(
        p.host_dir.join("x").is_dir(),
        "the directory did not come back"
    );
    assert_eq!(tree(&p.host_dir).len(), 2);
    let report = p.cycle().await;
    assert_eq!(
        (report.applied, report.retry, report.pending),
        (0, false, 0)
    );
}

/// A problem a full cycle found (a FIFO, never synced) stays listed in `status` while it
/// stands: a live cycle of another path says nothing about it.
#[tokio::test]
async fn a_standing_problem_stays_listed_after_a_live_cycle_elsewhere() {
    use vmsync_tests::fixture::Pair;
    let mut p = Pair::new(Default::default());
    write(&p.host_dir, "keep.txt", "k");
    p.sync().await;
    let made = Command::new("mkfifo")
        .arg(p.guest_dir.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    p.sync().await;
    assert_eq!(p.status().problems.len(), 1, "{:?}", p.status().problems);
    write(&p.host_dir, "other.txt", "o");
    p.cycle_paths(&["other.txt"]).await;
    assert_eq!(read(&p.guest_dir, "other.txt"), b"o");
    assert_eq!(p.status().problems.len(), 1, "the FIFO is no longer listed");
    // A cycle that covers it finds it gone.
    std::fs::remove_file(p.guest_dir.join("fifo")).unwrap();
    p.cycle_paths(&["fifo"]).await;
    assert!(p.status().problems.is_empty(), "{:?}", p.status().problems);
}

/// A real inotify queue overflow: the guest agent is stopped (`SIGSTOP`) while files are made
/// in its share, about twice as many events as the kernel's queue holds
/// (`fs.inotify.max_queued_events`, 16,384 by default), so the kernel drops the rest and queues
/// `IN_Q_OVERFLOW`. Once the agent runs again it says so and rescans the whole share: every
/// file reaches the host, the trees end identical.
#[test]
fn a_real_inotify_queue_overflow_rescans_and_loses_no_file() {
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16_384);
    if limit > 65_536 {
        eprintln!("skipped: fs.inotify.max_queued_events is {limit}, too many files to fill");
        return;
    }
    let _heavy = heavy();
    let mut a = Agents::new("");
    write(
        &a.guest_dir,
        "flood/before.txt",
        "synced before the flood\n",
    );
    a.start();
    a.wait_in_sync();
    a.freeze_guest();
    // In a directory the agent watches already (a new one would get its watch only once the
    // agent runs): each new file is at least two events, its creation and its close after
    // writing.
    let dir = a.guest_dir.join("flood");
    for i in 0..limit + 1_000 {
        std::fs::write(dir.join(format!("{i:05}")), format!("{i}\n")).unwrap();
    }
    a.thaw_guest();
    let said = eventually(SETTLE, || {
        a.log("guest.log")
            .contains("the kernel's event queue overflowed")
    });
    assert!(said, "no overflow seen; {}", a.log_tail("guest.log", 20));
    a.converge(SETTLE);
    assert_same_tree(&a.host_dir, &a.guest_dir);
}
