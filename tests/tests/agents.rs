//! The foundation scenarios across real processes: `vmsync-host` and `vmsync-guest` on temp
//! directories over a Unix socket, with the bytes on that socket counted by a relay.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use vmsync_tests::agents::{bin, guest_config, host_config, Agents};
use vmsync_tests::fixture::{
    assert_same_tree, changed_chunk_bytes, patch_in_place, random_bytes, read, set_mtime,
    text_bytes, tree, write,
};

#[test]
fn host_only_and_guest_only_trees_meet() {
    let mut a = Agents::new("");
    write(&a.host_dir, "src/main.rs", "fn main() {}\n");
    write(&a.host_dir, "assets/logo.bin", random_bytes(1, 200_000));
    std::fs::create_dir_all(a.host_dir.join("empty")).unwrap();
    write(&a.guest_dir, "out/result.txt", "built in the guest\n");
    a.start();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(read(&a.host_dir, "out/result.txt"), b"built in the guest\n");
    let share = a.share();
    assert_eq!(share["state"], "in-sync");
    assert_eq!(share["files"], 3);
    assert!(share["bytes_sent"].as_u64().unwrap() > 0);
    assert!(share["bytes_received"].as_u64().unwrap() > 0);
    let guest = a.guest_status();
    assert_eq!(guest["agent"]["peer"], "connected");
}

#[test]
fn disjoint_edits_while_host_is_down_converge_on_restart() {
    let mut a = Agents::new("");
    write(&a.host_dir, "a.txt", "a1");
    write(&a.host_dir, "gone.txt", "bye");
    a.start();
    a.wait_in_sync();
    a.stop_host();
    write(&a.host_dir, "a.txt", "a2 host");
    write(&a.guest_dir, "new/from-guest.txt", "g");
    std::fs::remove_file(a.guest_dir.join("gone.txt")).unwrap();
    a.start_host();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(read(&a.guest_dir, "a.txt"), b"a2 host");
    assert!(!a.host_dir.join("gone.txt").exists());
    assert_eq!(read(&a.host_dir, "new/from-guest.txt"), b"g");
}

fn edited_on_both_sides_while_down(policy: &str) -> Agents {
    let mut a = Agents::new(&format!("conflict = \"{policy}\""));
    write(&a.host_dir, "f.txt", "base");
    a.start();
    a.wait_in_sync();
    a.stop_host();
    write(&a.host_dir, "f.txt", "host version");
    set_mtime(&a.host_dir.join("f.txt"), 1_700_000_000, 0);
    write(&a.guest_dir, "f.txt", "guest version (newer)");
    set_mtime(&a.guest_dir.join("f.txt"), 1_750_000_000, 0);
    a.start_host();
    a
}

#[test]
fn both_edited_while_down_keep() {
    let a = edited_on_both_sides_while_down("keep");
    assert_eq!(a.wait(60), 3, "wait must exit 3 on a conflict");
    let share = a.share();
    assert_eq!(share["state"], "conflicted");
    assert_eq!(share["conflicts"][0], "f.txt");
    assert_eq!(read(&a.host_dir, "f.txt"), b"host version");
    assert_eq!(read(&a.guest_dir, "f.txt"), b"guest version (newer)");
    assert!(a.host_trash().is_empty() && a.guest_trash().is_empty());
}

#[test]
fn both_edited_while_down_auto_policies() {
    for (policy, winner, loser, loser_side) in [
        (
            "host-wins",
            "host version",
            "guest version (newer)",
            "guest",
        ),
        (
            "guest-wins",
            "guest version (newer)",
            "host version",
            "host",
        ),
        (
            "newer-wins",
            "guest version (newer)",
            "host version",
            "host",
        ),
    ] {
        let a = edited_on_both_sides_while_down(policy);
        a.wait_in_sync();
        assert_same_tree(&a.host_dir, &a.guest_dir);
        assert_eq!(read(&a.host_dir, "f.txt"), winner.as_bytes(), "{policy}");
        // The losing version is kept in the trash of the side where it lost.
        let (copies, other) = if loser_side == "host" {
            (a.host_trash(), a.guest_trash())
        } else {
            (a.guest_trash(), a.host_trash())
        };
        assert_eq!(copies.len(), 1, "{policy}: {copies:?}");
        assert!(other.is_empty(), "{policy}: {other:?}");
        assert!(copies[0].0.ends_with("/f.txt"), "{policy}: {copies:?}");
        assert_eq!(copies[0].1, loser.as_bytes(), "{policy}");
        // Never in the synced tree.
        assert_eq!(tree(&a.host_dir).len(), 1, "{policy}");
    }
}

#[test]
fn delete_on_one_side_modify_on_the_other_keeps_the_modification() {
    let mut a = Agents::new("conflict = \"host-wins\"");
    write(&a.host_dir, "doc.txt", "v1");
    // A second file: deleting a share's only file empties it, which halts (a separate test).
    write(&a.host_dir, "other.txt", "stays");
    a.start();
    a.wait_in_sync();
    a.stop_host();
    std::fs::remove_file(a.host_dir.join("doc.txt")).unwrap();
    write(&a.guest_dir, "doc.txt", "v2 edited in the guest");
    a.start_host();
    a.wait_in_sync();
    assert_eq!(read(&a.host_dir, "doc.txt"), b"v2 edited in the guest");
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

#[test]
fn renaming_a_200_mb_file_while_down_sends_under_1_mb() {
    let mut a = Agents::new("");
    write(&a.host_dir, "big/disk.img", random_bytes(7, 200 << 20));
    a.start();
    a.wait_in_sync();
    a.stop_host();
    std::fs::create_dir_all(a.host_dir.join("moved")).unwrap();
    std::fs::rename(
        a.host_dir.join("big/disk.img"),
        a.host_dir.join("moved/renamed.img"),
    )
    .unwrap();
    a.relay.reset();
    a.start_host();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let wire = a.wire_bytes();
    assert!(
        wire < 1 << 20,
        "{wire} bytes crossed the socket for a rename"
    );
    assert_eq!(a.share()["bytes_sent"], 0);
}

/// A full cycle of an unchanged share moves a few KiB, not its listing: each share's remote
/// endpoint lives as long as the session and keeps the last listing the guest sent, so the
/// next one crosses as the difference against it.
#[test]
fn a_full_cycle_of_an_unchanged_share_sends_no_listing() {
    let mut a = Agents::new("");
    for i in 0..2000 {
        write(
            &a.host_dir,
            &format!("dir{}/file-{i:05}.txt", i % 20),
            format!("{i}\n"),
        );
    }
    a.start();
    a.wait_in_sync();
    a.sync();
    a.relay.reset();
    a.sync();
    let wire = a.wire_bytes();
    // The whole listing is about 2,000 x 70 bytes.
    assert!(
        wire < 8 * 1024,
        "{wire} bytes for a full cycle of an unchanged share"
    );
}

#[test]
fn one_mib_inserted_in_a_64_mb_file_sends_about_one_mib() {
    let mut a = Agents::new("");
    let data = random_bytes(8, 64 << 20);
    write(&a.host_dir, "f.img", &data);
    a.start();
    a.wait_in_sync();
    let mut edited = data[..20 << 20].to_vec();
    edited.extend_from_slice(&random_bytes(9, 1 << 20));
    edited.extend_from_slice(&data[20 << 20..]);
    // Counted from before the edit: the watcher may sync it before `sync` is even called.
    let sent_before = a.share()["bytes_sent"].as_u64().unwrap();
    a.relay.reset();
    // Written beside the share and renamed in: one atomic change. Written in place, the live
    // watcher may sync consistent intermediate versions on the way, which costs more bytes.
    let staged = a.tmp.path().join("f.img.new");
    std::fs::write(&staged, &edited).unwrap();
    std::fs::rename(&staged, a.host_dir.join("f.img")).unwrap();
    a.sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let content = a.share()["bytes_sent"].as_u64().unwrap() - sent_before;
    let wire = a.wire_bytes();
    eprintln!("1 MiB inserted in 64 MiB: {content} content bytes, {wire} bytes on the socket");
    // Random data does not compress: about the insertion; the chunks around it cross as
    // deltas against their old bytes.
    assert!(
        ((1 << 20)..(1 << 20) + 64 * 1024).contains(&content),
        "{content} content bytes"
    );
    // The manifest (4,000 references, ~160 KiB in full) crosses as edits: the socket carries
    // little more than the content.
    assert!(wire < (1 << 20) + 96 * 1024, "{wire} bytes on the socket");
}

/// Across real processes: 256 random bytes written in place into each of 200 files
/// (text and random, 8-40 KiB) cross as deltas against the other side's old copies, in both
/// directions: a small fraction of the whole chunks they touch, counted on the socket.
#[test]
fn two_hundred_small_patches_cross_the_socket_as_deltas_both_ways() {
    let mut a = Agents::new("");
    let mut names = Vec::new();
    for i in 0..200u64 {
        let name = format!("d{}/f{i}.dat", i % 7);
        let len = 8 * 1024 + (i as usize * 7919) % (32 * 1024);
        let data = if i % 2 == 0 {
            text_bytes(100 + i, len)
        } else {
            random_bytes(100 + i, len)
        };
        write(&a.host_dir, &name, &data);
        names.push(name);
    }
    a.start();
    a.wait_in_sync();
    for (round, root) in [a.host_dir.clone(), a.guest_dir.clone()].iter().enumerate() {
        let mut whole = 0;
        a.relay.reset();
        for (i, name) in names.iter().enumerate() {
            let before = read(root, name);
            let seed = 1000 * (round as u64 + 1) + i as u64;
            patch_in_place(root, name, seed, (i * 4099 + round * 777) % before.len());
            whole += changed_chunk_bytes(&before, &read(root, name));
        }
        a.sync();
        a.wait_in_sync();
        assert_same_tree(&a.host_dir, &a.guest_dir);
        let wire = a.wire_bytes();
        eprintln!(
            "200 patches {}: {wire} bytes on the socket; the chunks they touch are {whole} bytes",
            if round == 0 {
                "host -> guest"
            } else {
                "guest -> host"
            }
        );
        // Whole chunks would be about 200 x 16 KiB (less what zstd saves on the text half).
        assert!(wire * 8 < whole, "{wire} bytes on the socket vs {whole}");
    }
}

#[test]
fn an_escaping_symlink_is_never_created() {
    let mut a = Agents::new("");
    let outside = a.tmp.path().join("OUT");
    write(&outside, "secret", "do not touch");
    std::os::unix::fs::symlink("../OUT", a.guest_dir.join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, a.guest_dir.join("absolute")).unwrap();
    std::os::unix::fs::symlink("inside.txt", a.guest_dir.join("ok-link")).unwrap();
    write(&a.guest_dir, "inside.txt", "in");
    a.start();
    a.wait_in_sync();
    assert!(std::fs::symlink_metadata(a.host_dir.join("escape")).is_err());
    assert!(std::fs::symlink_metadata(a.host_dir.join("absolute")).is_err());
    assert_eq!(
        std::fs::read_link(a.host_dir.join("ok-link"))
            .unwrap()
            .to_str(),
        Some("inside.txt")
    );
    assert_eq!(read(&outside, "secret"), b"do not touch");
    let problems = a.share()["problems"].to_string();
    assert!(
        problems.contains("escape") && problems.contains("absolute"),
        "{problems}"
    );
}

#[test]
fn a_restart_with_nothing_changed_rehashes_nothing() {
    let mut a = Agents::new("");
    for i in 0..200 {
        write(
            &a.host_dir,
            &format!("d{}/f{i}.txt", i % 10),
            format!("file {i}\n").repeat(100),
        );
    }
    a.start();
    a.wait_in_sync();
    a.stop_host();
    a.stop_guest();
    a.start();
    a.wait_in_sync();
    assert_eq!(a.share()["files_hashed"], 0);
    assert_eq!(a.guest_status()["shares"][0]["files_hashed"], 0);
}

#[test]
fn a_replaced_guest_root_halts_and_resume_repopulates_it() {
    let mut a = Agents::new("");
    for i in 0..30 {
        write(&a.host_dir, &format!("f{i}"), format!("{i}"));
    }
    a.start();
    a.wait_in_sync();
    a.stop_guest();
    // The VM was rebuilt: its share comes back empty.
    std::fs::remove_dir_all(&a.guest_dir).unwrap();
    std::fs::create_dir_all(&a.guest_dir).unwrap();
    a.start_guest();
    assert_eq!(a.wait(60), 3);
    let share = a.share();
    assert_eq!(share["state"], "halted");
    assert_eq!(share["halt_code"], "root-replaced");
    assert_eq!(tree(&a.host_dir).len(), 30, "the host lost files");
    let out = a.host_cmd(&["resume", "--share", "src"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(tree(&a.guest_dir).len(), 30);
}

#[test]
fn a_share_the_guest_does_not_export_is_a_clear_error() {
    let mut a = Agents::new("");
    let text = std::fs::read_to_string(&a.host_toml).unwrap();
    std::fs::write(
        &a.host_toml,
        text.replace("name = \"src\"", "name = \"other\""),
    )
    .unwrap();
    a.start();
    assert_eq!(a.wait(3), 1, "wait must time out");
    let st = a.status();
    assert_eq!(st["agent"]["peer"], "disconnected");
    let detail = st["agent"]["peer_detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("other") && detail.contains("not exported"),
        "{detail}"
    );
    assert!(
        a.log("guest.log").contains("not exported"),
        "guest log:\n{}",
        a.log("guest.log")
    );
}

#[test]
fn check_reports_bad_configs_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("guest = \"unix:/x.sock\"\nbogus = 1\n[[share]]\nname = \"a\"\npath = \"/tmp\"\n", "bogus"),
        ("guest = \"unix:/x.sock\"\n[[share]]\nname = \"a\"\npath = \"relative/dir\"\n", "relative"),
        ("guest = \"tcp://1.2.3.4:5\"\n[[share]]\nname = \"a\"\npath = \"/tmp/a\"\n", "tcp"),
        ("guest = \"unix:/x.sock\"\n[[share]]\nname = \"a\"\npath = \"/tmp/a\"\n[[share]]\nname = \"a\"\npath = \"/tmp/b\"\n", "duplicate"),
    ];
    // Share paths in this test's own directory (they need not exist; `/tmp/a` might, as a file).
    let here = |text: &str| {
        text.replace("/tmp/a", &dir.path().join("a").display().to_string())
            .replace("/tmp/b", &dir.path().join("b").display().to_string())
    };
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("vm{i}.toml"));
        std::fs::write(&path, here(text)).unwrap();
        let out = Command::new(bin("vmsync-host"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: `{needle}` not in: {err}");
        assert!(
            err.contains(&format!("vm{i}.toml")),
            "case {i}: no file name in: {err}"
        );
    }
    let good = dir.path().join("good.toml");
    std::fs::write(&good, here("guest = \"vsock://3:786\"\nstate_dir = \"/tmp/b/s\"\ncontrol = \"/tmp/b/c.ctl\"\n[[share]]\nname = \"a\"\npath = \"/tmp/a\"\n")).unwrap();
    let out = Command::new(bin("vmsync-host"))
        .arg("check")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gbad = dir.path().join("guest.toml");
    std::fs::write(
        &gbad,
        here(
            "listen = \"unix:/g.sock\"\nextra = true\n[[share]]\nname = \"a\"\npath = \"/tmp/a\"\n",
        ),
    )
    .unwrap();
    let out = Command::new(bin("vmsync-guest"))
        .arg("check")
        .arg("--config")
        .arg(&gbad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("extra"));
}

/// Regression: staged temp files used to stay open until the end of the cycle, so a first sync
/// of more files than the guest's fd limit failed everywhere (and `wait` said in-sync).
#[test]
fn thousands_of_new_files_fit_in_a_small_fd_limit() {
    let mut a = Agents::new("");
    a.guest_fd_limit = Some(256);
    for i in 0..3000 {
        write(
            &a.host_dir,
            &format!("d{}/e{}/f{i}.txt", i % 40, i % 3),
            format!("{i}\n"),
        );
    }
    a.start();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    assert_eq!(a.share()["problems"], serde_json::json!([]));
}

#[test]
fn the_shipped_default_configurations_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    for (agent, file) in [
        ("vmsync-host", "host-vm.toml"),
        ("vmsync-guest", "guest.toml"),
    ] {
        let out = Command::new(bin(agent))
            .args(["check", "--config"])
            .arg(root.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// docs/testing.md "Crash and fault injection": either agent killed with SIGKILL in the middle
/// of a transfer, then restarted: the trees converge, every file is whole, nothing is left in the
/// staging area.
#[test]
fn kill_9_of_either_agent_mid_transfer_converges_with_no_torn_files() {
    for victim in ["guest", "host"] {
        let mut a = Agents::new("");
        write(&a.host_dir, "big/disk.img", random_bytes(11, 96 << 20));
        for i in 0..500 {
            write(
                &a.host_dir,
                &format!("many/f{i}.txt"),
                format!("file {i}\n").repeat(200),
            );
        }
        a.start();
        // Let the transfer get under way (4 MiB of its 98 across the socket), then kill
        // without warning.
        let under_way =
            vmsync_tests::agents::eventually(std::time::Duration::from_secs(120), || {
                a.wire_bytes() >= 4 << 20
            });
        assert!(under_way, "{victim}: the transfer never started");
        match victim {
            "guest" => a.kill_guest(),
            _ => a.kill_host(),
        }
        // The kill landed mid-transfer: the big file had not arrived whole.
        let arrived = std::fs::read(a.guest_dir.join("big/disk.img")).unwrap_or_default();
        assert!(
            arrived.len() < 96 << 20
                || arrived != std::fs::read(a.host_dir.join("big/disk.img")).unwrap(),
            "{victim}: killed after the transfer, not during it"
        );
        match victim {
            "guest" => a.start_guest(),
            _ => a.start_host(),
        }
        a.wait_in_sync();
        assert_same_tree(&a.host_dir, &a.guest_dir);
        for dir in [&a.host_dir, &a.guest_dir] {
            let leftovers: Vec<_> = std::fs::read_dir(dir.join(".vmsync/tmp"))
                .unwrap()
                .collect();
            assert!(
                leftovers.is_empty(),
                "{victim}: temp files left: {leftovers:?}"
            );
        }
    }
}

#[test]
fn both_agents_keep_what_the_other_side_removed_and_show_it_in_status() {
    let mut a = Agents::new("");
    write(&a.host_dir, "host-file.txt", "deleted on the guest");
    write(&a.host_dir, "edited.txt", "the guest's old version");
    write(&a.host_dir, "stays.txt", "stays");
    a.start();
    a.wait_in_sync();
    std::fs::remove_file(a.guest_dir.join("host-file.txt")).unwrap();
    write(&a.host_dir, "edited.txt", "edited on the host");
    a.sync();
    a.wait_in_sync();
    assert_same_tree(&a.host_dir, &a.guest_dir);
    let host_kept = a.host_trash();
    assert_eq!(host_kept.len(), 1, "{host_kept:?}");
    assert!(host_kept[0].0.ends_with("/host-file.txt"), "{host_kept:?}");
    assert_eq!(host_kept[0].1, b"deleted on the guest");
    let guest_kept = a.guest_trash();
    assert_eq!(guest_kept.len(), 1, "{guest_kept:?}");
    assert_eq!(guest_kept[0].1, b"the guest's old version");
    // Each agent's pruner measures its trash after the transition that filled it.
    let counted = vmsync_tests::agents::eventually(std::time::Duration::from_secs(30), || {
        a.share()["trash_files"] == 1 && a.guest_status()["shares"][0]["trash_files"] == 1
    });
    assert!(counted, "host: {}\nguest: {}", a.share(), a.guest_status());
    assert_eq!(a.share()["trash_bytes"], 20);
    assert_eq!(a.guest_status()["shares"][0]["trash_bytes"], 23);
    // The guest's own CLI lists the guest's trash.
    let out = Command::new(bin("vmsync-guest"))
        .args(["trash", "--json", "--share", "src", "--config"])
        .arg(&a.guest_toml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["items"][0]["path"], "edited.txt");
    assert_eq!(listed["items"][0]["kind"], "file");
}

/// The system unit's way of running the host agent: an unprivileged user of its own (here
/// `nobody`), no capability, `state_dir` and `control` left to their defaults, which come from
/// systemd's `STATE_DIRECTORY` and `RUNTIME_DIRECTORY` (packaging/README.md). It syncs both
/// ways, what it makes on the host belongs to that user, and `wait` run by the same user with
/// the same environment finds its control socket. Needs root, to start a process as `nobody`.
#[test]
fn the_host_agent_runs_unprivileged_in_the_units_directories() {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting the host agent as another user needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(d, 0o755);
    // A copy of the binary: the build directory's parents need not be open to `nobody`.
    let host_bin = d.join("vmsync-host");
    std::fs::copy(bin("vmsync-host"), &host_bin).unwrap();
    mode(&host_bin, 0o755);
    let (host_dir, guest_dir) = (d.join("host"), d.join("guest"));
    let (state, run) = (d.join("var/vm1"), d.join("run"));
    for dir in [&host_dir, &guest_dir, &state, &run] {
        std::fs::create_dir_all(dir).unwrap();
    }
    mode(&d.join("var"), 0o755);
    mode(&state, 0o700);
    for owned in [&host_dir, &state, &run] {
        chown(owned, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    write(&host_dir, "from-host.txt", "made on the host\n");
    chown(host_dir.join("from-host.txt"), Some(NOBODY), Some(NOBODY)).unwrap();
    write(&guest_dir, "sub/from-guest.txt", "made in the guest\n");
    let guest_toml = d.join("guest.toml");
    std::fs::write(
        &guest_toml,
        format!(
            "listen = \"unix:{d}/guest.sock\"\nstate_dir = \"{d}/guest-state\"\n\
             control = \"{d}/guest.ctl\"\n[[share]]\nname = \"src\"\npath = \"{g}\"\n",
            d = d.display(),
            g = guest_dir.display()
        ),
    )
    .unwrap();
    // Named as the unit names it (`%i.toml`), and with no state_dir or control.
    let host_toml = d.join("vm1.toml");
    std::fs::write(
        &host_toml,
        format!(
            "guest = \"unix:{d}/guest.sock\"\n[[share]]\nname = \"src\"\npath = \"{h}\"\n",
            d = d.display(),
            h = host_dir.display()
        ),
    )
    .unwrap();
    mode(&host_toml, 0o644);
    let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
    let mut guest = Command::new(bin("vmsync-guest"))
        .args(["run", "--config"])
        .arg(&guest_toml)
        .env("VMSYNC_LOG", "debug")
        .stderr(log("guest.log"))
        .spawn()
        .unwrap();
    let sock = d.join("guest.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    mode(&sock, 0o777);
    // As systemd starts the unit: its user, an environment of its own, no capability.
    let as_unit = |cmd: &mut Command| {
        cmd.uid(NOBODY)
            .gid(NOBODY)
            .env_clear()
            .env("HOME", d.join("var"))
            .env("STATE_DIRECTORY", &state)
            .env("RUNTIME_DIRECTORY", &run)
            .env("VMSYNC_LOG", "debug");
    };
    let mut run_cmd = Command::new(&host_bin);
    run_cmd
        .args(["run", "--config"])
        .arg(&host_toml)
        .stderr(log("host.log"));
    as_unit(&mut run_cmd);
    let mut host = run_cmd.spawn().unwrap();
    let mut wait_cmd = Command::new(&host_bin);
    wait_cmd
        .args(["wait", "--timeout", "60", "--config"])
        .arg(&host_toml);
    as_unit(&mut wait_cmd);
    let waited = wait_cmd.output().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.id())).unwrap();
    let socket_there = run.join("vm1.ctl").exists();
    for child in [&host, &guest] {
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let _ = host.wait();
    let _ = guest.wait();
    let host_log = std::fs::read_to_string(d.join("host.log")).unwrap_or_default();
    assert!(
        waited.status.success(),
        "wait: {}\nhost log:\n{host_log}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:")[..2], ["65534", "65534"], "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(
        read(&host_dir, "sub/from-guest.txt"),
        b"made in the guest\n"
    );
    assert_eq!(read(&guest_dir, "from-host.txt"), b"made on the host\n");
    for made in ["sub", "sub/from-guest.txt", ".vmsync"] {
        let m = std::fs::symlink_metadata(host_dir.join(made)).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "{made}");
    }
    // The state and the control socket where the unit's directories are.
    assert!(state.join("host.redb").is_file(), "{host_log}");
    assert!(
        socket_there,
        "no control socket at {}",
        run.join("vm1.ctl").display()
    );
}

/// A second host agent started with the same configuration (a unit started twice, a developer
/// running `run` by hand beside the service) refuses to start: the state database is locked. It
/// exits with an error that says so, and the first one keeps syncing.
#[test]
fn a_second_host_agent_on_the_same_state_directory_refuses_to_start() {
    let mut a = Agents::new("");
    write(&a.host_dir, "before.txt", "synced by the first");
    a.start();
    a.wait_in_sync();
    let second = Command::new(bin("vmsync-host"))
        .args(["run", "--config"])
        .arg(&a.host_toml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second agent ran: {stderr}");
    assert!(
        stderr.contains("another vmsync-host is already running"),
        "{stderr}"
    );
    write(&a.host_dir, "after.txt", "still synced by the first");
    a.wait_in_sync();
    assert_eq!(
        read(&a.guest_dir, "after.txt"),
        b"still synced by the first"
    );
    assert_eq!(a.share()["state"], "in-sync");
}

/// Readiness and progress (docs/cli.md, "Progress and readiness"): the guest tells systemd
/// `READY=1` only once the host's first full sync has converged, so at that moment its tree
/// is the host's, byte for byte; before it, `STATUS=` lines say how far the sync has come. On
/// the host, `wait --progress` off a terminal prints a progress line every few seconds.
#[test]
fn the_guest_is_ready_only_once_the_first_sync_is_complete() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let mut a = Agents::new("");
    for i in 0..600u64 {
        write(
            &a.host_dir,
            &format!("d{}/f{i}.bin", i % 10),
            random_bytes(i, 16 << 10),
        );
    }
    let notify = a.tmp.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    a.guest_env.push(("NOTIFY_SOCKET".into(), notify));
    // About 10 MB at 1 MB/s: a first sync of several seconds.
    a.relay.set_rate_limit(1 << 20);
    a.start();
    let waiting = Command::new(bin("vmsync-host"))
        .args(["wait", "--progress", "--timeout", "120", "--config"])
        .arg(&a.host_toml)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    let mut ready_tree_matched = None;
    while Instant::now() < deadline && ready_tree_matched.is_none() {
        let Ok(n) = systemd.recv(&mut buf) else {
            continue;
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message == "READY=1" {
            // The host's tree does not change in this test: the guest's must equal it now.
            ready_tree_matched = Some(tree(&a.host_dir) == tree(&a.guest_dir));
        }
        heard.push(message);
    }
    assert_eq!(
        ready_tree_matched,
        Some(true),
        "READY=1 {}: {heard:?}",
        if ready_tree_matched.is_some() {
            "came before the tree was complete"
        } else {
            "never came"
        }
    );
    let before_ready: Vec<&String> = heard.iter().take_while(|m| *m != "READY=1").collect();
    assert!(
        before_ready
            .iter()
            .any(|m| m.starts_with("STATUS=src: syncing ") && m.contains("/600 files")),
        "no progress before READY=1: {heard:?}"
    );
    assert!(
        heard.iter().any(|m| m == "STATUS=src: in sync"),
        "{heard:?}"
    );
    assert_eq!(
        heard.iter().filter(|m| *m == "READY=1").count(),
        1,
        "{heard:?}"
    );
    assert_eq!(a.guest_status()["shares"][0]["state"], "in-sync");
    let waited = waiting.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&waited.stderr);
    assert!(waited.status.success(), "wait: {lines}");
    assert!(
        lines
            .lines()
            .any(|l| l.starts_with("src: syncing ") && l.contains("/600 files")),
        "wait --progress printed no progress line: {lines}"
    );
}

/// One agent per share directory: a second host controller on the same directory (its own
/// state directory, its own guest) syncs nothing and says why in `status`, while the first
/// keeps syncing. Two controllers on one tree would each take the other's writes for the
/// user's and delete each other's temp files.
#[test]
fn a_second_agent_on_the_same_share_directory_syncs_nothing_and_says_why() {
    use std::time::Duration;
    use vmsync_tests::agents::eventually;
    let mut a = Agents::new("");
    write(&a.host_dir, "before.txt", "synced by the first");
    a.start();
    a.wait_in_sync();
    let d = a.tmp.path();
    let guest2_dir = d.join("guest2");
    std::fs::create_dir(&guest2_dir).unwrap();
    let guest2_toml = guest_config(d, "guest2", &guest2_dir);
    let host2_toml = host_config(d, "host2", &d.join("guest2.sock"), &a.host_dir, "");
    let spawn = |bin_name: &str, config: &std::path::Path| {
        Command::new(bin(bin_name))
            .args(["run", "--config"])
            .arg(config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut guest2 = spawn("vmsync-guest", &guest2_toml);
    let mut host2 = spawn("vmsync-host", &host2_toml);
    let status2 = || {
        let out = Command::new(bin("vmsync-host"))
            .args(["status", "--json", "--config"])
            .arg(&host2_toml)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let refused = eventually(Duration::from_secs(30), || {
        status2()["shares"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("another vmsync agent serves this directory"))
    });
    let text = Command::new(bin("vmsync-host"))
        .args(["status", "--config"])
        .arg(&host2_toml)
        .output()
        .unwrap();
    let _ = host2.kill();
    let _ = host2.wait();
    let _ = guest2.kill();
    let _ = guest2.wait();
    assert!(
        refused,
        "the second controller did not say why: {}",
        status2()
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("last cycle failed: "),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // Nothing reached the second guest; the first pair syncs on.
    assert!(tree(&guest2_dir).is_empty(), "{:?}", tree(&guest2_dir));
    write(&a.host_dir, "after.txt", "still synced by the first");
    a.wait_in_sync();
    assert_eq!(
        read(&a.guest_dir, "after.txt"),
        b"still synced by the first"
    );
    assert_same_tree(&a.host_dir, &a.guest_dir);
}

/// SIGTERM (what `systemctl stop` sends) in the middle of a transfer: either agent exits, with
/// status 0, within a few seconds, and every file visible on the destination is whole (the
/// source's bytes) or absent, never torn; the next start finishes the sync.
#[test]
fn sigterm_mid_transfer_stops_within_seconds_and_tears_nothing() {
    use std::time::{Duration, Instant};
    use vmsync_tests::agents::eventually;
    use vmsync_tests::fixture::Node;
    let mut a = Agents::new("");
    // Files land a batch at a time (128 files): several batches.
    for i in 0..512u64 {
        write(
            &a.host_dir,
            &format!("d{}/f{i:03}.bin", i % 8),
            random_bytes(i, 48 << 10),
        );
    }
    let source = tree(&a.host_dir);
    // About 24 MB at 3 MB/s: eight seconds of transfer, stopped in the middle.
    a.relay.set_rate_limit(3 << 20);
    let whole_or_absent = |a: &Agents| {
        for (path, node) in tree(&a.guest_dir) {
            if let Node::File { data, .. } = &node {
                match source.get(&path) {
                    Some(Node::File { data: want, .. }) => assert!(
                        data == want,
                        "{} is torn: {} of {} bytes",
                        String::from_utf8_lossy(&path),
                        data.len(),
                        want.len()
                    ),
                    _ => panic!("{} is not the host's", String::from_utf8_lossy(&path)),
                }
            }
        }
    };
    let landed = |a: &Agents| {
        tree(&a.guest_dir)
            .values()
            .filter(|n| matches!(n, Node::File { .. }))
            .count()
    };
    for stop_guest in [false, true] {
        let before = landed(&a);
        a.start();
        let started = Instant::now();
        assert!(
            eventually(Duration::from_secs(60), || landed(&a) > before),
            "nothing landed: {}",
            a.log_tail("host.log", 20)
        );
        let (took, code) = if stop_guest {
            let r = a.terminate_guest();
            a.stop_host();
            r
        } else {
            let r = a.terminate_host();
            a.stop_guest();
            r
        };
        let who = if stop_guest { "guest" } else { "host" };
        assert!(
            took < Duration::from_secs(5),
            "the {who} took {took:?} to stop"
        );
        assert_eq!(code, Some(0), "the {who} exited with {code:?}");
        assert!(
            landed(&a) < 512,
            "the sync finished before the {who} was stopped ({:?}): the test proves nothing",
            started.elapsed()
        );
        whole_or_absent(&a);
    }
    a.relay.set_rate_limit(0);
    a.start();
    a.converge(Duration::from_secs(120));
    assert_same_tree(&a.host_dir, &a.guest_dir);
}
