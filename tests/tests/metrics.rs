//! `vmsync-host metrics` and `metrics_file` with real processes: both agents over a Unix
//! socket, the metrics read as a Prometheus scraper would read them.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::fixture::{random_bytes, write};

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of exposition text; `None` if any line is neither a comment nor
/// `name{label="value",...} value`.
fn parse(text: &str) -> Option<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            while !rest.starts_with('}') {
                let eq = rest.find("=\"")?;
                let key = rest[..eq].to_string();
                rest = &rest[eq + 2..];
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let close = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => value.push(match chars.next()?.1 {
                            'n' => '\n',
                            c => c,
                        }),
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key, value));
                rest = &rest[close + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
            rest = &rest[1..];
        }
        let value = match rest.strip_prefix(' ')? {
            "+Inf" => f64::INFINITY,
            v => v.parse().ok()?,
        };
        samples.push((name.to_string(), labels, value));
    }
    Some(samples)
}

fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

/// The series (name and labels) of the samples, without their values.
fn series(samples: &[Sample]) -> BTreeSet<String> {
    samples
        .iter()
        .map(|(n, l, _)| format!("{n}{l:?}"))
        .collect()
}

/// What a synced share `src` of configuration `host.toml` must show.
fn check_synced(samples: &[Sample]) {
    let src = [("vm", "host"), ("share", "src")];
    let at = |name: &str| get(samples, name, &src).unwrap_or_else(|| panic!("no {name}"));
    assert!(at("vmsync_share_sent_bytes_total") > 0.0);
    assert_eq!(at("vmsync_share_files"), 3.0);
    let cycles = at("vmsync_share_cycles_total");
    assert!(cycles > 0.0);
    for state in [
        "connecting",
        "scanning",
        "syncing",
        "in-sync",
        "conflicted",
        "halted",
    ] {
        let labels = [("share", "src"), ("state", state)];
        let want = if state == "in-sync" { 1.0 } else { 0.0 };
        assert_eq!(
            get(samples, "vmsync_share_state", &labels),
            Some(want),
            "{state}"
        );
    }
    assert_eq!(get(samples, "vmsync_share_halted", &[]), None);
    assert_eq!(
        get(samples, "vmsync_agent_connected", &[("vm", "host")]),
        Some(1.0)
    );
    // Every completed cycle is in one of the two histograms, and each one's count is its
    // +Inf bucket.
    let mut counted = 0.0;
    for scope in ["full", "live"] {
        let labels = [("share", "src"), ("scope", scope)];
        let count = get(samples, "vmsync_cycle_duration_seconds_count", &labels).unwrap();
        let inf = [("share", "src"), ("scope", scope), ("le", "+Inf")];
        let bucket = get(samples, "vmsync_cycle_duration_seconds_bucket", &inf);
        assert_eq!(bucket, Some(count), "{scope}");
        counted += count;
    }
    assert_eq!(counted, cycles);
    let full = [("share", "src"), ("scope", "full")];
    assert!(get(samples, "vmsync_cycle_duration_seconds_count", &full).unwrap() >= 1.0);
}

fn three_files(a: &Agents) {
    write(&a.host_dir, "a.txt", "hello\n");
    write(&a.host_dir, "dir/b.bin", random_bytes(7, 100_000));
    write(&a.guest_dir, "from-guest.txt", "g\n");
}

#[test]
fn metrics_show_a_synced_share_and_say_when_no_agent_runs() {
    let mut a = Agents::new("");
    three_files(&a);
    a.start();
    a.wait_in_sync();
    let out = a.host_cmd(&["metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let samples = parse(&text).unwrap_or_else(|| panic!("not exposition text:\n{text}"));
    check_synced(&samples);

    a.stop_host();
    let out = a.host_cmd(&["metrics"]);
    let status = a.host_cmd(&["status"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(out.status.code(), status.status.code());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no agent answers"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn metrics_file_is_replaced_whole_and_matches_the_command() {
    let mut a = Agents::new("");
    let dir = a.tmp.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let prom = dir.join("vmsync-host.prom");
    let config = std::fs::read_to_string(&a.host_toml).unwrap();
    std::fs::write(
        &a.host_toml,
        format!("metrics_file = \"{}\"\n{config}", prom.display()),
    )
    .unwrap();
    three_files(&a);

    // A scraper reading the file all along: every read must be a whole file.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let prom = prom.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            use std::os::unix::fs::MetadataExt;
            let mut inodes = BTreeSet::new();
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut file) = std::fs::File::open(&prom) {
                    let inode = file.metadata().unwrap().ino();
                    let mut text = String::new();
                    file.read_to_string(&mut text).unwrap();
                    let whole = text.ends_with('\n')
                        && text.contains("vmsync_cycle_duration_seconds_count{")
                        && parse(&text).is_some();
                    assert!(whole, "a partial metrics file was visible:\n{text}");
                    inodes.insert(inode);
                    reads += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (inodes.len(), reads)
        })
    };

    a.start();
    assert!(eventually(Duration::from_secs(10), || prom.exists()));
    a.wait_in_sync();
    let out = a.host_cmd(&["metrics"]);
    assert!(out.status.success());
    let command = parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    // Stopping writes the file once more, with the state at that moment.
    a.stop_host();
    stop.store(true, Ordering::Relaxed);
    let (files_seen, reads) = reader.join().unwrap();
    assert!(reads > 0);
    assert!(
        files_seen >= 2,
        "the file was not replaced ({files_seen} versions in {reads} reads)"
    );

    let text = std::fs::read_to_string(&prom).unwrap();
    let samples = parse(&text).unwrap();
    check_synced(&samples);
    assert_eq!(series(&samples), series(&command));
    // Nothing but the file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("vmsync-host.prom")]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&prom).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644);
}
