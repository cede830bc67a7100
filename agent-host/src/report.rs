//! The short-lived commands (`status`, `metrics`, `sync`, `wait`, `resume`, `resolve`): clients
//! of a running agent's control socket that print what it says.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vmsync_agent_common::control::{self, request, ControlRequest, ControlResponse};
use vmsync_engine::status::ShareState;

/// How long a quick command waits for the agent to answer.
const CONTROL_TIMEOUT_MS: u64 = 10_000;
/// How long `sync` waits for a cycle (a first sync of a large tree takes a while).
const SYNC_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// `wait` polls the agent this often.
const WAIT_POLL_MS: u64 = 10;
/// How long shares must stay in sync before `wait` believes it (see `wait`).
const WAIT_SETTLE_MS: u64 = 20;
/// How long `wait` gives an agent that does not answer (no control socket, or nobody
/// listening on it) before it says so: long enough for `run` started just before to bind its
/// socket, short against any timeout a caller would give `wait`.
const AGENT_START_GRACE_MS: u64 = 3_000;

/// Exit code of every command that talks to the agent when no agent answers on the control
/// socket (README "Running it").
pub const EXIT_NO_AGENT: u8 = 4;

pub async fn status(control: &Path, config: &Path, json: bool) -> ExitCode {
    match request(
        control,
        &ControlRequest::Status,
        Duration::from_millis(CONTROL_TIMEOUT_MS),
    )
    .await
    {
        Ok(response) => {
            print_response(&response, json, config);
            match response {
                ControlResponse::Error { .. } => ExitCode::from(1),
                ControlResponse::Status { .. } => ExitCode::SUCCESS,
            }
        }
        Err(e) => not_running(control, e),
    }
}

/// `metrics`: the status as Prometheus text exposition (see [`crate::metrics`]). Exits like
/// `status`.
pub async fn metrics(control: &Path, config: &Path) -> ExitCode {
    match request(
        control,
        &ControlRequest::Status,
        Duration::from_millis(CONTROL_TIMEOUT_MS),
    )
    .await
    {
        Ok(ControlResponse::Status { agent, shares }) => {
            let vm = crate::metrics::vm_label(config);
            out(&crate::metrics::render(&vm, &agent, &shares));
            ExitCode::SUCCESS
        }
        Ok(ControlResponse::Error { message }) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(e) => not_running(control, e),
    }
}

pub async fn sync(control: &Path, config: &Path) -> ExitCode {
    match request(
        control,
        &ControlRequest::Sync,
        Duration::from_millis(SYNC_TIMEOUT_MS),
    )
    .await
    {
        Ok(response) => {
            print_response(&response, false, config);
            exit_for(&response)
        }
        Err(e) => not_running(control, e),
    }
}

pub async fn resume(control: &Path, config: &Path, share: &str) -> ExitCode {
    let req = ControlRequest::Resume {
        share: share.to_string(),
    };
    match request(control, &req, Duration::from_millis(CONTROL_TIMEOUT_MS)).await {
        Ok(response) => {
            print_response(&response, false, config);
            exit_for(&response)
        }
        Err(e) => not_running(control, e),
    }
}

pub async fn resolve(
    control: &Path,
    config: &Path,
    share: String,
    path: String,
    keep: control::Keep,
) -> ExitCode {
    let req = ControlRequest::Resolve { share, path, keep };
    match request(control, &req, Duration::from_millis(SYNC_TIMEOUT_MS)).await {
        Ok(response) => {
            print_response(&response, false, config);
            exit_for(&response)
        }
        Err(e) => not_running(control, e),
    }
}

/// Exit 0 once every share is in sync, 3 as soon as one is conflicted or halted, 1 on timeout,
/// [`EXIT_NO_AGENT`] when no agent answers. An agent that is not answering yet gets
/// [`AGENT_START_GRACE_MS`], so `wait` can be started right after `run`.
pub async fn wait(control: &Path, timeout: Option<f64>, progress: bool) -> ExitCode {
    let mut display = progress.then(|| crate::progress::Display::new(false));
    let code = wait_for_sync(control, timeout, display.as_mut()).await;
    if let Some(display) = display.as_mut() {
        display.finish();
    }
    code
}

async fn wait_for_sync(
    control: &Path,
    timeout: Option<f64>,
    mut display: Option<&mut crate::progress::Display>,
) -> ExitCode {
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    let mut settled: Option<Instant> = None;
    // Since when nobody has answered (`None` while the agent answers).
    let mut silent_since: Option<Instant> = Some(Instant::now());
    loop {
        match request(
            control,
            &ControlRequest::Status,
            Duration::from_millis(CONTROL_TIMEOUT_MS),
        )
        .await
        {
            Ok(ControlResponse::Status { shares, agent }) => {
                silent_since = None;
                if let Some(display) = display.as_deref_mut() {
                    display.show(&shares);
                }
                if let Some(bad) = shares
                    .iter()
                    .find(|s| matches!(s.state, ShareState::Conflicted | ShareState::Halted))
                {
                    eprintln!(
                        "share `{}` is {}{}",
                        bad.name,
                        bad.state.as_str(),
                        bad.halt_reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                    return ExitCode::from(3);
                }
                let in_sync = agent.peer == "connected"
                    && !shares.is_empty()
                    && shares.iter().all(|s| s.state == ShareState::InSync);
                // In sync on two looks WAIT_SETTLE_MS apart: a change made just before `wait`
                // was called has had time to reach the host as a hint (that takes about a
                // millisecond) and would have turned the share to `syncing`.
                if in_sync
                    && settled.is_some_and(|t: Instant| {
                        t.elapsed() >= Duration::from_millis(WAIT_SETTLE_MS)
                    })
                {
                    return ExitCode::SUCCESS;
                }
                if !in_sync {
                    settled = None;
                } else if settled.is_none() {
                    settled = Some(Instant::now());
                }
            }
            Ok(ControlResponse::Error { .. }) => {}
            // Nobody listens: no agent (yet). A busy agent that answers late is not this.
            Err(e) if no_listener(&e) => {
                let since = *silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(AGENT_START_GRACE_MS) {
                    return not_running(control, e);
                }
            }
            Err(_) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("timed out waiting for the shares to be in sync");
            return ExitCode::from(1);
        }
        tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
    }
}

/// The control socket is not there or nobody accepts on it.
fn no_listener(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn not_running(control: &Path, e: std::io::Error) -> ExitCode {
    if no_listener(&e) {
        eprintln!(
            "no agent answers at {}: {e} (is `vmsync-host run` running with this config?)",
            control.display()
        );
        return ExitCode::from(EXIT_NO_AGENT);
    }
    eprintln!("cannot reach the agent at {}: {e}", control.display());
    ExitCode::from(1)
}

fn exit_for(response: &ControlResponse) -> ExitCode {
    match response {
        ControlResponse::Error { .. } => ExitCode::from(1),
        ControlResponse::Status { shares, .. } => {
            if shares
                .iter()
                .any(|s| matches!(s.state, ShareState::Conflicted | ShareState::Halted))
            {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn print_response(response: &ControlResponse, json: bool, config: &Path) {
    match response {
        ControlResponse::Error { message } => eprintln!("error: {message}"),
        _ if json => out(&format!("{}\n", control::render_json(response))),
        _ => {
            let shown = vmsync_core::path::escape_bytes(config.as_os_str().as_encoded_bytes());
            out(&control::render_text(response, Some(&shown)))
        }
    }
}

/// Writes to stdout, ignoring a closed pipe (`status | head` must not panic).
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
