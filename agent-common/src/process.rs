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
/// Returns the soft limit now in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
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
    getrlimit(Resource::Nofile).current
}

/// Most staged files each share holds open at once, for a soft fd limit of `fd_limit`: a
/// quarter of it (at least 16), so a host that batches more than this process can hold gets
/// retries, not EMFILE failures.
pub fn max_staged_files(fd_limit: Option<u64>) -> usize {
    fd_limit
        .map_or(4096, |n| usize::try_from(n / 4).unwrap_or(4096))
        .max(16)
}

/// glibc's malloc arenas an agent may use: see [`limit_malloc_arenas`].
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] (agents call it first thing, before any
/// thread starts), unless `MALLOC_ARENA_MAX` is set, which then decides. By default glibc
/// gives each thread that contends for the heap its own arena, up to eight per core, and
/// memory freed in one is kept there for reuse by that arena alone: under steady churn a
/// long-running agent's RSS then creeps up arena by arena with no more data in use
/// (docs/performance.md, "Memory and CPU over hours"). Two arenas keep the runtime's threads from
/// contending much while holding far less freed memory. Does nothing on other C libraries.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable; it is called before the agent starts any
        // thread, and a value it refuses (it returns 0) leaves glibc's default in place.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_are_a_quarter_of_the_fd_limit() {
        for (limit, want) in [
            (Some(1024), 256),
            (Some(256), 64),
            (Some(40), 16),
            (Some(0), 16),
            (Some(1 << 20), 1 << 18),
            (None, 4096),
        ] {
            assert_eq!(max_staged_files(limit), want, "{limit:?}");
        }
    }
}
