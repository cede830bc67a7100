//! `vmsync-host sync --guest ENDPOINT --share NAME DIR`: one share synced with a guest once,
//! without a configuration file or a running agent, for scripts and fleets. It runs full
//! cycles until the share converges (bounded: [`MAX_RETRY_CYCLES`] more after the first, as
//! the agent's loop retries), prints what moved, and exits 0 in sync, 3 conflicted or halted,
//! 1 on a failure.
//!
//! The share is built exactly as `run` builds a `[[share]]` with only `name`, `path` (and
//! `mode`, `conflict`) set ([`HostShare::with_defaults`], [`crate::service::open_share`]), so
//! every safety applies alike: root markers, the mass-deletion guard, the trash, the disk
//! reserve, quotas. Its state (the ancestor, so a second run is incremental and deletions are
//! judged against what was in sync; a halt, which stands until `--resume`) is kept in a state
//! directory of its own per guest and share ([`default_state_dir`]), or `--state-dir`. The
//! state database's lock keeps a `run` agent and a one-shot sync (or two) off the same one.

use crate::config::{
    parse_guest, DefaultDirs, HostShare, CONFLICT_POLICIES, DEFAULT_MAX_DELETE_FRACTION, MODES,
};
use crate::service::{dial, open_share, StatePlace, STATE_DB_FILE};
use clap::builder::PossibleValuesParser;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use vmsync_agent_common::control::{human_bytes, shell_quote, STATUS_LIST_FIRST};
use vmsync_core::endpoint::{
    Change, ChangeHints, ChunkData, ChunkRead, DeltaRead, Endpoint, EndpointError, MissingChunk,
    NotStaged, Outcome, Problem, ScanOptions, ScanReport, ScanScope, StageRequest,
};
use vmsync_core::reconcile::{ConflictPolicy, SyncMode};
use vmsync_core::{Entry, RelPath};
use vmsync_engine::controller::{DISK_FULL_CODE, QUOTA_CODE};
use vmsync_engine::schedule::{Share, MAX_RETRY_CYCLES, PENDING_RETRY_MAX, PENDING_RETRY_MIN};
use vmsync_engine::state::StateDb;
use vmsync_engine::status::{ShareState, ShareStatus};
use vmsync_transport::EndpointAddr;

/// Exit code: the share is conflicted or halted (or paused).
const EXIT_CONFLICTED_OR_HALTED: u8 = 3;
/// Exit code: bad arguments (clap's own usage errors exit 2 too).
const EXIT_USAGE: u8 = 2;
/// The directory under the state parent that holds the one-shot syncs' state directories.
pub const ONESHOT_DIR: &str = "oneshot";
/// A path component longer than this is shortened (see [`component`]); file systems take 255.
const MAX_COMPONENT_BYTES: usize = 120;
/// What a shortened component keeps of the escaped text before its hash.
const SHORTENED_KEEP_BYTES: usize = 80;

/// The one-shot form of `sync`: every argument but `--guest` and `--share` is optional, and
/// none goes with `--config`.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "oneshot", multiple = true)]
pub struct OneShotArgs {
    /// One-shot form: the guest to sync with, as `guest =` in a configuration takes it
    /// (unix:/PATH, vsock://CID:PORT, hybrid:/PATH:PORT, libvirt:DOMAIN[@URI][:PORT]).
    #[arg(long, value_name = "ENDPOINT", requires = "share")]
    pub guest: Option<String>,
    /// One-shot form: the share's name, as the guest exports it, and the host directory.
    #[arg(long, num_args = 2, value_names = ["NAME", "DIR"], requires = "guest")]
    pub share: Option<Vec<OsString>>,
    /// One-shot form: which way changes go (default two-way).
    #[arg(long, requires = "guest", value_parser = PossibleValuesParser::new(MODES.map(|(name, _)| name)))]
    pub mode: Option<String>,
    /// One-shot form: how a path both sides changed is settled, two-way only (default keep:
    /// left as it is on both sides, exit 3).
    #[arg(long, requires = "guest", value_parser = PossibleValuesParser::new(CONFLICT_POLICIES.map(|(name, _)| name)))]
    pub conflict: Option<String>,
    /// One-shot form: where to keep the share's sync state (default:
    /// <state parent>/oneshot/<ENDPOINT>/<NAME>, the endpoint escaped into one file name;
    /// the state parent is /var/lib/vmsync for root, else $XDG_STATE_HOME/vmsync or
    /// ~/.local/state/vmsync).
    #[arg(long, value_name = "DIR", requires = "guest")]
    pub state_dir: Option<PathBuf>,
    /// One-shot form: lift the share's safety halt first (a halt stands from run to run).
    #[arg(long, requires = "guest")]
    pub resume: bool,
    /// One-shot form: print the summary as a JSON object.
    #[arg(long, requires = "guest")]
    pub json: bool,
}

/// The arguments checked and resolved: what to sync and where its state is.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    guest: EndpointAddr,
    share: HostShare,
    state_dir: PathBuf,
    resume: bool,
    json: bool,
    /// The command that runs this sync again (for the guidance), without `--resume`.
    again: String,
}

/// `sync --guest ...`: parses, syncs, prints the summary, and returns the exit code.
pub fn main(args: OneShotArgs) -> ExitCode {
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            eprintln!("vmsync-host sync: cannot read the current directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plan = match plan(&args, &DefaultDirs::of_this_process(), &cwd) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("vmsync-host sync: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    vmsync_agent_common::process::tune_malloc();
    // The summary is the output: the log adds warnings and errors only, unless asked for more.
    if std::env::var_os("VMSYNC_LOG").is_none() {
        std::env::set_var("VMSYNC_LOG", "warn");
    }
    vmsync_agent_common::process::init_logging();
    let fd_limit = vmsync_agent_common::process::raise_fd_limit();
    let max_staged = vmsync_agent_common::process::max_staged_files(fd_limit);
    let runtime = match vmsync_agent_common::process::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmsync-host: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = sync(&plan, max_staged) => result,
            _ = vmsync_agent_common::process::shutdown_signal() => Err("interrupted".to_string()),
        }
    });
    // Blocking threads still busy (a scan cut short by a signal) get at most a second.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(done) => report(&plan, &done),
        Err(message) => {
            eprintln!("vmsync-host sync: {message}");
            if plan.json {
                let json = serde_json::json!({
                    "share": plan.share.name,
                    "guest": plan.guest.to_string(),
                    "state_dir": plan.state_dir,
                    "state": "failed",
                    "error": message,
                });
                out(&format!("{json}\n"));
            }
            ExitCode::FAILURE
        }
    }
}

/// Checks the arguments as a configuration's `[[share]]` would be checked, and resolves the
/// directories (`cwd` for relative ones, symlinks as `load` resolves them).
fn plan(args: &OneShotArgs, defaults: &DefaultDirs, cwd: &Path) -> Result<Plan, String> {
    let (Some(guest_text), Some([name, dir])) = (&args.guest, args.share.as_deref()) else {
        return Err("give both --guest ENDPOINT and --share NAME DIR".into());
    };
    let guest = parse_guest(guest_text).map_err(|e| format!("--guest: {e}"))?;
    let Some(name) = name.to_str() else {
        return Err(format!("--share: the name {name:?} is not UTF-8"));
    };
    if let Some(message) = vmsync_agent_common::config::share_name_error(name) {
        return Err(format!("--share: share name {name:?}: {message}"));
    }
    let mode = match args.mode.as_deref() {
        None => SyncMode::TwoWay,
        Some(text) => lookup(&MODES, text).ok_or_else(|| format!("--mode: unknown {text:?}"))?,
    };
    let conflict = match args.conflict.as_deref() {
        None => ConflictPolicy::Keep,
        Some(text) if mode != SyncMode::TwoWay => {
            return Err(format!(
                "--conflict {text} applies only to --mode two-way; a one-way share always \
                 makes the destination match the source"
            ))
        }
        Some(text) => lookup(&CONFLICT_POLICIES, text)
            .ok_or_else(|| format!("--conflict: unknown {text:?}"))?,
    };
    let path = absolute(Path::new(dir), cwd).map_err(|e| format!("--share DIR: {e}"))?;
    let path =
        vmsync_agent_common::config::on_disk(&path).map_err(|e| format!("--share DIR: {e}"))?;
    let state_dir = match &args.state_dir {
        Some(dir) => {
            let dir = absolute(dir, cwd).map_err(|e| format!("--state-dir: {e}"))?;
            vmsync_agent_common::config::on_disk(&dir).unwrap_or(dir)
        }
        None => default_state_dir(&defaults.state_parent, &guest, name),
    };
    if state_dir.starts_with(&path) || path.starts_with(&state_dir) {
        return Err(format!(
            "the share directory {} and the state directory {} nest; keep vmsync's state \
             outside the share (--state-dir)",
            path.display(),
            state_dir.display()
        ));
    }
    if let EndpointAddr::Unix(socket) | EndpointAddr::Hybrid { path: socket, .. } = &guest {
        if socket.starts_with(&path) {
            return Err(format!(
                "the guest socket {} is inside the share directory {}; put sockets outside \
                 every share",
                socket.display(),
                path.display()
            ));
        }
    }
    let mut again = vec![
        "vmsync-host sync --guest".to_string(),
        shell_quote(guest_text),
        "--share".into(),
        shell_quote(name),
        shell_quote(&path.to_string_lossy()),
    ];
    if let Some(mode) = &args.mode {
        again.extend(["--mode".into(), mode.clone()]);
    }
    if args.state_dir.is_some() {
        again.extend([
            "--state-dir".into(),
            shell_quote(&state_dir.to_string_lossy()),
        ]);
    }
    Ok(Plan {
        guest,
        share: HostShare::with_defaults(name.to_string(), path, mode, conflict),
        state_dir,
        resume: args.resume,
        json: args.json,
        again: again.join(" "),
    })
}

fn lookup<T: Copy>(table: &[(&str, T)], name: &str) -> Option<T> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, value)| *value)
}

/// `path` made absolute against `cwd`, without `.` components; a `..` is resolved on disk
/// (the path, else its parent, must exist), never lexically across a symlink.
fn absolute(path: &Path, cwd: &Path) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        return Err("the path is empty".into());
    }
    let joined = cwd.join(path);
    if !joined.components().any(|c| c == Component::ParentDir) {
        return Ok(joined.components().collect());
    }
    match std::fs::canonicalize(&joined) {
        Ok(real) => Ok(real),
        Err(_) => match (joined.parent(), joined.file_name()) {
            (Some(parent), Some(name)) => std::fs::canonicalize(parent)
                .map(|parent| parent.join(name))
                .map_err(|e| format!("{}: {e}", parent.display())),
            _ => Err(format!(
                "{}: give it without `..` or make it exist",
                path.display()
            )),
        },
    }
}

/// The default state directory of a one-shot sync of share `share` with `guest`:
/// `<state_parent>/oneshot/<guest>/<share>`, the guest's address (as it prints, e.g.
/// `unix:/run/vm1.sock`) and the share's name each made into one path component by
/// [`component`]. `state_parent` is [`DefaultDirs`]' (`/var/lib/vmsync` for root, else
/// `$XDG_STATE_HOME/vmsync` or `~/.local/state/vmsync`).
pub fn default_state_dir(state_parent: &Path, guest: &EndpointAddr, share: &str) -> PathBuf {
    state_parent
        .join(ONESHOT_DIR)
        .join(component(&guest.to_string()))
        .join(component(share))
}

/// `text` as one file name, injectively: ASCII letters, digits, `-`, `_`, `:`, `@` and `.`
/// (but a leading one) stay; every other byte (`/`, `%`, `~`, a leading `.`, spaces, control
/// and non-ASCII bytes) becomes `%XX` (upper-case hex), so no result is empty, `.`, `..` or
/// holds a `/`, and two texts never give the same name. A result longer than
/// [`MAX_COMPONENT_BYTES`] keeps its first [`SHORTENED_KEEP_BYTES`] bytes (never cutting a
/// `%XX`) and gets `~` and 32 hex digits of the text's BLAKE3 instead of the rest (no
/// unshortened name holds a `~`).
pub fn component(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for (i, byte) in text.bytes().enumerate() {
        let keep = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_' | b':' | b'@')
            || (byte == b'.' && i > 0);
        if keep {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    if escaped.is_empty() {
        // Only the empty text gives this: every escape is three bytes.
        return "%".into();
    }
    if escaped.len() <= MAX_COMPONENT_BYTES {
        return escaped;
    }
    let mut keep = SHORTENED_KEEP_BYTES;
    // Back off to the start of an escape that the cut would split.
    if let Some(at) = escaped[keep.saturating_sub(2)..keep].find('%') {
        keep = keep - 2 + at;
    }
    let digest = vmsync_core::digest::hash_chunk(text.as_bytes()).to_hex();
    format!("{}~{}", &escaped[..keep], &digest[..32])
}

/// Changes applied on one side: what the other side sent it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// Files and symlinks created or given new content.
    files: u64,
    /// The bytes of those files.
    bytes: u64,
    /// Entries removed (kept in that side's trash).
    removed: u64,
}

impl Tally {
    fn count(&mut self, change: &Change) {
        match (&change.expected, &change.new) {
            (Some(old), Some(new)) if old.same_content(new) => {}
            (_, Some(Entry::File(meta))) => {
                self.files += 1;
                self.bytes += meta.size;
            }
            (_, Some(Entry::Symlink { .. })) => self.files += 1,
            (_, Some(Entry::Dir { .. })) => {}
            (Some(_), None) => self.removed += 1,
            (None, None) => {}
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"files": self.files, "bytes": self.bytes, "removed": self.removed})
    }
}

/// A side whose applied changes are counted; every call is passed on unchanged (each method
/// of [`Endpoint`], the defaulted ones too).
struct Counted<E> {
    inner: E,
    tally: Tally,
}

impl<E: Endpoint> Endpoint for Counted<E> {
    fn scan(
        &mut self,
        scope: ScanScope,
        options: ScanOptions,
    ) -> impl std::future::Future<Output = Result<ScanReport, EndpointError>> + Send {
        self.inner.scan(scope, options)
    }

    fn manifests(
        &mut self,
        files: Vec<(RelPath, vmsync_core::entry::FileMeta)>,
    ) -> impl std::future::Future<
        Output = Result<Vec<Result<vmsync_core::entry::Manifest, Problem>>, EndpointError>,
    > + Send {
        self.inner.manifests(files)
    }

    fn read_chunks(
        &mut self,
        reads: Vec<ChunkRead>,
    ) -> impl std::future::Future<Output = Result<Vec<Option<Vec<u8>>>, EndpointError>> + Send {
        self.inner.read_chunks(reads)
    }

    fn read_deltas(
        &mut self,
        reads: Vec<DeltaRead>,
    ) -> impl std::future::Future<Output = Result<Vec<Option<ChunkData>>, EndpointError>> + Send
    {
        self.inner.read_deltas(reads)
    }

    fn stage(
        &mut self,
        files: Vec<StageRequest>,
    ) -> impl std::future::Future<
        Output = Result<Vec<Result<Vec<MissingChunk>, NotStaged>>, EndpointError>,
    > + Send {
        self.inner.stage(files)
    }

    fn supply(
        &mut self,
        chunks: Vec<(vmsync_core::digest::Hash, ChunkData)>,
    ) -> impl std::future::Future<Output = Result<Vec<vmsync_core::digest::Hash>, EndpointError>> + Send
    {
        self.inner.supply(chunks)
    }

    fn changes(
        &mut self,
    ) -> impl std::future::Future<Output = Result<ChangeHints, EndpointError>> + Send {
        self.inner.changes()
    }

    fn put_back(
        &mut self,
        items: Vec<(RelPath, Entry)>,
    ) -> impl std::future::Future<Output = Result<Vec<Outcome>, EndpointError>> + Send {
        self.inner.put_back(items)
    }

    fn mark(
        &mut self,
        generation: u64,
    ) -> impl std::future::Future<Output = Result<(), EndpointError>> + Send {
        self.inner.mark(generation)
    }

    fn note_sync(
        &mut self,
        state: vmsync_core::progress::SyncState,
    ) -> impl std::future::Future<Output = Result<(), EndpointError>> + Send {
        self.inner.note_sync(state)
    }

    fn transition(
        &mut self,
        changes: Vec<Change>,
    ) -> impl std::future::Future<Output = Result<Vec<Outcome>, EndpointError>> + Send {
        // What each change would count, taken before the changes go.
        let counts: Vec<Tally> = changes
            .iter()
            .map(|change| {
                let mut one = Tally::default();
                one.count(change);
                one
            })
            .collect();
        async move {
            let outcomes = self.inner.transition(changes).await?;
            for (one, outcome) in counts.iter().zip(&outcomes) {
                if *outcome == Outcome::Applied {
                    self.tally.files += one.files;
                    self.tally.bytes += one.bytes;
                    self.tally.removed += one.removed;
                }
            }
            Ok(outcomes)
        }
    }
}

/// What the cycles came to.
#[derive(Debug)]
struct Done {
    status: ShareStatus,
    /// Changes applied on the guest (sent by the host) and on the host.
    to_guest: Tally,
    to_host: Tally,
    /// File content on the wire (chunk payload, compressed size): sent, received.
    wire: (u64, u64),
    cycles: u64,
    /// Whether the halt was lifted by `--resume` (`Some(false)`: there was none).
    resumed: Option<bool>,
    /// The last cycle's error, when the last cycle failed.
    failed: Option<String>,
}

/// Opens the share's state, dials the guest, and runs full cycles until the share converges,
/// halts, or the retries run out. `Err` when it cannot start or the connection fails.
async fn sync(plan: &Plan, max_staged: usize) -> Result<Done, String> {
    let (db, notice) = match StateDb::open_or_recover(&plan.state_dir, STATE_DB_FILE) {
        Ok((db, notice)) => (Arc::new(db), notice),
        Err(e) if e.is_locked() => {
            return Err(format!(
                "the state directory {} is in use by another vmsync-host (a `run` agent with \
                 this state_dir, or another `sync` of this share); wait for it or stop it, or \
                 give this sync another --state-dir",
                plan.state_dir.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "opening the state database in {}: {e}",
                plan.state_dir.display()
            ))
        }
    };
    // The guest first: a guest that cannot be reached leaves the host's directory as it was.
    let (session, _) = dial(&plan.guest, std::slice::from_ref(&plan.share))
        .await
        .map_err(|e| {
            format!(
                "cannot reach the guest at {}: {e:#} (is `vmsync-guest run` listening there, \
                 exporting share `{}`?)",
                plan.guest, plan.share.name
            )
        })?;
    let place = StatePlace {
        db: &db,
        dir: &plan.state_dir,
        notice: notice.as_deref(),
    };
    let Share {
        mut controller,
        local,
        ..
    } = open_share(&plan.share, DEFAULT_MAX_DELETE_FRACTION, place, max_staged)
        .map_err(|e| format!("opening share {}: {e:#}", plan.share.name))?;
    let resumed = if plan.resume {
        Some(
            controller
                .resume()
                .map_err(|e| format!("lifting the halt: {e}"))?,
        )
    } else {
        None
    };
    let remote = session
        .endpoint(0)
        .map_err(|e| format!("opening share {} on the guest: {e}", plan.share.name))?;
    let mut host = Counted {
        inner: local,
        tally: Tally::default(),
    };
    let mut guest = Counted {
        inner: remote,
        tally: Tally::default(),
    };
    let mut cycles = 0;
    let mut failed = None;
    let mut delay = PENDING_RETRY_MIN;
    for attempt in 0..=MAX_RETRY_CYCLES {
        match controller
            .cycle(&mut host, &mut guest, ScanScope::Full)
            .await
        {
            Ok(report) => {
                cycles += 1;
                failed = None;
                if report.halted || (!report.retry && report.pending == 0) {
                    break;
                }
                // Something moved under the cycle: look again at once.
                if report.retry {
                    continue;
                }
            }
            Err(e) if e.is_disconnect() => {
                return Err(format!("the connection to the guest was lost: {e}"));
            }
            Err(e) => {
                tracing::warn!(share = %plan.share.name, "cycle failed: {e}");
                failed = Some(e.to_string());
            }
        }
        // Changes that failed (listed as problems), a pause, or a failed cycle: again after a
        // while, as the agent's loop would.
        if attempt < MAX_RETRY_CYCLES {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(PENDING_RETRY_MAX);
        }
    }
    let status = controller
        .status()
        .lock()
        .map(|s| s.clone())
        .map_err(|_| "the share's status is unreadable".to_string())?;
    // The guest's readiness follows what its host says (docs/cli.md, "Progress and
    // readiness"); it has nothing to do with this sync's outcome.
    let told = crate::progress::sync_state(&status, true);
    if let Err(e) = guest.note_sync(told).await {
        tracing::debug!("telling the guest how its share stands: {e}");
    }
    let stats = session.stats();
    session.close();
    Ok(Done {
        status,
        to_guest: guest.tally,
        to_host: host.tally,
        wire: (stats.content_bytes_sent, stats.content_bytes_received),
        cycles,
        resumed,
        failed,
    })
}

/// How the share ended up, for the summary and the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    InSync,
    Conflicted,
    /// Halted, or paused (`disk-full`, `quota`).
    Halted,
    /// Work left after the last cycle, or the last cycle failed.
    NotConverged,
}

impl Verdict {
    fn of(done: &Done) -> Verdict {
        let s = &done.status;
        if s.halt_code.is_some() || s.state == ShareState::Halted {
            Verdict::Halted
        } else if !s.conflicts.is_empty() || s.state == ShareState::Conflicted {
            Verdict::Conflicted
        } else if s.state == ShareState::InSync && done.failed.is_none() {
            Verdict::InSync
        } else {
            Verdict::NotConverged
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::InSync => "in-sync",
            Verdict::Conflicted => "conflicted",
            Verdict::Halted => "halted",
            Verdict::NotConverged => "not-converged",
        }
    }

    fn exit_code(self) -> ExitCode {
        match self {
            Verdict::InSync => ExitCode::SUCCESS,
            Verdict::Conflicted | Verdict::Halted => ExitCode::from(EXIT_CONFLICTED_OR_HALTED),
            Verdict::NotConverged => ExitCode::FAILURE,
        }
    }
}

/// Prints the summary (text on stdout, or JSON with `--json`; why it is not in sync on stderr
/// too) and returns the exit code.
fn report(plan: &Plan, done: &Done) -> ExitCode {
    let verdict = Verdict::of(done);
    let s = &done.status;
    if plan.json {
        let problems: Vec<serde_json::Value> = s
            .problems
            .iter()
            .map(|p| serde_json::json!({"path": p.path, "side": p.side, "reason": p.reason}))
            .collect();
        let json = serde_json::json!({
            "share": s.name,
            "guest": plan.guest.to_string(),
            "state_dir": plan.state_dir,
            "state": verdict.as_str(),
            "cycles": done.cycles,
            "to_guest": done.to_guest.json(),
            "to_host": done.to_host.json(),
            "content_bytes_sent": done.wire.0,
            "content_bytes_received": done.wire.1,
            "files": (s.cycles > 0).then_some(s.files),
            "bytes": (s.cycles > 0).then_some(s.bytes),
            "conflicts": s.conflicts,
            "problems": problems,
            "halt_code": s.halt_code,
            "halt_reason": s.halt_reason,
            "put_back": s.put_back,
            "notice": s.notice,
            "resumed": done.resumed,
            "error": done.failed,
        });
        out(&format!("{json}\n"));
    } else {
        out(&render_text(plan, done, verdict));
    }
    match verdict {
        Verdict::InSync => {}
        Verdict::Conflicted => eprintln!(
            "vmsync-host sync: share `{}` is conflicted: {} path(s) both sides changed",
            s.name,
            s.conflicts.len()
        ),
        Verdict::Halted => eprintln!(
            "vmsync-host sync: share `{}` is halted{}",
            s.name,
            s.halt_reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        Verdict::NotConverged => eprintln!(
            "vmsync-host sync: share `{}` is not in sync after {} cycle(s){}",
            s.name,
            done.cycles,
            done.failed
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_else(|| ": changes are still failing (see the problems)".into())
        ),
    }
    verdict.exit_code()
}

fn render_text(plan: &Plan, done: &Done, verdict: Verdict) -> String {
    use std::fmt::Write;
    let s = &done.status;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "share {} with {}: {} after {} cycle(s)",
        s.name,
        plan.guest,
        verdict.as_str(),
        done.cycles
    );
    for (label, tally) in [
        ("to the guest:", done.to_guest),
        ("to the host: ", done.to_host),
    ] {
        let _ = writeln!(
            text,
            "  {label} {} file(s), {}; {} removed",
            tally.files,
            human_bytes(tally.bytes),
            tally.removed
        );
    }
    let _ = writeln!(
        text,
        "  on the wire:  {} sent, {} received (file content)",
        human_bytes(done.wire.0),
        human_bytes(done.wire.1)
    );
    // Both sides' totals are known once a cycle has run to its end.
    if s.cycles > 0 {
        let _ = writeln!(
            text,
            "  in sync:      {} file(s), {}",
            s.files,
            human_bytes(s.bytes)
        );
    }
    if done.resumed == Some(false) {
        let _ = writeln!(text, "  --resume: the share was not halted");
    }
    if let Some(notice) = &s.notice {
        let _ = writeln!(text, "  notice: {notice}");
    }
    match (&s.halt_code, &s.halt_reason) {
        (Some(code), reason) if code == DISK_FULL_CODE || code == QUOTA_CODE => {
            let _ = writeln!(
                text,
                "  paused ({code}): {}",
                reason.as_deref().unwrap_or("")
            );
            let _ = writeln!(
                text,
                "  run it again once {}",
                if code == DISK_FULL_CODE {
                    "there is room again"
                } else {
                    "the guest's changes fit the share's quotas"
                }
            );
        }
        (code, Some(reason)) => {
            let _ = writeln!(
                text,
                "  halted ({}): {reason}",
                code.as_deref().unwrap_or("halted")
            );
            if s.put_back > 0 {
                let _ = writeln!(
                    text,
                    "  {} entries the halted changes had removed were put back from the trash",
                    s.put_back
                );
            }
            let _ = writeln!(text, "  to let it through: {} --resume", plan.again);
        }
        _ => {}
    }
    if !s.conflicts.is_empty() {
        let _ = writeln!(
            text,
            "  {} conflict(s): both sides changed these paths differently since they were last \
             in sync:",
            s.conflicts.len()
        );
        for c in s.conflicts.iter().take(STATUS_LIST_FIRST) {
            let _ = writeln!(text, "  conflict: {c}");
        }
        if s.conflicts.len() > STATUS_LIST_FIRST {
            let _ = writeln!(
                text,
                "  ... and {} more (--json lists them all)",
                s.conflicts.len() - STATUS_LIST_FIRST
            );
        }
        let _ = writeln!(
            text,
            "  to settle them, keep one side's version (the other goes to that side's trash):\n    \
             {again} --conflict host-wins\n    {again} --conflict guest-wins\n  \
             or make both versions the same (or remove one) by hand and run it again",
            again = plan.again
        );
    }
    if !s.problems.is_empty() {
        let _ = writeln!(
            text,
            "  {} problem(s): paths that could not be synced:",
            s.problems.len()
        );
        for p in s.problems.iter().take(STATUS_LIST_FIRST) {
            let _ = writeln!(text, "  problem: {} ({}): {}", p.path, p.side, p.reason);
        }
        if s.problems.len() > STATUS_LIST_FIRST {
            let _ = writeln!(
                text,
                "  ... and {} more (--json lists them all)",
                s.problems.len() - STATUS_LIST_FIRST
            );
        }
    }
    text
}

/// Writes to stdout, ignoring a closed pipe.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parents() -> [PathBuf; 2] {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let root = DefaultDirs::for_user(0, env(&[("HOME", "/root")]));
        let user = DefaultDirs::for_user(
            1000,
            env(&[
                ("HOME", "/home/alice"),
                ("XDG_STATE_HOME", "/home/alice/st"),
            ]),
        );
        [root.state_parent, user.state_parent]
    }

    #[test]
    fn the_default_state_dir_is_per_endpoint_and_share_under_the_users_state_parent() {
        let [root, user] = parents();
        let guest: EndpointAddr = "unix:/run/vm1/guest.sock".parse().unwrap();
        assert_eq!(
            default_state_dir(&root, &guest, "src"),
            PathBuf::from("/var/lib/vmsync/oneshot/unix:%2Frun%2Fvm1%2Fguest.sock/src")
        );
        assert_eq!(
            default_state_dir(&user, &guest, "src"),
            PathBuf::from("/home/alice/st/vmsync/oneshot/unix:%2Frun%2Fvm1%2Fguest.sock/src")
        );
        let vsock: EndpointAddr = "vsock://3:786".parse().unwrap();
        assert_eq!(
            default_state_dir(&root, &vsock, "src"),
            PathBuf::from("/var/lib/vmsync/oneshot/vsock:%2F%2F3:786/src")
        );
    }

    /// Every directory is exactly two normal components below `<parent>/oneshot`, and no two
    /// (endpoint, share) pairs share one, whatever `/`, `..`, `%` or length they hold.
    #[test]
    fn endpoints_never_collide_and_never_escape() {
        let long = format!("unix:/{}", "d/".repeat(50));
        let endpoints: Vec<String> = vec![
            "unix:/a/b".into(),
            "unix:/a%2Fb".into(),
            "unix:/a%252Fb".into(),
            "unix:/a_b".into(),
            "unix:/../..".into(),
            "unix:/a/../b".into(),
            "unix:/a/./b".into(),
            "unix:/a b".into(),
            "unix:/a~b".into(),
            "unix:/.hidden".into(),
            "unix:/a\u{e9}".into(),
            "vsock://3:786".into(),
            "vsock://33:786".into(),
            "vsock://3:7860".into(),
            "hybrid:/run/vm.vsock:786".into(),
            "libvirt:dev-vm".into(),
            "libvirt:dev-vm:786".into(),
            "libvirt:dev-vm@qemu:///system:786".into(),
            "libvirt:dev-vm@qemu+ssh://root@host:22/system:786".into(),
            format!("{long}x.sock"),
            format!("{long}y.sock"),
            format!("unix:/{}%2F.sock", "d/".repeat(30)),
            format!("unix:/{}/.sock", "d%2F".repeat(24)),
        ];
        let parent = Path::new("/var/lib/vmsync");
        let mut seen = std::collections::BTreeMap::new();
        for text in &endpoints {
            let guest: EndpointAddr = text.parse().unwrap();
            for share in ["src", "src2", "a.b"] {
                let dir = default_state_dir(parent, &guest, share);
                let rest = dir.strip_prefix(parent.join(ONESHOT_DIR)).unwrap();
                let parts: Vec<Component> = rest.components().collect();
                assert_eq!(parts.len(), 2, "{text}: {dir:?}");
                assert!(
                    parts.iter().all(|c| matches!(c, Component::Normal(_))),
                    "{text}: {dir:?}"
                );
                let first = rest.iter().next().unwrap().len();
                assert!(first <= MAX_COMPONENT_BYTES + 33, "{text}: {first} bytes");
                if let Some(before) = seen.insert(dir.clone(), (text.clone(), share)) {
                    panic!("{text} {share} and {before:?} share {dir:?}");
                }
            }
        }
        // As raw names too: the escape is injective, and none is `.`, `..` or empty.
        let names = [
            "", ".", "..", "...", "/", "%", "%25", "~", "a/b", "a%2Fb", "./x", "x/..",
        ];
        let mut components = std::collections::BTreeSet::new();
        for name in names {
            let c = component(name);
            assert!(
                !c.is_empty() && c != "." && c != ".." && !c.contains('/'),
                "{name:?}: {c}"
            );
            assert!(components.insert(c.clone()), "{name:?}: {c} twice");
        }
        // A share name is escaped the same way (the CLI checks it first anyway).
        let guest: EndpointAddr = "vsock://3:786".parse().unwrap();
        let dir = default_state_dir(parent, &guest, "../../etc");
        assert!(dir.starts_with(parent.join(ONESHOT_DIR)), "{dir:?}");
        assert_eq!(dir.components().count(), parent.components().count() + 3);
    }

    fn args(guest: &str, name: &str, dir: &str) -> OneShotArgs {
        OneShotArgs {
            guest: Some(guest.into()),
            share: Some(vec![name.into(), dir.into()]),
            mode: None,
            conflict: None,
            state_dir: None,
            resume: false,
            json: false,
        }
    }

    #[test]
    fn the_arguments_make_the_share_a_minimal_share_section_makes() {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(cwd.join("tree")).unwrap();
        let defaults = DefaultDirs::system();
        let got = plan(&args("unix:/run/g.sock", "src", "tree/./"), &defaults, &cwd).unwrap();
        assert_eq!(
            got.share,
            HostShare::with_defaults(
                "src".into(),
                cwd.join("tree"),
                SyncMode::TwoWay,
                ConflictPolicy::Keep
            )
        );
        assert_eq!(
            got.state_dir,
            PathBuf::from("/var/lib/vmsync/oneshot/unix:%2Frun%2Fg.sock/src")
        );
        // `..` resolved on disk; a mode and a policy; an explicit state directory.
        let mut a = args("vsock://3:786", "src", "../tree");
        a.mode = Some("host-to-guest".into());
        a.state_dir = Some("../state".into());
        let got = plan(&a, &defaults, &cwd.join("tree")).unwrap();
        assert_eq!(got.share.path, cwd.join("tree"));
        assert_eq!(got.share.mode, SyncMode::HostToGuest);
        assert_eq!(got.state_dir, cwd.join("state"));
        let mut a = args("vsock://3:786", "src", "tree");
        a.conflict = Some("newer-wins".into());
        a.state_dir = Some(cwd.join("state"));
        let got = plan(&a, &defaults, &cwd).unwrap();
        assert_eq!(got.share.conflict, ConflictPolicy::NewerWins);
        assert!(got.again.contains("--state-dir"), "{}", got.again);
    }

    #[test]
    fn bad_arguments_are_refused_with_why() {
        let tmp = tempfile::tempdir().unwrap();
        let cwd = tmp.path().canonicalize().unwrap();
        std::fs::write(cwd.join("file"), b"x").unwrap();
        let defaults = DefaultDirs::system();
        let cases: Vec<(OneShotArgs, &str)> = vec![
            (args("vsock://any:786", "src", "d"), "is for listening"),
            (args("vsock://2:786", "src", "d"), "CID 2 is the host"),
            (args("tcp://x", "src", "d"), "unknown address form"),
            (
                args("unix:/g.sock", ".hidden", "d"),
                "must not start with `.`",
            ),
            (args("unix:/g.sock", "a/b", "d"), "share name \"a/b\""),
            (args("unix:/g.sock", "src", "file"), "is not a directory"),
            (
                args(&format!("unix:{}/d/g.sock", cwd.display()), "src", "d"),
                "is inside the share directory",
            ),
            (
                {
                    let mut a = args("unix:/g.sock", "src", "d");
                    a.mode = Some("guest-to-host".into());
                    a.conflict = Some("host-wins".into());
                    a
                },
                "applies only to --mode two-way",
            ),
            (
                {
                    let mut a = args("unix:/g.sock", "src", "d");
                    a.state_dir = Some("d/state".into());
                    a
                },
                "nest",
            ),
        ];
        for (a, want) in cases {
            match plan(&a, &defaults, &cwd) {
                Ok(plan) => panic!("{a:?}: accepted as {plan:?}"),
                Err(message) => assert!(message.contains(want), "{a:?}: {message}"),
            }
        }
    }
}
