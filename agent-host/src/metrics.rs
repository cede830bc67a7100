//! The host agent's state as Prometheus text exposition (format 0.0.4): what `vmsync-host
//! metrics` prints and what `run` writes to `metrics_file` for node-exporter's textfile
//! collector. [`render`] is pure: the same status snapshot `status --json` gets, as text.
//!
//! Every series carries `vm` (the configuration file's stem, so that several hosts' files can
//! be scraped together); per-share series also `share`. The families are listed in
//! docs/cli.md.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use vmsync_agent_common::control::AgentInfo;
use vmsync_engine::status::{CycleHistogram, ShareState, ShareStatus, CYCLE_BUCKETS_MICROS};

/// Every state a share can be in, for the one-hot `vmsync_share_state`.
const STATES: [ShareState; 6] = [
    ShareState::Connecting,
    ShareState::Scanning,
    ShareState::Syncing,
    ShareState::InSync,
    ShareState::Conflicted,
    ShareState::Halted,
];

/// The `vm` label of a configuration file: its stem (`/etc/vmsync/host/vm1.toml` → `vm1`).
pub fn vm_label(config: &Path) -> String {
    config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A label value as the format writes it: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample: `name{k="v",...} value`.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A per-share family with one sample per share.
struct PerShare {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&ShareStatus) -> Option<u64>,
}

const PER_SHARE: &[PerShare] = &[
    PerShare {
        name: "vmsync_share_sent_bytes_total",
        kind: "counter",
        help: "Chunk payload bytes sent to the guest, as they crossed the wire (compressed), since the agent started.",
        value: |s| Some(s.bytes_sent),
    },
    PerShare {
        name: "vmsync_share_received_bytes_total",
        kind: "counter",
        help: "Chunk payload bytes received from the guest, as they crossed the wire (compressed), since the agent started.",
        value: |s| Some(s.bytes_received),
    },
    PerShare {
        name: "vmsync_share_files",
        kind: "gauge",
        help: "Regular files both sides agree on after the last cycle.",
        value: |s| Some(s.files),
    },
    PerShare {
        name: "vmsync_share_bytes",
        kind: "gauge",
        help: "Total size of the regular files both sides agree on after the last cycle.",
        value: |s| Some(s.bytes),
    },
    PerShare {
        name: "vmsync_share_chunks_reused_total",
        kind: "counter",
        help: "Chunks found locally on the receiving side instead of transferred.",
        value: |s| Some(s.chunks_reused),
    },
    PerShare {
        name: "vmsync_share_files_hashed_total",
        kind: "counter",
        help: "Files the host read and hashed since the agent started.",
        value: |s| Some(s.files_hashed),
    },
    PerShare {
        name: "vmsync_share_conflicts",
        kind: "gauge",
        help: "Paths in conflict, waiting for vmsync-host resolve.",
        value: |s| Some(s.conflicts.len() as u64),
    },
    PerShare {
        name: "vmsync_share_problems",
        kind: "gauge",
        help: "Paths the last cycles could not sync (see vmsync-host status).",
        value: |s| Some(s.problems.len() as u64),
    },
    PerShare {
        name: "vmsync_share_trash_files",
        kind: "gauge",
        help: "Files and symlinks the host's trash of the share keeps.",
        value: |s| Some(s.trash_files),
    },
    PerShare {
        name: "vmsync_share_trash_bytes",
        kind: "gauge",
        help: "Bytes the host's trash of the share keeps.",
        value: |s| Some(s.trash_bytes),
    },
    PerShare {
        name: "vmsync_share_cycles_total",
        kind: "counter",
        help: "Completed sync cycles since the agent started.",
        value: |s| Some(s.cycles),
    },
    PerShare {
        name: "vmsync_share_watching",
        kind: "gauge",
        help: "1 while the host's side of the share is watched live (inotify), else 0.",
        value: |s| Some(u64::from(s.watching)),
    },
    PerShare {
        name: "vmsync_share_watched_directories",
        kind: "gauge",
        help: "Directories the host's live watch of the share covers.",
        value: |s| Some(s.watched_dirs),
    },
    PerShare {
        name: "vmsync_share_disk_free_bytes",
        kind: "gauge",
        help: "While paused with disk-full: bytes free on the filesystem that is short.",
        value: |s| s.disk_free,
    },
    PerShare {
        name: "vmsync_share_disk_reserve_bytes",
        kind: "gauge",
        help: "While paused with disk-full: the reserve (min_free) of the filesystem that is short.",
        value: |s| s.disk_reserve,
    },
];

/// The status snapshot of the host agent of configuration `vm` as exposition text.
pub fn render(vm: &str, agent: &AgentInfo, shares: &[ShareStatus]) -> String {
    let mut out = String::new();
    let vm_only = [("vm", vm)];

    family(
        &mut out,
        "vmsync_agent_info",
        "gauge",
        "Always 1; the agent's version as a label.",
    );
    sample(
        &mut out,
        "vmsync_agent_info",
        &[("vm", vm), ("version", &agent.version)],
        1,
    );
    family(
        &mut out,
        "vmsync_agent_connected",
        "gauge",
        "1 while the host agent has a session with its guest, else 0.",
    );
    sample(
        &mut out,
        "vmsync_agent_connected",
        &vm_only,
        u8::from(agent.peer == "connected"),
    );
    family(
        &mut out,
        "vmsync_agent_reconnects_total",
        "counter",
        "Times the host agent connected to its guest again after its first connection.",
    );
    sample(
        &mut out,
        "vmsync_agent_reconnects_total",
        &vm_only,
        agent.reconnects.unwrap_or(0),
    );
    family(
        &mut out,
        "vmsync_agent_resident_memory_bytes",
        "gauge",
        "Resident set size of the host agent process.",
    );
    sample(
        &mut out,
        "vmsync_agent_resident_memory_bytes",
        &vm_only,
        agent.rss_bytes,
    );

    family(
        &mut out,
        "vmsync_share_state",
        "gauge",
        "1 for the state the share is in, 0 for every other state.",
    );
    for s in shares {
        for state in STATES {
            let labels = [("vm", vm), ("share", &s.name), ("state", state.as_str())];
            sample(
                &mut out,
                "vmsync_share_state",
                &labels,
                u8::from(s.state == state),
            );
        }
    }
    family(
        &mut out,
        "vmsync_share_halted",
        "gauge",
        "1 with the code of the halt or pause, present only while the share is halted or paused.",
    );
    for s in shares {
        if let Some(code) = &s.halt_code {
            let labels = [("vm", vm), ("share", &s.name), ("code", code)];
            sample(&mut out, "vmsync_share_halted", &labels, 1);
        }
    }
    for metric in PER_SHARE {
        family(&mut out, metric.name, metric.kind, metric.help);
        for s in shares {
            if let Some(value) = (metric.value)(s) {
                sample(
                    &mut out,
                    metric.name,
                    &[("vm", vm), ("share", &s.name)],
                    value,
                );
            }
        }
    }

    family(
        &mut out,
        "vmsync_cycle_duration_seconds",
        "histogram",
        "Duration of completed sync cycles: scope=\"full\" the whole share, scope=\"live\" the paths that changed.",
    );
    for s in shares {
        for (scope, histogram) in [
            ("full", &s.full_cycle_durations),
            ("live", &s.live_cycle_durations),
        ] {
            histogram_samples(&mut out, vm, &s.name, scope, histogram);
        }
    }
    out
}

/// The `_bucket` (cumulative, up to `+Inf`), `_sum` and `_count` samples of one histogram.
fn histogram_samples(out: &mut String, vm: &str, share: &str, scope: &str, h: &CycleHistogram) {
    const NAME: &str = "vmsync_cycle_duration_seconds";
    let mut cumulative = 0u64;
    for (bound, n) in CYCLE_BUCKETS_MICROS.iter().zip(h.buckets) {
        cumulative += n;
        let le = seconds(*bound);
        let labels = [("vm", vm), ("share", share), ("scope", scope), ("le", &le)];
        sample(out, &format!("{NAME}_bucket"), &labels, cumulative);
    }
    let labels = [
        ("vm", vm),
        ("share", share),
        ("scope", scope),
        ("le", "+Inf"),
    ];
    sample(out, &format!("{NAME}_bucket"), &labels, h.count);
    let labels = [("vm", vm), ("share", share), ("scope", scope)];
    sample(out, &format!("{NAME}_sum"), &labels, seconds(h.sum_micros));
    sample(out, &format!("{NAME}_count"), &labels, h.count);
}

/// Microseconds as decimal seconds, exactly (`1500` → `0.0015`, `30000000` → `30`).
fn seconds(micros: u64) -> String {
    let whole = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// `text` written to `path` so that a reader sees the old file or the new one, never a part:
/// into a temp file beside it (a name the textfile collector skips), then renamed over it.
/// Mode 0644, whatever the umask: the collector runs as another user.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp: PathBuf = path.with_file_name(temp_name);
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_engine::status::ProblemView;

    /// A parsed sample: name, labels (unescaped), value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn agent(connected: bool) -> AgentInfo {
        AgentInfo {
            role: "vmsync-host".into(),
            version: "1.2.3".into(),
            pid: 42,
            peer: if connected {
                "connected"
            } else {
                "disconnected"
            }
            .into(),
            reconnects: Some(3),
            ..AgentInfo::default()
        }
    }

    fn share(name: &str) -> ShareStatus {
        ShareStatus {
            name: name.into(),
            state: ShareState::InSync,
            files: 3,
            bytes: 300,
            bytes_sent: 1000,
            bytes_received: 20,
            chunks_reused: 4,
            files_hashed: 5,
            cycles: 7,
            trash_files: 1,
            trash_bytes: 9,
            conflicts: vec!["a".into(), "b".into()],
            problems: vec![ProblemView {
                path: "p".into(),
                side: "host".into(),
                reason: "r".into(),
            }],
            ..ShareStatus::default()
        }
    }

    /// One sample line split into its name, labels (unescaped) and value; `None` when it is
    /// not `name{label="value",...} value` (or `name value`).
    fn parse_sample(line: &str) -> Option<Sample> {
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        let end = line.find(|c: char| !is_name(c))?;
        let (name, mut rest) = line.split_at(end);
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = rest.find('=')?;
                let key = &rest[..eq];
                if key.is_empty() || !key.chars().all(is_name) || key.contains(':') {
                    return None;
                }
                rest = rest[eq + 1..].strip_prefix('"')?;
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let close = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next()?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            _ => return None,
                        },
                        (_, '\n') => return None,
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_string(), value));
                rest = &rest[close + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let value = rest.strip_prefix(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some((name.to_string(), labels, value))
    }

    /// Every line is a comment or a well-formed sample of a family declared before it, and
    /// each family's samples are together.
    fn check_format(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "{text}");
        let mut declared: Vec<String> = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split(' ');
                let name = words.next().unwrap().to_string();
                let kind = words.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{line}");
                }
                assert!(!declared.contains(&name), "declared twice: {line}");
                declared.push(name);
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let parsed = parse_sample(line).unwrap_or_else(|| panic!("bad line: {line:?}"));
            let current = declared.last().expect("a sample before any TYPE");
            let suffix = parsed.0.strip_prefix(current.as_str());
            assert!(
                matches!(suffix, Some("" | "_bucket" | "_sum" | "_count")),
                "{line} outside its family {current}"
            );
            assert!(parsed.0.starts_with("vmsync_"), "{line}");
            samples.push(parsed);
        }
        samples
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.2)
    }

    #[test]
    fn label_values_are_escaped() {
        for (raw, want) in [
            ("plain", "plain"),
            ("a\"b", "a\\\"b"),
            ("a\\b", "a\\\\b"),
            ("a\nb", "a\\nb"),
            ("\\\"\n", "\\\\\\\"\\n"),
        ] {
            assert_eq!(escape_label(raw), want, "{raw:?}");
        }
        // Through the renderer and back, in a share name, a halt code and the vm.
        let mut s = share("we\"ird\\na\nme");
        s.state = ShareState::Halted;
        s.halt_code = Some("co\"de\n\\x".into());
        let text = render("v\"m\n", &agent(true), &[s]);
        let samples = check_format(&text);
        let labels = [("vm", "v\"m\n"), ("share", "we\"ird\\na\nme")];
        assert_eq!(
            value(&samples, "vmsync_share_cycles_total", &labels),
            Some(7.0)
        );
        let halted = [("share", "we\"ird\\na\nme"), ("code", "co\"de\n\\x")];
        assert_eq!(value(&samples, "vmsync_share_halted", &halted), Some(1.0));
        assert!(text.contains("share=\"we\\\"ird\\\\na\\nme\""), "{text}");
    }

    #[test]
    fn the_state_is_one_hot() {
        for state in STATES {
            let mut s = share("src");
            s.state = state;
            let samples = check_format(&render("vm1", &agent(true), &[s]));
            for other in STATES {
                let got = value(
                    &samples,
                    "vmsync_share_state",
                    &[("share", "src"), ("state", other.as_str())],
                );
                assert_eq!(got, Some(f64::from(u8::from(other == state))), "{state:?}");
            }
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let mut s = share("src");
        for micros in [500, 1_500, 1_500, 40_000, 90_000_000] {
            s.live_cycle_durations
                .record(std::time::Duration::from_micros(micros));
        }
        s.full_cycle_durations
            .record(std::time::Duration::from_millis(3));
        let text = render("vm1", &agent(true), &[s]);
        let samples = check_format(&text);
        let bucket = |scope: &str, le: &str| {
            value(
                &samples,
                "vmsync_cycle_duration_seconds_bucket",
                &[("scope", scope), ("le", le)],
            )
        };
        let want = [
            ("0.001", 1.0),
            ("0.002", 3.0),
            ("0.005", 3.0),
            ("0.01", 3.0),
            ("0.05", 4.0),
            ("0.1", 4.0),
            ("0.5", 4.0),
            ("1", 4.0),
            ("5", 4.0),
            ("30", 4.0),
            ("+Inf", 5.0),
        ];
        for (le, n) in want {
            assert_eq!(bucket("live", le), Some(n), "le={le}\n{text}");
        }
        let live = [("scope", "live")];
        let count = value(&samples, "vmsync_cycle_duration_seconds_count", &live);
        assert_eq!(count, Some(5.0));
        let sum = value(&samples, "vmsync_cycle_duration_seconds_sum", &live);
        assert_eq!(sum, Some(90.0435));
        assert_eq!(bucket("full", "0.002"), Some(0.0));
        assert_eq!(bucket("full", "0.005"), Some(1.0));
        assert_eq!(bucket("full", "+Inf"), Some(1.0));
        // Buckets never decrease.
        let les: Vec<f64> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == "vmsync_cycle_duration_seconds_bucket"
                    && l.iter().any(|(k, v)| k == "scope" && v == "live")
            })
            .map(|s| s.2)
            .collect();
        assert_eq!(les.len(), 11);
        assert!(les.windows(2).all(|w| w[0] <= w[1]), "{les:?}");
    }

    #[test]
    fn a_halted_share_shows_its_code_and_disk_and_a_running_one_none() {
        let mut halted = share("a");
        halted.state = ShareState::Halted;
        halted.halt_code = Some("disk-full".into());
        halted.disk_free = Some(100);
        halted.disk_reserve = Some(1000);
        let text = render("vm1", &agent(true), &[halted, share("b")]);
        let samples = check_format(&text);
        let a = [("share", "a")];
        let b = [("share", "b")];
        for (name, labels, want) in [
            ("vmsync_share_halted", &a, Some(1.0)),
            ("vmsync_share_halted", &b, None),
            ("vmsync_share_disk_free_bytes", &a, Some(100.0)),
            ("vmsync_share_disk_reserve_bytes", &a, Some(1000.0)),
            ("vmsync_share_disk_free_bytes", &b, None),
        ] {
            assert_eq!(value(&samples, name, labels), want, "{name} {labels:?}");
        }
        let code = [("share", "a"), ("code", "disk-full")];
        assert_eq!(value(&samples, "vmsync_share_halted", &code), Some(1.0));
        let state = [("share", "a"), ("state", "halted")];
        assert_eq!(value(&samples, "vmsync_share_state", &state), Some(1.0));
    }

    #[test]
    fn agent_and_share_series_carry_the_snapshot() {
        let samples = check_format(&render("vm1", &agent(false), &[share("src")]));
        let vm = [("vm", "vm1")];
        let src = [("vm", "vm1"), ("share", "src")];
        for (name, labels, want) in [
            ("vmsync_agent_connected", &vm[..], 0.0),
            ("vmsync_agent_reconnects_total", &vm, 3.0),
            ("vmsync_agent_info", &[("version", "1.2.3")], 1.0),
            ("vmsync_share_sent_bytes_total", &src, 1000.0),
            ("vmsync_share_received_bytes_total", &src, 20.0),
            ("vmsync_share_files", &src, 3.0),
            ("vmsync_share_bytes", &src, 300.0),
            ("vmsync_share_chunks_reused_total", &src, 4.0),
            ("vmsync_share_files_hashed_total", &src, 5.0),
            ("vmsync_share_conflicts", &src, 2.0),
            ("vmsync_share_problems", &src, 1.0),
            ("vmsync_share_trash_files", &src, 1.0),
            ("vmsync_share_trash_bytes", &src, 9.0),
            ("vmsync_share_cycles_total", &src, 7.0),
            ("vmsync_cycle_duration_seconds_count", &src, 0.0),
        ] {
            assert_eq!(value(&samples, name, labels), Some(want), "{name}");
        }
        let connected = check_format(&render("vm1", &agent(true), &[]));
        assert_eq!(value(&connected, "vmsync_agent_connected", &vm), Some(1.0));
        // Every sample carries the vm.
        for (name, labels, _) in &samples {
            assert!(
                labels.iter().any(|(k, v)| k == "vm" && v == "vm1"),
                "{name}"
            );
        }
    }

    #[test]
    fn seconds_are_exact_decimals() {
        for (micros, want) in [
            (0, "0"),
            (1_000, "0.001"),
            (1_500, "0.0015"),
            (30_000_000, "30"),
            (1, "0.000001"),
        ] {
            assert_eq!(seconds(micros), want);
        }
    }

    #[test]
    fn the_vm_label_is_the_config_stem() {
        assert_eq!(vm_label(Path::new("/etc/vmsync/host/vm1.toml")), "vm1");
        assert_eq!(vm_label(Path::new("/x/my.vm.toml")), "my.vm");
    }

    #[test]
    fn write_atomically_replaces_the_file_and_leaves_no_temp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.prom");
        write_atomically(&path, "a 1\n").unwrap();
        write_atomically(&path, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vm1.prom")]);
        assert!(write_atomically(&dir.path().join("no/such/dir.prom"), "").is_err());
    }
}
