//! A hostile guest against the real host agent: a test peer ([`vmsync_tests::hostile`]) sends
//! what `vmsync-guest` never would, at the frame and message level. Each test keeps an `OUT`
//! directory beside the host's share (files, a directory, a FIFO, a symlink) and checks that it
//! is unchanged afterwards, that the host agent refused the guest, is still running and
//! answering `status`, and reconnected; and that its peak resident memory (`VmHWM`) stayed under
//! the bound docs/security.md states. The catalogue these come from: docs/threat-model.md.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmsync_core::endpoint::ChangeHints;
use vmsync_core::limits::MAX_BATCH_PATHS;
use vmsync_core::{Entry, RelPath};
use vmsync_protocol::limits::MAX_MESSAGE_BYTES;
use vmsync_protocol::messages::ScanDelta;
use vmsync_protocol::{Message, RequestBody, Response, ResponseBody};
use vmsync_tests::agents::{eventually, Agents};
use vmsync_tests::hostile::{
    benign, make_out, peak_rss, respond, snapshot, Answer, HostileGuest, Snapshot, MARKER,
    RSS_BOUND,
};

/// The host agent against a hostile guest answering with `answer`, and an `OUT` directory
/// beside the host's share.
struct Setup {
    a: Agents,
    out: PathBuf,
    before: Snapshot,
    guest: HostileGuest,
}

fn setup(answer: impl Fn(&vmsync_protocol::Request) -> Answer + Send + Sync + 'static) -> Setup {
    let mut a = Agents::new("");
    let out = make_out(a.tmp.path());
    let before = snapshot(&out);
    // The relay forwards the host's connections to where the guest would listen.
    let guest = HostileGuest::start(&a.tmp.path().join("guest.sock"), answer);
    a.start_host();
    Setup {
        a,
        out,
        before,
        guest,
    }
}

impl Setup {
    /// The host came back `sessions` times; it is alive, answers `status`, left `OUT` and its
    /// own share alone, and its peak RSS is under the bound. Returns the peak RSS.
    fn check(&self, what: &str, sessions: u32) -> u64 {
        let came_back = eventually(Duration::from_secs(60), || {
            self.guest.sessions() >= sessions
        });
        assert!(
            came_back,
            "{what}: the host connected {} times, not {sessions}\nhost log:\n{}",
            self.guest.sessions(),
            self.a.log("host.log")
        );
        let pid = self.a.host_pid().unwrap();
        let peak = peak_rss(pid).expect("the host agent is running");
        let status = self.a.status();
        assert_eq!(status["shares"][0]["name"], "src", "{what}: {status}");
        assert_eq!(snapshot(&self.out), self.before, "{what}: OUT changed");
        let share: Vec<_> = std::fs::read_dir(&self.a.host_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".vmsync")
            .collect();
        assert!(share.is_empty(), "{what}: the host's share got {share:?}");
        assert!(
            peak <= RSS_BOUND,
            "{what}: host peak RSS {peak} bytes, over the bound of {RSS_BOUND}"
        );
        eprintln!(
            "{what}: host peak RSS {:.1} MiB",
            peak as f64 / f64::from(1 << 20)
        );
        peak
    }
}

/// One-byte paths, as many as asked, all different.
fn tiny_paths(n: usize) -> Vec<RelPath> {
    (0..n)
        .map(|i| RelPath::from_bytes(format!("p{i}").as_bytes()).unwrap())
        .collect()
}

#[test]
fn a_hint_list_over_its_bound_is_refused_and_costs_the_host_nothing() {
    let s = setup(|req| match req.body {
        RequestBody::PollChanges { .. } => respond(
            req,
            ResponseBody::Changes(Ok(ChangeHints {
                paths: tiny_paths(MAX_BATCH_PATHS + 1),
                rescan: false,
            })),
        ),
        _ => benign(req),
    });
    s.check("hints over the bound", 3);
}

#[test]
fn a_forged_frame_header_is_refused_before_anything_is_buffered() {
    let s = setup(|req| match req.body {
        // A fragment claiming 2 GiB, then nothing.
        RequestBody::PollChanges { .. } => Answer::Raw(0x7fff_ffffu32.to_be_bytes().to_vec()),
        _ => benign(req),
    });
    s.check("a 2 GiB fragment header", 3);
}

/// Paths that leave the share (`..`, absolute) in a listing: refused when the message is
/// decoded, so nothing is even planned for them.
#[test]
fn a_listing_with_paths_out_of_the_share_is_refused() {
    // Placeholders of the same length as the hostile paths, swapped in the encoded bytes.
    let swaps: [(&[u8], &[u8]); 3] = [
        (b"zzzzzzzzzz1", b"../OUT/evil"),
        (b"zzzzzzzzzz2", b"/etc/passwd"),
        (b"zzzzzzzzzz3", b"a/../../OUT"),
    ];
    let s = setup(move |req| match req.body {
        RequestBody::ScanFull { .. } => {
            let entry = vmsync_core::testing::file_entry(5);
            let changed: Vec<(RelPath, Entry)> = swaps
                .iter()
                .map(|(from, _)| (RelPath::from_bytes(from).unwrap(), entry.clone()))
                .collect();
            let m = Message::Response(Response {
                id: req.id,
                body: ResponseBody::ScanDelta(Ok(ScanDelta {
                    token: 1,
                    base: None,
                    root: Some(MARKER),
                    changed,
                    removed: vec![],
                    problems: vec![],
                    ignored: vec![],
                    generation: None,
                })),
            });
            let mut bytes = postcard::to_allocvec(&m).unwrap();
            for (from, to) in &swaps {
                let at = bytes.windows(from.len()).position(|w| w == *from).unwrap();
                bytes[at..at + to.len()].copy_from_slice(to);
            }
            Answer::Payload(bytes)
        }
        _ => benign(req),
    });
    s.check("paths out of the share", 3);
}

/// The largest hint list a guest may send (within every count and the message cap, each path
/// 4 KB deep), four times in a row: each is taken as a rescan the moment it arrives, so they
/// never pile up in the host's hint queue, and the host's peak memory stays under the bound
/// (about two such messages: one as it arrives and decodes, and what the allocator kept of the
/// one before).
#[test]
fn the_largest_message_a_guest_may_send_stays_within_the_memory_bound() {
    let sent = Arc::new(AtomicU32::new(0));
    let counter = sent.clone();
    let s = setup(move |req| match req.body {
        RequestBody::PollChanges { .. } if counter.fetch_add(1, Ordering::Relaxed) < 4 => {
            // 16 names of 250 bytes a path: about 4 KB each, under MAX_PATH_BYTES.
            let n = (MAX_MESSAGE_BYTES - (1 << 20)) / 4020;
            let paths = (0..n)
                .map(|i| {
                    let first = format!("{i:0>250}");
                    let rest = vec!["d".repeat(250); 15].join("/");
                    RelPath::from_bytes(format!("{first}/{rest}").as_bytes()).unwrap()
                })
                .collect();
            respond(
                req,
                ResponseBody::Changes(Ok(ChangeHints {
                    paths,
                    rescan: false,
                })),
            )
        }
        _ => benign(req),
    });
    let went = eventually(Duration::from_secs(120), || {
        sent.load(Ordering::Relaxed) >= 5
    });
    assert!(went, "host log:\n{}", s.a.log("host.log"));
    s.check("the largest hint list", 1);
}

/// The empty path is how the wire names the share root, so decoding accepts it; everywhere
/// else a guest can put a path, it must change nothing. A guest that names the root as
/// changed in every poll and, one case at a time, as removed, as unreadable and as ignored (in
/// full and targeted scans), while the host's share holds files: the host stays up, keeps
/// every file as it was, leaves OUT alone, and stays under the memory bound.
#[test]
fn the_empty_path_wherever_a_guest_can_send_a_path_changes_nothing() {
    for case in ["removed", "unreadable", "ignored"] {
        empty_path_case(case);
    }
}

fn empty_path_case(case: &'static str) {
    use vmsync_protocol::messages::{Scanned, WireProblem};
    let polls = Arc::new(AtomicU32::new(0));
    let counter = polls.clone();
    let root = move |when: &str| {
        if when == case {
            vec![RelPath::root()]
        } else {
            vec![]
        }
    };
    let problems = move || {
        if case == "unreadable" {
            vec![WireProblem {
                path: RelPath::root(),
                message: "the root".to_string(),
            }]
        } else {
            vec![]
        }
    };
    let mut a = Agents::new("");
    let out = make_out(a.tmp.path());
    let before_out = snapshot(&out);
    std::fs::create_dir_all(a.host_dir.join("d")).unwrap();
    std::fs::write(a.host_dir.join("keep.txt"), "the host's file\n").unwrap();
    std::fs::write(a.host_dir.join("d/inner.txt"), "inside a directory\n").unwrap();
    let before_share = snapshot(&a.host_dir);
    let guest = HostileGuest::start(&a.tmp.path().join("guest.sock"), move |req| {
        match req.body {
            RequestBody::ScanFull { .. } => respond(
                req,
                ResponseBody::ScanDelta(Ok(ScanDelta {
                    token: 1,
                    base: None,
                    root: Some(MARKER),
                    changed: vec![],
                    removed: root("removed"),
                    problems: problems(),
                    ignored: root("ignored"),
                    generation: None,
                })),
            ),
            RequestBody::Scan { .. } => respond(
                req,
                ResponseBody::Scanned(Ok(Scanned {
                    root: Some(MARKER),
                    entries: vec![],
                    problems: problems(),
                    ignored: root("ignored"),
                    generation: None,
                    manifests: vec![],
                })),
            ),
            RequestBody::PollChanges { .. } => {
                counter.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
                respond(
                    req,
                    ResponseBody::Changes(Ok(ChangeHints {
                        paths: vec![RelPath::root()],
                        rescan: false,
                    })),
                )
            }
            _ => benign(req),
        }
    });
    a.start_host();
    let polled = eventually(Duration::from_secs(60), || {
        polls.load(Ordering::Relaxed) >= 10
    });
    assert!(
        polled,
        "{case}: the host polled {} times\n{}",
        polls.load(Ordering::Relaxed),
        a.log_tail("host.log", 40)
    );
    let pid = a.host_pid().unwrap();
    let status = a.status();
    assert_eq!(status["shares"][0]["name"], "src", "{case}: {status}");
    let share = |snap: &Snapshot| {
        snap.iter()
            .filter(|(p, _)| !p.components().any(|c| c.as_os_str() == ".vmsync"))
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        share(&snapshot(&a.host_dir)),
        share(&before_share),
        "{case}: the host's share changed"
    );
    assert_eq!(snapshot(&out), before_out, "{case}: OUT changed");
    let peak = peak_rss(pid).expect("the host agent is running");
    assert!(peak <= RSS_BOUND, "{case}: host peak RSS {peak}");
    assert!(guest.sessions() >= 1, "{case}");
}
