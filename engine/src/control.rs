//! The control socket: how `status`, `sync`, `wait` and `resume` talk to a running agent.
//! A Unix socket (mode 0600) carrying one JSON request line and one JSON response line per
//! connection. Local and trusted (root or the agent's user), but still bounded: a request line
//! longer than [`MAX_CONTROL_REQUEST_BYTES`] is refused.

use crate::status::ShareStatus;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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

/// Binds the control socket, replacing a stale socket file (but nothing else).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads one request from an accepted connection.
pub async fn read_request(stream: &mut UnixStream) -> std::io::Result<ControlRequest> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_CONTROL_REQUEST_BYTES);
    reader.read_line(&mut line).await?;
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
    let detail = agent
        .peer_detail
        .as_deref()
        .map(|d| format!(" ({d})"))
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
        if let Some(reason) = &s.halt_reason {
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
        if let Some(notice) = &s.notice {
            let _ = writeln!(out, "  notice: {notice}");
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
        for c in &s.conflicts {
            let _ = writeln!(out, "  conflict: {c}");
        }
        for p in &s.problems {
            let _ = writeln!(out, "  problem ({}): {}: {}", p.side, p.path, p.reason);
        }
    }
    out
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
