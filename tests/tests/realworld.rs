//! Real-world check on data nobody here wrote: published versions of a real crate (`itoa`, no
//! required dependencies), fetched with cargo from the registry and committed as successive
//! git commits in the host share while both agents run over a Unix socket; then `git checkout`
//! back and forth between the tags on the host, and `cargo build --offline` in the guest share
//! with its `target/` synced to the host. After every step both trees are identical by
//! `rsync -anic --delete` (content, kinds, modes, times, symlinks), in both directions, and
//! `git status` in the guest is clean.
//!
//! Hard links (cargo links `target/debug/libitoa.rlib` to its copy in `deps/`) are compared
//! too: the link groups on both sides must be the same, and `rsync -anH` must find nothing.
//!
//! Needs `cargo`, `git`, `rsync` and the crates.io registry (the first run downloads the
//! versions and what their lock files name, a few hundred KiB); so it is `#[ignore]`d in the
//! README's `cargo test --workspace` and run by `.ci/run`:
//! `cargo test -p vmsync-tests --test realworld -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{rsync_differences, time_differences};

const CRATE: &str = "itoa";
/// Far apart: 0.4 → 1.0 moved and renamed files, later ones added tests and benches.
const VERSIONS: [&str; 4] = ["0.4.8", "1.0.1", "1.0.9", "1.0.15"];
const SETTLE: Duration = Duration::from_secs(120);

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cmd`, panicking with its output when it fails; returns its stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=vmsync test",
            "-c",
            "user.email=test@vmsync.invalid",
            "-c",
            "advice.detachedHead=false",
            "-c",
            "core.hooksPath=/dev/null",
        ])
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0");
    run(&mut c, &format!("git {args:?} in {}", dir.display()))
}

/// Where the registry keeps `CRATE` `version`'s sources, fetched by cargo through a throwaway
/// project that depends on exactly that version.
fn fetch(scratch: &Path, version: &str) -> PathBuf {
    let proj = scratch.join(format!("fetch-{version}"));
    std::fs::create_dir_all(proj.join("src")).unwrap();
    std::fs::write(
        proj.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [dependencies]\n{CRATE} = \"={version}\"\n[workspace]\n"
        ),
    )
    .unwrap();
    std::fs::write(proj.join("src/lib.rs"), "").unwrap();
    run(
        Command::new(cargo()).arg("fetch").current_dir(&proj),
        &format!("cargo fetch {CRATE} {version}"),
    );
    let meta = run(
        Command::new(cargo())
            .args(["metadata", "--format-version", "1"])
            .current_dir(&proj),
        "cargo metadata",
    );
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == CRATE && p["version"] == version)
        .and_then(|p| p["manifest_path"].as_str())
        .expect("the crate in cargo metadata");
    Path::new(manifest).parent().unwrap().to_path_buf()
}

/// Copies a directory tree (files and directories; what a crate package holds).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        if name == ".cargo-ok" || name == "target" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&src, &dst);
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// One version's sources, with a lock file that pins what its (optional and dev) dependencies
/// resolve to, all of them downloaded: an offline build then needs nothing more.
fn prepare(scratch: &Path, version: &str) -> PathBuf {
    let src = fetch(scratch, version);
    let dir = scratch.join(format!("{CRATE}-{version}"));
    copy_tree(&src, &dir);
    run(
        Command::new(cargo()).arg("fetch").current_dir(&dir),
        &format!("cargo fetch in {CRATE} {version}"),
    );
    dir
}

/// Inode groups of files with more than one link, as relative paths.
fn hard_link_groups(root: &Path) -> Vec<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<u64, Vec<String>>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".vmsync" {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() {
                walk(root, &path, out);
            } else if m.is_file() && m.nlink() > 1 {
                out.entry(m.ino()).or_default().push(rel);
            }
        }
    }
    let mut by_ino = BTreeMap::new();
    walk(root, root, &mut by_ino);
    let mut groups: Vec<Vec<String>> = by_ino
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .filter(|g| g.len() > 1)
        .collect();
    groups.sort();
    groups
}

/// After a step: the share settles, the trees are identical (rsync, both ways, checksums),
/// and the guest's git sees a clean work tree at the host's commit.
fn check(a: &Agents, step: &str) {
    let settled = eventually(SETTLE, || {
        a.wait(60) == 0 && rsync_differences(&a.host_dir, &a.guest_dir, &[]).is_empty()
    });
    assert!(
        settled,
        "{step}: never settled identical; status {}\nrsync: {:?}\ntimes: {:?}\nhost log:\n{}",
        a.status(),
        rsync_differences(&a.host_dir, &a.guest_dir, &[])
            .into_iter()
            .take(20)
            .collect::<Vec<_>>(),
        time_differences(&a.host_dir, &a.guest_dir, 10),
        a.log_tail("host.log", 40)
    );
    assert_eq!(
        a.share()["conflicts"].as_array().map(Vec::len),
        Some(0),
        "{step}"
    );
    for (src, dst) in [(&a.host_dir, &a.guest_dir), (&a.guest_dir, &a.host_dir)] {
        let diff = rsync_differences(src, dst, &["-c"]);
        assert!(
            diff.is_empty(),
            "{step}: rsync -anic from {} would change {:?}",
            src.display(),
            diff.iter().take(20).collect::<Vec<_>>()
        );
    }
    let status = git(
        &a.guest_dir,
        &["status", "--porcelain", "--untracked-files=all"],
    );
    assert!(
        status.is_empty(),
        "{step}: git status in the guest:\n{status}"
    );
    if a.host_dir
        .join(".git/refs/tags")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
    {
        assert_eq!(
            git(&a.guest_dir, &["rev-parse", "HEAD"]),
            git(&a.host_dir, &["rev-parse", "HEAD"]),
            "{step}"
        );
    }
    // Hard links: the same groups on both sides.
    let (hl, gl) = (
        hard_link_groups(&a.host_dir),
        hard_link_groups(&a.guest_dir),
    );
    let h_diff = rsync_differences(&a.guest_dir, &a.host_dir, &["-H"]);
    assert!(
        hl == gl && h_diff.is_empty(),
        "{step}: hard links differ: host groups {hl:?}, guest groups {gl:?}, rsync -H: {:?}",
        h_diff.iter().take(10).collect::<Vec<_>>()
    );
}

fn build_in_guest(a: &Agents, step: &str) {
    run(
        Command::new(cargo())
            .args(["build", "--offline"])
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .current_dir(&a.guest_dir),
        step,
    );
    // cargo links its outputs into `deps/`: the hard-link comparison has something to compare.
    assert!(
        !hard_link_groups(&a.guest_dir).is_empty(),
        "{step}: cargo made no hard links"
    );
}

#[test]
#[ignore = "needs the crates.io registry, cargo, git and rsync; .ci/run runs it"]
fn published_versions_switched_with_git_and_built_in_the_guest_stay_identical() {
    let mut a = Agents::new("");
    let scratch = a.tmp.path().join("scratch");
    let versions: Vec<PathBuf> = VERSIONS.iter().map(|v| prepare(&scratch, v)).collect();

    a.start();
    a.wait_in_sync();
    let host = a.host_dir.clone();
    git(&host, &["init", "-q", "-b", "main"]);
    // The reserved directory and the build outputs are not the repository's.
    // Only the build outputs: `.vmsync/` ignores itself.
    std::fs::write(host.join(".git/info/exclude"), "/target/\n").unwrap();
    check(&a, "git init");

    // Each version a commit on top of the last: what it removed is removed, what it added is
    // added (lock files too, which the crate's own .gitignore would leave out).
    for (version, dir) in VERSIONS.iter().zip(&versions) {
        git(&host, &["rm", "-rq", "--ignore-unmatch", "."]);
        copy_tree(dir, &host);
        git(
            &host,
            &["add", "-A", "-f", "--", ".", ":!.vmsync", ":!target"],
        );
        git(&host, &["commit", "-qm", &format!("{CRATE} {version}")]);
        git(&host, &["tag", &format!("v{version}")]);
        check(&a, &format!("commit of {version}"));
    }

    // Back and forth between far-apart tags, a build in the guest after some of them.
    let first = format!("v{}", VERSIONS[0]);
    let last = format!("v{}", VERSIONS[VERSIONS.len() - 1]);
    build_in_guest(&a, "cargo build at the last version");
    check(&a, "cargo build at the last version");
    for (round, tag) in [&first, &last, &first, &format!("v{}", VERSIONS[1]), &last]
        .into_iter()
        .enumerate()
    {
        git(&host, &["checkout", "-q", tag]);
        let step = format!("round {round}: checkout {tag}");
        check(&a, &step);
        if round % 2 == 0 {
            build_in_guest(&a, &format!("{step}, cargo build"));
            check(&a, &format!("{step}, cargo build"));
        }
    }
    // The guest's build outputs arrived on the host: a build there has nothing to do.
    let rlib = a.host_dir.join(format!("target/debug/lib{CRATE}.rlib"));
    assert!(rlib.exists(), "{} missing on the host", rlib.display());
}
