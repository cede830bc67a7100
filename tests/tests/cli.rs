//! Share paths, missing roots and the CLI across real processes: `vmsync-host` and
//! `vmsync-guest` on temp directories over a Unix socket, driven through their own commands.
//! Each test pins what a user met: a config check that stopped at the first problem, a share
//! given through a symlink that halted at once, a root missing at start that was never watched
//! again, a halt that outlived the directory it was about, counters that stayed at zero,
//! `wait` with no agent, `resume` that showed `connecting`, conflicts with no procedure.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use vmsync_tests::agents::{bin, eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, random_bytes, read, tree, write};

/// The exit code `wait`, `status`, `sync`, `resume` and `resolve` give when no agent answers.
const EXIT_NO_AGENT: i32 = 4;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Replaces the host share's `path = "OLD"` with `NEW` in host.toml.
fn set_host_path(a: &Agents, old: &Path, new: &Path) {
    let toml = std::fs::read_to_string(&a.host_toml).unwrap();
    let from = format!("path = \"{}\"", old.display());
    assert!(toml.contains(&from), "{toml}");
    let to = format!("path = \"{}\"", new.display());
    std::fs::write(&a.host_toml, toml.replace(&from, &to)).unwrap();
}

/// The first share's status, or `None` while the host does not answer yet.
fn try_share(a: &Agents) -> Option<serde_json::Value> {
    let out = a.host_cmd(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(status["shares"][0].clone())
}

/// Every directory under the share `root`, `root` included and the reserved `.vmsync/` left
/// out (what the share's watch covers).
fn count_dirs(root: &Path) -> u64 {
    fn under(dir: &Path) -> u64 {
        let mut n = 1;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                n += under(&entry.path());
            }
        }
        n
    }
    under(root) - under(&root.join(".vmsync"))
}

#[test]
fn check_lists_every_problem_not_only_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("vm1.toml");
    std::fs::write(
        &host,
        "guest = \"unix:/g.sock\"\nstate_dri = \"/x\"\n\
         [[share]]\nname = 5\npath = \"/a\"\nmdoe = \"x\"\n\
         [[share]]\nname = \"b\"\npath = \"/b\"\nmode = \"both\"\n\
         [[share]]\nname = \"c d\"\npath = \"rel\"\n",
    )
    .unwrap();
    let out = Command::new(bin("vmsync-host"))
        .args(["check", "--config"])
        .arg(&host)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = host.display().to_string();
    for want in [
        format!("{shown}:2:1: unknown field `state_dri`"),
        format!("{shown}:4:8: invalid type: integer `5`, expected a string"),
        format!("{shown}:6:1: unknown field `mdoe`"),
        format!("{shown}:10:8: unknown variant `both`"),
        format!("{shown}:12:8: share name \"c d\""),
        format!("{shown}:13:8: share \"c d\" path: path \"rel\" is relative"),
    ] {
        assert!(stderr.contains(&want), "lacks {want:?}:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 6, "{stderr}");

    let guest = tmp.path().join("guest.toml");
    std::fs::write(
        &guest,
        "lisen = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nkeep = 1\n",
    )
    .unwrap();
    let out = Command::new(bin("vmsync-guest"))
        .args(["check", "--config"])
        .arg(&guest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1:1: unknown field `lisen`"), "{stderr}");
    assert!(stderr.contains("5:1: unknown field `keep`"), "{stderr}");
}

#[test]
fn a_share_path_through_a_symlink_syncs_and_nesting_is_judged_on_real_directories() {
    let mut a = Agents::new("");
    write(&a.host_dir, "src/main.rs", "fn main() {}\n");
    let link = a.tmp.path().join("link-to-host");
    std::os::unix::fs::symlink(&a.host_dir, &link).unwrap();
    let host_dir = a.host_dir.clone();
    set_host_path(&a, &host_dir, &link);

    let out = a.host_cmd(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let real = a.host_dir.canonicalize().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("share src: {}", real.display())),
        "{}",
        text(&out)
    );

    a.start();
    a.wait_in_sync();
    let share = a.share();
    assert_eq!(share["state"], "in-sync");
    assert!(share["halt_code"].is_null(), "{share}");
    assert_eq!(read(&a.guest_dir, "src/main.rs"), b"fn main() {}\n");
    // Live through the link too.
    write(&link, "src/lib.rs", "pub fn f() {}\n");
    a.converge(Duration::from_secs(30));
    assert_eq!(read(&a.guest_dir, "src/lib.rs"), b"pub fn f() {}\n");
    // The file is there; the cycle may still be setting its directory's time.
    a.wait_in_sync();
    assert_eq!(a.share()["state"], "in-sync");

    // A second share inside the first, named through the link: refused by check.
    let nested = a.tmp.path().join("nested.toml");
    std::fs::write(
        &nested,
        format!(
            "guest = \"unix:/g.sock\"\nstate_dir = \"/s\"\ncontrol = \"/c.ctl\"\n\
             [[share]]\nname = \"a\"\npath = \"{}\"\n[[share]]\nname = \"b\"\npath = \"{}/src\"\n",
            host_dir.display(),
            link.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("vmsync-host"))
        .args(["check", "--config"])
        .arg(&nested)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("nest; shares must not overlap"),
        "{}",
        text(&out)
    );
}

#[test]
fn wait_status_and_guest_status_say_at_once_that_no_agent_answers() {
    let a = Agents::new("");
    // No agent runs. Before, `wait` polled out its whole timeout and exited 1.
    let out = a.host_cmd(&["wait", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(EXIT_NO_AGENT), "{}", text(&out));
    assert!(text(&out).contains("no agent answers"), "{}", text(&out));
    let out = a.host_cmd(&["status"]);
    assert_eq!(out.status.code(), Some(EXIT_NO_AGENT), "{}", text(&out));
    let out = Command::new(bin("vmsync-guest"))
        .args(["status", "--config"])
        .arg(&a.guest_toml)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_NO_AGENT), "{}", text(&out));
}

#[test]
fn resume_shows_the_share_syncing_not_connecting() {
    let mut a = Agents::new("");
    for i in 0..30 {
        write(&a.host_dir, &format!("f{i}"), format!("{i}"));
    }
    a.start();
    a.wait_in_sync();
    a.stop_guest();
    std::fs::remove_dir_all(&a.guest_dir).unwrap();
    std::fs::create_dir_all(&a.guest_dir).unwrap();
    a.start_guest();
    assert_eq!(a.wait(60), 3);
    assert_eq!(a.share()["halt_code"], "root-replaced");
    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("src "))
        .unwrap_or_else(|| panic!("no row for src:\n{stdout}"));
    assert!(!row.contains("connecting"), "{stdout}");
    assert!(
        row.contains("syncing") || row.contains("in-sync"),
        "{stdout}"
    );
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

#[test]
fn resolve_keeps_the_host_the_guest_or_both_and_trashes_the_loser() {
    let mut a = Agents::new("");
    for name in ["a.txt", "b.txt", "c.txt"] {
        write(&a.host_dir, name, "base");
    }
    a.start();
    a.wait_in_sync();
    a.stop_host();
    for name in ["a.txt", "b.txt", "c.txt"] {
        write(&a.host_dir, name, format!("host {name}"));
        write(&a.guest_dir, name, format!("guest {name}"));
    }
    a.start_host();
    assert_eq!(a.wait(60), 3, "three conflicts");
    assert_eq!(a.share()["conflicts"].as_array().unwrap().len(), 3);

    // `status` prints the exact command for each.
    let out = a.host_cmd(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["a.txt", "b.txt", "c.txt"] {
        let want = format!(
            "vmsync-host resolve --config {} --share src {name} --keep host|guest|both",
            a.host_toml.display()
        );
        assert!(stdout.contains(&want), "lacks {want:?}:\n{stdout}");
    }

    let resolve =
        |path: &str, keep: &str| a.host_cmd(&["resolve", "--share", "src", path, "--keep", keep]);
    let out = resolve("nothing.txt", "host");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not in conflict"), "{}", text(&out));

    let out = resolve("a.txt", "host");
    assert_eq!(out.status.code(), Some(3), "two left: {}", text(&out));
    let out = resolve("b.txt", "guest");
    assert_eq!(out.status.code(), Some(3), "one left: {}", text(&out));
    let out = resolve("c.txt", "both");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    a.wait_in_sync();
    assert!(a.share()["conflicts"].as_array().unwrap().is_empty());

    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(read(&a.guest_dir, "a.txt"), b"host a.txt");
    assert_eq!(read(&a.host_dir, "b.txt"), b"guest b.txt");
    assert_eq!(read(&a.host_dir, "c.txt"), b"guest c.txt");
    let siblings: Vec<String> = tree(&a.host_dir)
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .filter(|k| k.starts_with("c.host-conflict-") && k.ends_with(".txt"))
        .collect();
    assert_eq!(siblings.len(), 1, "{siblings:?}");
    assert_eq!(read(&a.guest_dir, &siblings[0]), b"host c.txt");
    // The losers are in their side's trash, byte for byte.
    let kept = |trash: Vec<(String, Vec<u8>)>, name: &str| {
        trash
            .into_iter()
            .filter(|(p, _)| p.ends_with(&format!("/{name}")))
            .map(|(_, data)| data)
            .collect::<Vec<_>>()
    };
    assert!(
        kept(a.guest_trash(), "a.txt").contains(&b"guest a.txt".to_vec()),
        "{:?}",
        a.guest_trash()
    );
    assert!(
        kept(a.host_trash(), "b.txt").contains(&b"host b.txt".to_vec()),
        "{:?}",
        a.host_trash()
    );
}

#[test]
fn a_host_root_missing_at_start_is_watched_live_once_it_appears() {
    let mut a = Agents::new("");
    std::fs::remove_dir_all(&a.host_dir).unwrap();
    write(&a.guest_dir, "g.txt", "from the guest");
    a.start();
    assert!(
        eventually(Duration::from_secs(30), || try_share(&a)
            .is_some_and(|s| s["halt_code"] == "root-missing")),
        "{}",
        a.share()
    );
    std::fs::create_dir_all(&a.host_dir).unwrap();
    // The halt lifts at the next periodic rescan, and the watch starts with it.
    let watched = eventually(Duration::from_secs(60), || {
        let s = a.share();
        s["state"] == "in-sync" && s["watching"] == true && s["watch_problem"].is_null()
    });
    assert!(watched, "{}\n{}", a.share(), a.log_tail("host.log", 40));
    assert_eq!(read(&a.host_dir, "g.txt"), b"from the guest");
    write(&a.host_dir, "h.txt", "live from the host");
    a.converge(Duration::from_secs(30));
    assert_eq!(read(&a.guest_dir, "h.txt"), b"live from the host");
}

#[test]
fn a_halt_does_not_survive_a_change_of_the_share_path() {
    let mut a = Agents::new("");
    for i in 0..5 {
        write(&a.host_dir, &format!("f{i}"), format!("{i}"));
    }
    a.start();
    a.wait_in_sync();
    a.stop_host();
    // The old directory goes away (moved aside: nothing here may be lost).
    let old = a.tmp.path().join("old-host");
    std::fs::rename(&a.host_dir, &old).unwrap();
    a.start_host();
    assert_eq!(a.wait(60), 3);
    assert_eq!(a.share()["halt_code"], "root-missing");
    a.stop_host();
    // The user points the share at another directory.
    let new = a.tmp.path().join("new-host");
    write(&new, "n.txt", "new");
    let host_dir = a.host_dir.clone();
    set_host_path(&a, &host_dir, &new);
    a.start_host();
    a.wait_in_sync();
    let share = a.share();
    assert!(share["halt_code"].is_null(), "{share}");
    assert!(
        share["notice"].as_str().unwrap_or("").contains("changed"),
        "{share}"
    );
    // Merged add-only: nothing deleted on either side.
    assert_same_tree(&new, &a.guest_dir);
    assert_eq!(tree(&new).len(), 6);
    assert_eq!(read(&a.guest_dir, "n.txt"), b"new");
    assert_eq!(tree(&old).len(), 5);
}

#[test]
fn both_agents_count_what_they_move_and_the_directories_they_watch() {
    let mut a = Agents::new("");
    write(&a.host_dir, "h/one.bin", random_bytes(1, 100_000));
    write(&a.guest_dir, "g/two.bin", random_bytes(2, 100_000));
    a.start();
    a.wait_in_sync();
    // Live: new directories on both sides after the first full scan.
    write(&a.host_dir, "d1/d2/d3/x", "x");
    write(&a.guest_dir, "e1/e2/y", "y");
    a.converge(Duration::from_secs(30));
    assert_eq!(a.wait(60), 0);

    let guest = a.guest_status();
    let share = &guest["shares"][0];
    assert!(share["bytes_sent"].as_u64().unwrap() >= 100_000, "{guest}");
    assert!(
        share["bytes_received"].as_u64().unwrap() >= 100_000,
        "{guest}"
    );
    assert!(share["cycles"].as_u64().unwrap() >= 1, "{guest}");
    let host = a.share();
    assert!(host["bytes_sent"].as_u64().unwrap() >= 100_000, "{host}");
    assert!(
        host["bytes_received"].as_u64().unwrap() >= 100_000,
        "{host}"
    );

    // Every directory of each tree is watched, the live ones included.
    let host_ok = eventually(Duration::from_secs(30), || {
        a.share()["watched_dirs"].as_u64() == Some(count_dirs(&a.host_dir))
    });
    assert!(
        host_ok,
        "host watches {} of {} directories",
        a.share()["watched_dirs"],
        count_dirs(&a.host_dir)
    );
    let guest_ok = eventually(Duration::from_secs(30), || {
        a.guest_status()["shares"][0]["watched_dirs"].as_u64() == Some(count_dirs(&a.guest_dir))
    });
    assert!(
        guest_ok,
        "guest watches {} of {} directories",
        a.guest_status()["shares"][0]["watched_dirs"],
        count_dirs(&a.guest_dir)
    );
}

#[test]
fn removing_a_big_directory_does_not_flood_the_log_with_dropped_watches() {
    let mut a = Agents::new("");
    for i in 0..200 {
        write(&a.host_dir, &format!("target/d{i}/f"), format!("{i}"));
    }
    write(&a.host_dir, "keep.txt", "kept");
    a.start();
    a.wait_in_sync();
    // Build output (deletion-exempt): the removal goes through on both sides.
    std::fs::remove_dir_all(a.host_dir.join("target")).unwrap();
    a.converge(Duration::from_secs(60));
    assert!(!a.guest_dir.join("target").exists());
    assert_eq!(read(&a.guest_dir, "keep.txt"), b"kept");
    for log in ["host.log", "guest.log"] {
        let n = a
            .log(log)
            .matches("unable to remove watch descriptor")
            .count();
        assert_eq!(n, 0, "{log} has {n} dropped-watch lines");
    }
}

/// A share root swapped for another directory while the agents run (`mv share old; mv copy
/// share`, as putting back a backup does) halts the share, and once resumed the new directory
/// is watched: edits in it arrive, live.
#[test]
fn a_host_root_swapped_while_running_is_watched_anew_after_resume() {
    let mut a = Agents::new("");
    write(&a.host_dir, "a.txt", "one");
    a.start();
    a.wait_in_sync();
    let copy = a.tmp.path().join("host-copy");
    // `cp -a` keeps the root marker: the same share, in another directory.
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&a.host_dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::rename(&a.host_dir, a.tmp.path().join("host-old")).unwrap();
    std::fs::rename(&copy, &a.host_dir).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || try_share(&a)
            .is_some_and(|s| s["halt_code"] == "root-replaced")),
        "{}",
        a.share()
    );
    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(out.status.success(), "{}", text(&out));
    // The watch on the old directory hears nothing of the new one; a new watch starts at the
    // next check of the root, and rescans.
    write(&a.host_dir, "b.txt", "in the new directory");
    a.converge(Duration::from_secs(60));
    assert_eq!(read(&a.guest_dir, "b.txt"), b"in the new directory");
    write(&a.host_dir, "c.txt", "live");
    a.converge(Duration::from_secs(30));
    assert_eq!(read(&a.guest_dir, "c.txt"), b"live");
    assert!(a.share()["halt_code"].is_null(), "{}", a.share());
}
