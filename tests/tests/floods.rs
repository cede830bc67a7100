//! Floods: what a hostile guest (or anyone who can reach an agent's sockets) can throw at the
//! agents in bulk, against the real `vmsync-host` and `vmsync-guest` processes. Each test keeps
//! an `OUT` directory beside the share under attack and checks it unchanged, that the agent is
//! still running, answering `status` and syncing afterwards, that its peak RSS (`VmHWM`) stayed
//! under the bound docs/threat-model.md states, and that the flood got the specific refusal.
//! The catalogue these come from: docs/threat-model.md ("Known gaps").

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmsync_core::endpoint::{Change, Outcome};
use vmsync_core::testing::noise;
use vmsync_core::{Entry, FileMeta, Hash, RelPath};
use vmsync_protocol::limits::MAX_BATCH_CHUNKS;
use vmsync_protocol::messages::{ManifestForm, StageAnswer, StageFile};
use vmsync_protocol::{
    Message, Request, RequestBody, RequestKind, Response, ResponseBody, WireContent,
};
use vmsync_tests::agents::{bin, eventually, Agents};
use vmsync_tests::hostile::{
    fd_count, make_out, manifest_of, peak_rss, respond, snapshot, Answer, FakeShare, HostileGuest,
    HostileHost, Snapshot, RSS_BOUND,
};

/// An agent process started by a test itself: with an fd limit (`ulimit -n`, soft and hard) or
/// a log level of its own (`None`: the default, `info`, as in production), logging to `log`.
/// Stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(
        name: &str,
        config: &Path,
        log: &Path,
        fd_limit: Option<u32>,
        level: Option<&str>,
    ) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new("sh");
        let limit = fd_limit.map_or(String::new(), |n| format!("ulimit -n {n} && "));
        cmd.arg("-c")
            .arg(format!("{limit}exec \"$0\" run --config \"$1\""))
            .arg(bin(name))
            .arg(config);
        match level {
            Some(level) => cmd.env("VMSYNC_LOG", level),
            None => cmd.env_remove("VMSYNC_LOG"),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's status of its share, or `Null` while it does not answer (not started yet).
fn share_status(a: &Agents) -> serde_json::Value {
    let out = a.host_cmd(&["status", "--json"]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["shares"][0].clone()
}

/// Files under `dir` and how many there are, by walking it (`.vmsync` left out).
fn count_files(dir: &Path) -> usize {
    vmsync_tests::fixture::tree(dir)
        .values()
        .filter(|n| matches!(n, vmsync_tests::fixture::Node::File { .. }))
        .count()
}

// ---------------------------------------------------------------- 200,000 entries in one directory

/// Files in the one big directory of the real-agent test.
const BIG_DIR_FILES: usize = 200_000;

/// The name and content of file `i` of the big directory: every 1,000th file holds a line
/// naming it, the rest are empty.
fn big_file(i: usize) -> (String, Vec<u8>) {
    let name = format!("big/f{i:06}");
    // `%` rather than `is_multiple_of`, which is newer than the workspace's rust-version.
    #[allow(clippy::manual_is_multiple_of)]
    let every_1000th = i % 1000 == 0;
    let data = if every_1000th {
        format!("file {i}\n").into_bytes()
    } else {
        Vec::new()
    };
    (name, data)
}

/// Real agents: 200,000 files (empty, and every 1,000th with a line of text) in one host
/// directory reach the guest: every name and size, and the content of a sample, byte for byte;
/// then an edit in that directory lands.
#[test]
fn two_hundred_thousand_files_in_one_host_directory_reach_the_guest() {
    let mut a = Agents::new("");
    let started = Instant::now();
    std::fs::create_dir(a.host_dir.join("big")).unwrap();
    for i in 0..BIG_DIR_FILES {
        let (name, data) = big_file(i);
        std::fs::write(a.host_dir.join(name), data).unwrap();
    }
    let made = started.elapsed();
    let started = Instant::now();
    a.start();
    let code = a.wait(600);
    eprintln!(
        "{BIG_DIR_FILES} files made in {made:?}, synced in {:?}",
        started.elapsed()
    );
    assert_eq!(code, 0, "host log:\n{}", a.log_tail("host.log", 40));
    // Every name, each file's size, and the content of a sample.
    let mut sizes: Vec<(String, u64)> = std::fs::read_dir(a.guest_dir.join("big"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (format!("big/{name}"), e.metadata().unwrap().len())
        })
        .collect();
    sizes.sort();
    let want: Vec<(String, u64)> = (0..BIG_DIR_FILES)
        .map(|i| {
            let (name, data) = big_file(i);
            (name, data.len() as u64)
        })
        .collect();
    assert_eq!(sizes.len(), BIG_DIR_FILES);
    assert!(sizes == want, "the guest's big/ differs from the host's");
    for i in (0..BIG_DIR_FILES)
        .step_by(997)
        .chain((0..BIG_DIR_FILES).step_by(20_000))
    {
        let (name, data) = big_file(i);
        assert_eq!(
            std::fs::read(a.guest_dir.join(&name)).unwrap(),
            data,
            "{name}"
        );
    }
    // And it keeps syncing: an edit in the big directory lands.
    std::fs::write(a.host_dir.join("big/f000001"), "edited\n").unwrap();
    let edited = eventually(Duration::from_secs(60), || {
        std::fs::read(a.guest_dir.join("big/f000001"))
            .ok()
            .as_deref()
            == Some(b"edited\n")
    });
    assert!(edited, "{}", a.log_tail("host.log", 20));
}

// ---------------------------------------------------------------- the host against a hostile guest

/// The real host agent (started by the test: see [`Daemon`]) against a hostile guest, an
/// `OUT` directory beside the host's share, and a sampler of the host's descriptors.
/// Fields drop in this order: the host agent stops before its temp directory goes.
struct Attack {
    host: Daemon,
    sampler: Sampler,
    guest: HostileGuest,
    out: PathBuf,
    before: Snapshot,
    a: Agents,
}

/// Samples a process's open descriptors every few milliseconds, keeping the most seen: all of
/// them, and those on temp files under a directory (see [`temp_fds`]).
struct Sampler {
    stop: Arc<AtomicBool>,
    fds: Arc<AtomicUsize>,
    temps: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, dir: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let fds = Arc::new(AtomicUsize::new(0));
        let temps = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, fds, temps) = (stop.clone(), fds.clone(), temps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    fds.fetch_max(fd_count(pid), Ordering::Relaxed);
                    temps.fetch_max(temp_fds(pid, &dir), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Sampler {
            stop,
            fds,
            temps,
            thread: Some(thread),
        }
    }

    /// The most descriptors, and the most on temp files, seen so far.
    fn peaks(&self) -> (usize, usize) {
        (
            self.fds.load(Ordering::Relaxed),
            self.temps.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The descriptors process `pid` holds on temp files in the share at `dir`: unnamed
/// (`O_TMPFILE`) ones show as `<dir>/.../#<inode> (deleted)`, named ones are in `.vmsync/tmp/`.
fn temp_fds(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let tmp = dir.join(".vmsync/tmp");
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| {
            (t.starts_with(&tmp) && *t != tmp)
                || (t.starts_with(dir)
                    && t.file_name()
                        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"#")))
        })
        .count()
}

/// Where each descriptor of process `pid` points.
fn fd_targets(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Names in the share's `.vmsync/tmp/` (named temp files).
fn named_temps(share: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(share.join(".vmsync/tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Starts the hostile guest answering with `answer` (given the host's connection number, from
/// 1), and the host agent after `prepare` has made what its share holds: `share_extra` in its
/// share's config, `fd_limit` and log `level` as [`Daemon::start`] takes them.
fn attack(
    share_extra: &str,
    fd_limit: Option<u32>,
    level: Option<&str>,
    prepare: impl FnOnce(&Agents),
    answer: impl Fn(u32, &Request) -> Answer + Send + Sync + 'static,
) -> Attack {
    let a = Agents::new(share_extra);
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    prepare(&a);
    // The relay forwards the host's connections to where the guest would listen.
    let guest = HostileGuest::start_counted(&a.tmp.path().join("guest.sock"), answer);
    let host = Daemon::start(
        "vmsync-host",
        &a.host_toml,
        &a.tmp.path().join("host.log"),
        fd_limit,
        level,
    );
    let sampler = Sampler::start(host.pid(), a.host_dir.clone());
    Attack {
        host,
        sampler,
        guest,
        out,
        before,
        a,
    }
}

impl Attack {
    /// The host is alive and answers `status`, OUT is unchanged, no temp file is left in its
    /// share's `.vmsync/tmp/`, and its peak RSS is under the bound. Returns the peak RSS.
    fn check(&mut self, what: &str) -> u64 {
        assert!(self.host.running(), "{what}: the host agent exited");
        let peak = peak_rss(self.host.pid()).expect("the host agent is running");
        let status = self.a.status();
        assert_eq!(status["shares"][0]["name"], "src", "{what}: {status}");
        assert_eq!(snapshot(&self.out), self.before, "{what}: OUT changed");
        assert_eq!(
            named_temps(&self.a.host_dir),
            Vec::<std::ffi::OsString>::new(),
            "{what}"
        );
        assert!(
            peak <= RSS_BOUND,
            "{what}: host peak RSS {peak} bytes, over the bound of {RSS_BOUND}"
        );
        let (fds, temps) = self.sampler.peaks();
        eprintln!(
            "{what}: host peak RSS {:.1} MiB, at most {fds} descriptors and {temps} on temp files",
            peak as f64 / f64::from(1 << 20)
        );
        peak
    }

    /// The reasons the host's sessions closed that contain `needle`, one line per session: its
    /// transport's, at debug level (not the warning, which a log limit may hold back).
    fn ended(&self, needle: &str) -> Vec<String> {
        self.a
            .log("host.log")
            .lines()
            .filter(|l| l.contains("session closed reason=") && l.contains(needle))
            .map(String::from)
            .collect()
    }
}

/// A chunk of `len` random bytes (from `seed`), whole and valid: it hashes to its id.
fn unique_chunk(seed: u64, len: usize) -> WireContent {
    let data = noise(len, seed);
    let hash = vmsync_core::digest::hash_chunk(&data);
    WireContent::Whole(vmsync_protocol::chunk::encode_chunk(hash, &data, 0))
}

/// A hash no chunk anyone holds has: 32 bytes from a counter.
fn made_up_hash(n: u64) -> Hash {
    let mut h = [0xa5u8; 32];
    h[..8].copy_from_slice(&n.to_le_bytes());
    Hash(h)
}

/// A guest that answers the host's requests for chunks with floods of unique, valid chunks it
/// was never asked for: first a full batch (1,024 chunks of 64 KiB, 64 MiB) where fewer were
/// asked, twice; then as many as asked, of the lengths asked, but none of them the chunk asked
/// for, twice. And as the destination of a host file, it answers the host's `Stage` with the
/// file's real missing chunks plus as many made-up ones as a file may have (2 Mi). Every
/// read flood is refused and ends the session; the made-up missing chunks are ignored (the
/// host supplies only chunks of the file's own manifest); nothing of the floods lands, no temp
/// file stays, and once the guest answers honestly its files land and the host's reaches it.
#[test]
fn a_guest_flooding_unique_chunks_is_refused_and_nothing_lands() {
    const FLOODS: u32 = 2;
    let share = Arc::new(FakeShare::default());
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("g{i}.bin"), noise(300_000, i)))
        .collect();
    for (name, data) in &files {
        share.add_file(name, data);
    }
    let host_file = noise(200_000, 99);
    let (host_manifest, host_meta) = manifest_of(&host_file);
    let (more, unasked, stage) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let seeds = Arc::new(AtomicU64::new(1 << 40));
    let answer = {
        let (share, more, unasked, stage) =
            (share.clone(), more.clone(), unasked.clone(), stage.clone());
        move |_: u32, req: &Request| match &req.body {
            RequestBody::ReadChunks { .. } if more.load(Ordering::Relaxed) < FLOODS => {
                share.note(req);
                more.fetch_add(1, Ordering::Relaxed);
                let chunks = (0..MAX_BATCH_CHUNKS)
                    .map(|_| {
                        Some(unique_chunk(
                            seeds.fetch_add(1, Ordering::Relaxed),
                            64 << 10,
                        ))
                    })
                    .collect();
                respond(req, ResponseBody::Chunks(Ok(chunks)))
            }
            RequestBody::ReadChunks { reads } if unasked.load(Ordering::Relaxed) < FLOODS => {
                share.note(req);
                unasked.fetch_add(1, Ordering::Relaxed);
                let chunks = reads
                    .iter()
                    .map(|r| {
                        let seed = seeds.fetch_add(1, Ordering::Relaxed);
                        Some(unique_chunk(seed, r.read.chunk.len as usize))
                    })
                    .collect();
                respond(req, ResponseBody::Chunks(Ok(chunks)))
            }
            RequestBody::Stage { .. } if stage.load(Ordering::Relaxed) < FLOODS => {
                stage.fetch_add(1, Ordering::Relaxed);
                let Answer::Message(Message::Response(Response {
                    id,
                    body: ResponseBody::Staged(Ok(mut answers)),
                })) = share.answer(req)
                else {
                    panic!("the fake share answers Stage with Staged");
                };
                for a in &mut answers {
                    if let StageAnswer::Missing(missing) = a {
                        let room = vmsync_protocol::limits::MAX_FILE_CHUNKS - missing.len();
                        missing.extend((0..room as u64).map(|n| {
                            vmsync_core::endpoint::MissingChunk {
                                hash: made_up_hash(n),
                                base: None,
                            }
                        }));
                    }
                }
                Answer::Message(Message::Response(Response {
                    id,
                    body: ResponseBody::Staged(Ok(answers)),
                }))
            }
            _ => share.answer(req),
        }
    };
    let mut s = attack(
        "",
        None,
        Some("debug"),
        |a| std::fs::write(a.host_dir.join("h.bin"), &host_file).unwrap(),
        answer,
    );
    // Every flood went out, and then the guest's files landed.
    let landed = eventually(Duration::from_secs(120), || {
        files
            .iter()
            .all(|(name, data)| std::fs::read(s.a.host_dir.join(name)).ok().as_ref() == Some(data))
    });
    assert!(landed, "host log:\n{}", s.a.log_tail("host.log", 60));
    eprintln!(
        "floods: {} more, {} unasked, {} stage; {} sessions",
        more.load(Ordering::Relaxed),
        unasked.load(Ordering::Relaxed),
        stage.load(Ordering::Relaxed),
        s.guest.sessions()
    );
    assert_eq!(more.load(Ordering::Relaxed), FLOODS);
    assert_eq!(unasked.load(Ordering::Relaxed), FLOODS);
    // Each read flood was refused and ended its session; the stage floods did not.
    let more_ended = s.ended("answered ");
    assert_eq!(more_ended.len(), FLOODS as usize, "{more_ended:#?}");
    assert!(
        more_ended
            .iter()
            .all(|l| l.contains("chunk reads with 1024 results")),
        "{more_ended:#?}"
    );
    let unasked_ended = s.ended("for a read of");
    assert_eq!(unasked_ended.len(), FLOODS as usize, "{unasked_ended:#?}");
    assert!(s.guest.sessions() > 2 * FLOODS);
    // The host's file reached the guest, and the host supplied only chunks of its manifest,
    // never one of the made-up ones.
    let reached = eventually(
        Duration::from_secs(30),
        || matches!(share.entry("h.bin"), Some(vmsync_core::Entry::File(m)) if m.digest == host_meta.digest),
    );
    assert!(reached, "{}", s.a.log_tail("host.log", 60));
    // It was staged on the guest under a stage flood at least once (it lands in the session of
    // the first one, unless a read flood ended that session before its transition).
    assert!(stage.load(Ordering::Relaxed) >= 1);
    let own: std::collections::HashSet<Hash> =
        host_manifest.chunks.iter().map(|c| c.hash).collect();
    let supplied = share.supplied();
    assert!(!supplied.is_empty());
    assert!(
        supplied.iter().all(|h| own.contains(h)),
        "the host supplied a chunk it was not sending"
    );
    // Nothing else is in the host's share, and no temp file is held open any more.
    let mut names: Vec<String> = std::fs::read_dir(&s.a.host_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n != ".vmsync")
        .collect();
    names.sort();
    assert_eq!(names, ["g0.bin", "g1.bin", "g2.bin", "h.bin"]);
    assert_eq!(
        std::fs::read(s.a.host_dir.join("h.bin")).unwrap(),
        host_file
    );
    let pid = s.host.pid();
    let released = eventually(Duration::from_secs(30), || {
        temp_fds(pid, &s.a.host_dir) == 0
    });
    assert!(released, "{:#?}", fd_targets(pid));
    assert!(share.asked(RequestKind::ReadChunks) > 2 * FLOODS as usize);
    s.check("chunk floods");
}

/// Every path under `dir` (`.vmsync` left out), sorted.
fn share_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = vmsync_tests::fixture::tree(dir)
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .collect();
    names.sort();
    names
}

/// A hostile guest listing 200,000 files in one directory, with a host whose share allows
/// 100,000 (`quota_files`): the cycle plans them and pauses the share with `quota` before it
/// fetches anything (no manifest, no chunk is asked for), the host's memory stays under the
/// bound, and once the guest's directory shrinks to 2,000 files the pause lifts by itself and
/// they land.
#[test]
fn a_listing_of_200000_entries_in_one_directory_is_held_to_the_quota() {
    let share = Arc::new(FakeShare::default());
    for i in 0..200_000 {
        share.add_file(&format!("d/f{i:06}"), format!("{i}\n").as_bytes());
    }
    let answer = {
        let share = share.clone();
        move |_: u32, req: &Request| share.answer(req)
    };
    let mut s = attack("quota_files = 100000", None, Some("info"), |_| {}, answer);
    let paused = eventually(Duration::from_secs(120), || {
        share_status(&s.a)["halt_code"] == "quota"
    });
    assert!(paused, "{}\n{}", s.a.share(), s.a.log_tail("host.log", 40));
    let reason = s.a.share()["halt_reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("200000 files, over quota_files (100000)"),
        "{reason}"
    );
    assert_eq!(share.asked(RequestKind::Manifests), 0);
    assert_eq!(share.asked(RequestKind::ReadChunks), 0);
    assert_eq!(share_names(&s.a.host_dir), Vec::<String>::new());
    s.check("200,000 entries listed");
    // The guest's directory shrinks; the next cycle (`sync` asks for it) fits and lifts the
    // pause.
    let fewer: Vec<(String, Vec<u8>)> = (0..2_000)
        .map(|i| (format!("d/f{i:06}"), format!("{i}\n").into_bytes()))
        .collect();
    share.set_files(fewer.iter().map(|(p, d)| (p.as_str(), d.as_slice())));
    let out = s.a.host_cmd(&["sync"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let landed = eventually(Duration::from_secs(60), || {
        count_files(&s.a.host_dir.join("d")) == 2_000
    });
    assert!(landed, "{}", s.a.log_tail("host.log", 40));
    for i in (0..2_000).step_by(97) {
        let data = std::fs::read(s.a.host_dir.join(format!("d/f{i:06}"))).unwrap();
        assert_eq!(data, format!("{i}\n").as_bytes());
    }
    assert_eq!(s.a.share()["halt_code"], serde_json::Value::Null);
    s.check("200,000 entries listed, then 2,000");
}

/// The host's fd limit in [`a_guest_announcing_100000_files_and_serving_none_leaks_nothing`],
/// and the staged files it allows: a quarter of it (`max_staged_files`, agent-common).
const HOST_FD_LIMIT: u32 = 1024;
const HOST_MAX_STAGED: usize = HOST_FD_LIMIT as usize / 4;

/// A hostile guest that lists 100,000 files, answers for their manifests, and never serves a
/// chunk of any (each read: "changed on disk"). The host, at an fd limit of 1,024, stages them
/// batch by batch and holds each unfinished one open until its next full scan: 256 (a quarter
/// of the limit) at most, the rest refused with "no room" and listed as problems; no
/// descriptor is exhausted, memory stays under the bound, nothing lands. Once the guest serves
/// its files, they land, and every temp file of the unfinished ones is closed.
#[test]
fn a_guest_announcing_100000_files_and_serving_none_leaks_nothing() {
    const FILES: usize = 100_000;
    let share = Arc::new(FakeShare::default());
    for i in 0..FILES {
        share.add_file(
            &format!("n/f{i:06}"),
            format!("never finished {i}\n").as_bytes(),
        );
    }
    let serve = Arc::new(AtomicBool::new(false));
    let answer = {
        let (share, serve) = (share.clone(), serve.clone());
        move |_: u32, req: &Request| match &req.body {
            RequestBody::ReadChunks { reads } if !serve.load(Ordering::Relaxed) => {
                share.note(req);
                respond(req, ResponseBody::Chunks(Ok(vec![None; reads.len()])))
            }
            _ => share.answer(req),
        }
    };
    let mut s = attack("", Some(HOST_FD_LIMIT), Some("info"), |_| {}, answer);
    let no_room = vmsync_core::endpoint::NotStaged::NO_ROOM_REASON;
    let refused = |s: &Attack| {
        share_status(&s.a)["problems"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["reason"] == no_room).count())
    };
    // Every file past the cap refused, once the cycle has been through them all.
    let went_through = eventually(Duration::from_secs(300), || {
        refused(&s) >= FILES - HOST_MAX_STAGED
    });
    assert!(went_through, "{}", s.a.log_tail("host.log", 40));
    let problems = s.a.share()["problems"].as_array().unwrap().len();
    let (fds, temps) = s.sampler.peaks();
    eprintln!(
        "{FILES} files announced: {} refused with no room, {problems} problems; at most {fds} \
         descriptors, {temps} on temp files; {} reads",
        refused(&s),
        share.asked(RequestKind::ReadChunks)
    );
    assert!(temps <= HOST_MAX_STAGED, "{temps} temp files open at once");
    assert!(temps > 0, "the host staged nothing");
    assert!(fds < HOST_FD_LIMIT as usize);
    let log = s.a.log("host.log");
    assert!(!log.contains("Too many open files"), "{log}");
    // Only the directory (made before any content is fetched) is there, empty.
    assert_eq!(share_names(&s.a.host_dir), ["n"]);
    assert!(s.a.host_dir.join("n").is_dir());
    s.check("100,000 files announced");
    // The guest now serves what it lists, and lists fewer: they land, and nothing of the
    // unfinished files is left open.
    let fewer: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| (format!("n/f{i:06}"), format!("finished {i}\n").into_bytes()))
        .collect();
    share.set_files(fewer.iter().map(|(p, d)| (p.as_str(), d.as_slice())));
    serve.store(true, Ordering::Relaxed);
    let out = s.a.host_cmd(&["sync"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let landed = eventually(Duration::from_secs(60), || {
        count_files(&s.a.host_dir.join("n")) == 100
    });
    assert!(landed, "{}", s.a.log_tail("host.log", 40));
    assert_eq!(
        std::fs::read(s.a.host_dir.join("n/f000042")).unwrap(),
        b"finished 42\n"
    );
    let pid = s.host.pid();
    let released = eventually(Duration::from_secs(30), || {
        temp_fds(pid, &s.a.host_dir) == 0
    });
    assert!(released, "{:#?}", fd_targets(pid));
    s.check("100,000 files announced, then 100 served");
}

// ---------------------------------------------------------------- the guest against a hostile host

/// The real guest agent (`fd_limit`, if any) against a hostile host ([`HostileHost`]) on its
/// listening socket, an `OUT` directory beside its share, and a sampler of its descriptors.
struct GuestAttack {
    sampler: Sampler,
    out: PathBuf,
    before: Snapshot,
    pid: u32,
    a: Agents,
}

fn guest_attack(fd_limit: Option<u32>) -> GuestAttack {
    let mut a = Agents::new("");
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    a.guest_fd_limit = fd_limit;
    a.start_guest();
    let mut pid = None;
    let up = eventually(Duration::from_secs(30), || {
        let out = Command::new(bin("vmsync-guest"))
            .args(["status", "--json", "--config"])
            .arg(&a.guest_toml)
            .output()
            .unwrap();
        if out.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            pid = status["agent"]["pid"].as_u64();
        }
        pid.is_some()
    });
    // The control socket answers first; the listening socket is in place once it listens.
    let listening = eventually(Duration::from_secs(30), || {
        a.tmp.path().join("guest.sock").exists()
    });
    assert!(up && listening, "{}", a.log("guest.log"));
    let pid = pid.unwrap() as u32;
    let sampler = Sampler::start(pid, a.guest_dir.clone());
    GuestAttack {
        a,
        out,
        before,
        pid,
        sampler,
    }
}

impl GuestAttack {
    /// A hostile host on the guest's socket, past the handshake, after a full scan (a share is
    /// served only once scanned).
    fn host(&self) -> HostileHost {
        let (mut h, welcome) = HostileHost::connect(&self.a.tmp.path().join("guest.sock"), "src")
            .expect("connect to the guest agent");
        assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
        let scanned = h
            .call(RequestBody::ScanFull {
                options: Default::default(),
                base: None,
            })
            .unwrap();
        assert!(
            matches!(scanned, ResponseBody::ScanDelta(Ok(_))),
            "{scanned:?}"
        );
        h
    }

    /// The guest is alive and answers `status`, OUT is unchanged, and its peak RSS is under the
    /// bound the host has (the same decoders and caps).
    fn check(&self, what: &str) {
        let status = self.a.guest_status();
        assert_eq!(status["shares"][0]["name"], "src", "{what}: {status}");
        assert_eq!(snapshot(&self.out), self.before, "{what}: OUT changed");
        let peak = peak_rss(self.pid).expect("the guest agent is running");
        assert!(peak <= RSS_BOUND, "{what}: guest peak RSS {peak}");
        let (fds, temps) = self.sampler.peaks();
        eprintln!(
            "{what}: guest peak RSS {:.1} MiB, at most {fds} descriptors and {temps} on temp files",
            peak as f64 / f64::from(1 << 20)
        );
    }

    /// A real host connects (or reconnects), and a file written in its share reaches the guest.
    fn real_host_syncs(&mut self, name: &str) {
        std::fs::write(
            self.a.host_dir.join(name),
            format!("{name} from the real host\n"),
        )
        .unwrap();
        if self.a.host_pid().is_none() {
            self.a.start_host();
        }
        let path = self.a.guest_dir.join(name);
        let synced = eventually(Duration::from_secs(60), || {
            std::fs::read(&path).ok() == Some(format!("{name} from the real host\n").into_bytes())
        });
        assert!(
            synced,
            "{name} did not reach the guest\n--- host.log\n{}\n--- guest.log\n{}",
            self.a.log_tail("host.log", 30),
            self.a.log_tail("guest.log", 30)
        );
    }
}

/// `data` as the `Stage` request of one file at `path`.
fn stage_file(path: &str, data: &[u8]) -> (StageFile, FileMeta) {
    let (manifest, meta) = manifest_of(data);
    let file = StageFile {
        path: RelPath::from_bytes(path.as_bytes()).unwrap(),
        meta,
        manifest: ManifestForm::Full(manifest),
    };
    (file, meta)
}

/// `data`'s chunks, whole, as a `Supply` request.
fn supply_of(data: &[u8]) -> RequestBody {
    let (manifest, _) = manifest_of(data);
    let chunks = manifest
        .chunks
        .iter()
        .map(|c| {
            let bytes = &data[c.offset as usize..c.offset as usize + c.len as usize];
            WireContent::Whole(vmsync_protocol::chunk::encode_chunk(c.hash, bytes, 0))
        })
        .collect();
    RequestBody::Supply { chunks }
}

/// Stages `data` at `path` on the guest and supplies its chunks; returns its metadata.
fn put(h: &mut HostileHost, path: &str, data: &[u8]) -> FileMeta {
    let (file, meta) = stage_file(path, data);
    let staged = h.call(RequestBody::Stage { files: vec![file] }).unwrap();
    assert!(
        matches!(&staged, ResponseBody::Staged(Ok(a)) if matches!(a[..], [StageAnswer::Missing(_)])),
        "{staged:?}"
    );
    let supplied = h.call(supply_of(data)).unwrap();
    assert_eq!(supplied, ResponseBody::Supplied(Ok(vec![])));
    meta
}

/// The outcomes of a `Transition` answer.
fn outcomes(body: ResponseBody) -> Vec<Outcome> {
    match body {
        ResponseBody::Transitioned(Ok(o)) => o,
        other => panic!("expected outcomes, got {other:?}"),
    }
}

fn change(path: &str, expected: Option<FileMeta>, new: Option<FileMeta>) -> Change {
    Change {
        path: RelPath::from_bytes(path.as_bytes()).unwrap(),
        expected: expected.map(Entry::File),
        new: new.map(Entry::File),
    }
}

/// A hostile host that stages 100,000 files on the real guest agent (fd limit 1,024) and never
/// supplies a chunk of any: the guest stages 256 (a quarter of its limit) and answers "no
/// room" for the other 99,744, holds exactly those 256 temp files open, stays within the
/// memory bound; a commit of one of them is refused (incomplete); and the next host's first
/// full scan closes them all, leaving no temp file, before that host's file lands.
#[test]
fn a_host_staging_100000_files_and_finishing_none_leaks_nothing_on_the_guest() {
    const FILES: usize = 100_000;
    const GUEST_FD_LIMIT: u32 = 1024;
    let mut g = guest_attack(Some(GUEST_FD_LIMIT));
    let mut h = g.host();
    let files: Vec<(StageFile, FileMeta)> = (0..FILES)
        .map(|i| {
            stage_file(
                &format!("f{i:06}"),
                format!("never supplied {i}\n").as_bytes(),
            )
        })
        .collect();
    let mut answers = Vec::new();
    for batch in files.chunks(vmsync_protocol::limits::MAX_BATCH_FILES) {
        let files = batch.iter().map(|(f, _)| f.clone()).collect();
        match h.call(RequestBody::Stage { files }).unwrap() {
            ResponseBody::Staged(Ok(a)) => answers.extend(a),
            other => panic!("{other:?}"),
        }
    }
    let cap = GUEST_FD_LIMIT as usize / 4;
    let staged = answers
        .iter()
        .filter(|a| matches!(a, StageAnswer::Missing(m) if m.len() == 1))
        .count();
    let no_room = answers
        .iter()
        .filter(|a| **a == StageAnswer::NoRoom)
        .count();
    assert_eq!((staged, no_room), (cap, FILES - cap));
    assert!(matches!(answers[cap - 1], StageAnswer::Missing(_)));
    assert_eq!(temp_fds(g.pid, &g.a.guest_dir), cap);
    // Committing one of them: refused, it is incomplete.
    let (first, meta) = &files[0];
    let _ = first;
    let done = outcomes(
        h.call(RequestBody::Transition {
            changes: vec![change("f000000", None, Some(*meta))],
        })
        .unwrap(),
    );
    assert!(
        matches!(&done[..], [Outcome::Failed(why)] if why.contains("incomplete")),
        "{done:?}"
    );
    assert_eq!(share_names(&g.a.guest_dir), Vec::<String>::new());
    let (_, peak_temps) = g.sampler.peaks();
    assert!(peak_temps <= cap, "{peak_temps} temp files open at once");
    g.check("100,000 files staged");
    // The hostile host goes; the next host's full scan drops what it left.
    drop(h);
    g.real_host_syncs("real.txt");
    let released = eventually(Duration::from_secs(30), || {
        temp_fds(g.pid, &g.a.guest_dir) == 0
    });
    assert!(released, "{:#?}", fd_targets(g.pid));
    assert_eq!(
        named_temps(&g.a.guest_dir),
        Vec::<std::ffi::OsString>::new()
    );
    assert_eq!(share_names(&g.a.guest_dir), ["real.txt"]);
    g.check("100,000 files staged, then a real host");
}

/// A hostile host replays transition requests, verbatim (the same request id) and under new
/// ids: a create, a replacement and a deletion. Each is applied once: its replay finds the path
/// no longer as it expects and answers `Changed`, nothing is applied twice, and the guest's
/// trash holds each replaced or deleted version exactly once. The session stays up (a replay
/// is a stale request, not a violation) and the guest still serves a real host.
#[test]
fn a_replayed_transition_request_is_applied_once() {
    let mut g = guest_attack(None);
    let mut h = g.host();
    let (one, two) = (
        b"first version\n".as_slice(),
        b"second version\n".as_slice(),
    );
    let transition = |h: &mut HostileHost, id: u64, c: Change| {
        h.send(id, RequestBody::Transition { changes: vec![c] })
            .unwrap();
        outcomes(h.answer_to(id).unwrap())
    };
    let changed = |o: &[Outcome]| matches!(o, [Outcome::Changed(_)]);
    // Create f.
    let m1 = put(&mut h, "f", one);
    let create = change("f", None, Some(m1));
    let create_id = h.id();
    assert_eq!(
        transition(&mut h, create_id, create.clone()),
        [Outcome::Applied]
    );
    for id in [create_id, h.id()] {
        let o = transition(&mut h, id, create.clone());
        assert!(changed(&o), "a replayed create: {o:?}");
    }
    assert_eq!(std::fs::read(g.a.guest_dir.join("f")).unwrap(), one);
    // Replace it.
    let m2 = put(&mut h, "f", two);
    let replace = change("f", Some(m1), Some(m2));
    let replace_id = h.id();
    assert_eq!(
        transition(&mut h, replace_id, replace.clone()),
        [Outcome::Applied]
    );
    for (id, c) in [
        (replace_id, replace.clone()),
        (h.id(), replace.clone()),
        (create_id, create.clone()),
    ] {
        let o = transition(&mut h, id, c);
        assert!(changed(&o), "a replay after the replacement: {o:?}");
    }
    assert_eq!(std::fs::read(g.a.guest_dir.join("f")).unwrap(), two);
    // Delete it.
    let delete = change("f", Some(m2), None);
    let delete_id = h.id();
    assert_eq!(
        transition(&mut h, delete_id, delete.clone()),
        [Outcome::Applied]
    );
    for (id, c) in [
        (delete_id, delete.clone()),
        (h.id(), delete),
        (replace_id, replace),
        (create_id, create),
    ] {
        let o = transition(&mut h, id, c);
        assert!(
            changed(&o) || matches!(&o[..], [Outcome::Failed(_)]),
            "a replay after the deletion: {o:?}"
        );
        assert_ne!(o, [Outcome::Applied], "applied twice");
    }
    assert!(!g.a.guest_dir.join("f").exists());
    let kept: Vec<Vec<u8>> = g.a.guest_trash().into_iter().map(|(_, d)| d).collect();
    let mut want = vec![one.to_vec(), two.to_vec()];
    want.sort();
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    assert_eq!(kept_sorted, want, "each version kept once");
    assert_eq!(h.call(RequestBody::Ping).unwrap(), ResponseBody::Pong);
    g.check("replayed transitions");
    drop(h);
    g.real_host_syncs("real.txt");
    g.check("replayed transitions, then a real host");
}

/// A hostile host commits files it never staged, or staged elsewhere or otherwise: a file never
/// announced, a file staged at one path committed at another, a staged file committed with
/// another content's digest, a staged file whose chunks never came, and a metadata change of a
/// file that is not there. Each is refused (`Failed` with the reason, or `Changed`), nothing is
/// made in the guest's share, the session goes on, and the file staged properly then commits
/// at its own path.
#[test]
fn commits_for_files_never_staged_are_refused_and_change_nothing() {
    let mut g = guest_attack(None);
    let mut h = g.host();
    let staged = b"staged and supplied\n".as_slice();
    let m_staged = put(&mut h, "staged", staged);
    let (_, m_ghost) = manifest_of(b"never announced\n");
    let (half, m_half) = stage_file("half", b"staged, never supplied\n");
    let answer = h.call(RequestBody::Stage { files: vec![half] }).unwrap();
    assert!(
        matches!(&answer, ResponseBody::Staged(Ok(a)) if matches!(a[..], [StageAnswer::Missing(_)]))
    );
    let mut other = m_staged;
    other.mode = 0o600;
    let done = outcomes(
        h.call(RequestBody::Transition {
            changes: vec![
                change("ghost", None, Some(m_ghost)),
                change("elsewhere", None, Some(m_staged)),
                change("staged", None, Some(m_ghost)),
                change("half", None, Some(m_half)),
                change("absent", Some(m_staged), Some(other)),
            ],
        })
        .unwrap(),
    );
    let reason = |o: &Outcome| match o {
        Outcome::Failed(why) => why.clone(),
        other => format!("{other:?}"),
    };
    assert_eq!(reason(&done[0]), "content was not staged");
    assert_eq!(reason(&done[1]), "content was not staged");
    assert_eq!(reason(&done[2]), "content was not staged");
    assert_eq!(reason(&done[3]), "staged file is incomplete");
    assert_eq!(done[4], Outcome::Changed(None));
    assert_eq!(share_names(&g.a.guest_dir), Vec::<String>::new());
    // The session goes on: the file staged at its own path commits.
    let done = outcomes(
        h.call(RequestBody::Transition {
            changes: vec![change("staged", None, Some(m_staged))],
        })
        .unwrap(),
    );
    assert_eq!(done, [Outcome::Applied]);
    assert_eq!(share_names(&g.a.guest_dir), ["staged"]);
    assert_eq!(std::fs::read(g.a.guest_dir.join("staged")).unwrap(), staged);
    g.check("commits for unannounced files");
    drop(h);
    g.real_host_syncs("real.txt");
}

/// `payload` with the 32 bytes of `hash`, where they first occur, cut to 31 (`grow`: to 33, a
/// byte added): a hash field of the wrong length, as a hostile peer would send it.
fn wrong_length(mut payload: Vec<u8>, hash: &Hash, grow: bool) -> Vec<u8> {
    let at = payload
        .windows(32)
        .position(|w| w == hash.as_bytes())
        .expect("the hash is in the message");
    if grow {
        payload.insert(at + 32, 0x5a);
    } else {
        payload.remove(at + 31);
    }
    payload
}

/// A hostile host sends requests whose hash fields are a byte short or a byte long: a chunk id
/// in a `Stage` manifest, a digest in a `Transition`. The message fails to decode and the guest
/// ends the session at once: nothing is staged or committed, and it serves the next host.
#[test]
fn requests_with_hash_fields_of_the_wrong_length_end_the_session() {
    let mut g = guest_attack(None);
    let data = b"a file whose hashes are mangled\n".as_slice();
    let (file, meta) = stage_file("f", data);
    let ManifestForm::Full(manifest) = &file.manifest else {
        unreachable!()
    };
    let chunk = manifest.chunks[0].hash;
    let stage = Message::Request(Request {
        id: 1,
        share: 0,
        body: RequestBody::Stage {
            files: vec![file.clone()],
        },
    });
    let commit = Message::Request(Request {
        id: 2,
        share: 0,
        body: RequestBody::Transition {
            changes: vec![change("f", None, Some(meta))],
        },
    });
    let cases = [
        (
            "a short chunk id",
            postcard::to_allocvec(&stage).unwrap(),
            chunk,
            false,
        ),
        (
            "a long chunk id",
            postcard::to_allocvec(&stage).unwrap(),
            chunk,
            true,
        ),
        (
            "a short digest",
            postcard::to_allocvec(&commit).unwrap(),
            meta.digest,
            false,
        ),
        (
            "a long digest",
            postcard::to_allocvec(&commit).unwrap(),
            meta.digest,
            true,
        ),
    ];
    for (what, payload, hash, grow) in cases {
        let mut h = g.host();
        h.send_payload(&wrong_length(payload, &hash, grow)).unwrap();
        assert!(
            h.ended(Duration::from_secs(20)),
            "{what}: the session goes on"
        );
        assert_eq!(temp_fds(g.pid, &g.a.guest_dir), 0, "{what}");
        assert_eq!(share_names(&g.a.guest_dir), Vec::<String>::new(), "{what}");
    }
    // The sessions ended on the decoder ("the peer sent bad data"; one replaced by the next
    // connection before it logged is not logged at all).
    let said = eventually(Duration::from_secs(10), || {
        g.a.log("guest.log")
            .lines()
            .any(|l| l.contains("host session ended") && l.contains("bad data"))
    });
    assert!(said, "{}", g.a.log("guest.log"));
    g.check("hash fields of the wrong length");
    g.real_host_syncs("real.txt");
}

/// A hostile guest answers with hash fields a byte short or long: a chunk id in its
/// `Manifests` answer (twice: short, long), then a file digest in its listing (twice). A hash
/// has no length on the wire, so what follows shifts: the message fails to decode (the session
/// ends) or decodes into other values that the hash checks refuse (a manifest that does not
/// hash to the file's digest is not staged; a listing's digest no manifest matches brings
/// nothing). Either way nothing lands while the guest mangles, OUT is unchanged, and once it
/// answers properly its file lands.
#[test]
fn answers_with_hash_fields_of_the_wrong_length_are_refused() {
    let data = noise(100_000, 7);
    let (manifest, meta) = manifest_of(&data);
    let share = Arc::new(FakeShare::default());
    share.add_file("g.bin", &data);
    // (session, what) of each mangled answer, and whether the file had landed by then.
    let mangled = Arc::new(std::sync::Mutex::new(Vec::<(u32, String)>::new()));
    let early = Arc::new(AtomicBool::new(false));
    let mut a = Agents::new("");
    let host_file = a.host_dir.join("g.bin");
    let answer = {
        let (share, mangled, early) = (share.clone(), mangled.clone(), early.clone());
        let chunk = manifest.chunks[1].hash;
        let (manifests, listings) = (AtomicU32::new(0), AtomicU32::new(0));
        move |session: u32, req: &Request| {
            let honest = share.answer(req);
            let (hash, grow, what) = match &req.body {
                RequestBody::Manifests { .. } if manifests.load(Ordering::Relaxed) < 2 => {
                    let n = manifests.fetch_add(1, Ordering::Relaxed);
                    (chunk, n == 1, "a chunk id in a manifest")
                }
                RequestBody::ScanFull { .. }
                    if manifests.load(Ordering::Relaxed) == 2
                        && listings.load(Ordering::Relaxed) < 2 =>
                {
                    let n = listings.fetch_add(1, Ordering::Relaxed);
                    (meta.digest, n == 1, "a file digest in a listing")
                }
                _ => return honest,
            };
            let Answer::Message(m) = honest else {
                return honest;
            };
            early.fetch_or(host_file.exists(), Ordering::Relaxed);
            let how = if grow { "long" } else { "short" };
            mangled
                .lock()
                .unwrap()
                .push((session, format!("{what}, a byte {how}")));
            Answer::Payload(wrong_length(
                postcard::to_allocvec(&m).unwrap(),
                &hash,
                grow,
            ))
        }
    };
    // Built by hand: `attack` makes its own Agents.
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    let guest = HostileGuest::start_counted(&a.tmp.path().join("guest.sock"), answer);
    a.start_host();
    let landed = eventually(Duration::from_secs(90), || {
        std::fs::read(a.host_dir.join("g.bin")).ok().as_ref() == Some(&data)
    });
    assert!(
        landed,
        "{:?}\n{}",
        mangled.lock().unwrap(),
        a.log_tail("host.log", 40)
    );
    let mangled = mangled.lock().unwrap().clone();
    eprintln!(
        "mangled answers (session, field): {mangled:?}; {} sessions",
        guest.sessions()
    );
    assert_eq!(mangled.len(), 4, "{mangled:?}");
    assert!(
        !early.load(Ordering::Relaxed),
        "the file landed while the guest mangled"
    );
    assert_eq!(share_names(&a.host_dir), ["g.bin"]);
    assert_eq!(snapshot(&out), before, "OUT changed");
    let peak = peak_rss(a.host_pid().unwrap()).unwrap();
    assert!(peak <= RSS_BOUND, "{peak}");
    assert_eq!(a.status()["shares"][0]["name"], "src");
}

// ---------------------------------------------------------------- connection floods

/// `Hello` framed, and cut in the middle of its body: a handshake dropped half-way.
fn half_a_hello() -> Vec<u8> {
    let hello = Message::Hello(vmsync_protocol::handshake::hello(
        "flood",
        vec![vmsync_protocol::ShareOpen {
            name: "src".into(),
            ignore: vec![],
            respect_gitignore: false,
        }],
    ));
    let body = postcard::to_allocvec(&hello).unwrap();
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body[..body.len() / 2]);
    bytes
}

/// The guest agent's pid, from its `status`.
fn guest_pid(a: &Agents) -> u32 {
    a.guest_status()["agent"]["pid"].as_u64().unwrap() as u32
}

/// Writes `name` in the host's share and waits (60 s at most) for it to reach the guest.
fn lands_on_the_guest(a: &Agents, name: &str) -> bool {
    let data = format!("{name}\n");
    std::fs::write(a.host_dir.join(name), &data).unwrap();
    eventually(Duration::from_secs(60), || {
        std::fs::read(a.guest_dir.join(name)).ok() == Some(data.clone().into_bytes())
    })
}

/// Thousands of connections at the guest agent's listening socket (its fd limit 1,024): 2,000
/// that send half a `Hello` and hang up, then 2,000 held open (half silent, half with half a
/// `Hello`). The guest serves one host at a time, and each new connection replaces the last, so
/// once the burst is accepted it holds none of them: its descriptors are back to what they were
/// while all 2,000 are still held. It stays up, within the memory bound, and the real host
/// (whose session the flood replaced) reconnects and its edits land, during the flood and after.
#[test]
fn a_connection_flood_at_the_guest_listener_costs_the_guest_nothing() {
    const FLOOD: usize = 2_000;
    let mut a = Agents::new("");
    a.guest_fd_limit = Some(1024);
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    a.start();
    a.wait_in_sync();
    assert!(lands_on_the_guest(&a, "before.txt"));
    let pid = guest_pid(&a);
    let baseline = fd_count(pid);
    let sampler = Sampler::start(pid, a.guest_dir.clone());
    let sock = a.tmp.path().join("guest.sock");
    let half = half_a_hello();
    let started = Instant::now();
    for _ in 0..FLOOD {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = std::io::Write::write_all(&mut c, &half);
    }
    let held: Vec<std::os::unix::net::UnixStream> = (0..FLOOD)
        .map(|i| {
            let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            if i % 2 == 0 {
                let _ = std::io::Write::write_all(&mut c, &half);
            }
            c
        })
        .collect();
    let took = started.elapsed();
    assert!(
        lands_on_the_guest(&a, "during.txt"),
        "{}",
        a.log_tail("host.log", 30)
    );
    // Held by the flood, not by the guest.
    let released = eventually(Duration::from_secs(30), || fd_count(pid) <= baseline + 2);
    assert!(
        released,
        "{} descriptors, {baseline} before the flood",
        fd_count(pid)
    );
    let (fds, _) = sampler.peaks();
    drop(held);
    assert!(
        lands_on_the_guest(&a, "after.txt"),
        "{}",
        a.log_tail("host.log", 30)
    );
    assert_eq!(guest_pid(&a), pid, "the guest agent restarted");
    assert_eq!(snapshot(&out), before, "OUT changed");
    let peak = peak_rss(pid).unwrap();
    assert!(peak <= RSS_BOUND, "{peak}");
    let log = a.log("guest.log");
    eprintln!(
        "{} connections in {took:?}; guest descriptors {baseline} before, at most {fds} during \
         the burst, {} after; peak RSS {:.1} MiB; {} lines in its log ({} 'host connected'); \
         the host reconnected {} times",
        2 * FLOOD,
        fd_count(pid),
        peak as f64 / f64::from(1 << 20),
        log.lines().count(),
        log.matches("host connected").count(),
        a.status()["agent"]["reconnects"]
    );
}

/// Thousands of connections at the host agent's control socket (its fd limit 1,024): 1,000
/// silent, 1,000 with half a request line, held; 1,000 with half a line, dropped. The host
/// stays up and within the memory bound, answers `status` and keeps syncing while they are
/// still held, and its descriptors come back to what they were; and the flood never takes it
/// to its descriptor limit, where its own work (scans, staging) would fail with "Too many open
/// files".
#[test]
fn a_connection_flood_at_the_host_control_socket_costs_the_host_nothing() {
    const FLOOD: usize = 1_000;
    const LIMIT: u32 = 1024;
    let mut a = Agents::new("");
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    a.start_guest();
    let log = a.tmp.path().join("host.log");
    let mut host = Daemon::start("vmsync-host", &a.host_toml, &log, Some(LIMIT), None);
    a.wait_in_sync();
    assert!(lands_on_the_guest(&a, "before.txt"));
    let pid = host.pid();
    let baseline = fd_count(pid);
    let sampler = Sampler::start(pid, a.host_dir.clone());
    let ctl = a.tmp.path().join("host.ctl");
    let started = Instant::now();
    let mut held = Vec::new();
    for i in 0..3 * FLOOD {
        let Ok(mut c) = std::os::unix::net::UnixStream::connect(&ctl) else {
            continue;
        };
        match i % 3 {
            0 => held.push(c),
            1 => {
                let _ = std::io::Write::write_all(&mut c, b"{\"cmd\":\"sta");
                held.push(c);
            }
            _ => {
                let _ = std::io::Write::write_all(&mut c, b"{\"cmd\":\"sy");
            }
        }
    }
    let took = started.elapsed();
    assert!(
        lands_on_the_guest(&a, "during.txt"),
        "{}",
        a.log_tail("host.log", 30)
    );
    let answers = eventually(Duration::from_secs(30), || {
        share_status(&a)["name"] == "src"
    });
    assert!(answers, "no status while the flood is held");
    let (fds, _) = sampler.peaks();
    drop(held);
    let back = eventually(Duration::from_secs(30), || fd_count(pid) <= baseline + 2);
    assert!(
        back,
        "{} descriptors, {baseline} before the flood",
        fd_count(pid)
    );
    assert!(lands_on_the_guest(&a, "after.txt"));
    assert!(host.running());
    assert_eq!(snapshot(&out), before, "OUT changed");
    let peak = peak_rss(pid).unwrap();
    assert!(peak <= RSS_BOUND, "{peak}");
    let log = a.log("host.log");
    let exhausted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .collect();
    eprintln!(
        "{} connections in {took:?}; host descriptors {baseline} before, at most {fds} during \
         the flood; peak RSS {:.1} MiB; {} log lines on exhausted descriptors",
        3 * FLOOD,
        peak as f64 / f64::from(1 << 20),
        exhausted.len()
    );
    assert!(
        fds < LIMIT as usize,
        "the flood took the host to its descriptor limit ({fds} of {LIMIT}): {exhausted:#?}"
    );
    assert!(exhausted.is_empty(), "{exhausted:#?}");
}

// ---------------------------------------------------------------- the same error, over and over

/// How long [`the_same_invalid_answer_over_and_over_keeps_the_log_bounded`] keeps it up.
const REPEAT_FOR: Duration = Duration::from_secs(60);

/// A log line's cause: its level, its target and its message with every digit taken out (what
/// the line says, not which session or count it is about), up to the first `: ` after the
/// message starts (what follows is the error's own text).
fn cause(line: &str) -> String {
    let mut words = line.split_whitespace();
    let (_time, level, target) = (words.next(), words.next(), words.next());
    let message: String = words.collect::<Vec<_>>().join(" ");
    let head = message.split(": ").next().unwrap_or("");
    let head: String = head.chars().filter(|c| !c.is_ascii_digit()).collect();
    format!("{} {} {head}", level.unwrap_or(""), target.unwrap_or(""))
}

/// A hostile guest that answers the host's full scans the same wrong way for a minute,
/// connection after connection, in turns: an invalid listing (a file with mode 04755: refused
/// when decoded, which ends the session), or an error (the cycle fails) and then a hang-up at
/// the next request. The host at its default log level (`info`) must keep its log bounded as
/// engine/src/log_limit.rs promises, across connections: at most one line a minute per cause
/// (plus the one that says how many were held back); and `status` stays readable throughout.
#[test]
fn the_same_invalid_answer_over_and_over_keeps_the_log_bounded() {
    // Odd connections get the invalid listing, even ones the error and the hang-up.
    let answer = |session: u32, req: &Request| match (&req.body, session % 2 == 1) {
        (RequestBody::ScanFull { .. }, true) => {
            let m = Message::Response(Response {
                id: req.id,
                body: ResponseBody::ScanDelta(Ok(vmsync_protocol::messages::ScanDelta {
                    token: 1,
                    base: None,
                    root: Some(vmsync_tests::hostile::MARKER),
                    changed: vec![(
                        RelPath::from_bytes(b"setuid").unwrap(),
                        Entry::File(FileMeta {
                            mode: 0o4755,
                            ..manifest_of(b"x").1
                        }),
                    )],
                    removed: vec![],
                    problems: vec![],
                    ignored: vec![],
                    generation: None,
                })),
            });
            Answer::Message(m)
        }
        (RequestBody::ScanFull { .. }, false) => respond(
            req,
            ResponseBody::ScanDelta(Err(vmsync_protocol::messages::WireError {
                code: vmsync_protocol::messages::ErrorCode::Io,
                message: "the same error, again".into(),
            })),
        ),
        (RequestBody::Ping, _) => vmsync_tests::hostile::benign(req),
        (_, false) => Answer::HangUp,
        (_, true) => vmsync_tests::hostile::benign(req),
    };
    let mut s = attack("", None, None, |_| {}, answer);
    let started = Instant::now();
    let mut statuses = 0;
    while started.elapsed() < REPEAT_FOR {
        let status = share_status(&s.a);
        if status["name"] == "src" {
            statuses += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed();
    let sessions = s.guest.sessions();
    let log = s.a.log("host.log");
    let mut causes: std::collections::BTreeMap<String, usize> = Default::default();
    for line in log.lines() {
        *causes.entry(cause(line)).or_default() += 1;
    }
    eprintln!(
        "{sessions} sessions in {elapsed:?}, each refused; {} log lines; {statuses} status \
         answers; lines by cause:",
        log.lines().count()
    );
    for (cause, n) in &causes {
        eprintln!("  {n:>6} {cause}");
    }
    assert!(statuses > 0);
    // Both wrong answers were given and refused.
    assert!(sessions >= 3, "{sessions} sessions");
    assert!(
        log.contains("guest session ended") && log.contains("mode"),
        "{log}"
    );
    assert!(
        log.contains("cycle failed") && log.contains("the same error, again"),
        "{log}"
    );
    // One minute: the first line of a cause, and at most one more with the count of the rest.
    let over: Vec<_> = causes.iter().filter(|(_, n)| **n > 2).collect();
    assert!(
        over.is_empty(),
        "{sessions} sessions in {elapsed:?}: causes logged more than once a minute: {over:#?}"
    );
    s.check("the same invalid answer, over and over");
}

/// A burst of connections at the guest's listening socket (anyone who can reach it, on vsock
/// any process on the host): each replaces the session before it. 2,000 connections, up to
/// 400 of them held open by the flooder, while a real host is connected, against a guest
/// limited to 64 descriptors, faster than the guest drops the sessions they replace (it
/// reaches its limit, and `accept` fails for a moment): the guest stays up and answers
/// `status`, its descriptors go back to what they were once the flood ends, OUT is unchanged,
/// its peak RSS stays under the bound, and the real host reconnects and syncs.
#[test]
fn a_burst_of_connections_at_the_guests_listener_is_survived() {
    let mut g = guest_attack(Some(64));
    g.real_host_syncs("before.txt");
    let baseline = fd_count(g.pid);
    let sock = g.a.tmp.path().join("guest.sock");
    let done = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let (done, connected) = (done.clone(), connected.clone());
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            for _ in 0..2_000 {
                if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
                    connected.fetch_add(1, Ordering::Relaxed);
                    held.push_back(s);
                }
                if held.len() > 400 {
                    held.pop_front();
                }
            }
            drop(held);
            done.store(true, Ordering::SeqCst);
        })
    };
    let finished = eventually(Duration::from_secs(120), || done.load(Ordering::SeqCst));
    assert!(finished, "the flood did not finish: connect blocked");
    flooder.join().unwrap();
    assert!(
        connected.load(Ordering::Relaxed) > 1_000,
        "only {} connections were made",
        connected.load(Ordering::Relaxed)
    );
    let settled = eventually(Duration::from_secs(30), || fd_count(g.pid) <= baseline + 4);
    assert!(
        settled,
        "the guest holds {} descriptors, {baseline} before the flood",
        fd_count(g.pid)
    );
    g.check("a burst of 2,000 connections");
    // The flood outran the sessions' teardown: the guest reached its descriptor limit.
    let log = g.a.log("guest.log");
    assert!(
        log.contains("WARN vmsync_guest::service: accept failed"),
        "the burst never took the guest to its descriptor limit"
    );
    g.real_host_syncs("after.txt");
}
