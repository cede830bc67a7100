//! `vmsync-host sync --guest ENDPOINT --share NAME DIR`: one share synced with a real
//! `vmsync-guest` once, without a configuration file or a running host agent, through the
//! byte-counting relay; its exit codes and what it says.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use vmsync_tests::agents::{bin, eventually, Agents};
use vmsync_tests::fixture::{assert_same_tree, patch_in_place, random_bytes, read, write};

/// The share `src` and a guest agent exporting it, running; nothing synced yet.
fn guest_up() -> Agents {
    let mut a = Agents::new("");
    a.start_guest();
    let socket = a.tmp.path().join("guest.sock");
    assert!(
        eventually(Duration::from_secs(10), || socket.exists()),
        "the guest agent did not bind {}:\n{}",
        socket.display(),
        a.log("guest.log")
    );
    a
}

/// `vmsync-host sync --guest unix:<relay> --share src <host dir> --state-dir <state> EXTRA`.
fn oneshot(a: &Agents, state: &Path, extra: &[&str]) -> Output {
    oneshot_to(a, &a.tmp.path().join("relay.sock"), state, extra)
}

fn oneshot_to(a: &Agents, socket: &Path, state: &Path, extra: &[&str]) -> Output {
    Command::new(bin("vmsync-host"))
        .arg("sync")
        .arg("--guest")
        .arg(format!("unix:{}", socket.display()))
        .arg("--share")
        .arg("src")
        .arg(&a.host_dir)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .output()
        .expect("run vmsync-host sync")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn state_dir(a: &Agents) -> PathBuf {
    a.tmp.path().join("oneshot-state")
}

#[test]
fn a_host_tree_reaches_the_guest_and_a_second_run_sends_only_the_edit() {
    let a = guest_up();
    write(&a.host_dir, "src/main.rs", "fn main() {}\n");
    write(&a.host_dir, "big.bin", random_bytes(1, 2 << 20));
    write(&a.host_dir, "gone.txt", "delete me");
    std::fs::create_dir_all(a.host_dir.join("empty")).unwrap();
    let state = state_dir(&a);

    let out = oneshot(&a, &state, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let first = a.wire_bytes();
    assert!(first > 2 << 20, "{first} bytes for a 2 MiB tree");
    assert!(state.join("host.redb").is_file(), "no state database");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("to the guest: 3 file(s)"), "{}", text(&out));

    // Edit a few bytes of the big file, delete another: the ancestor from the first run
    // makes this an edit and a deletion, not a merge.
    patch_in_place(&a.host_dir, "big.bin", 7, 1 << 20);
    std::fs::remove_file(a.host_dir.join("gone.txt")).unwrap();
    a.relay.reset();
    let out = oneshot(&a, &state, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let wire = a.wire_bytes();
    eprintln!("a 256-byte edit and a deletion: {wire} bytes on the socket (first run: {first})");
    assert!(
        wire < 160 * 1024,
        "{wire} bytes crossed the socket for a 256-byte edit (the first run: {first})"
    );
    assert!(!a.guest_dir.join("gone.txt").exists());
    let trash = a.guest_trash();
    assert!(
        trash
            .iter()
            .any(|(path, data)| path.ends_with("/gone.txt") && data == b"delete me"),
        "the deleted file is not in the guest's trash: {:?}",
        trash.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(json["state"], "in-sync", "{json}");
    assert_eq!(json["to_guest"]["files"], 1, "{json}");
    assert_eq!(json["to_guest"]["removed"], 1, "{json}");
    assert_eq!(json["to_host"]["files"], 0, "{json}");
    assert_eq!(json["files"], 2, "{json}");
    assert!(
        json["content_bytes_sent"].as_u64().unwrap() < 128 * 1024,
        "{json}"
    );
}

#[test]
fn both_sides_edited_between_runs_is_a_conflict_exit_3_naming_the_path() {
    let a = guest_up();
    write(&a.host_dir, "notes/f.txt", "base");
    write(&a.host_dir, "other.txt", "untouched");
    let state = state_dir(&a);
    let out = oneshot(&a, &state, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    write(&a.host_dir, "notes/f.txt", "host version");
    write(&a.guest_dir, "notes/f.txt", "guest version");
    let out = oneshot(&a, &state, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("conflict: notes/f.txt"), "{said}");
    assert!(said.contains("is conflicted"), "{said}");
    // How to settle it, with this very command.
    assert!(said.contains("--conflict host-wins"), "{said}");
    assert_eq!(read(&a.host_dir, "notes/f.txt"), b"host version");
    assert_eq!(read(&a.guest_dir, "notes/f.txt"), b"guest version");

    // The guidance works: the host's version wins, the guest's goes to the guest's trash.
    let out = oneshot(&a, &state, &["--conflict", "host-wins"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(read(&a.guest_dir, "notes/f.txt"), b"host version");
    assert!(a
        .guest_trash()
        .iter()
        .any(|(path, data)| path.ends_with("/notes/f.txt") && data == b"guest version"));
}

#[test]
fn no_guest_listening_fails_with_exit_1_at_once() {
    let a = Agents::new("");
    let state = state_dir(&a);
    // No socket at all, and a socket file nobody listens on.
    let missing = a.tmp.path().join("nobody.sock");
    let stale = a.tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    for socket in [&missing, &stale] {
        let started = Instant::now();
        let out = oneshot_to(&a, socket, &state, &[]);
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot reach the guest at unix:")
                && stderr.contains(&socket.display().to_string()),
            "{}",
            text(&out)
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    // With --json, a JSON object says so too.
    let out = oneshot_to(&a, &missing, &state, &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(json["state"], "failed", "{json}");
    assert!(json["error"]
        .as_str()
        .unwrap()
        .contains("cannot reach the guest"));
    // Nothing of the host's tree was touched.
    assert!(std::fs::read_dir(&a.host_dir).unwrap().next().is_none());
}

#[test]
fn config_and_the_one_shot_arguments_do_not_mix() {
    let a = Agents::new("");
    let host = |args: &[&str]| {
        Command::new(bin("vmsync-host"))
            .args(args)
            .output()
            .expect("run vmsync-host")
    };
    let config = a.host_toml.to_str().unwrap();
    let dir = a.host_dir.to_str().unwrap();
    for args in [
        vec!["sync", "--config", config, "--guest", "unix:/g.sock"],
        vec![
            "sync",
            "--config",
            config,
            "--guest",
            "unix:/g.sock",
            "--share",
            "src",
            dir,
        ],
        vec!["sync", "--config", config, "--json"],
        vec!["sync", "--share", "src", dir],
        vec!["sync"],
        // Checked like a configuration's `[[share]]`.
        vec!["sync", "--guest", "unix:/g.sock", "--share", "../x", dir],
        vec!["sync", "--guest", "vsock://any:786", "--share", "src", dir],
        vec![
            "sync",
            "--guest",
            "unix:/g.sock",
            "--share",
            "src",
            dir,
            "--mode",
            "host-to-guest",
            "--conflict",
            "guest-wins",
        ],
    ] {
        let out = host(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: says nothing");
    }
    let out = host(&["sync", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("sync --config") && help.contains("sync --guest"),
        "{help}"
    );
}

/// The state directory's lock: a one-shot sync never runs beside a `run` agent on the same
/// state, and says why.
#[test]
fn a_running_agent_on_the_same_state_directory_is_refused() {
    let mut a = Agents::new("");
    write(&a.host_dir, "f.txt", "x");
    a.start();
    a.wait_in_sync();
    let out = oneshot(&a, &a.host_state.clone(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another vmsync-host"),
        "{}",
        text(&out)
    );
}
