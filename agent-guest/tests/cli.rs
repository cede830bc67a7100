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
