//! The kill loop: either agent killed with SIGKILL at random moments of a two-way sync of
//! thousands of files (some of 100 MiB and more), restarted, again and again, while a writer on
//! each side keeps making new versions. At every moment observed (a sampler while the agents
//! run, a full check after every kill) every visible file is a complete version some writer
//! wrote; leftovers of a killed agent in `.vmsync/tmp` are gone once it is back; the share never
//! turns `conflicted` or `halted`; and in the end both trees are identical (content, modes,
//! mtimes) and equal to what the writers last left. See `tests/soak/README.md`.
//!
//! Knobs (environment): `KILL_LOOP_ROUNDS` (default 4), `KILL_LOOP_FILES` (small files per
//! side, default 1000), `KILL_LOOP_BIG_MIB` (big files per side, comma-separated MiB, default
//! "100"), `KILL_LOOP_SEED`, `KILL_LOOP_CONVERGE_EVERY` (rounds between full convergences with
//! the writers paused, default 5), `KILL_LOOP_MAX_KILL_MS` (default 2500).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::killloop::{hex, snapshot, Checker, Known, Running, Snap, Writer};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The names in a side's `.vmsync/tmp` right now.
fn temp_names(root: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(root.join(".vmsync/tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Fails with the violations and both logs' tails.
/// The bytes of the files under `dir` (not following symlinks), and their count.
fn bytes_under(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (b, n) = bytes_under(&entry.path());
            total = (total.0 + b, total.1 + n);
        } else if meta.is_file() {
            total = (total.0 + meta.len(), total.1 + 1);
        }
    }
    total
}

/// The largest files under `dir`, largest first: (bytes, path under `dir`).
fn largest_under(dir: &Path, n: usize) -> Vec<(u64, String)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(u64, String)>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(base, &entry.path(), out);
            } else if meta.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(base)
                    .map(|p| p.display().to_string());
                out.push((meta.len(), rel.unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| b.cmp(a));
    out.truncate(n);
    out
}

/// The trash stays bounded however much the writers churned: once the pruner has had its
/// turn, each side's trash holds at most about two versions of what the share holds (the size
/// limit thins young batches to each path's oldest and newest version), plus the 64 MiB floor
/// of a percentage limit. Returns each side's trash bytes.
fn check_trash_bounded(a: &Agents) -> [u64; 2] {
    let mut out = [0; 2];
    for (i, (side, root)) in [("host", &a.host_dir), ("guest", &a.guest_dir)]
        .into_iter()
        .enumerate()
    {
        let trash = root.join(".vmsync/trash");
        let share = bytes_under(root).0 - bytes_under(&root.join(".vmsync")).0;
        let bound = 2 * share + (64 << 20);
        // The pruner prunes at most every 5 s after something was kept.
        let bounded = eventually(Duration::from_secs(60), || bytes_under(&trash).0 <= bound);
        let (bytes, files) = bytes_under(&trash);
        if !bounded {
            let mut evidence = vec![format!(
                "{side}: trash {bytes} bytes in {files} files; share {share} bytes; bound {bound}"
            )];
            evidence.extend(
                largest_under(&trash, 12)
                    .into_iter()
                    .map(|(b, p)| format!("{b:>12} {p}")),
            );
            fail(
                a,
                &format!("the {side}'s trash is over its bound"),
                &evidence,
            );
        }
        out[i] = bytes;
    }
    out
}

fn fail(a: &Agents, what: &str, evidence: &[String]) -> ! {
    panic!(
        "kill loop: {what}:\n  {}\n--- host.log (tail)\n{}\n--- guest.log (tail)\n{}",
        evidence.join("\n  "),
        a.log_tail("host.log", 40),
        a.log_tail("guest.log", 20),
    );
}

/// The share's state, if the host answers (it may be restarting).
fn share_state(a: &Agents) -> Option<serde_json::Value> {
    let out = a.host_cmd(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["shares"][0].clone())
}

/// A conflicted or halted share is a violation: the writers never touch the same path, and
/// nothing a kill leaves may look like the user's conflict or a wipe.
fn check_state(a: &Agents) {
    if let Some(share) = share_state(a) {
        let state = share["state"].as_str().unwrap_or("");
        if state == "conflicted" || state == "halted" {
            fail(a, &format!("the share is {state}"), &[share.to_string()]);
        }
    }
}

/// What the writers left: the expected end state of both trees (files only).
fn expected_files(
    models: &[&BTreeMap<String, vmsync_tests::killloop::Version>],
) -> BTreeMap<String, Snap> {
    models
        .iter()
        .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), Snap::File(v.clone()))))
        .collect()
}

/// Waits for `vmsync-host wait` to return 0, then insists both trees are identical and their
/// files are exactly `expected`. Returns how long it took to converge.
fn converge(a: &Agents, expected: &BTreeMap<String, Snap>) -> Duration {
    let t = Instant::now();
    let code = a.wait(600);
    if code != 0 {
        fail(
            a,
            &format!("`vmsync-host wait` exited {code}"),
            &[share_state(a).map(|s| s.to_string()).unwrap_or_default()],
        );
    }
    let took = t.elapsed();
    let (host, guest) = (snapshot(&a.host_dir), snapshot(&a.guest_dir));
    let files = |t: &BTreeMap<String, Snap>| -> BTreeMap<String, Snap> {
        t.iter()
            .filter(|(_, s)| !matches!(s, Snap::Dir(_)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let show = |s: Option<&Snap>| match s {
        Some(Snap::File(v)) => format!(
            "file {} mode {:o} mtime {}.{:09}",
            &hex(&v.digest)[..16],
            v.mode,
            v.mtime.0,
            v.mtime.1
        ),
        other => format!("{other:?}"),
    };
    let diff = |x: &BTreeMap<String, Snap>, y: &BTreeMap<String, Snap>| -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        keys.into_iter()
            .filter(|k| x.get(*k) != y.get(*k))
            .take(10)
            .map(|k| format!("{k}: {} vs {}", show(x.get(k)), show(y.get(k))))
            .collect()
    };
    if host != guest {
        fail(
            a,
            "in sync, yet the trees differ (host vs guest)",
            &diff(&host, &guest),
        );
    }
    let got = files(&host);
    if &got != expected {
        fail(
            a,
            "in sync, yet the files are not what the writers left (tree vs writers)",
            &diff(&got, expected),
        );
    }
    took
}

#[test]
fn kill_9_loop_every_visible_file_is_a_whole_version_and_the_trees_converge() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let rounds: u32 = env_or("KILL_LOOP_ROUNDS", 4);
    let files: usize = env_or("KILL_LOOP_FILES", 1000);
    let big: Vec<usize> = std::env::var("KILL_LOOP_BIG_MIB")
        .unwrap_or_else(|_| "100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let converge_every: u32 = env_or("KILL_LOOP_CONVERGE_EVERY", 5).max(1);
    let max_kill_ms: u64 = env_or("KILL_LOOP_MAX_KILL_MS", 2500).max(60);
    let seed: u64 = env_or("KILL_LOOP_SEED", rand::random());
    eprintln!(
        "kill loop: seed {seed}, {rounds} rounds, {files} files + {big:?} MiB per side \
         (KILL_LOOP_SEED={seed} repeats the choices)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let mut a = Agents::new("conflict = \"newer-wins\"");
    let known = Arc::new(Known::default());
    let tmp = a.tmp.path().to_path_buf();
    let mut hw = Writer::new(
        &a.host_dir,
        "h",
        tmp.join("scratch-h"),
        seed ^ 1,
        known.clone(),
    );
    let mut gw = Writer::new(
        &a.guest_dir,
        "g",
        tmp.join("scratch-g"),
        seed ^ 2,
        known.clone(),
    );
    hw.populate(files, &big);
    // The guest's big files a little bigger: "100 MB and more".
    let gbig: Vec<usize> = big.iter().map(|m| m + m / 8).collect();
    gw.populate(files, &gbig);

    // The sampler: checks both trees over and over while the agents run.
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (known, v, on) = (known.clone(), violations.clone(), sampling.clone());
        let (h, g) = (a.host_dir.clone(), a.guest_dir.clone());
        std::thread::spawn(move || {
            let mut checker = Checker::default();
            let mut passes = 0u64;
            while on.load(Ordering::Relaxed) {
                for (side, root) in [("host", &h), ("guest", &g)] {
                    let bad = checker.check(side, root, &known);
                    if !bad.is_empty() {
                        v.lock().unwrap().extend(bad);
                        return passes;
                    }
                }
                passes += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            passes
        })
    };
    let check_sampler = |a: &Agents| {
        let v = violations.lock().unwrap();
        if !v.is_empty() {
            fail(a, "the sampler saw a file that is no whole version", &v);
        }
    };

    let pause = Duration::from_millis(5);
    let big_p = 0.01;
    let mut running = Some((
        Running::spawn(hw, pause, big_p),
        Running::spawn(gw, pause, big_p),
    ));

    a.start();
    // Kills of the host, of the guest, and cuts of the connection alone (both agents live on
    // and reconnect).
    let mut kills = [0u32; 3];
    let mut max_converge = Duration::ZERO;
    let mut converges = 0u32;
    let mut checker = Checker::default();
    for round in 0..rounds {
        // The first kill lands in the initial sync; later ones in the full cycle a restart
        // brings and the live changes the writers keep making.
        let delay = rng.random_range(50..max_kill_ms);
        std::thread::sleep(Duration::from_millis(delay));
        let victim = rng.random_range(0..3usize);
        match victim {
            0 => a.kill_host(),
            1 => a.kill_guest(),
            _ => a.relay.disconnect_all(),
        }
        kills[victim] += 1;
        let (name, roots) = match victim {
            0 => ("host", vec![a.host_dir.clone()]),
            1 => ("guest", vec![a.guest_dir.clone()]),
            _ => ("connection", vec![a.host_dir.clone(), a.guest_dir.clone()]),
        };
        // With the victim dead (or its session), nothing on its side moves but the writer: a
        // full check.
        let mut bad = checker.check("host", &a.host_dir, &known);
        bad.extend(checker.check("guest", &a.guest_dir, &known));
        if !bad.is_empty() {
            fail(
                &a,
                &format!("round {round}: after kill -9 of the {name} at {delay} ms"),
                &bad,
            );
        }
        check_sampler(&a);
        let left: Vec<_> = roots.iter().map(|root| temp_names(root)).collect();
        match victim {
            0 => a.start_host(),
            1 => a.start_guest(),
            _ => {}
        }
        // A restarted agent removes what its predecessor left in .vmsync/tmp when it opens the
        // share (its first scan after the connection); after a cut, the full scan of the new
        // session discards what the old one staged.
        for (root, left) in roots.iter().zip(&left) {
            let cleaned = eventually(Duration::from_secs(120), || {
                let now = temp_names(root);
                left.iter().all(|n| !now.contains(n))
            });
            if !cleaned {
                let now = temp_names(root);
                let stale: Vec<String> = left
                    .iter()
                    .filter(|n| now.contains(n))
                    .map(|n| format!("{}: .vmsync/tmp/{}", root.display(), n.to_string_lossy()))
                    .collect();
                fail(
                    &a,
                    &format!("round {round}: temps left when the {name} went are still there"),
                    &stale,
                );
            }
        }
        check_state(&a);
        check_sampler(&a);
        if (round + 1) % converge_every == 0 && round + 1 < rounds {
            // Stop the writers and let the share settle: it must converge on what they left.
            let (hr, gr) = running.take().unwrap();
            let (hw, gw) = (hr.finish(), gr.finish());
            let expected = expected_files(&[&hw.model, &gw.model]);
            let took = converge(&a, &expected);
            check_trash_bounded(&a);
            running = Some((
                Running::spawn(hw, pause, big_p),
                Running::spawn(gw, pause, big_p),
            ));
            max_converge = max_converge.max(took);
            converges += 1;
        }
        if round % 10 == 9 {
            eprintln!(
                "kill loop: round {} of {rounds}, kills host {} guest {}, cuts {}, {} versions, {} files checked, {:.0} s",
                round + 1,
                kills[0],
                kills[1],
                kills[2],
                known.versions.load(Ordering::Relaxed),
                known.files_checked.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }

    // Stop killing and writing; the share must converge on what the writers last left.
    let (hr, gr) = running.take().unwrap();
    let (hw, gw) = (hr.finish(), gr.finish());
    let expected = expected_files(&[&hw.model, &gw.model]);
    let took = converge(&a, &expected);
    max_converge = max_converge.max(took);
    converges += 1;
    sampling.store(false, Ordering::Relaxed);
    let passes = sampler.join().unwrap();
    check_sampler(&a);
    for root in [&a.host_dir, &a.guest_dir] {
        let bad = checker.check("end", root, &known);
        if !bad.is_empty() {
            fail(&a, "at the end", &bad);
        }
    }
    let trash = check_trash_bounded(&a);
    eprintln!(
        "kill loop summary: seed {seed}; {rounds} rounds in {:.1} s ({:.2} s/round); kills: host {}, guest {}; connection cuts {}; \
         {} versions written, {} file checks ({passes} sampler passes); {converges} convergences, \
         max time to converge {:.2} s; {} files at the end; trash: host {:.0} MiB, guest {:.0} MiB",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() / f64::from(rounds.max(1)),
        kills[0],
        kills[1],
        kills[2],
        known.versions.load(Ordering::Relaxed),
        known.files_checked.load(Ordering::Relaxed),
        max_converge.as_secs_f64(),
        expected.len(),
        trash[0] as f64 / f64::from(1 << 20),
        trash[1] as f64 / f64::from(1 << 20),
    );
}

/// Regression: `kill -9` of the destination in the middle of an initial sync that makes many
/// directories left one at mode 0700 (made owner-only, killed before its mode was set), and the
/// next cycle reported it as the user's conflict (`wait` exited 3). The guest is killed three
/// times while it makes 8,000 directories, each time once a different number exist; every
/// directory visible after each kill must have its final mode, and the sync must finish clean.
#[test]
fn kill_9_while_making_directories_leaves_none_at_a_temporary_mode() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    const DIRS: usize = 8_000;
    let mut a = Agents::new("");
    for i in 0..DIRS {
        std::fs::create_dir_all(a.host_dir.join(format!("t/d{i:05}"))).unwrap();
    }
    let count = |root: &Path| std::fs::read_dir(root.join("t")).map_or(0, |d| d.count());
    let modes = |root: &Path| -> Vec<String> {
        std::fs::read_dir(root.join("t"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        use std::os::unix::fs::PermissionsExt;
                        let m = e.metadata().ok()?.permissions().mode() & 0o7777;
                        (m != 0o755).then(|| format!("{:?} at {m:o}", e.file_name()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let host_times = vmsync_tests::fixture::times(&a.host_dir);
    a.start();
    for (round, fraction) in [10, 4, 2].into_iter().enumerate() {
        let seen = count(&a.guest_dir);
        let until = seen + (DIRS - seen) / fraction;
        let reached = eventually(Duration::from_secs(120), || count(&a.guest_dir) >= until);
        assert!(
            reached,
            "round {round}: the guest never had {until} directories"
        );
        a.kill_guest();
        let wrong = modes(&a.guest_dir);
        assert!(
            wrong.is_empty(),
            "round {round}: after kill -9 at {} directories: {wrong:?}",
            count(&a.guest_dir)
        );
        a.start_guest();
    }
    assert_eq!(a.wait(300), 0, "status: {}", a.share());
    assert_eq!(count(&a.guest_dir), DIRS);
    assert!(modes(&a.guest_dir).is_empty());
    vmsync_tests::fixture::assert_same_tree(&a.host_dir, &a.guest_dir);
    assert!(temp_names(&a.guest_dir).is_empty());
    // Every directory has the same mtime on both sides, and each one made by the killed
    // agent got the source's before it was visible (only `t`, which the agent was writing
    // into when killed, may carry the time of that moment, on both sides alike).
    let diff = vmsync_tests::fixture::time_differences(&a.host_dir, &a.guest_dir, 10);
    assert!(diff.is_empty(), "times differ: {diff:?}");
    let guest_times = vmsync_tests::fixture::times(&a.guest_dir);
    let moved: Vec<&String> = host_times
        .iter()
        .filter(|(p, t)| p.as_str() != "t" && guest_times.get(*p) != Some(t))
        .map(|(p, _)| p)
        .take(10)
        .collect();
    assert!(moved.is_empty(), "not the source's time: {moved:?}");
}
