//! The `vmsync-guest` command line. Also makes `cargo test --workspace` build the
//! `vmsync-guest` executable, which the process-level tests in `tests/` run.

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmsync-guest"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "status"] {
        assert!(text.contains(cmd), "`{cmd}` missing from --help:\n{text}");
    }
}

#[test]
fn a_missing_config_is_an_error_with_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmsync-guest"))
        .args(["check", "--config", "/nonexistent/guest.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Under systemd (`NOTIFY_SOCKET`, `WatchdogSec=`): `WATCHDOG=1` at half of `WATCHDOG_USEC`
/// for as long as it runs, and while no host has synced its shares, no `READY=1` but a
/// `STATUS=` that says so (`tests/tests/agents.rs` has the host's side of readiness).
#[test]
fn pings_its_watchdog_and_is_not_ready_before_a_host_syncs() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("share")).unwrap();
    let config = d.join("guest.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"unix:{d}/guest.sock\"\nstate_dir = \"{d}/state\"\n\
             control = \"{d}/guest.ctl\"\n[[share]]\nname = \"s\"\npath = \"{d}/share\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let systemd = UnixDatagram::bind(d.join("notify.sock")).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_vmsync-guest"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", d.join("notify.sock"))
        .env("WATCHDOG_USEC", "100000")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline
        && heard
            .iter()
            .filter(|m: &&String| *m == "WATCHDOG=1")
            .count()
            < 5
    {
        if let Ok(n) = systemd.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let pings = heard.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 5, "{pings} watchdog pings: {heard:?}");
    let others: Vec<&String> = heard.iter().filter(|m| *m != "WATCHDOG=1").collect();
    assert_eq!(
        others,
        ["STATUS=waiting for the host to connect"],
        "{heard:?}"
    );
}
