//! `vmsync-host` configuration: one TOML file per VM.
//!
//! Two layers, resolved in one place:
//! - `Raw*` structs mirror the file exactly. Serde rejects unknown keys (`deny_unknown_fields`)
//!   and keeps the byte span of every value (`toml::Spanned`) so that a later check can say
//!   where in the file the offending value is.
//! - [`parse`] checks every value and returns a [`HostConfig`] whose fields are ready to use:
//!   absolute normalized paths, a parsed guest endpoint, core enums for mode and conflict policy,
//!   ignore patterns known to compile. Validation collects every problem it finds instead of
//!   stopping at the first, so one `vmsync-host check` run lists everything to fix.
//!
//! The file format (keys, defaults):
//!
//! ```toml
//! guest = "unix:/run/vmsync/guest.sock"   # required; or "vsock://CID:PORT", "hybrid:/PATH:PORT",
//!                                         # "libvirt:DOMAIN[@URI][:PORT]"
//! state_dir = "/var/lib/vmsync/vm1"       # default: /var/lib/vmsync/<config file stem>
//! control = "/run/vmsync/vm1.ctl"         # default: /run/vmsync/<config file stem>.ctl
//!                                         # (not root: the XDG directories, see DefaultDirs)
//! max_delete_fraction = 0.5               # default 0.5, in (0, 1]
//! metrics_file = "/var/lib/node_exporter/textfile/vmsync-vm1.prom"
//!                                         # default: none. `run` writes the metrics (Prometheus
//!                                         # text, as `vmsync-host metrics` prints them) there
//!                                         # every 15 s and at shutdown, atomically (a temp
//!                                         # file beside it, renamed over it); absolute, not
//!                                         # inside a share
//! [[share]]                               # at least one
//! name = "src"                            # [A-Za-z0-9._-], 1..=64 bytes, unique
//! path = "/home/alice/src"                # absolute
//! mode = "two-way"                        # two-way | host-to-guest | guest-to-host
//! conflict = "keep"                       # keep | host-wins | guest-wins | newer-wins (two-way only)
//! ignore = ["target/", "*.swp"]           # gitignore syntax, relative to the share root
//! respect_gitignore = false               # also honour .gitignore/.ignore files in the tree:
//!                                         # what they exclude on either side is never sent,
//!                                         # deleted or overwritten; re-read when they change
//! ignore_vcs = false                      # skip .git, .hg and .svn directories
//! deletion_exempt = ["target/", ...]      # gitignore syntax; deletions beneath these never
//!                                         # count toward max_delete_fraction (default:
//!                                         # DEFAULT_DELETION_EXEMPT, build outputs and caches)
//! min_free = "1GiB"                       # default: the smaller of 1 GiB and 5 % of the
//!                                         # filesystem; or a percentage ("5%"). Below it on
//!                                         # the share's or the state_dir's filesystem the share
//!                                         # pauses with `disk-full` (docs/safety.md)
//! quota_bytes = "none"                    # how much the guest may make this share hold on
//! quota_files = 4194304                   # the host (files and symlinks, directories, the
//! quota_dirs = 1048576                    # largest file; sizes or "none"): a cycle that
//! quota_file_bytes = "64GiB"              # would go past one pauses the share with `quota`
//! ```
//!
//! The defaults for `state_dir` and `control` come from the config file's name so that several
//! VMs, each with its own `/etc/vmsync/<vm>.toml`, never share state or a control socket without
//! anyone having to think about it. A file stem that is not a valid share-style name (for example
//! one with spaces) cannot name a default: such a file must set both keys.
//!
//! The guest endpoint is parsed by the transport crate's [`EndpointAddr`] (the one grammar for
//! configs and the CLI); this module adds what only a host can know, such as that a host must
//! dial a concrete CID.
//!
//! Checking a configuration (`vmsync-host check`, and the unit's `ExecStartPre`) reads the file
//! and the file system only: it dials no guest and so it does not run `virsh` for a
//! `libvirt:DOMAIN` guest either; its syntax is checked, not the domain. The CID is the running
//! domain's (libvirt assigns an automatic one when the domain starts), so there may be none to
//! find yet when the host agent starts before its VM, which is what it is made to do (it retries
//! until the guest answers); and a libvirt daemon that is down or slow must not make a correct
//! file fail its check. `run` resolves the domain at every connect and reports a failure
//! (no virsh, no such domain, no vsock device, no CID) like any other unreachable guest: in the
//! log and in `vmsync-host status`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ignore::gitignore::GitignoreBuilder;
use serde::Deserialize;
use toml::Spanned;
pub use vmsync_agent_common::config::ConfigError;
use vmsync_agent_common::config::{
    absolute_path, check_places, deserialize_all, min_free, normalize_absolute, share_name_error,
    socket_path, Problems, ResolvePath,
};
use vmsync_core::reconcile::{ConflictPolicy, SyncMode};
use vmsync_core::reserve::MinFree;
use vmsync_transport::endpoint_addr::EndpointAddr;

/// Parent of the default per-VM state directory (`<this>/<config file stem>`).
pub const DEFAULT_STATE_PARENT_DIR: &str = "/var/lib/vmsync";
/// Directory of the default control socket (`<this>/<config file stem>.ctl`).
pub const DEFAULT_CONTROL_DIR: &str = "/run/vmsync";

/// Where the defaults of `state_dir` and `control` live: [`DEFAULT_STATE_PARENT_DIR`] and
/// [`DEFAULT_CONTROL_DIR`] for root, and for anyone else the directories systemd gives the
/// unit (packaging/README.md): the parent of `$STATE_DIRECTORY` and `$RUNTIME_DIRECTORY` (the
/// system unit run as its own user, `StateDirectory=vmsync/%i`, `RuntimeDirectory=vmsync`);
/// else the XDG directories of a developer's `systemctl --user` unit: `$XDG_STATE_HOME/vmsync`
/// (else `~/.local/state/vmsync`) and `$XDG_RUNTIME_DIR/vmsync`. Both units' directories are
/// those a root shell's or the user's own `vmsync-host status` computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultDirs {
    pub state_parent: PathBuf,
    pub control: PathBuf,
}

impl DefaultDirs {
    /// The system's.
    pub fn system() -> DefaultDirs {
        DefaultDirs {
            state_parent: PathBuf::from(DEFAULT_STATE_PARENT_DIR),
            control: PathBuf::from(DEFAULT_CONTROL_DIR),
        }
    }

    /// For a process of user `uid` with environment `var` (each XDG directory only when set
    /// to an absolute path; a user with none keeps the system's).
    pub fn for_user(uid: u32, var: impl Fn(&str) -> Option<String>) -> DefaultDirs {
        let system = DefaultDirs::system();
        if uid == 0 {
            return system;
        }
        let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
        // systemd's: one directory each (the units name one), already the unit's own.
        let unit_state = absolute("STATE_DIRECTORY")
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .filter(|d| d.parent().is_some());
        let state_home = absolute("XDG_STATE_HOME")
            .or_else(|| absolute("HOME").map(|home| home.join(".local/state")))
            .map(|d| d.join("vmsync"));
        let runtime = absolute("XDG_RUNTIME_DIR").map(|d| d.join("vmsync"));
        DefaultDirs {
            state_parent: unit_state.or(state_home).unwrap_or(system.state_parent),
            control: absolute("RUNTIME_DIRECTORY")
                .or(runtime)
                .unwrap_or(system.control),
        }
    }

    /// This process's.
    pub fn of_this_process() -> DefaultDirs {
        DefaultDirs::for_user(rustix::process::geteuid().as_raw(), |name| {
            std::env::var(name).ok()
        })
    }
}
/// Default for `max_delete_fraction`.
pub const DEFAULT_MAX_DELETE_FRACTION: f64 = 0.5;
/// Default for a share's `deletion_exempt`: build outputs and caches that tools delete in bulk
/// by design (`cargo clean`, `rm -rf node_modules`, `git gc`, virtualenvs, test caches). Their
/// deletions are still kept in the trash; they only do not count toward the mass-deletion halt.
pub const DEFAULT_DELETION_EXEMPT: &[&str] = &[
    "target/",
    "node_modules/",
    ".git/objects/",
    "__pycache__/",
    ".venv/",
    ".tox/",
    ".cache/",
    ".gradle/",
    ".mypy_cache/",
    ".pytest_cache/",
];

/// A validated host configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// The file this configuration was read from (for messages).
    pub file: PathBuf,
    /// Where the guest agent listens.
    pub guest: EndpointAddr,
    /// Index and ancestor state of this VM's shares.
    pub state_dir: PathBuf,
    /// Path of the control socket that `status`, `sync`, `wait` and `resume` talk to.
    pub control: PathBuf,
    /// A cycle that would delete more than this fraction of a share's entries halts the share
    /// instead (safety), in (0, 1].
    pub max_delete_fraction: f64,
    /// Where `run` keeps the metrics for node-exporter's textfile collector (none: nowhere).
    pub metrics_file: Option<PathBuf>,
    /// In file order; names are unique and paths do not nest.
    pub shares: Vec<HostShare>,
}

/// One `[[share]]` of a host configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShare {
    pub name: String,
    /// Absolute and lexically normalized (no `.`/`..` components, no trailing slash).
    pub path: PathBuf,
    pub mode: SyncMode,
    /// Only meaningful for [`SyncMode::TwoWay`]; [`ConflictPolicy::Keep`] otherwise.
    pub conflict: ConflictPolicy,
    /// Gitignore patterns relative to the share root, each known to compile.
    pub ignore: Vec<String>,
    /// Also honour `.gitignore` and `.ignore` files inside the tree (default false).
    pub respect_gitignore: bool,
    /// Skip `.git`, `.hg` and `.svn` directories (default false).
    pub ignore_vcs: bool,
    /// Gitignore patterns whose deletions never count toward `max_delete_fraction`.
    pub deletion_exempt: Vec<String>,
    /// How long and how much of what changes replace or delete is kept in the share's trash.
    pub retention: vmsync_engine::trash::Retention,
    /// Free space to keep on the share's filesystem and on the state directory's (default:
    /// the smaller of 1 GiB and 5 %); below it the share pauses with `disk-full`.
    pub min_free: MinFree,
    /// How much the guest may make the host's share hold; past it the share pauses with
    /// `quota`.
    pub quota: vmsync_core::quota::Quota,
}

/// The values of a share's `mode` (and of `vmsync-host sync --mode`), as written.
pub const MODES: [(&str, SyncMode); 3] = [
    ("two-way", SyncMode::TwoWay),
    ("host-to-guest", SyncMode::HostToGuest),
    ("guest-to-host", SyncMode::GuestToHost),
];

/// The values of a share's `conflict` (and of `vmsync-host sync --conflict`), as written.
pub const CONFLICT_POLICIES: [(&str, ConflictPolicy); 4] = [
    ("keep", ConflictPolicy::Keep),
    ("host-wins", ConflictPolicy::HostWins),
    ("guest-wins", ConflictPolicy::GuestWins),
    ("newer-wins", ConflictPolicy::NewerWins),
];

impl HostShare {
    /// The share a `[[share]]` with only `name`, `path`, `mode` and `conflict` set makes: every
    /// other key at its default. `path` as resolved (see [`load`]).
    pub fn with_defaults(
        name: String,
        path: PathBuf,
        mode: SyncMode,
        conflict: ConflictPolicy,
    ) -> HostShare {
        HostShare {
            name,
            path,
            mode,
            conflict,
            ignore: Vec::new(),
            respect_gitignore: false,
            ignore_vcs: false,
            deletion_exempt: DEFAULT_DELETION_EXEMPT
                .iter()
                .map(|p| p.to_string())
                .collect(),
            retention: Default::default(),
            min_free: MinFree::Default,
            quota: Default::default(),
        }
    }
}

/// Reads and validates a host configuration file.
pub fn load(file: &Path) -> Result<HostConfig, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_with(
        &text,
        file,
        &vmsync_agent_common::config::on_disk,
        &DefaultDirs::of_this_process(),
    )
}

/// Validates configuration text. `file` is used in messages and names the default `state_dir`
/// and `control`; it is not read.
#[cfg(test)]
pub fn parse(text: &str, file: &Path) -> Result<HostConfig, ConfigError> {
    parse_with(
        text,
        file,
        &vmsync_agent_common::config::as_written,
        &DefaultDirs::system(),
    )
}

/// [`parse`], with share paths and `state_dir` resolved by `resolve_path`.
pub fn parse_with(
    text: &str,
    file: &Path,
    resolve_path: ResolvePath,
    defaults: &DefaultDirs,
) -> Result<HostConfig, ConfigError> {
    let mut problems = Problems::new(text);
    let Some((raw, dropped)) = deserialize_all::<RawHostConfig>(text, &mut problems) else {
        return Err(problems.into_error(file));
    };
    match resolve(raw, dropped, file, resolve_path, defaults, &mut problems) {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems.into_error(file)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostConfig {
    guest: Spanned<String>,
    state_dir: Option<Spanned<String>>,
    control: Option<Spanned<String>>,
    max_delete_fraction: Option<Spanned<f64>>,
    metrics_file: Option<Spanned<String>>,
    #[serde(default)]
    share: Vec<Spanned<RawShare>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    mode: RawMode,
    // Optional (not defaulted) so that a policy set on a one-way share can be reported.
    conflict: Option<Spanned<RawConflict>>,
    #[serde(default)]
    ignore: Vec<Spanned<String>>,
    #[serde(default)]
    respect_gitignore: bool,
    #[serde(default)]
    ignore_vcs: bool,
    deletion_exempt: Option<Vec<Spanned<String>>>,
    keep_deleted: Option<Spanned<String>>,
    keep_deleted_max: Option<Spanned<String>>,
    min_free: Option<Spanned<String>>,
    quota_bytes: Option<Spanned<String>>,
    quota_file_bytes: Option<Spanned<String>>,
    quota_files: Option<Spanned<u64>>,
    quota_dirs: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawMode {
    #[default]
    TwoWay,
    HostToGuest,
    GuestToHost,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawConflict {
    Keep,
    HostWins,
    GuestWins,
    NewerWins,
}

/// Turns the raw file into a `HostConfig`, recording every problem. Returns `None` only when a
/// required value is unusable; the caller also fails when any problem was recorded.
fn resolve(
    raw: RawHostConfig,
    dropped: bool,
    file: &Path,
    resolve_path: ResolvePath,
    defaults: &DefaultDirs,
    problems: &mut Problems,
) -> Option<HostConfig> {
    let guest = match parse_guest(raw.guest.get_ref()) {
        Ok(endpoint) => Some(endpoint),
        Err(error) => {
            problems.at(&raw.guest, format!("guest: {error}"));
            None
        }
    };

    // A stem usable as a default must be safe as a single path component: the share-name rule.
    let stem = file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| share_name_error(stem).is_none());
    let state_dir = match &raw.state_dir {
        Some(value) => absolute_path(value, "state_dir", problems)
            .map(|path| resolve_path(&path).unwrap_or(path)),
        None => match stem {
            Some(stem) => Some(defaults.state_parent.join(stem)),
            None => {
                problems.push(
                    None,
                    format!(
                        "state_dir is not set and the file name {:?} cannot name the default \
                         ({}/<file stem>); set state_dir",
                        file.file_name().unwrap_or(file.as_os_str()),
                        defaults.state_parent.display()
                    ),
                );
                None
            }
        },
    };
    let control = match &raw.control {
        Some(value) => socket_path(value, "control", problems),
        None => match stem {
            Some(stem) => Some(defaults.control.join(format!("{stem}.ctl"))),
            None => {
                problems.push(
                    None,
                    format!(
                        "control is not set and the file name {:?} cannot name the default \
                         ({}/<file stem>.ctl); set control",
                        file.file_name().unwrap_or(file.as_os_str()),
                        defaults.control.display()
                    ),
                );
                None
            }
        },
    };

    let max_delete_fraction = match &raw.max_delete_fraction {
        None => DEFAULT_MAX_DELETE_FRACTION,
        Some(value) => {
            let fraction = *value.get_ref();
            // Written as a negated range test so NaN fails it too.
            if !(fraction > 0.0 && fraction <= 1.0) {
                problems.at(
                    value,
                    format!(
                        "max_delete_fraction must be greater than 0 and at most 1, got {fraction}"
                    ),
                );
            }
            fraction
        }
    };

    if raw.share.is_empty() && !dropped {
        problems.push(
            None,
            "no [[share]] defined; add at least one with `name` and `path`".to_string(),
        );
    }
    let mut shares: Vec<HostShare> = Vec::with_capacity(raw.share.len());
    // Spans of accepted shares' name and path, parallel to `shares`, for the cross-share checks.
    let mut spans: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(raw.share.len());
    let mut complete = true;
    // Every name defined so far and where, accepted or not: a duplicate is reported even when
    // the first definition has problems of its own.
    let mut named: Vec<(&String, usize)> = Vec::with_capacity(raw.share.len());
    for raw_share in &raw.share {
        let raw_share = raw_share.get_ref();
        let name = raw_share.name.get_ref();
        if let Some(message) = share_name_error(name) {
            problems.at(&raw_share.name, format!("share name {name:?}: {message}"));
            complete = false;
        } else if let Some(&(_, first)) = named.iter().find(|(n, _)| *n == name) {
            let (line, _) = problems.line_column(first);
            problems.at(
                &raw_share.name,
                format!("duplicate share name {name:?} (first defined on line {line})"),
            );
            complete = false;
        }
        named.push((name, raw_share.name.span().start));
        let key = format!("share {name:?} path");
        let path = absolute_path(&raw_share.path, &key, problems).and_then(|path| {
            resolve_path(&path)
                .map_err(|message| problems.at(&raw_share.path, format!("{key}: {message}")))
                .ok()
        });
        let mode = match raw_share.mode {
            RawMode::TwoWay => SyncMode::TwoWay,
            RawMode::HostToGuest => SyncMode::HostToGuest,
            RawMode::GuestToHost => SyncMode::GuestToHost,
        };
        let conflict = match &raw_share.conflict {
            None => ConflictPolicy::Keep,
            Some(value) if mode != SyncMode::TwoWay => {
                // One-way shares never settle conflicts: the destination is made to match the
                // source, and a local edit there is kept in its trash first. A policy
                // here means the user expects something that will not happen.
                problems.at(
                    value,
                    format!(
                        "share {name:?}: `conflict` applies only to mode = \"two-way\"; a \
                         one-way share always makes the destination match the source; remove it"
                    ),
                );
                ConflictPolicy::Keep
            }
            Some(value) => match value.get_ref() {
                RawConflict::Keep => ConflictPolicy::Keep,
                RawConflict::HostWins => ConflictPolicy::HostWins,
                RawConflict::GuestWins => ConflictPolicy::GuestWins,
                RawConflict::NewerWins => ConflictPolicy::NewerWins,
            },
        };
        let ignore = check_ignore_patterns(name, &raw_share.ignore, problems);
        let deletion_exempt = match &raw_share.deletion_exempt {
            None => DEFAULT_DELETION_EXEMPT
                .iter()
                .map(|p| p.to_string())
                .collect(),
            Some(patterns) => check_ignore_patterns(name, patterns, problems),
        };
        let retention = vmsync_agent_common::config::retention(
            name,
            raw_share.keep_deleted.as_ref(),
            raw_share.keep_deleted_max.as_ref(),
            problems,
        );
        let min_free = min_free(name, raw_share.min_free.as_ref(), problems);
        let quota = vmsync_agent_common::config::quota(
            name,
            [&raw_share.quota_bytes, &raw_share.quota_file_bytes],
            [&raw_share.quota_files, &raw_share.quota_dirs],
            problems,
        );
        match path {
            Some(path) => {
                spans.push((raw_share.name.span(), raw_share.path.span()));
                shares.push(HostShare {
                    name: name.clone(),
                    path,
                    mode,
                    conflict,
                    ignore,
                    respect_gitignore: raw_share.respect_gitignore,
                    ignore_vcs: raw_share.ignore_vcs,
                    deletion_exempt,
                    retention,
                    min_free,
                    quota,
                });
            }
            None => complete = false,
        }
    }

    let sockets = [
        ("control", control.clone()),
        (
            "guest",
            match &guest {
                Some(EndpointAddr::Unix(path)) | Some(EndpointAddr::Hybrid { path, .. }) => {
                    normalize_absolute(&path.to_string_lossy()).ok()
                }
                _ => None,
            },
        ),
    ];
    let places = shares.iter().map(|s| (s.name.as_str(), s.path.as_path()));
    check_places(places, &spans, state_dir.as_deref(), &sockets, problems);
    let metrics_file = raw.metrics_file.as_ref().and_then(|value| {
        let path = absolute_path(value, "metrics_file", problems)?;
        if path.parent().is_none() {
            problems.at(
                value,
                "metrics_file: a file is expected, not `/`".to_string(),
            );
            return None;
        }
        // It changes every 15 s: inside a share it would be synced, over and over.
        if let Some(share) = shares.iter().find(|s| path.starts_with(&s.path)) {
            problems.at(
                value,
                format!(
                    "metrics_file {:?} is inside share {:?} ({:?}); put it outside every share",
                    path, share.name, share.path
                ),
            );
            return None;
        }
        Some(path)
    });

    if !complete {
        return None;
    }
    Some(HostConfig {
        file: file.to_path_buf(),
        guest: guest?,
        state_dir: state_dir?,
        control: control?,
        max_delete_fraction,
        metrics_file,
        shares,
    })
}

/// Parses a guest address as `guest =` takes it (and `vmsync-host sync --guest`): any form
/// [`EndpointAddr`] parses that a host can dial, a concrete guest CID for `vsock://`.
pub fn parse_guest(text: &str) -> Result<EndpointAddr, String> {
    match text.parse::<EndpointAddr>() {
        Ok(EndpointAddr::VsockAny { port }) => Err(format!(
            "`vsock://any:{port}` is for listening; dial the guest's CID, e.g. `vsock://3:{port}`"
        )),
        Ok(EndpointAddr::Vsock { cid, .. }) if cid == 0 || cid == 2 => Err(format!(
            "CID {cid} is the {}, not a guest; guest CIDs start at 3",
            if cid == 0 { "hypervisor" } else { "host" }
        )),
        Ok(endpoint) => Ok(endpoint),
        Err(error) => Err(error.to_string()),
    }
}

/// Checks each pattern with the same gitignore compiler the engine uses, so that a pattern that
/// would fail at run time fails `check` instead.
fn check_ignore_patterns(
    share: &str,
    patterns: &[Spanned<String>],
    problems: &mut Problems,
) -> Vec<String> {
    // Patterns are matched relative to the share root; the root itself does not matter for
    // compiling them.
    let mut builder = GitignoreBuilder::new("/");
    let mut all_compiled = true;
    for pattern in patterns {
        let text = pattern.get_ref();
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            // Gitignore reads these as a blank line or a comment: they would silently match
            // nothing, which is never what a pattern in a config list means.
            problems.at(
                pattern,
                format!(
                    "share {share:?} ignore pattern {text:?} matches nothing (blank or a `#` \
                     comment); write `\\#` for a literal leading #"
                ),
            );
            all_compiled = false;
        } else if text.contains(['\n', '\r']) {
            problems.at(
                pattern,
                format!(
                    "share {share:?} ignore pattern {text:?} contains a line break; give one \
                     pattern per list element"
                ),
            );
            all_compiled = false;
        } else if let Err(error) = builder.add_line(None, text) {
            problems.at(
                pattern,
                format!("share {share:?} ignore pattern {text:?} does not compile: {error}"),
            );
            all_compiled = false;
        }
    }
    if all_compiled {
        if let Err(error) = builder.build() {
            problems.push(
                None,
                format!("share {share:?} ignore patterns do not compile together: {error}"),
            );
        }
    }
    patterns
        .iter()
        .map(|pattern| pattern.get_ref().clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/vmsync/vm1.toml";

    fn parse_ok(text: &str) -> HostConfig {
        match parse(text, Path::new(FILE)) {
            Ok(config) => config,
            Err(error) => panic!("expected a valid config, got:\n{error}\n--- config:\n{text}"),
        }
    }

    const MINIMAL: &str = r#"
guest = "unix:/run/vmsync/guest.sock"
[[share]]
name = "src"
path = "/home/alice/src"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse_ok(MINIMAL);
        assert_eq!(
            config.guest,
            EndpointAddr::Unix(PathBuf::from("/run/vmsync/guest.sock"))
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/vmsync/vm1"));
        assert_eq!(config.control, PathBuf::from("/run/vmsync/vm1.ctl"));
        assert_eq!(config.max_delete_fraction, DEFAULT_MAX_DELETE_FRACTION);
        assert_eq!(config.metrics_file, None);
        assert_eq!(config.file, PathBuf::from(FILE));
        assert_eq!(
            config.shares,
            vec![HostShare {
                name: "src".into(),
                path: PathBuf::from("/home/alice/src"),
                mode: SyncMode::TwoWay,
                conflict: ConflictPolicy::Keep,
                ignore: vec![],
                respect_gitignore: false,
                ignore_vcs: false,
                deletion_exempt: DEFAULT_DELETION_EXEMPT
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                retention: Default::default(),
                min_free: MinFree::Default,
                quota: Default::default(),
            }]
        );
    }

    #[test]
    fn full_config_resolves_every_key() {
        let config = parse_ok(
            r#"
guest = "hybrid:/run/vm1.vsock:786"
state_dir = "/srv/vmsync//state/./vm1/"
control = "/run/vm1.ctl"
max_delete_fraction = 1
metrics_file = "/var/lib/node_exporter/textfile//vmsync-vm1.prom"
[[share]]
name = "src"
path = "/home/alice/src"
mode = "two-way"
conflict = "newer-wins"
ignore = ["target/", "*.swp", "!keep.swp", "/build"]
[[share]]
name = "out.put_2-x"
path = "/home/alice/out"
mode = "guest-to-host"
[[share]]
name = "docs"
path = "/home/alice/docs"
mode = "host-to-guest"
respect_gitignore = true
ignore_vcs = true
deletion_exempt = ["out/", "*.o"]
"#,
        );
        assert_eq!(
            config.guest,
            EndpointAddr::Hybrid {
                path: PathBuf::from("/run/vm1.vsock"),
                port: 786
            }
        );
        assert_eq!(config.state_dir, PathBuf::from("/srv/vmsync/state/vm1"));
        assert_eq!(config.control, PathBuf::from("/run/vm1.ctl"));
        assert_eq!(config.max_delete_fraction, 1.0);
        assert_eq!(
            config.metrics_file,
            Some(PathBuf::from(
                "/var/lib/node_exporter/textfile/vmsync-vm1.prom"
            ))
        );
        let modes: Vec<_> = config.shares.iter().map(|s| s.mode).collect();
        assert_eq!(
            modes,
            [
                SyncMode::TwoWay,
                SyncMode::GuestToHost,
                SyncMode::HostToGuest
            ]
        );
        assert_eq!(config.shares[0].conflict, ConflictPolicy::NewerWins);
        assert_eq!(
            config.shares[0].ignore,
            ["target/", "*.swp", "!keep.swp", "/build"]
        );
        assert!(!config.shares[0].respect_gitignore && !config.shares[0].ignore_vcs);
        assert!(config.shares[2].respect_gitignore && config.shares[2].ignore_vcs);
        assert_eq!(config.shares[2].deletion_exempt, ["out/", "*.o"]);
        assert!(config.shares[0]
            .deletion_exempt
            .contains(&"target/".to_string()));
    }

    #[test]
    fn retention_defaults_and_values() {
        let config = parse_ok(MINIMAL);
        assert_eq!(
            config.shares[0].retention,
            vmsync_engine::trash::Retention::default()
        );
        let config = parse_ok(&format!(
            "{MINIMAL}keep_deleted = \"36h\"\nkeep_deleted_max = \"5GiB\"\n"
        ));
        assert_eq!(
            config.shares[0].retention,
            vmsync_engine::trash::Retention {
                max_age: std::time::Duration::from_secs(36 * 3600),
                max_size: vmsync_engine::trash::SizeLimit::Bytes(5 << 30),
            }
        );
    }

    #[test]
    fn a_users_defaults_are_its_units_or_xdg_directories_and_roots_the_systems() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let full = env(&[
            ("HOME", "/home/alice"),
            ("XDG_STATE_HOME", "/home/alice/state"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        let cases = [
            (0, DefaultDirs::for_user(0, full), DefaultDirs::system()),
            (
                1000,
                DefaultDirs::for_user(1000, full),
                DefaultDirs {
                    state_parent: PathBuf::from("/home/alice/state/vmsync"),
                    control: PathBuf::from("/run/user/1000/vmsync"),
                },
            ),
            (
                1000,
                DefaultDirs::for_user(1000, env(&[("HOME", "/home/alice")])),
                DefaultDirs {
                    state_parent: PathBuf::from("/home/alice/.local/state/vmsync"),
                    control: PathBuf::from(DEFAULT_CONTROL_DIR),
                },
            ),
            (
                1000,
                DefaultDirs::for_user(1000, env(&[("XDG_RUNTIME_DIR", "relative")])),
                DefaultDirs::system(),
            ),
            // The system unit run as its own user: systemd's directories win over HOME.
            (
                999,
                DefaultDirs::for_user(
                    999,
                    env(&[
                        ("HOME", "/var/lib/vmsync"),
                        ("STATE_DIRECTORY", "/var/lib/vmsync/vm1"),
                        ("RUNTIME_DIRECTORY", "/run/vmsync"),
                    ]),
                ),
                DefaultDirs::system(),
            ),
            // The user unit: the same directories as its XDG ones.
            (
                1000,
                DefaultDirs::for_user(
                    1000,
                    env(&[
                        ("HOME", "/home/alice"),
                        ("STATE_DIRECTORY", "/home/alice/.local/state/vmsync/vm1"),
                        ("RUNTIME_DIRECTORY", "/run/user/1000/vmsync"),
                    ]),
                ),
                DefaultDirs {
                    state_parent: PathBuf::from("/home/alice/.local/state/vmsync"),
                    control: PathBuf::from("/run/user/1000/vmsync"),
                },
            ),
            // A relative or top-level STATE_DIRECTORY names no parent to use.
            (
                1000,
                DefaultDirs::for_user(1000, env(&[("STATE_DIRECTORY", "/vm1")])),
                DefaultDirs::system(),
            ),
        ];
        for (uid, got, want) in cases {
            assert_eq!(got, want, "uid {uid}");
        }
        let user = DefaultDirs::for_user(1000, full);
        let config = parse_with(
            MINIMAL,
            Path::new(FILE),
            &vmsync_agent_common::config::as_written,
            &user,
        )
        .unwrap();
        assert_eq!(
            config.state_dir,
            PathBuf::from("/home/alice/state/vmsync/vm1")
        );
        assert_eq!(
            config.control,
            PathBuf::from("/run/user/1000/vmsync/vm1.ctl")
        );
    }

    #[test]
    fn quotas_take_sizes_counts_or_none_and_default_when_unset() {
        use vmsync_core::quota::Quota;
        assert_eq!(parse_ok(MINIMAL).shares[0].quota, Quota::default());
        let config = parse_ok(&format!(
            "{MINIMAL}quota_bytes = \"50GiB\"\nquota_file_bytes = \"none\"\n\
             quota_files = 1000\nquota_dirs = 10\n"
        ));
        assert_eq!(
            config.shares[0].quota,
            Quota {
                bytes: Some(50 << 30),
                files: Some(1000),
                dirs: Some(10),
                file_bytes: None,
            }
        );
        for bad in ["quota_bytes = \"10%\"", "quota_file_bytes = \"lots\""] {
            let text = format!("{MINIMAL}{bad}\n");
            let err = parse(&text, Path::new(FILE)).unwrap_err().to_string();
            assert!(err.contains("is not a size such as"), "{bad}: {err}");
        }
        let text = format!("{MINIMAL}quota_files = -1\n");
        let err = parse(&text, Path::new(FILE)).unwrap_err().to_string();
        assert!(err.contains(":6:15: invalid value: integer `-1`"), "{err}");
    }

    #[test]
    fn min_free_takes_a_size_or_a_percentage() {
        for (text, want) in [
            ("1GiB", MinFree::Bytes(1 << 30)),
            ("5%", MinFree::Basis(500)),
            ("0", MinFree::Bytes(0)),
        ] {
            let config = parse_ok(&format!("{MINIMAL}min_free = \"{text}\"\n"));
            assert_eq!(config.shares[0].min_free, want, "{text}");
        }
        let text = format!("{MINIMAL}min_free = \"lots\"\n");
        let err = parse(&text, Path::new(FILE)).unwrap_err().to_string();
        assert!(err.contains("share \"src\" min_free: `lots`"), "{err}");
    }

    /// `sync --guest` builds its share with [`HostShare::with_defaults`] from the names in
    /// [`MODES`] and [`CONFLICT_POLICIES`]: the same share a `[[share]]` with those keys makes.
    #[test]
    fn a_share_with_defaults_is_what_a_minimal_share_section_makes() {
        let config = parse_ok(MINIMAL);
        let share = HostShare::with_defaults(
            "src".into(),
            PathBuf::from("/home/alice/src"),
            SyncMode::TwoWay,
            ConflictPolicy::Keep,
        );
        assert_eq!(config.shares, vec![share]);
        for (name, mode) in MODES {
            let config = parse_ok(&format!("{MINIMAL}mode = \"{name}\"\n"));
            let want = HostShare::with_defaults(
                "src".into(),
                PathBuf::from("/home/alice/src"),
                mode,
                ConflictPolicy::Keep,
            );
            assert_eq!(config.shares, vec![want], "{name}");
        }
        for (name, policy) in CONFLICT_POLICIES {
            let config = parse_ok(&format!("{MINIMAL}conflict = \"{name}\"\n"));
            assert_eq!(config.shares[0].conflict, policy, "{name}");
        }
    }

    #[test]
    fn every_conflict_policy_maps() {
        for (text, policy) in [
            ("keep", ConflictPolicy::Keep),
            ("host-wins", ConflictPolicy::HostWins),
            ("guest-wins", ConflictPolicy::GuestWins),
            ("newer-wins", ConflictPolicy::NewerWins),
        ] {
            let config = parse_ok(&format!("{MINIMAL}conflict = \"{text}\"\n"));
            assert_eq!(config.shares[0].conflict, policy, "{text}");
        }
    }

    #[test]
    fn every_endpoint_form_a_host_can_dial_is_accepted() {
        use vmsync_transport::endpoint_addr::LibvirtDomain;
        for (text, endpoint) in [
            ("unix:/run/g.sock", EndpointAddr::Unix("/run/g.sock".into())),
            ("vsock://3:786", EndpointAddr::Vsock { cid: 3, port: 786 }),
            // Loopback vsock, for testing on one machine with vsock_loopback.
            ("vsock://1:786", EndpointAddr::Vsock { cid: 1, port: 786 }),
            (
                "hybrid:/run/a:b.vsock:1024",
                EndpointAddr::Hybrid {
                    path: "/run/a:b.vsock".into(),
                    port: 1024,
                },
            ),
            // Syntax only: no virsh runs (a test machine has none, and no such domain).
            (
                "libvirt:dev-vm",
                EndpointAddr::Libvirt(LibvirtDomain {
                    domain: "dev-vm".into(),
                    uri: None,
                    port: None,
                }),
            ),
            (
                "libvirt:dev-vm@qemu:///system:786",
                EndpointAddr::Libvirt(LibvirtDomain {
                    domain: "dev-vm".into(),
                    uri: Some("qemu:///system".into()),
                    port: Some(786),
                }),
            ),
        ] {
            let config = parse_ok(&format!(
                "guest = \"{text}\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n"
            ));
            assert_eq!(config.guest, endpoint, "{text}");
            assert_eq!(config.guest.to_string(), text);
        }
    }

    /// Each case: a name, the config text, and fragments the error message must contain.
    /// `{FILE}` stands for the file name; locations are checked as `FILE:LINE:COLUMN`.
    #[test]
    fn bad_configs_explain_what_and_where() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "not toml",
                "guest = \n",
                &["/etc/vmsync/vm1.toml:1:9: ", "string values must be quoted"],
            ),
            (
                "unknown top-level key",
                "guest = \"unix:/g.sock\"\nstate_dri = \"/x\"\n",
                &["vm1.toml:2:1: ", "unknown field `state_dri`", "`state_dir`"],
            ),
            (
                "unknown share key",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nmdoe = \"x\"\n",
                &["vm1.toml:5:1: ", "unknown field `mdoe`"],
            ),
            (
                "missing guest",
                "[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["missing field `guest`"],
            ),
            (
                "missing share path",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\n",
                &["missing field `path`"],
            ),
            (
                "no shares",
                "guest = \"unix:/g.sock\"\n",
                &["vm1.toml: no [[share]] defined"],
            ),
            (
                "wrong type",
                "guest = 5\n",
                &["vm1.toml:1:9: ", "invalid type: integer `5`, expected a string"],
            ),
            (
                "bad mode",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nmode = \"both\"\n",
                &["vm1.toml:5:8: ", "unknown variant `both`", "`host-to-guest`"],
            ),
            (
                "bad keep_deleted",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nkeep_deleted = \"7 days\"\n",
                &["vm1.toml:5:16: ", "keep_deleted", "s, m, h or d"],
            ),
            (
                "bad keep_deleted_max",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nkeep_deleted_max = \"150%\"\n",
                &["vm1.toml:5:20: ", "keep_deleted_max", "0 to 100"],
            ),
            (
                "bad conflict",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nconflict = \"mine\"\n",
                &["vm1.toml:5:12: ", "unknown variant `mine`", "`newer-wins`"],
            ),
            (
                "relative metrics_file",
                "guest = \"unix:/g.sock\"\nmetrics_file = \"vm1.prom\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:2:16: ", "metrics_file", "relative"],
            ),
            (
                "metrics_file inside a share",
                "guest = \"unix:/g.sock\"\nmetrics_file = \"/a/m.prom\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:2:16: ", "inside share \"a\""],
            ),
            (
                "unparsable endpoint",
                "guest = \"vsock:3:786\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:1:9: guest: `vsock:3:786`: unknown address form"],
            ),
            (
                "bad libvirt domain",
                "guest = \"libvirt:-vm\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:1:9: guest: `libvirt:-vm`: the libvirt domain starts with `-`"],
            ),
            (
                "listen-only endpoint",
                "guest = \"vsock://any:786\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:1:9: ", "is for listening", "vsock://3:786"],
            ),
            (
                "host cid",
                "guest = \"vsock://2:786\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["CID 2 is the host"],
            ),
            (
                "relative share path",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"home/a\"\n",
                &["vm1.toml:4:8: share \"a\" path: path \"home/a\" is relative"],
            ),
            (
                "empty share path",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"\"\n",
                &["vm1.toml:4:8: share \"a\" path: path is empty"],
            ),
            (
                "dotdot share path",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/x/../a\"\n",
                &["contains `..`"],
            ),
            (
                "relative state_dir",
                "guest = \"unix:/g.sock\"\nstate_dir = \"state\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:2:13: state_dir: path \"state\" is relative"],
            ),
            (
                "control with scheme",
                "guest = \"unix:/g.sock\"\ncontrol = \"unix:/c.ctl\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:2:11: ", "without `unix:`"],
            ),
            (
                "duplicate share name",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n[[share]]\nname = \"a\"\npath = \"/b\"\n",
                &["vm1.toml:6:8: duplicate share name \"a\" (first defined on line 3)"],
            ),
            (
                "duplicate share name whose first path is bad",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"rel\"\n[[share]]\nname = \"a\"\npath = \"/b\"\n",
                &[
                    "vm1.toml:4:8: share \"a\" path: path \"rel\" is relative",
                    "vm1.toml:6:8: duplicate share name \"a\" (first defined on line 3)",
                ],
            ),
            (
                "invalid share name characters",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"my src\"\npath = \"/a\"\n",
                &["vm1.toml:3:8: share name \"my src\": contains ' '"],
            ),
            (
                "empty share name",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"\"\npath = \"/a\"\n",
                &["must not be empty"],
            ),
            (
                "dot share name",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"..\"\npath = \"/a\"\n",
                &["must not start with `.`"],
            ),
            (
                // The guest refuses it in the handshake: the host must not accept it either.
                "hidden share name",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \".dotfiles\"\npath = \"/a\"\n",
                &["vm1.toml:3:8: share name \".dotfiles\": must not start with `.`"],
            ),
            (
                "long share name",
                &format!(
                    "guest = \"unix:/g.sock\"\n[[share]]\nname = \"{}\"\npath = \"/a\"\n",
                    "n".repeat(65)
                ),
                &["is 65 bytes; the limit is 64"],
            ),
            (
                "nested shares",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/home/a\"\n[[share]]\nname = \"b\"\npath = \"/home/a/sub/\"\n",
                &["vm1.toml:7:8: share \"b\" path \"/home/a/sub\" and share \"a\" path \"/home/a\" (line 4) nest"],
            ),
            (
                "same path twice",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/home/a\"\n[[share]]\nname = \"b\"\npath = \"/home//a\"\n",
                &["nest"],
            ),
            (
                "share inside state_dir",
                "guest = \"unix:/g.sock\"\nstate_dir = \"/var/lib/vmsync\"\n[[share]]\nname = \"a\"\npath = \"/var/lib/vmsync/a\"\n",
                &["vm1.toml:5:8: share \"a\" path \"/var/lib/vmsync/a\" and state_dir \"/var/lib/vmsync\" nest"],
            ),
            (
                "state_dir inside share",
                "guest = \"unix:/g.sock\"\nstate_dir = \"/home/a/.state\"\n[[share]]\nname = \"a\"\npath = \"/home/a\"\n",
                &["and state_dir \"/home/a/.state\" nest"],
            ),
            (
                "control inside share",
                "guest = \"unix:/g.sock\"\ncontrol = \"/home/a/vm.ctl\"\n[[share]]\nname = \"a\"\npath = \"/home/a\"\n",
                &["the control socket \"/home/a/vm.ctl\" is inside share \"a\""],
            ),
            (
                "guest socket inside share",
                "guest = \"unix:/home/a/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/home/a\"\n",
                &["the guest socket \"/home/a/g.sock\" is inside share \"a\""],
            ),
            (
                "bad ignore pattern",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nignore = [\"ok\", \"a{b\"]\n",
                &["vm1.toml:5:17: share \"a\" ignore pattern \"a{b\" does not compile"],
            ),
            (
                "comment as ignore pattern",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nignore = [\"# build output\"]\n",
                &["matches nothing"],
            ),
            (
                "fraction zero",
                "guest = \"unix:/g.sock\"\nmax_delete_fraction = 0.0\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["vm1.toml:2:23: max_delete_fraction must be greater than 0 and at most 1, got 0"],
            ),
            (
                "fraction above one",
                "guest = \"unix:/g.sock\"\nmax_delete_fraction = 1.5\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["got 1.5"],
            ),
            (
                "fraction nan",
                "guest = \"unix:/g.sock\"\nmax_delete_fraction = nan\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["got NaN"],
            ),
            (
                "conflict on a one-way share",
                "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\nmode = \"host-to-guest\"\nconflict = \"host-wins\"\n",
                &["vm1.toml:6:12: ", "applies only to mode = \"two-way\""],
            ),
            (
                "several problems at once",
                "guest = \"unix:g.sock\"\n[[share]]\nname = \"a b\"\npath = \"rel\"\n",
                &[
                    "vm1.toml:1:9: guest:",
                    "\n/etc/vmsync/vm1.toml:3:8: share name",
                    "\n/etc/vmsync/vm1.toml:4:8: share \"a b\" path",
                ],
            ),
        ];
        for (name, text, fragments) in cases {
            let message = match parse(text, Path::new(FILE)) {
                Ok(config) => panic!("case {name:?}: expected an error, got {config:?}"),
                Err(error) => error.to_string(),
            };
            for fragment in *fragments {
                assert!(
                    message.contains(fragment),
                    "case {name:?}: message lacks {fragment:?}:\n{message}"
                );
            }
        }
    }

    /// Serde stops at the first unknown key, wrong type or missing key; `check` must not.
    #[test]
    fn every_problem_is_listed_not_only_the_first() {
        let text = "guest = \"unix:/g.sock\"\nstate_dri = \"/x\"\n\
                    [[share]]\nname = 5\npath = \"/a\"\nmdoe = \"x\"\n\
                    [[share]]\nname = \"b\"\npath = \"/b\"\nmode = \"both\"\n\
                    [[share]]\nname = \"c\"\n\
                    [[share]]\nname = \"d e\"\npath = \"rel\"\n";
        let message = parse(text, Path::new(FILE)).unwrap_err().to_string();
        let lines: Vec<&str> = message.lines().collect();
        let want = [
            "vm1.toml:2:1: unknown field `state_dri`",
            "vm1.toml:4:8: invalid type: integer `5`, expected a string",
            "vm1.toml:6:1: unknown field `mdoe`",
            "vm1.toml:10:8: unknown variant `both`",
            "vm1.toml:11:1: missing field `path`",
            "vm1.toml:14:8: share name \"d e\"",
            "vm1.toml:15:8: share \"d e\" path: path \"rel\" is relative",
        ];
        assert_eq!(lines.len(), want.len(), "{message}");
        for (line, want) in lines.iter().zip(want) {
            assert!(line.contains(want), "{line:?} lacks {want:?}:\n{message}");
        }
    }

    /// A share given through a symlink is resolved once, at load, and nesting is judged on
    /// the real directories.
    #[test]
    fn symlinked_share_paths_resolve_and_nest_on_real_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().canonicalize().unwrap().join("real");
        std::fs::create_dir_all(real.join("inner")).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let load = |text: String| {
            let file = tmp.path().join("vm1.toml");
            std::fs::write(&file, text).unwrap();
            load(&file)
        };
        let head = "guest = \"unix:/g.sock\"\nstate_dir = \"/s\"\ncontrol = \"/c.ctl\"\n";
        let config = load(format!(
            "{head}[[share]]\nname = \"a\"\npath = \"{}\"\n",
            link.display()
        ))
        .unwrap();
        assert_eq!(config.shares[0].path, real);
        // Missing beneath a link: resolved as far as it exists.
        let config = load(format!(
            "{head}[[share]]\nname = \"a\"\npath = \"{}/later\"\n",
            link.display()
        ))
        .unwrap();
        assert_eq!(config.shares[0].path, real.join("later"));
        let error = load(format!(
            "{head}[[share]]\nname = \"a\"\npath = \"{}\"\n[[share]]\nname = \"b\"\npath = \"{}\"\n",
            link.display(),
            real.join("inner").display()
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("nest; shares must not overlap"), "{error}");
        let file = real.join("file");
        std::fs::write(&file, b"x").unwrap();
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        let error = load(format!(
            "{head}[[share]]\nname = \"a\"\npath = \"{}\"\n[[share]]\nname = \"b\"\npath = \"{}\"\n",
            file.display(),
            dangling.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("is not a directory"), "{error}");
        assert!(error.contains("which does not exist"), "{error}");
    }

    #[test]
    fn file_stem_that_cannot_name_defaults_requires_explicit_paths() {
        let error = match parse(MINIMAL, Path::new("/etc/vmsync/my vm.toml")) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("state_dir is not set"), "{error}");
        assert!(error.contains("control is not set"), "{error}");
        let explicit = format!("state_dir = \"/s\"\ncontrol = \"/c.ctl\"\n{MINIMAL}");
        assert!(parse(&explicit, Path::new("/etc/vmsync/my vm.toml")).is_ok());
    }

    #[test]
    fn load_reports_unreadable_file_with_its_path() {
        let missing = Path::new("/nonexistent/vmsync/host.toml");
        match load(missing) {
            Err(error @ ConfigError::Read { .. }) => {
                assert!(error
                    .to_string()
                    .starts_with("cannot read config file /nonexistent/vmsync/host.toml: "));
            }
            other => panic!("expected a read error, got {other:?}"),
        }
    }
}
