//! The trash: every file or symlink a change deletes or replaces is kept in the side's
//! `.vmsync/trash/<batch>/<path>`, can be put back (by the controller through `put_back`, by
//! the user with `restore`), and expires by age and by size. In-process pairs for the sync,
//! the real `vmsync-host` binary for the CLI.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmsync_core::endpoint::{Endpoint, Outcome};
use vmsync_core::{Entry, FileMeta, Hash, RelPath, Timestamp};
use vmsync_engine::root::ShareRoot;
use vmsync_engine::trash::{self, parse_batch_name, Retention, SizeLimit};
use vmsync_tests::agents::bin;
use vmsync_tests::fixture::{
    assert_same_tree, random_bytes, read, set_mtime, trash_files, tree, write, Pair, PairOptions,
};

fn pair() -> Pair {
    Pair::new(PairOptions::default())
}

/// Batch directories of a share's trash, sorted (by time).
fn batches(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(".vmsync/trash"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn rel(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes()).unwrap()
}

#[tokio::test]
async fn a_deletion_on_the_guest_keeps_the_host_file_byte_identical_under_its_path() {
    let mut p = pair();
    let data = random_bytes(7, 200_000);
    write(&p.host_dir, "docs/deep/report.bin", &data);
    write(&p.host_dir, "stays.txt", "stays");
    p.sync().await;
    std::fs::remove_file(p.guest_dir.join("docs/deep/report.bin")).unwrap();
    p.sync().await;
    assert!(!p.host_dir.join("docs/deep/report.bin").exists());
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let b = batches(&p.host_dir);
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(parse_batch_name(b[0].as_bytes()).is_some(), "{b:?}");
    let kept = p
        .host_dir
        .join(".vmsync/trash")
        .join(&b[0])
        .join("docs/deep/report.bin");
    assert_eq!(std::fs::read(&kept).unwrap(), data);
    assert_eq!(p.host_trash().len(), 1, "only the deleted file");
    // The guest deleted it itself: nothing of the guest's was trashed.
    assert!(p.guest_trash().is_empty(), "{:?}", p.guest_trash());
}

#[tokio::test]
async fn an_edit_on_the_guest_keeps_the_hosts_previous_version() {
    let mut p = pair();
    write(&p.host_dir, "f.txt", "version one");
    write(&p.host_dir, "g.txt", "other");
    p.sync().await;
    write(&p.guest_dir, "f.txt", "version two, longer");
    p.sync().await;
    assert_eq!(read(&p.host_dir, "f.txt"), b"version two, longer");
    let kept = p.host_trash();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].0.ends_with("/f.txt"), "{kept:?}");
    assert_eq!(kept[0].1, b"version one");
    // A second edit keeps the second version too, in a batch of its own that sorts later.
    write(&p.guest_dir, "f.txt", "version three");
    p.sync().await;
    let kept: Vec<Vec<u8>> = p.host_trash().into_iter().map(|(_, d)| d).collect();
    assert_eq!(
        kept,
        vec![b"version one".to_vec(), b"version two, longer".to_vec()]
    );
}

#[tokio::test]
async fn a_file_replaced_by_a_directory_or_a_symlink_is_kept() {
    let mut p = pair();
    write(&p.host_dir, "becomes-dir", "file content");
    write(&p.host_dir, "target.txt", "t");
    write(&p.host_dir, "becomes-link", "linked over");
    symlink("target.txt", p.host_dir.join("old-link")).unwrap();
    p.sync().await;
    std::fs::remove_file(p.guest_dir.join("becomes-dir")).unwrap();
    write(&p.guest_dir, "becomes-dir/inside", "new");
    std::fs::remove_file(p.guest_dir.join("becomes-link")).unwrap();
    symlink("target.txt", p.guest_dir.join("becomes-link")).unwrap();
    std::fs::remove_file(p.guest_dir.join("old-link")).unwrap();
    symlink("becomes-dir", p.guest_dir.join("old-link")).unwrap();
    p.sync().await;
    assert_same_tree(&p.host_dir, &p.guest_dir);
    let kept = p.host_trash();
    let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        kept.iter()
            .any(|(n, d)| n.ends_with("/becomes-dir") && d == b"file content"),
        "{names:?}"
    );
    assert!(
        kept.iter()
            .any(|(n, d)| n.ends_with("/becomes-link") && d == b"linked over"),
        "{names:?}"
    );
    // The replaced symlink is kept as a symlink, with its old target.
    let b = batches(&p.host_dir);
    let old_link = b
        .iter()
        .map(|b| p.host_dir.join(".vmsync/trash").join(b).join("old-link"))
        .find(|l| l.symlink_metadata().is_ok())
        .expect("old symlink kept");
    assert_eq!(
        std::fs::read_link(old_link).unwrap(),
        PathBuf::from("target.txt")
    );
}

#[tokio::test]
async fn ignored_paths_are_never_trashed() {
    let mut p = Pair::new(PairOptions {
        ignore: vec!["*.log".into()],
        ..PairOptions::default()
    });
    write(&p.host_dir, "d/kept.txt", "synced");
    write(&p.host_dir, "d/host.log", "host's own log");
    write(&p.host_dir, "other.txt", "x");
    p.sync().await;
    std::fs::remove_dir_all(p.guest_dir.join("d")).unwrap();
    p.sync().await;
    assert_eq!(read(&p.host_dir, "d/host.log"), b"host's own log");
    let kept = p.host_trash();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].0.ends_with("/d/kept.txt"), "{kept:?}");
}

#[tokio::test]
async fn put_back_returns_what_a_transition_removed_and_only_that() {
    let mut p = pair();
    write(&p.host_dir, "a/b/c.txt", "c content");
    write(&p.host_dir, "stays.txt", "stays");
    symlink("c.txt", p.host_dir.join("a/b/link")).unwrap();
    p.sync().await;
    let c_meta = match tree_entry(&p.host_dir, "a/b/c.txt") {
        Some(e) => e,
        None => panic!("no entry"),
    };
    std::fs::remove_dir_all(p.guest_dir.join("a")).unwrap();
    p.sync().await;
    assert!(!p.host_dir.join("a").exists());
    let items = vec![
        (
            rel("a"),
            Entry::Dir {
                mode: 0o755,
                mtime: Default::default(),
            },
        ),
        (
            rel("a/b"),
            Entry::Dir {
                mode: 0o755,
                mtime: Default::default(),
            },
        ),
        (rel("a/b/c.txt"), c_meta.clone()),
        (
            rel("a/b/link"),
            Entry::Symlink {
                target: b"c.txt".to_vec(),
                mtime: Default::default(),
            },
        ),
    ];
    // A version that was never removed is not found.
    let mut wrong = c_meta.clone();
    if let Entry::File(m) = &mut wrong {
        m.mtime.secs += 1;
    }
    let out = p
        .sides()
        .host
        .put_back(vec![(rel("a/b/c.txt"), wrong)])
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Failed(_)), "{out:?}");
    let out = p.sides().host.put_back(items.clone()).await.unwrap();
    assert_eq!(out, vec![Outcome::Applied; 4]);
    assert_eq!(read(&p.host_dir, "a/b/c.txt"), b"c content");
    assert_eq!(
        std::fs::read_link(p.host_dir.join("a/b/link")).unwrap(),
        PathBuf::from("c.txt")
    );
    assert!(p.host_trash().is_empty(), "moved back, not copied");
    // Again: the directories are there (applied), the files are in place (changed).
    let out = p.sides().host.put_back(items).await.unwrap();
    assert_eq!(out[0], Outcome::Applied);
    assert!(matches!(out[2], Outcome::Changed(Some(_))), "{out:?}");
}

/// The entry the host's index would give a file: size and mtime are what put_back compares.
fn tree_entry(root: &Path, rel: &str) -> Option<Entry> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(root.join(rel)).ok()?;
    Some(Entry::File(FileMeta {
        size: m.size(),
        mode: m.mode() & 0o777,
        mtime: Timestamp::new(m.mtime(), u32::try_from(m.mtime_nsec()).unwrap()),
        digest: Hash([0; 32]),
    }))
}

#[tokio::test]
async fn expiry_by_age_then_by_size_oldest_first() {
    let mut p = pair();
    for i in 0..4 {
        write(&p.host_dir, &format!("f{i}"), random_bytes(i, 1000));
    }
    write(&p.host_dir, "stays", "x");
    p.sync().await;
    // Four deletions in four cycles: four batches of 1000 bytes, oldest first.
    for i in 0..4 {
        std::fs::remove_file(p.guest_dir.join(format!("f{i}"))).unwrap();
        p.sync().await;
    }
    let all = batches(&p.host_dir);
    assert_eq!(all.len(), 4, "{all:?}");
    let root = ShareRoot::open(&p.host_dir).unwrap();
    let now = trash::now();
    // Nothing expired, within the size: nothing removed.
    let kept = trash::prune_once(&root, Retention::default(), 1 << 30, now).unwrap();
    assert_eq!(kept, (4, 4000));
    assert_eq!(batches(&p.host_dir), all);
    // 2500 bytes at most: nothing kept within the hour goes for size alone...
    let by_size = Retention {
        max_size: SizeLimit::Bytes(2500),
        ..Retention::default()
    };
    assert_eq!(
        trash::prune_once(&root, by_size, 0, now).unwrap(),
        (4, 4000)
    );
    assert_eq!(batches(&p.host_dir), all);
    // ...and two hours later the two oldest go.
    let now = vmsync_core::entry::Timestamp::new(now.secs + 7200, now.nanos);
    assert_eq!(
        trash::prune_once(&root, by_size, 0, now).unwrap(),
        (2, 2000)
    );
    assert_eq!(batches(&p.host_dir), all[2..].to_vec());
    assert_eq!(
        trash_files(&p.host_dir)
            .into_iter()
            .map(|(_, d)| d)
            .collect::<Vec<_>>(),
        vec![random_bytes(2, 1000), random_bytes(3, 1000)]
    );
    // A percentage of a small share (10 % of 10,000 bytes) never limits below 64 MiB.
    let by_percent = Retention {
        max_size: SizeLimit::Percent(10),
        ..Retention::default()
    };
    assert_eq!(
        trash::prune_once(&root, by_percent, 10_000, now).unwrap(),
        (2, 2000)
    );
    // 10 % of 20 GiB is 2 GiB: within. 0 %: down to the newest batch, which always stays.
    assert_eq!(
        trash::prune_once(&root, by_percent, 20 << 30, now).unwrap(),
        (2, 2000)
    );
    let zero = Retention {
        max_size: SizeLimit::Bytes(0),
        ..Retention::default()
    };
    assert_eq!(trash::prune_once(&root, zero, 0, now).unwrap(), (1, 1000));
    assert_eq!(batches(&p.host_dir), all[3..].to_vec());
    // A day later with keep_deleted = 1h: the last batch has expired too.
    let by_age = Retention {
        max_age: Duration::from_secs(3600),
        ..Retention::default()
    };
    let later = Timestamp::new(now.secs + 86_400, 0);
    assert_eq!(
        trash::prune_once(&root, by_age, 1 << 30, later).unwrap(),
        (0, 0)
    );
    assert!(batches(&p.host_dir).is_empty());
    // Nothing outside the trash was touched.
    assert_eq!(tree(&p.host_dir).len(), 1);
    assert_eq!(read(&p.host_dir, "stays"), b"x");
}

/// A file rewritten again and again within the hour, with the trash over its size: the size
/// limit cannot remove batches that young, so it thins them: of each path, its oldest kept
/// version (what it was before the edits) and its newest stay, and what the guest deleted.
#[tokio::test]
async fn a_trash_over_its_size_keeps_each_paths_oldest_and_newest_version() {
    let mut p = pair();
    write(&p.host_dir, "log.bin", random_bytes(100, 1000));
    write(&p.host_dir, "gone.bin", random_bytes(200, 1000));
    p.sync().await;
    for i in 1..=4 {
        write(&p.guest_dir, "log.bin", random_bytes(100 + i, 1000));
        p.sync().await;
    }
    std::fs::remove_file(p.guest_dir.join("gone.bin")).unwrap();
    p.sync().await;
    // The kept contents, sorted, as the seeds of `random_bytes`.
    let kept = |p: &Pair| -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = p.host_trash().into_iter().map(|(_, d)| d).collect();
        v.sort();
        v
    };
    let seeds = |seeds: &[u64]| -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = seeds.iter().map(|&s| random_bytes(s, 1000)).collect();
        v.sort();
        v
    };
    assert_eq!(kept(&p), seeds(&[100, 101, 102, 103, 200]));
    let root = ShareRoot::open(&p.host_dir).unwrap();
    let now = trash::now();
    let limit = |bytes| Retention {
        max_size: SizeLimit::Bytes(bytes),
        ..Retention::default()
    };
    // 4,000 bytes at most: one middle version goes, the oldest of the two.
    let left = trash::prune_once(&root, limit(4000), 0, now).unwrap();
    assert_eq!(left, (4, 4000));
    assert_eq!(kept(&p), seeds(&[100, 102, 103, 200]));
    // Nothing at all: down to the ends of log.bin and the deletion, however far over.
    let left = trash::prune_once(&root, limit(0), 0, now).unwrap();
    assert_eq!(left, (3, 3000));
    assert_eq!(kept(&p), seeds(&[100, 103, 200]));
    assert_eq!(read(&p.host_dir, "log.bin"), random_bytes(104, 1000));
    assert_same_tree(&p.host_dir, &p.guest_dir);
}

/// A host config for share `s` at `dir`, for the CLI (no agent needs to run).
fn host_config(p: &Pair) -> PathBuf {
    let file = p.tmp.path().join("host.toml");
    std::fs::write(
        &file,
        format!(
            "guest = \"unix:{}\"\nstate_dir = \"{}\"\ncontrol = \"{}\"\n[[share]]\nname = \"s\"\npath = \"{}\"\n",
            p.tmp.path().join("g.sock").display(),
            p.tmp.path().join("cli-state").display(),
            p.tmp.path().join("h.ctl").display(),
            p.host_dir.display()
        ),
    )
    .unwrap();
    file
}

fn host_cli(config: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin("vmsync-host"))
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["--share", "s"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn trash_lists_and_restore_puts_back_never_over_newer_files() {
    let mut p = pair();
    write(&p.host_dir, "gone.txt", "gone, then back");
    write(&p.host_dir, "old.txt", "kept version of old");
    write(&p.host_dir, "new.txt", "kept version of new");
    write(&p.host_dir, "stays.txt", "x");
    for (f, secs) in [
        ("gone.txt", 1_700_000_000),
        ("old.txt", 1_700_000_100),
        ("new.txt", 1_700_000_100),
    ] {
        set_mtime(&p.host_dir.join(f), secs, 0);
    }
    p.sync().await;
    for f in ["gone.txt", "old.txt", "new.txt"] {
        std::fs::remove_file(p.guest_dir.join(f)).unwrap();
    }
    p.sync().await;
    // Files that appeared since: one older than its kept version, one newer.
    write(&p.host_dir, "old.txt", "an older file");
    set_mtime(&p.host_dir.join("old.txt"), 1_600_000_000, 0);
    write(&p.host_dir, "new.txt", "a newer file");
    set_mtime(&p.host_dir.join("new.txt"), 1_800_000_000, 0);
    let config = host_config(&p);

    let (code, out) = host_cli(&config, &["trash", "--json"]);
    assert_eq!(code, 0, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["files"], 3, "{out}");
    assert_eq!(listed["bytes"], 15 + 19 + 19, "{out}");
    let mut paths: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, ["gone.txt", "new.txt", "old.txt"]);

    // --since in the future selects nothing; a dry run changes nothing.
    let (code, out) = host_cli(&config, &["restore", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing in the trash matches"), "{out}");
    let before = tree(&p.host_dir);
    let (code, out) = host_cli(&config, &["restore", "--dry-run"]);
    assert_eq!(code, 3, "the newer file would be skipped: {out}");
    assert_eq!(tree(&p.host_dir), before);

    // One path only.
    let (code, out) = host_cli(&config, &["restore", "--since", "1h", "gone.txt"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(read(&p.host_dir, "gone.txt"), b"gone, then back");
    assert!(
        p.host_dir.join("new.txt").exists() && read(&p.host_dir, "old.txt") == b"an older file"
    );

    // Everything: the older file is replaced (and itself kept), the newer one is skipped.
    let (code, out) = host_cli(&config, &["restore"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("skipped: new.txt"), "{out}");
    assert_eq!(read(&p.host_dir, "old.txt"), b"kept version of old");
    assert_eq!(read(&p.host_dir, "new.txt"), b"a newer file");
    let kept: Vec<Vec<u8>> = p.host_trash().into_iter().map(|(_, d)| d).collect();
    assert!(kept.contains(&b"an older file".to_vec()), "{kept:?}");
    assert!(kept.contains(&b"kept version of new".to_vec()), "{kept:?}");
    assert_eq!(kept.len(), 2, "{kept:?}");
}
