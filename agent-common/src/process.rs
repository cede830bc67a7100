//! Process plumbing both agents need in the same way: logging to stderr (plain text off a
//! terminal, for journald), the tokio runtime, and the shutdown signal.

/// Logs to stderr at the level `VMSYNC_LOG` asks for (default `info`). Plain text when stderr is
/// not a terminal: journald and log files get no colour escapes.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// The multi-threaded runtime an agent runs on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Resolves on SIGTERM or SIGINT; never, if the handlers cannot be installed.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}
