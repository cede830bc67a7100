//! Process plumbing both agents need in the same way: logging to stderr (plain text off a
//! terminal, for journald), the open-file limit, the tokio runtime, and the shutdown signal.

/// Logs to stderr at the level `VMSYNC_LOG` asks for (default `info`). Plain text when stderr is
/// not a terminal: journald and log files get no colour escapes.
pub fn init_logging() {
    let asked = std::env::var("VMSYNC_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&asked)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if asked.trim().is_empty() {
        filter = tracing_subscriber::EnvFilter::new("info");
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| AroundBars)
        .with_ansi(ansi)
        .init();
}

/// Progress bars on stderr that log lines must not tear (see [`log_around`]).
static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();

/// From now on, log lines are written above `bars` (cleared, the line written, drawn again)
/// instead of through them. Once per process; later calls do nothing.
pub fn log_around(bars: indicatif::MultiProgress) {
    let _ = BARS.set(bars);
}

/// stderr, around the progress bars when there are any.
struct AroundBars;

impl std::io::Write for AroundBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
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

/// glibc's malloc arenas an agent may use: see [`tune_malloc`].
pub const MALLOC_ARENAS: i32 = 1;

/// Allocations of at least this many bytes get pages of their own from the kernel, given back
/// when freed: see [`tune_malloc`].
pub const MALLOC_MMAP_THRESHOLD: i32 = 64 * 1024;

/// Sets glibc's malloc up for a process that runs for weeks under churn (agents call it first
/// thing, before any thread starts); does nothing on other C libraries. Two tunables, each
/// unless its environment variable is set, which then decides:
/// - one arena ([`MALLOC_ARENAS`], `MALLOC_ARENA_MAX`): by default glibc gives each thread
///   that contends for the heap an arena of its own, up to eight per core, and memory freed in
///   one stays there for that arena alone, so RSS creeps up arena by arena with no more data in
///   use. With one, everything freed is in the heap that `malloc_trim` hands back page by page
///   ([`spawn_heap_trimmer`]). The agents' threads allocate little and briefly, and
///   edit-to-visible latency did not move;
/// - a fixed mmap threshold ([`MALLOC_MMAP_THRESHOLD`], `MALLOC_MMAP_THRESHOLD_`): glibc
///   raises its threshold each time a big block is freed, after which buffers of chunks and
///   batches come from the heap, and a burst of them leaves it tens of MiB larger for good
///   (freed blocks under live ones cannot be trimmed). At 64 KiB they are mapped and unmapped.
///
/// Over an hour of churn (docs/performance.md, "Memory and CPU over hours") both together kept
/// each agent's RSS within a few percent of its 5-minute value; one arena alone let the guest's
/// heap grow from 24 to 37 MiB in one burst, two arenas grew both agents by a third.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = [
            ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, MALLOC_ARENAS),
            (
                "MALLOC_MMAP_THRESHOLD_",
                libc::M_MMAP_THRESHOLD,
                MALLOC_MMAP_THRESHOLD,
            ),
        ];
        for (variable, param, value) in tunables {
            if std::env::var_os(variable).is_none() {
                // SAFETY: mallopt only sets a malloc tunable; it is called before the agent
                // starts any thread, and a value it refuses (it returns 0) leaves glibc's
                // default in place.
                #[allow(unsafe_code)]
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        }
    }
}

/// How often a running agent hands glibc's freed heap pages back to the kernel (see
/// [`spawn_heap_trimmer`]).
pub const HEAP_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts a task that calls `malloc_trim(0)` every [`HEAP_TRIM_EVERY`] on the current tokio
/// runtime. glibc returns freed memory to the kernel only from the top of each heap; a
/// long-running agent under churn frees memory all through its heaps (hash tables that reached
/// a peak, batches of paths, message buffers), so its RSS creeps up with no more data in use.
/// `malloc_trim` releases every whole free page in every arena (`madvise(MADV_DONTNEED)`); in
/// the soak benchmark it took 0.6 ms at the median and 2.3 ms at most, every 5 s
/// (docs/performance.md, "Memory and CPU over hours"). Does nothing on other C libraries
/// (musl's allocator returns memory itself).
pub fn spawn_heap_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        let mut every = tokio::time::interval(HEAP_TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let started = std::time::Instant::now();
            // SAFETY: malloc_trim only gives free pages back to the kernel; it takes the
            // arenas' locks itself and is safe to call from any thread at any time.
            #[allow(unsafe_code)]
            unsafe {
                libc::malloc_trim(0);
            }
            tracing::trace!("heap trimmed in {} us", started.elapsed().as_micros());
        }
    });
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
