//! Process plumbing both agents need in the same way: logging to stderr (plain text off a
//! terminal, for journald), the open-file limit, the tokio runtime, and the shutdown signal.

/// What `notify` may log unless `VMSYNC_LOG` says otherwise (see [`init_logging`]).
const NOTIFY_DIRECTIVE: &str = "notify=warn";

/// Logs to stderr at the level `VMSYNC_LOG` asks for (default `info`). Plain text when stderr is
/// not a terminal: journald and log files get no colour escapes.
pub fn init_logging() {
    let asked = std::env::var("VMSYNC_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&asked)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if asked.trim().is_empty() {
        filter = tracing_subscriber::EnvFilter::new("info");
    }
    // `notify` logs at INFO every watch the kernel already dropped with its directory
    // ("unable to remove watch descriptor"): one line per directory after an `rm -rf` of a big
    // tree. Expected, harmless, and it drowns the journal: only its warnings and errors show,
    // unless VMSYNC_LOG names `notify` itself.
    if !asked.contains("notify") {
        if let Ok(directive) = NOTIFY_DIRECTIVE.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Raises this process's soft fd limit to its hard limit (agents call it first thing): a
/// share with many files in flight wants descriptors, and the soft default (1024) is low.
/// Before any share is opened: each caps its staged files by the limit it finds then.
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
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
