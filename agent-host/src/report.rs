//! The short-lived commands (`status`, `sync`, `wait`, `resume`): clients of a running agent's
//! control socket that print what it says.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vmsync_engine::control::{self, request, ControlRequest, ControlResponse};
use vmsync_engine::status::ShareState;

/// How long a quick command waits for the agent to answer.
const CONTROL_TIMEOUT_MS: u64 = 10_000;
/// How long `sync` waits for a cycle (a first sync of a large tree takes a while).
const SYNC_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// `wait` polls the agent this often.
const WAIT_POLL_MS: u64 = 10;
/// How long shares must stay in sync before `wait` believes it (see `wait`).
const WAIT_SETTLE_MS: u64 = 20;

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

/// Exit 0 once every share is in sync, 3 as soon as one is conflicted or halted, 1 on timeout.
/// An agent that is not (yet) answering counts as "not in sync yet", so `wait` can be started
/// right after `run`.
pub async fn wait(control: &Path, timeout: Option<f64>) -> ExitCode {
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    let mut settled: Option<Instant> = None;
    loop {
        if let Ok(ControlResponse::Status { shares, agent }) = request(
            control,
            &ControlRequest::Status,
            Duration::from_millis(CONTROL_TIMEOUT_MS),
        )
        .await
        {
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
            // In sync on two looks WAIT_SETTLE_MS apart: a change made just before `wait` was
            // called has had time to reach the host as a hint (that takes about a millisecond)
            // and would have turned the share to `syncing`.
            if in_sync
                && settled
                    .is_some_and(|t: Instant| t.elapsed() >= Duration::from_millis(WAIT_SETTLE_MS))
            {
                return ExitCode::SUCCESS;
            }
            if !in_sync {
                settled = None;
            } else if settled.is_none() {
                settled = Some(Instant::now());
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("timed out waiting for the shares to be in sync");
            return ExitCode::from(1);
        }
        tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
    }
}

fn not_running(control: &Path, e: std::io::Error) -> ExitCode {
    eprintln!(
        "cannot reach the agent at {}: {e} (is `run` running?)",
        control.display()
    );
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
