//! The control socket: how `status`, `sync`, `wait` and `resume` talk to a running agent.
//! A Unix socket (mode 0600) carrying one JSON request line and one JSON response line per
//! connection. Local and trusted (root or the agent's user), but still bounded: a request line
//! longer than [`MAX_CONTROL_REQUEST_BYTES`] is refused.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vmsync_engine::status::ShareStatus;

pub const MAX_CONTROL_REQUEST_BYTES: u64 = 64 * 1024;
/// A whole status answer, however many shares and problems it lists.
pub const MAX_CONTROL_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    /// Run a full cycle of every share now; answer when it is done.
    Sync,
    Resume {
        share: String,
    },
    /// Settle the conflict at `path` (as `status` shows it: escaped, share-relative) of
    /// `share` by keeping one side's version or both.
    Resolve {
        share: String,
        path: String,
        keep: Keep,
    },
}

/// What `resolve` keeps of a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The host's version, on both sides; the guest's goes to the guest's trash.
    Host,
    /// The guest's version, on both sides; the host's goes to the host's trash.
    Guest,
    /// The guest's version at the path and the host's under a sibling name, on both sides.
    Both,
}

/// The bytes of a path as `status` shows it ([`vmsync_core::path::escape_bytes`]: `\\` for a
/// backslash, `\xNN` for any other byte that is not printable ASCII).
pub fn unescape_path(shown: &str) -> Result<Vec<u8>, String> {
    let bytes = shown.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = bytes
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!("{shown:?}: `\\x` must be followed by two hex digits")
                    })?;
                out.push(hex);
                i += 4;
            }
            _ => {
                return Err(format!(
                    "{shown:?}: a backslash is written `\\\\` (give the path as `status` shows it)"
                ))
            }
        }
    }
    Ok(out)
}

/// Facts about the agent process itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub role: String,
    pub version: String,
    pub pid: u32,
    /// `connected` or `disconnected` (host: to its guest; guest: from a host).
    pub peer: String,
    pub peer_detail: Option<String>,
    pub rss_bytes: u64,
    /// Chunk payload bytes sent and received in the current (or last) session.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Host: how many times it connected to its guest again after the first connection since
    /// it started (the guest leaves this out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnects: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ControlResponse {
    Status {
        agent: AgentInfo,
        shares: Vec<ShareStatus>,
    },
    Error {
        message: String,
    },
}

/// Binds the control socket (mode 0600 before anyone can reach it), replacing a stale socket
/// file but never a live socket of another agent, nor anything else.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    vmsync_transport::stream::bind_unix(path).await
}

/// How long a control client may take to send its request.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most control connections an agent serves at once. Past it a new connection is closed as
/// soon as it is accepted: a flood of clients that connect and say nothing holds at most this
/// many descriptors (each for [`CONTROL_READ_TIMEOUT`]), never the agent's whole fd limit,
/// which its scans and staged files need.
pub const MAX_CONTROL_CLIENTS: usize = 64;

/// How long the control socket's accept loop waits after a failed accept (out of
/// descriptors, say) before it tries again, instead of spinning.
pub const CONTROL_ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Reads one request from an accepted connection, within [`CONTROL_READ_TIMEOUT`]: a client
/// that connects and says nothing does not hold a task forever.
pub async fn read_request(stream: &mut UnixStream) -> std::io::Result<ControlRequest> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_CONTROL_REQUEST_BYTES);
    tokio::time::timeout(CONTROL_READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub async fn write_response(
    stream: &mut UnixStream,
    response: &ControlResponse,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await?;
    stream.shutdown().await
}

/// Sends `request` to the agent listening on `path` and waits up to `timeout` for its answer.
pub async fn request(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> std::io::Result<ControlResponse> {
    let work = async {
        let mut stream = UnixStream::connect(path).await?;
        let mut bytes = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        stream.write_all(&bytes).await?;
        let mut line = String::new();
        BufReader::new(stream)
            .take(MAX_CONTROL_RESPONSE_BYTES)
            .read_line(&mut line)
            .await?;
        serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the agent did not answer in time",
        )
    })?
}

/// This process's resident set size, from `/proc/self/statm` (0 if unavailable).
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

/// The response as pretty JSON (`status --json`).
pub fn render_json(response: &ControlResponse) -> String {
    serde_json::to_string_pretty(response).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The response as a human-readable table (`status`).
/// The status as text. `config_shown` is the configuration file the command was given, for
/// the exact `resume` command a halted share needs.
pub fn render_text(response: &ControlResponse, config_shown: Option<&str>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (agent, shares) = match response {
        ControlResponse::Error { message } => return format!("error: {message}\n"),
        ControlResponse::Status { agent, shares } => (agent, shares),
    };
    // A disconnect reason can carry the peer's words: escaped like everything a peer says.
    let detail = agent
        .peer_detail
        .as_deref()
        .map(|d| format!(" ({})", vmsync_core::text::escape_text(d)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "{} {} (pid {}), peer {}{detail}, rss {}",
        agent.role,
        agent.version,
        agent.pid,
        agent.peer,
        human_bytes(agent.rss_bytes)
    );
    let _ = writeln!(
        out,
        "{:<16} {:<11} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "SHARE", "STATE", "FILES", "BYTES", "SENT", "RECEIVED", "REUSED"
    );
    for s in shares {
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:>9} {:>10} {:>10} {:>10} {:>8}",
            s.name,
            s.state.as_str(),
            s.files,
            human_bytes(s.bytes),
            human_bytes(s.bytes_sent),
            human_bytes(s.bytes_received),
            s.chunks_reused
        );
        // Pauses lift themselves; `resume` is for halts.
        let lifts = match s.halt_code.as_deref() {
            Some(vmsync_engine::controller::DISK_FULL_CODE) => Some("once there is room again"),
            Some(vmsync_engine::controller::QUOTA_CODE) => Some(
                "once the guest's changes fit the share's quotas \
                 (or raise its quota_* and restart the agent)",
            ),
            _ => None,
        };
        match (&s.halt_reason, lifts) {
            (Some(reason), Some(lifts)) => {
                let _ = writeln!(out, "  paused: {reason}");
                let _ = writeln!(out, "  goes on by itself {lifts}");
            }
            (Some(reason), None) => {
                let _ = writeln!(out, "  halted: {reason}");
                if s.put_back > 0 {
                    let _ = writeln!(
                        out,
                        "  {} entries the halted changes had removed were put back from the trash",
                        s.put_back
                    );
                }
                let _ = writeln!(
                    out,
                    "  to let it through: vmsync-host resume --config {} --share {}",
                    config_shown.unwrap_or("<config>"),
                    s.name
                );
            }
            (None, _) => {}
        }
        if let Some(notice) = &s.notice {
            let _ = writeln!(out, "  notice: {notice}");
        }
        if let Some(error) = &s.error {
            let _ = writeln!(out, "  last cycle failed: {error}");
        }
        match (&s.watch_problem, s.watching) {
            (Some(problem), _) => {
                let _ = writeln!(out, "  not watched: {problem}");
            }
            (None, true) => {
                let _ = writeln!(out, "  watching {} directories live", s.watched_dirs);
            }
            (None, false) => {}
        }
        if s.trash_files > 0 {
            let _ = writeln!(
                out,
                "  trash: {} files, {} kept (list with `trash --share {}`)",
                s.trash_files,
                human_bytes(s.trash_bytes),
                s.name
            );
        }
        render_conflicts(&mut out, s, config_shown);
        render_problems(&mut out, s);
    }
    out
}

/// Conflicts and problems listed one by one in `status` before the rest is summarised (the
/// JSON has them all).
pub const STATUS_LIST_FIRST: usize = 10;

/// Each conflict with the command that settles it, the first [`STATUS_LIST_FIRST`] of them.
fn render_conflicts(out: &mut String, s: &ShareStatus, config_shown: Option<&str>) {
    use std::fmt::Write;
    if s.conflicts.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {} conflict(s): both sides changed these paths differently; keep one side's version \
         (the other goes to that side's trash) or both (the guest's under a sibling name):",
        s.conflicts.len()
    );
    for c in s.conflicts.iter().take(STATUS_LIST_FIRST) {
        let _ = writeln!(out, "  conflict: {c}");
        let _ = writeln!(
            out,
            "    vmsync-host resolve --config {} --share {} {} --keep host|guest|both",
            shell_quote(config_shown.unwrap_or("<config>")),
            s.name,
            shell_quote(c)
        );
    }
    if s.conflicts.len() > STATUS_LIST_FIRST {
        let _ = writeln!(
            out,
            "  ... and {} more conflict(s) (`status --json` lists them all)",
            s.conflicts.len() - STATUS_LIST_FIRST
        );
    }
}

/// Problems counted by side and kind (the reason up to its first `:`), then the first
/// [`STATUS_LIST_FIRST`] of them.
fn render_problems(out: &mut String, s: &ShareStatus) {
    use std::fmt::Write;
    if s.problems.len() > STATUS_LIST_FIRST {
        let mut kinds: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
        for p in &s.problems {
            let kind = p.reason.split(':').next().unwrap_or(&p.reason).trim();
            *kinds.entry((p.side.as_str(), kind)).or_default() += 1;
        }
        let _ = writeln!(out, "  {} problems:", s.problems.len());
        for ((side, kind), n) in &kinds {
            let _ = writeln!(out, "    {n} x ({side}) {kind}");
        }
        let _ = writeln!(out, "  the first {STATUS_LIST_FIRST}:");
    }
    for p in s.problems.iter().take(STATUS_LIST_FIRST) {
        let _ = writeln!(out, "  problem ({}): {}: {}", p.side, p.path, p.reason);
    }
    if s.problems.len() > STATUS_LIST_FIRST {
        let _ = writeln!(
            out,
            "  ... and {} more problem(s) (`status --json` lists them all)",
            s.problems.len() - STATUS_LIST_FIRST
        );
    }
}

/// `text` as one shell word: as it is when it is plainly safe, else in single quotes.
pub fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:=@%".contains(&b));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_engine::status::ProblemView;

    /// A client that connects and says nothing is let go after [`CONTROL_READ_TIMEOUT`].
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let listener = bind(&path).await.unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = read_request(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), CONTROL_READ_TIMEOUT);
    }

    fn status_with(conflicts: usize, problems: &[(&str, &str)]) -> ControlResponse {
        ControlResponse::Status {
            agent: AgentInfo::default(),
            shares: vec![ShareStatus {
                name: "src".into(),
                conflicts: (0..conflicts).map(|i| format!("dir/it's {i}")).collect(),
                problems: problems
                    .iter()
                    .enumerate()
                    .map(|(i, (side, reason))| ProblemView {
                        path: format!("p{i}"),
                        side: side.to_string(),
                        reason: reason.to_string(),
                    })
                    .collect(),
                ..ShareStatus::default()
            }],
        }
    }

    #[test]
    fn many_problems_are_counted_by_kind_and_only_the_first_listed() {
        let mut problems = vec![("host", "write failed: no space left on device"); 300];
        problems.extend([("guest", "not UTF-8"); 34]);
        let text = render_text(&status_with(0, &problems), Some("/etc/vm1.toml"));
        assert!(text.contains("  334 problems:\n"), "{text}");
        assert!(text.contains("    300 x (host) write failed\n"), "{text}");
        assert!(text.contains("    34 x (guest) not UTF-8\n"), "{text}");
        assert_eq!(
            text.matches("  problem (").count(),
            STATUS_LIST_FIRST,
            "{text}"
        );
        assert!(text.contains("... and 324 more problem(s)"), "{text}");
        // A few are listed as they are, with no summary.
        let text = render_text(&status_with(0, &problems[..3]), None);
        assert_eq!(text.matches("  problem (").count(), 3, "{text}");
        assert!(!text.contains("problems:"), "{text}");
    }

    #[test]
    fn each_conflict_shows_the_command_that_settles_it() {
        let text = render_text(&status_with(12, &[]), Some("/etc/vm 1.toml"));
        assert!(
            text.contains(
                "    vmsync-host resolve --config '/etc/vm 1.toml' --share src 'dir/it'\\''s 0' \
                 --keep host|guest|both\n"
            ),
            "{text}"
        );
        assert_eq!(
            text.matches("vmsync-host resolve").count(),
            STATUS_LIST_FIRST
        );
        assert!(text.contains("... and 2 more conflict(s)"), "{text}");
    }

    #[test]
    fn a_pause_says_it_lifts_itself_and_a_halt_names_resume() {
        use vmsync_engine::controller::{DISK_FULL_CODE, QUOTA_CODE};
        let with = |code: &str, reason: &str| {
            let mut st = status_with(0, &[]);
            if let ControlResponse::Status { shares, .. } = &mut st {
                shares[0].halt_code = Some(code.to_string());
                shares[0].halt_reason = Some(reason.to_string());
            }
            render_text(&st, Some("/etc/vm1.toml"))
        };
        for (code, says) in [
            (DISK_FULL_CODE, "goes on by itself once there is room again"),
            (QUOTA_CODE, "goes on by itself once the guest's changes fit"),
        ] {
            let text = with(code, "why");
            assert!(text.contains("  paused: why\n"), "{code}: {text}");
            assert!(text.contains(says), "{code}: {text}");
            assert!(!text.contains("resume"), "{code}: {text}");
        }
        let text = with("mass-deletion", "why");
        assert!(text.contains("  halted: why\n"), "{text}");
        assert!(
            text.contains(
                "  to let it through: vmsync-host resume --config /etc/vm1.toml --share src\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn unescape_path_undoes_escape_bytes() {
        for raw in [&b"plain/name.txt"[..], b"back\\slash", b"nl\n\xff\x01 x"] {
            let shown = vmsync_core::path::escape_bytes(raw);
            assert_eq!(unescape_path(&shown).unwrap(), raw, "{shown}");
        }
        assert!(unescape_path("a\\q").is_err());
        assert!(unescape_path("a\\x4").is_err());
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        for (text, want) in [
            ("a/b.c", "a/b.c"),
            ("a b", "'a b'"),
            ("it's", "'it'\\''s'"),
            ("", "''"),
            ("$HOME", "'$HOME'"),
        ] {
            assert_eq!(shell_quote(text), want, "{text}");
        }
    }
}
