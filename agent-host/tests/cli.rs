//! The `vmsync-host` command line as a user meets it. Also makes `cargo test --workspace` build
//! the `vmsync-host` executable, which the process-level tests in `tests/` run.

use std::process::Command;

fn host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmsync-host"))
}

#[test]
fn help_lists_every_command() {
    let out = host().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "run", "check", "status", "metrics", "sync", "wait", "resume",
    ] {
        assert!(text.contains(cmd), "`{cmd}` missing from --help:\n{text}");
    }
}

#[test]
fn a_missing_config_is_an_error_with_exit_2() {
    let out = host()
        .args(["check", "--config", "/nonexistent/vm.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vm.toml"));
}

#[test]
fn status_without_a_running_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.toml");
    let ctl = dir.path().join("vm.ctl");
    std::fs::write(
        &config,
        format!(
            "guest = \"unix:{d}/g.sock\"\nstate_dir = \"{d}/state\"\ncontrol = \"{c}\"\n[[share]]\nname = \"s\"\npath = \"{d}/share\"\n",
            d = dir.path().display(),
            c = ctl.display()
        ),
    )
    .unwrap();
    for command in ["status", "metrics"] {
        let out = host()
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        // 4: no agent answers (README "Running it", exit codes).
        assert_eq!(out.status.code(), Some(4), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no agent answers"), "{command}: {stderr}");
        assert!(
            stderr.contains("is `vmsync-host run` running"),
            "{command}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{command}");
    }
}

/// `check` accepts a `libvirt:` guest on its syntax alone: it never runs `virsh` (a stand-in
/// first on PATH would leave a mark), whether or not the domain exists or runs.
#[test]
fn check_accepts_a_libvirt_guest_without_running_virsh() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let mark = dir.path().join("virsh-ran");
    let virsh = bin.join("virsh");
    std::fs::write(
        &virsh,
        format!("#!/bin/sh\ntouch '{}'\nexit 1\n", mark.display()),
    )
    .unwrap();
    std::fs::set_permissions(&virsh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("vm.toml");
    let write = |guest: &str| {
        std::fs::write(
            &config,
            format!(
                "guest = \"{guest}\"\nstate_dir = \"{d}/state\"\ncontrol = \"{d}/vm.ctl\"\n[[share]]\nname = \"s\"\npath = \"{d}/share\"\n",
                d = dir.path().display(),
            ),
        )
        .unwrap();
    };
    let check = || {
        host()
            .args(["check", "--config"])
            .arg(&config)
            .env("PATH", &bin)
            .output()
            .unwrap()
    };
    for guest in [
        "libvirt:dev-vm",
        "libvirt:dev-vm:786",
        "libvirt:dev-vm@qemu:///system:786",
    ] {
        write(guest);
        let out = check();
        assert!(
            out.status.success(),
            "{guest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok (1 share(s))"));
    }
    write("libvirt:dev-vm@qemu:///system:port");
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("port `port` is not a decimal number"),
        "{stderr}"
    );
    assert!(!mark.exists(), "check ran virsh");
}
