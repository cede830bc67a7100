//! Real processes: a `vmsync-guest` and a `vmsync-host` started from the workspace's built
//! binaries on temp directories, talking over a Unix socket through a byte-counting [`Relay`],
//! driven and inspected through their own CLI (`wait`, `sync`, `status --json`).
//!
//! The binaries must be built first; `cargo test --workspace` (the README's test command) does
//! that before any test runs.

use crate::relay::Relay;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where cargo put this test binary's sibling executables (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (which builds the agents first)",
        path.display()
    );
    path
}

pub struct Agents {
    pub tmp: tempfile::TempDir,
    pub host_dir: PathBuf,
    pub guest_dir: PathBuf,
    pub host_toml: PathBuf,
    pub guest_toml: PathBuf,
    pub host_state: PathBuf,
    pub relay: Relay,
    host: Option<Child>,
    guest: Option<Child>,
    /// `ulimit -n` for the guest process, when set.
    pub guest_fd_limit: Option<u32>,
    /// Extra environment of the guest process (e.g. systemd's `NOTIFY_SOCKET`).
    pub guest_env: Vec<(String, PathBuf)>,
}

impl Agents {
    /// Both configs, one share `src`; `share_extra` is appended to the host's `[[share]]`
    /// (e.g. `conflict = "host-wins"`). Nothing is started.
    pub fn new(share_extra: &str) -> Agents {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        let host_dir = d.join("host");
        let guest_dir = d.join("guest");
        std::fs::create_dir_all(&host_dir).expect("mkdir");
        std::fs::create_dir_all(&guest_dir).expect("mkdir");
        let guest_toml = guest_config(d, "guest", &guest_dir);
        let host_toml = host_config(d, "host", &d.join("relay.sock"), &host_dir, share_extra);
        let relay = Relay::start(d.join("relay.sock"), d.join("guest.sock")).expect("relay");
        Agents {
            host_state: d.join("host-state"),
            tmp,
            host_dir,
            guest_dir,
            host_toml,
            guest_toml,
            relay,
            host: None,
            guest: None,
            guest_fd_limit: None,
            guest_env: Vec::new(),
        }
    }

    fn spawn(
        &self,
        name: &str,
        config: &Path,
        log: &str,
        fd_limit: Option<u32>,
        env: &[(String, PathBuf)],
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(log))
            .expect("log file");
        let mut cmd = match fd_limit {
            // Through the shell's ulimit: setting an rlimit in a pre_exec hook needs unsafe.
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" run --config \"$1\""));
                c.arg(bin(name)).arg(config);
                c
            }
            None => {
                let mut c = Command::new(bin(name));
                c.args(["run", "--config"]).arg(config);
                c
            }
        };
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.env("VMSYNC_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    pub fn start_guest(&mut self) {
        assert!(self.guest.is_none(), "guest already running");
        self.guest = Some(self.spawn(
            "vmsync-guest",
            &self.guest_toml,
            "guest.log",
            self.guest_fd_limit,
            &self.guest_env,
        ));
    }

    /// The running host agent's process id.
    pub fn host_pid(&self) -> Option<u32> {
        self.host.as_ref().map(Child::id)
    }

    /// SIGTERM to the host agent; returns how long it took to exit (10 s: it did not, and
    /// was killed) and its exit code.
    pub fn terminate_host(&mut self) -> (Duration, Option<i32>) {
        Self::terminate(self.host.take())
    }

    /// [`Agents::terminate_host`] for the guest agent.
    pub fn terminate_guest(&mut self) -> (Duration, Option<i32>) {
        Self::terminate(self.guest.take())
    }

    fn terminate(child: Option<Child>) -> (Duration, Option<i32>) {
        let Some(mut child) = child else {
            return (Duration::ZERO, None);
        };
        let started = Instant::now();
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return (started.elapsed(), status.code());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        (started.elapsed(), None)
    }

    pub fn start_host(&mut self) {
        assert!(self.host.is_none(), "host already running");
        self.host = Some(self.spawn("vmsync-host", &self.host_toml, "host.log", None, &[]));
    }

    pub fn start(&mut self) {
        self.start_guest();
        self.start_host();
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn stop_child(child: Option<Child>) {
        let Some(mut child) = child else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn stop_host(&mut self) {
        Self::stop_child(self.host.take());
    }

    pub fn stop_guest(&mut self) {
        Self::stop_child(self.guest.take());
    }

    pub fn kill_guest(&mut self) {
        if let Some(mut c) = self.guest.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_host(&mut self) {
        if let Some(mut c) = self.host.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn host_cmd(&self, args: &[&str]) -> Output {
        Command::new(bin("vmsync-host"))
            .args(args)
            .arg("--config")
            .arg(&self.host_toml)
            .output()
            .expect("run vmsync-host")
    }

    /// `vmsync-host wait --timeout SECS`; returns its exit code.
    pub fn wait(&self, secs: u32) -> i32 {
        let out = self.host_cmd(&["wait", "--timeout", &secs.to_string()]);
        out.status.code().unwrap_or(-1)
    }

    /// Waits for the first sync and insists it succeeded.
    pub fn wait_in_sync(&self) {
        let code = self.wait(60);
        assert_eq!(
            code,
            0,
            "wait exited {code}; host log:\n{}",
            self.log("host.log")
        );
    }

    /// `vmsync-host sync`, insisting on success.
    pub fn sync(&self) {
        let out = self.host_cmd(&["sync"]);
        assert!(
            out.status.success(),
            "sync failed: {}{}\nhost log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log("host.log")
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.host_cmd(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn guest_status(&self) -> serde_json::Value {
        let out = Command::new(bin("vmsync-guest"))
            .args(["status", "--json", "--config"])
            .arg(&self.guest_toml)
            .output()
            .expect("run vmsync-guest status");
        assert!(
            out.status.success(),
            "guest status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("guest status json")
    }

    /// The first share's status object.
    pub fn share(&self) -> serde_json::Value {
        self.status()["shares"][0].clone()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(name)).unwrap_or_default()
    }

    /// Bytes that crossed the socket in both directions since the last reset.
    pub fn wire_bytes(&self) -> u64 {
        self.relay.bytes_up() + self.relay.bytes_down()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop_host();
        self.stop_guest();
    }
}

/// Writes `<dir>/<name>.toml`: a guest agent listening on `<dir>/<name>.sock`, its state in
/// `<dir>/<name>-state` and its control socket at `<dir>/<name>.ctl`, exporting share `src` at
/// `share`. Returns the file's path.
pub fn guest_config(dir: &Path, name: &str, share: &Path) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "listen = \"unix:{d}/{name}.sock\"\nstate_dir = \"{d}/{name}-state\"\n\
             control = \"{d}/{name}.ctl\"\n[[share]]\nname = \"src\"\npath = \"{s}\"\n",
            d = dir.display(),
            s = share.display()
        ),
    )
    .expect("write the guest's config");
    file
}

/// Writes `<dir>/<name>.toml`: a host agent dialling `unix:<guest>`, its state in
/// `<dir>/<name>-state` and its control socket at `<dir>/<name>.ctl`, with share `src` at
/// `share` (`share_extra` appended to its `[[share]]`). Returns the file's path.
pub fn host_config(
    dir: &Path,
    name: &str,
    guest: &Path,
    share: &Path,
    share_extra: &str,
) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "guest = \"unix:{g}\"\nstate_dir = \"{d}/{name}-state\"\ncontrol = \"{d}/{name}.ctl\"\n\
             [[share]]\nname = \"src\"\npath = \"{s}\"\n{share_extra}\n",
            g = guest.display(),
            d = dir.display(),
            s = share.display()
        ),
    )
    .expect("write the host's config");
    file
}

/// Polls `condition` until it holds or `timeout` has passed; returns whether it held. The first
/// polls are a couple of milliseconds apart (live sync lands in milliseconds) and the interval
/// grows to 50 ms, so a slow condition (walking a big tree) does not eat the CPU the agents
/// need. This is how live tests synchronise: a bounded wait on the outcome, never a fixed sleep.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

impl Agents {
    /// The last `lines` lines of a log in the temp dir (the agents log at debug level, so the
    /// whole file is too long for a failure message).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = self.log(name);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits (bounded by `timeout`) until the host's and the guest's trees are identical byte
    /// for byte, leaving out paths at or beneath `skip`; panics with the differences and the
    /// tails of both logs if they are not by then.
    pub fn converge_except(&self, timeout: Duration, skip: &[&str]) {
        use crate::fixture::{tree_diff, tree_except};
        let same = eventually(timeout, || {
            tree_except(&self.host_dir, skip) == tree_except(&self.guest_dir, skip)
        });
        if !same {
            let diff = tree_diff(
                &tree_except(&self.host_dir, skip),
                &tree_except(&self.guest_dir, skip),
                10,
            );
            panic!(
                "host and guest trees still differ after {timeout:?} (host vs guest):\n  {}\n\
                 status: {}\n--- host.log (tail)\n{}\n--- guest.log (tail)\n{}",
                diff.join("\n  "),
                self.status(),
                self.log_tail("host.log", 60),
                self.log_tail("guest.log", 30),
            );
        }
    }

    /// [`Agents::converge_except`] with nothing left out.
    pub fn converge(&self, timeout: Duration) {
        self.converge_except(timeout, &[]);
    }

    /// Files kept in the host's trash for share `src`, as (`<batch>/<path>`, content).
    pub fn host_trash(&self) -> Vec<(String, Vec<u8>)> {
        crate::fixture::trash_files(&self.host_dir)
    }

    /// Files kept in the guest's trash for share `src`, as (`<batch>/<path>`, content).
    pub fn guest_trash(&self) -> Vec<(String, Vec<u8>)> {
        crate::fixture::trash_files(&self.guest_dir)
    }
}

impl Agents {
    /// Freezes (`SIGSTOP`) the running `vmsync-host`: no cycle runs until [`Agents::thaw_host`],
    /// while both watchers keep queueing. Lets a test make edits on both sides that are
    /// certainly concurrent for the sync, whatever the thread scheduling.
    pub fn freeze_host(&self) {
        self.signal_host(rustix::process::Signal::STOP);
    }

    /// Resumes (`SIGCONT`) a host frozen by [`Agents::freeze_host`].
    pub fn thaw_host(&self) {
        self.signal_host(rustix::process::Signal::CONT);
    }

    /// Freezes (`SIGSTOP`) the running `vmsync-guest`: its share and state stand still, as a
    /// VM's disk does at the instant a snapshot is taken.
    pub fn freeze_guest(&self) {
        self.signal_guest(rustix::process::Signal::STOP);
    }

    /// Resumes (`SIGCONT`) a guest frozen by [`Agents::freeze_guest`].
    pub fn thaw_guest(&self) {
        self.signal_guest(rustix::process::Signal::CONT);
    }

    fn signal_guest(&self, signal: rustix::process::Signal) {
        let child = self.guest.as_ref().expect("guest is not running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("guest pid");
        rustix::process::kill_process(pid, signal).expect("signal the guest");
    }

    fn signal_host(&self, signal: rustix::process::Signal) {
        let child = self.host.as_ref().expect("host is not running");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("host pid");
        rustix::process::kill_process(pid, signal).expect("signal the host");
    }
}
