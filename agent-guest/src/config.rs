//! `vmsync-guest` configuration: which endpoint to listen on and which directories to export.
//!
//! Two layers, resolved in one place:
//! - `Raw*` structs mirror the file exactly. Serde rejects unknown keys (`deny_unknown_fields`)
//!   and keeps the byte span of every value (`toml::Spanned`) so that a later check can say
//!   where in the file the offending value is.
//! - [`parse`] checks every value and returns a [`GuestConfig`] whose fields are ready to use:
//!   absolute normalized paths and a parsed listen endpoint. Validation collects every problem it
//!   finds instead of stopping at the first, so one `vmsync-guest check` run lists everything.
//!
//! The file format (keys, defaults):
//!
//! ```toml
//! listen = "vsock://any:786"         # default; or "unix:/PATH", "vsock://CID:PORT"
//! state_dir = "/var/lib/vmsync"      # default
//! control = "/run/vmsync/guest.ctl"  # default
//! max_write_bytes = 32768            # default; largest single write to the host connection
//! [[share]]                          # at least one
//! name = "src"                       # [A-Za-z0-9._-], 1..=64 bytes, unique
//! path = "/home/dev/src"             # absolute
//! min_free = "1GiB"                  # default: the smaller of 1 GiB and 5 % of the filesystem;
//!                                    # or a percentage ("5%"). Below it, no new content is
//!                                    # written into the share (docs/safety.md)
//! ```
//!
//! The default port, 786, is below 1024: vsock reserves those ports for privileged processes on
//! Linux, so an unprivileged process in the guest cannot take the port first and pose as the
//! agent. Mode, conflict policy and ignore patterns are the host's to set (the host config
//! module); the guest only says what it exports.
//!
//! `max_write_bytes` caps every write the guest makes to its host connection. With guest kernels
//! 6.12 and newer, a vsock write above 32 KiB becomes one packet over several descriptors, and
//! some device backends (vhost-device-vsock 0.3.0, Cloud Hypervisor before PR #7680) read only
//! the first: guest→host bytes are lost. The default, 32 KiB, is safe with every backend. Its
//! cost, measured by tests/vm on a 6.1 guest (unaffected by the bug) under vhost-device-vsock:
//! raw socket writes of 32 KiB ran 13–28 % slower than 256 KiB ones (72–93 vs 100–107 MiB/s),
//! but vmsync's own guest→host sync throughput showed no difference beyond run-to-run noise
//! (5.9 vs 5.8 MiB/s over five runs: it is CPU-bound there, not socket-bound). See
//! docs/hypervisors.md. Raise it only for guests older than 6.12 or a backend known to walk
//! descriptor chains.
//!
//! The listen endpoint is parsed by the transport crate's [`EndpointAddr`] (the one grammar for
//! configs and the CLI); this module only refuses the forms a guest cannot listen on.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
pub use vmsync_agent_common::config::ConfigError;
use vmsync_agent_common::config::{
    absolute_path, check_places, deserialize_all, min_free, normalize_absolute, share_name_error,
    socket_path, Problems, ResolvePath,
};
use vmsync_core::reserve::MinFree;
use vmsync_transport::endpoint_addr::{EndpointAddr, DEFAULT_VSOCK_PORT};

/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmsync";
/// Default `control`.
pub const DEFAULT_CONTROL: &str = "/run/vmsync/guest.ctl";
/// Default `max_write_bytes`: 32 KiB, the largest vsock write every device backend handles.
pub const DEFAULT_MAX_WRITE_BYTES: usize = vmsync_transport::capped::SAFE_VSOCK_WRITE_BYTES;
/// Accepted range of `max_write_bytes`: below 1 KiB the per-write overhead dominates; above
/// 16 MiB the value means nothing (socket buffers are smaller).
pub const MAX_WRITE_BYTES_RANGE: std::ops::RangeInclusive<i64> = 1024..=16 * 1024 * 1024;

/// A validated guest configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The file this configuration was read from (for messages).
    pub file: PathBuf,
    /// Where to accept the host's connection: any form but [`EndpointAddr::Hybrid`] and
    /// [`EndpointAddr::Libvirt`] (host-side addresses).
    pub listen: EndpointAddr,
    /// Index and staging state of the exported shares.
    pub state_dir: PathBuf,
    /// Path of the control socket that `status` talks to.
    pub control: PathBuf,
    /// Largest single write to the host connection (see the module docs: the 32 KiB trap).
    pub max_write_bytes: usize,
    /// In file order; names are unique and paths do not nest.
    pub shares: Vec<GuestShare>,
}

/// One `[[share]]` the guest exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    pub name: String,
    /// Absolute and lexically normalized (no `.`/`..` components, no trailing slash).
    pub path: PathBuf,
    /// How long and how much of what changes replace or delete is kept in the share's trash.
    pub retention: vmsync_engine::trash::Retention,
    /// Free space to keep on the share's filesystem (default: the smaller of 1 GiB and 5 %);
    /// below it the guest refuses to write new content and the host pauses the share.
    pub min_free: MinFree,
}

/// Reads and validates a guest configuration file.
pub fn load(file: &Path) -> Result<GuestConfig, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_with(&text, file, &vmsync_agent_common::config::on_disk)
}

/// Validates configuration text. `file` is used in messages only; it is not read.
#[cfg(test)]
pub fn parse(text: &str, file: &Path) -> Result<GuestConfig, ConfigError> {
    parse_with(text, file, &vmsync_agent_common::config::as_written)
}

/// [`parse`], with share paths and `state_dir` resolved by `resolve_path`.
pub fn parse_with(
    text: &str,
    file: &Path,
    resolve_path: ResolvePath,
) -> Result<GuestConfig, ConfigError> {
    let mut problems = Problems::new(text);
    let Some((raw, dropped)) = deserialize_all::<RawGuestConfig>(text, &mut problems) else {
        return Err(problems.into_error(file));
    };
    match resolve(raw, dropped, file, resolve_path, &mut problems) {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(problems.into_error(file)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuestConfig {
    listen: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    control: Option<Spanned<String>>,
    max_write_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    share: Vec<Spanned<RawShare>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    name: Spanned<String>,
    path: Spanned<String>,
    keep_deleted: Option<Spanned<String>>,
    keep_deleted_max: Option<Spanned<String>>,
    min_free: Option<Spanned<String>>,
}

/// Turns the raw file into a `GuestConfig`, recording every problem. Returns `None` only when a
/// required value is unusable; the caller also fails when any problem was recorded.
fn resolve(
    raw: RawGuestConfig,
    dropped: bool,
    file: &Path,
    resolve_path: ResolvePath,
    problems: &mut Problems,
) -> Option<GuestConfig> {
    let listen = match &raw.listen {
        // Default: every CID, the transport's default port (786, documented above).
        None => Some(EndpointAddr::VsockAny {
            port: DEFAULT_VSOCK_PORT,
        }),
        Some(value) => match value.get_ref().parse::<EndpointAddr>() {
            Ok(EndpointAddr::Hybrid { port, .. }) => {
                problems.at(
                    value,
                    format!(
                        "listen: `hybrid:` is the host side of a hybrid vsock; inside the guest \
                         listen on `vsock://any:{port}`"
                    ),
                );
                None
            }
            Ok(EndpointAddr::Libvirt(target)) => {
                problems.at(
                    value,
                    format!(
                        "listen: `libvirt:` names a VM for the host to dial; inside the guest \
                         listen on `vsock://any:{}`",
                        target.port()
                    ),
                );
                None
            }
            Ok(endpoint) => Some(endpoint),
            Err(error) => {
                problems.at(value, format!("listen: {error}"));
                None
            }
        },
    };
    let state_dir = match &raw.state_dir {
        Some(value) => absolute_path(value, "state_dir", problems)
            .map(|path| resolve_path(&path).unwrap_or(path)),
        None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
    };
    let control = match &raw.control {
        Some(value) => socket_path(value, "control", problems),
        None => Some(PathBuf::from(DEFAULT_CONTROL)),
    };
    let max_write_bytes = match &raw.max_write_bytes {
        None => Some(DEFAULT_MAX_WRITE_BYTES),
        Some(value) if MAX_WRITE_BYTES_RANGE.contains(value.get_ref()) => {
            usize::try_from(*value.get_ref()).ok()
        }
        Some(value) => {
            problems.at(
                value,
                format!(
                    "max_write_bytes: {} is outside {}..={} (32768 is safe with every vsock \
                     device backend)",
                    value.get_ref(),
                    MAX_WRITE_BYTES_RANGE.start(),
                    MAX_WRITE_BYTES_RANGE.end()
                ),
            );
            None
        }
    };

    if raw.share.is_empty() && !dropped {
        problems.push(
            None,
            "no [[share]] defined; add at least one with `name` and `path`".to_string(),
        );
    }
    let mut shares: Vec<GuestShare> = Vec::with_capacity(raw.share.len());
    // Spans of accepted shares' name and path, parallel to `shares`, for the cross-share checks.
    let mut spans: Vec<(Range<usize>, Range<usize>)> = Vec::with_capacity(raw.share.len());
    let mut complete = true;
    for raw_share in &raw.share {
        let raw_share = raw_share.get_ref();
        let name = raw_share.name.get_ref();
        if let Some(message) = share_name_error(name) {
            problems.at(&raw_share.name, format!("share name {name:?}: {message}"));
            complete = false;
        } else if let Some(first) = shares.iter().position(|share| &share.name == name) {
            let (line, _) = problems.line_column(spans[first].0.start);
            problems.at(
                &raw_share.name,
                format!("duplicate share name {name:?} (first defined on line {line})"),
            );
            complete = false;
        }
        let retention = vmsync_agent_common::config::retention(
            name,
            raw_share.keep_deleted.as_ref(),
            raw_share.keep_deleted_max.as_ref(),
            problems,
        );
        let min_free = min_free(name, raw_share.min_free.as_ref(), problems);
        let key = format!("share {name:?} path");
        let path = absolute_path(&raw_share.path, &key, problems).and_then(|path| {
            resolve_path(&path)
                .map_err(|message| problems.at(&raw_share.path, format!("{key}: {message}")))
                .ok()
        });
        match path {
            Some(path) => {
                spans.push((raw_share.name.span(), raw_share.path.span()));
                shares.push(GuestShare {
                    name: name.clone(),
                    path,
                    retention,
                    min_free,
                });
            }
            None => complete = false,
        }
    }

    let sockets = [
        ("control", control.clone()),
        (
            "listen",
            match &listen {
                Some(EndpointAddr::Unix(path)) => normalize_absolute(&path.to_string_lossy()).ok(),
                _ => None,
            },
        ),
    ];
    let places = shares.iter().map(|s| (s.name.as_str(), s.path.as_path()));
    check_places(places, &spans, state_dir.as_deref(), &sockets, problems);

    if !complete {
        return None;
    }
    Some(GuestConfig {
        file: file.to_path_buf(),
        listen: listen?,
        state_dir: state_dir?,
        control: control?,
        max_write_bytes: max_write_bytes?,
        shares,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/vmsync/guest.toml";

    fn parse_ok(text: &str) -> GuestConfig {
        match parse(text, Path::new(FILE)) {
            Ok(config) => config,
            Err(error) => panic!("expected a valid config, got:\n{error}\n--- config:\n{text}"),
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse_ok("[[share]]\nname = \"src\"\npath = \"/home/dev/src\"\n");
        assert_eq!(config.listen, EndpointAddr::VsockAny { port: 786 });
        assert_eq!(config.listen.to_string(), "vsock://any:786");
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(config.control, PathBuf::from(DEFAULT_CONTROL));
        assert_eq!(config.max_write_bytes, 32 * 1024);
        assert_eq!(
            config.shares,
            vec![GuestShare {
                name: "src".into(),
                path: "/home/dev/src".into(),
                retention: Default::default(),
                min_free: MinFree::Default,
            }]
        );
    }

    #[test]
    fn min_free_takes_a_size_or_a_percentage() {
        let config = parse_ok(
            "[[share]]\nname = \"a\"\npath = \"/a\"\nmin_free = \"2.5%\"\n[[share]]\nname = \"b\"\npath = \"/b\"\nmin_free = \"512MiB\"\n",
        );
        assert_eq!(config.shares[0].min_free, MinFree::Basis(250));
        assert_eq!(config.shares[1].min_free, MinFree::Bytes(512 << 20));
        let err = parse(
            "[[share]]\nname = \"a\"\npath = \"/a\"\nmin_free = \"120%\"\n",
            Path::new("guest.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("guest.toml:4:12: share \"a\" min_free"),
            "{err}"
        );
    }

    #[test]
    fn full_config_resolves_every_key() {
        let config = parse_ok(
            r#"
listen = "unix:/run/vmsync/guest.sock"
state_dir = "/srv/state/"
control = "/run/g.ctl"
max_write_bytes = 262144
[[share]]
name = "src"
path = "/home/dev/src"
[[share]]
name = "docs"
path = "/home/dev/docs/."
"#,
        );
        assert_eq!(
            config.listen,
            EndpointAddr::Unix("/run/vmsync/guest.sock".into())
        );
        assert_eq!(config.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(config.control, PathBuf::from("/run/g.ctl"));
        assert_eq!(config.max_write_bytes, 256 * 1024);
        let paths: Vec<_> = config.shares.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/home/dev/src"),
                PathBuf::from("/home/dev/docs")
            ]
        );
        let vsock =
            parse_ok("listen = \"vsock://7:1024\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n");
        assert_eq!(vsock.listen, EndpointAddr::Vsock { cid: 7, port: 1024 });
    }

    /// Each case: a name, the config text, and fragments the error message must contain.
    #[test]
    fn bad_configs_explain_what_and_where() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "not toml",
                "[[share]\n",
                &["/etc/vmsync/guest.toml:1:"],
            ),
            (
                "unknown top-level key",
                "listen = \"vsock://any:786\"\nmode = \"two-way\"\n",
                &["guest.toml:2:1: ", "unknown field `mode`", "`listen`"],
            ),
            (
                "host-only share key",
                "[[share]]\nname = \"a\"\npath = \"/a\"\nignore = []\n",
                &["guest.toml:4:1: ", "unknown field `ignore`", "`name`, `path`, `keep_deleted`", "`min_free`"],
            ),
            (
                "bad keep_deleted",
                "[[share]]\nname = \"a\"\npath = \"/a\"\nkeep_deleted = \"1w\"\n",
                &["guest.toml:4:16: ", "share \"a\": keep_deleted", "s, m, h or d"],
            ),
            (
                "bad keep_deleted_max",
                "[[share]]\nname = \"a\"\npath = \"/a\"\nkeep_deleted_max = \"5 GB\"\n",
                &["guest.toml:4:20: ", "keep_deleted_max", "not a size"],
            ),
            (
                "max_write_bytes out of range",
                "max_write_bytes = 0\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["guest.toml:1:19: max_write_bytes: 0 is outside 1024..=16777216"],
            ),
            (
                "no shares",
                "",
                &["guest.toml: no [[share]] defined"],
            ),
            (
                "unparsable listen",
                "listen = \"tcp:0.0.0.0:786\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["guest.toml:1:10: listen: `tcp:0.0.0.0:786`: unknown address form"],
            ),
            (
                "hybrid listen",
                "listen = \"hybrid:/run/vm.vsock:786\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["guest.toml:1:10: ", "host side of a hybrid vsock", "vsock://any:786"],
            ),
            (
                "libvirt listen",
                "listen = \"libvirt:dev-vm:1024\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["guest.toml:1:10: ", "names a VM for the host to dial", "vsock://any:1024"],
            ),
            (
                "relative share path",
                "[[share]]\nname = \"a\"\npath = \"a\"\n",
                &["guest.toml:3:8: share \"a\" path: path \"a\" is relative"],
            ),
            (
                "missing share name",
                "[[share]]\npath = \"/a\"\n",
                &["missing field `name`"],
            ),
            (
                "relative control",
                "control = \"guest.ctl\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
                &["guest.toml:1:11: control: path \"guest.ctl\" is relative"],
            ),
            (
                "duplicate share name",
                "[[share]]\nname = \"a\"\npath = \"/a\"\n[[share]]\nname = \"a\"\npath = \"/b\"\n",
                &["guest.toml:5:8: duplicate share name \"a\" (first defined on line 2)"],
            ),
            (
                "invalid share name",
                "[[share]]\nname = \"src/x\"\npath = \"/a\"\n",
                &["guest.toml:2:8: share name \"src/x\": contains '/'"],
            ),
            (
                "nested shares",
                "[[share]]\nname = \"a\"\npath = \"/home\"\n[[share]]\nname = \"b\"\npath = \"/home/dev\"\n",
                &["guest.toml:6:8: share \"b\" path \"/home/dev\" and share \"a\" path \"/home\" (line 3) nest"],
            ),
            (
                "share inside default state_dir",
                "[[share]]\nname = \"a\"\npath = \"/var/lib/vmsync/a\"\n",
                &["guest.toml:3:8: ", "state_dir \"/var/lib/vmsync\" nest"],
            ),
            (
                "root share holds state_dir",
                "[[share]]\nname = \"all\"\npath = \"/\"\n",
                &["share \"all\" path \"/\" and state_dir \"/var/lib/vmsync\" nest"],
            ),
            (
                "listen socket inside share",
                "listen = \"unix:/home/dev/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/home/dev\"\n",
                &["the listen socket \"/home/dev/g.sock\" is inside share \"a\""],
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

    #[test]
    fn load_reports_unreadable_file_with_its_path() {
        match load(Path::new("/nonexistent/vmsync/guest.toml")) {
            Err(error @ ConfigError::Read { .. }) => assert!(error
                .to_string()
                .starts_with("cannot read config file /nonexistent/vmsync/guest.toml: ")),
            other => panic!("expected a read error, got {other:?}"),
        }
    }
}
