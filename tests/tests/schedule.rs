//! The live sync loop (`vmsync_engine::schedule`) over two local endpoints, with tokio's clock
//! paused: which cycles run for which events, and when. Every delay here is virtual, so the
//! backoff and the pacing are asserted exactly; the cycles themselves do real file I/O.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use vmsync_core::endpoint::{
    Change, ChangeHints, MissingChunk, NotStaged, Problem, ScanScope, StageRequest,
};
use vmsync_core::RelPath;
use vmsync_engine::controller::BULK_MIN_BYTES;
use vmsync_engine::local::LocalEndpoint;
use vmsync_engine::pace::{GUEST_RESCANS, PATH_BURST, PATH_CYCLE_INTERVAL};
use vmsync_engine::schedule::{
    self, Command, Link, Live, Share, PENDING_RETRY_MAX, PENDING_RETRY_MIN,
};
use vmsync_tests::fixture::{local_pair, random_bytes, read, write, PairOptions};
use vmsync_tests::intercept::{Hooks, Intercept, Transit};

/// What the guest side saw, in order, with the (virtual) time of each.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// A scan: `None` for a full one, else its paths.
    Scan(Option<Vec<String>>),
    /// A transition of these paths.
    Transition(Vec<String>),
}

/// A path, and what to do when it is staged.
type OnStage = Option<(String, Box<dyn FnMut() + Send>)>;

/// The guest's hooks: records scans and transitions; can refuse to stage a path a number of
/// times; can run a closure when a path is staged.
#[derive(Clone, Default)]
struct Recorder {
    log: Arc<Mutex<Vec<(Instant, Event)>>>,
    refuse: Arc<Mutex<Option<(String, usize)>>>,
    on_stage: Arc<Mutex<OnStage>>,
}

fn text(path: &RelPath) -> String {
    String::from_utf8_lossy(path.as_bytes()).into_owned()
}

impl Recorder {
    fn events(&self) -> Vec<(Instant, Event)> {
        self.log.lock().unwrap().clone()
    }
    /// Times of the full scans.
    fn full_scans(&self) -> Vec<Instant> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(_, e)| *e == Event::Scan(None))
            .map(|(t, _)| *t)
            .collect()
    }
    /// The targeted scans, as their paths.
    fn targeted_scans(&self) -> Vec<(Instant, Vec<String>)> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter_map(|(t, e)| match e {
                Event::Scan(Some(paths)) => Some((*t, paths.clone())),
                _ => None,
            })
            .collect()
    }
    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Hooks for Recorder {
    fn scanning(&mut self, scope: &ScanScope) {
        let event = match scope {
            ScanScope::Full => Event::Scan(None),
            ScanScope::Paths(paths) => Event::Scan(Some(paths.iter().map(text).collect())),
        };
        self.log.lock().unwrap().push((Instant::now(), event));
    }
    fn stage(
        &mut self,
        files: &[StageRequest],
    ) -> Option<Vec<Result<Vec<MissingChunk>, NotStaged>>> {
        if let Some((path, f)) = self.on_stage.lock().unwrap().as_mut() {
            if files.iter().any(|r| text(&r.path) == *path) {
                f();
            }
        }
        let mut refuse = self.refuse.lock().unwrap();
        let (path, left) = refuse.as_mut()?;
        if *left == 0 || !files.iter().any(|r| text(&r.path) == *path) {
            return None;
        }
        *left -= 1;
        let problem = |r: &StageRequest| Problem {
            path: r.path.clone(),
            reason: "refused by the test".into(),
        };
        Some(
            files
                .iter()
                .map(|r| Err(NotStaged::Problem(problem(r))))
                .collect(),
        )
    }
    fn transition(&mut self, changes: &[Change]) -> Transit {
        let paths = changes.iter().map(|c| text(&c.path)).collect();
        self.log
            .lock()
            .unwrap()
            .push((Instant::now(), Event::Transition(paths)));
        Transit::Pass
    }
}

/// Nothing recorded on the host side.
#[derive(Clone, Default)]
struct Quiet;
impl Hooks for Quiet {}

/// A connection that ends when the test says so; it moves no content bytes of its own.
struct TestLink(watch::Receiver<Option<String>>);

impl Link for TestLink {
    fn closed(&self) -> impl std::future::Future<Output = String> + Send {
        let mut rx = self.0.clone();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone().unwrap_or_default(),
                Err(_) => "test link dropped".into(),
            }
        }
    }
    fn content_bytes(&self) -> (u64, u64) {
        (0, 0)
    }
}

type HostSide = Intercept<LocalEndpoint, Quiet>;
type GuestSide = Intercept<LocalEndpoint, Recorder>;

/// A host share and a guest side in temp directories, and the channels the loop reads.
struct Rig {
    tmp: tempfile::TempDir,
    shares: Vec<Share<HostSide>>,
    guest: Option<GuestSide>,
    recorder: Recorder,
    hints_tx: mpsc::Sender<(usize, ChangeHints)>,
    hints_rx: mpsc::Receiver<(usize, ChangeHints)>,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
    close: watch::Sender<Option<String>>,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let host_dir = tmp.path().join("host");
        let guest_dir = tmp.path().join("guest");
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::create_dir_all(&guest_dir).unwrap();
        let (host, guest, controller) = local_pair(tmp.path(), &PairOptions::default());
        let host = Intercept {
            inner: host,
            hooks: Quiet,
        };
        let recorder = Recorder::default();
        let guest = Intercept {
            inner: guest,
            hooks: recorder.clone(),
        };
        let (hints_tx, hints_rx) = mpsc::channel(64);
        let (commands_tx, commands_rx) = mpsc::channel(16);
        Rig {
            tmp,
            shares: vec![Share::new(controller, host, host_dir)],
            guest: Some(guest),
            recorder,
            hints_tx,
            hints_rx,
            commands_tx,
            commands_rx,
            close: watch::channel(None).0,
        }
    }

    fn host(&self) -> std::path::PathBuf {
        self.tmp.path().join("host")
    }
    fn guest(&self) -> std::path::PathBuf {
        self.tmp.path().join("guest")
    }

    /// Runs the loop until `driver` is done, then ends the connection and returns why the
    /// loop says it ended.
    async fn run<F: std::future::Future<Output = ()>>(
        &mut self,
        driver: impl FnOnce(Handles) -> F,
    ) -> String {
        let link = TestLink(self.close.subscribe());
        let handles = Handles {
            hints: self.hints_tx.clone(),
            commands: self.commands_tx.clone(),
            host: self.host(),
            guest: self.guest(),
        };
        let guest = self.guest.take().expect("one run per rig");
        let live = Live::new(&mut self.shares, vec![guest], link);
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let synced = move || {
            let _ = done_tx.send(());
        };
        let driver = async move {
            done_rx.await.expect("first sync");
            driver(handles).await;
        };
        let loop_ = live.run(&mut self.hints_rx, &mut self.commands_rx, synced);
        let (reason, ()) = tokio::join!(loop_, async {
            driver.await;
            let _ = self.close.send(Some("closed by the test".into()));
        });
        reason
    }
}

/// What a test's driver holds while the loop runs.
struct Handles {
    hints: mpsc::Sender<(usize, ChangeHints)>,
    commands: mpsc::Sender<Command>,
    host: std::path::PathBuf,
    guest: std::path::PathBuf,
}

impl Handles {
    /// Queues a hint for `paths` of share 0 without yielding.
    fn hint(&self, paths: &[&str]) {
        let paths = paths
            .iter()
            .map(|p| RelPath::from_bytes(p.as_bytes()).unwrap())
            .collect();
        self.hints
            .try_send((
                0,
                ChangeHints {
                    paths,
                    rescan: false,
                },
            ))
            .unwrap();
    }

    /// Waits (virtual time) until `rel` on the guest holds `data`, up to `bound`.
    async fn landed(&self, rel: &str, data: &[u8], bound: Duration) -> Instant {
        let end = Instant::now() + bound;
        loop {
            if std::fs::read(self.guest.join(rel)).is_ok_and(|d| d == data) {
                return Instant::now();
            }
            assert!(Instant::now() < end, "{rel} did not land in {bound:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn ask(&self, make: impl FnOnce(schedule::Reply) -> Command) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(make(reply)).await.unwrap();
        rx.await.unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_sync_is_full_and_the_loop_ends_with_its_connection() {
    let mut rig = Rig::new();
    write(&rig.host(), "a.txt", "from the host");
    write(&rig.guest(), "b.txt", "from the guest");
    let recorder = rig.recorder.clone();
    let reason = rig
        .run(|h| async move {
            assert_eq!(read(&h.guest, "a.txt"), b"from the host");
            assert_eq!(read(&h.host, "b.txt"), b"from the guest");
        })
        .await;
    assert_eq!(reason, "closed by the test");
    assert_eq!(recorder.full_scans().len(), 1, "{:?}", recorder.events());
    assert!(recorder.targeted_scans().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_hints_is_one_targeted_cycle() {
    let mut rig = Rig::new();
    let recorder = rig.recorder.clone();
    rig.run(|h| async move {
        recorder.clear();
        let names = ["one", "two", "three", "four", "five"];
        for name in names {
            write(&h.host, name, name);
            h.hint(&[name]);
        }
        for name in names {
            h.landed(name, name.as_bytes(), Duration::from_secs(5))
                .await;
        }
        let targeted = recorder.targeted_scans();
        assert_eq!(targeted.len(), 1, "{:?}", recorder.events());
        let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        want.sort();
        assert_eq!(targeted[0].1, want);
        assert!(recorder.full_scans().is_empty());
    })
    .await;
}

/// A cycle that leaves work pending is retried with a full cycle after 0.5 s, then 1 s, 2 s,
/// 4 s...; once nothing is pending, no more retries run.
#[tokio::test(start_paused = true)]
async fn pending_work_is_retried_with_doubling_delays_until_it_lands() {
    let mut rig = Rig::new();
    let recorder = rig.recorder.clone();
    rig.run(|h| async move {
        recorder.clear();
        *recorder.refuse.lock().unwrap() = Some(("late.txt".into(), 4));
        write(&h.host, "late.txt", "refused four times");
        let start = Instant::now();
        h.hint(&["late.txt"]);
        let landed = h
            .landed("late.txt", b"refused four times", Duration::from_secs(60))
            .await;
        let fulls: Vec<Duration> = recorder.full_scans().iter().map(|t| *t - start).collect();
        // Refused by the targeted cycle and the first three retries; the fourth lands it.
        let mut want = Vec::new();
        let (mut at, mut delay) = (Duration::ZERO, PENDING_RETRY_MIN);
        for _ in 0..4 {
            at += delay;
            want.push(at);
            delay = (delay * 2).min(PENDING_RETRY_MAX);
        }
        assert_eq!(fulls, want, "{:?}", recorder.events());
        // (`landed` polls every millisecond.)
        assert!(
            landed - start - want[3] <= Duration::from_millis(1),
            "{:?}",
            landed - start
        );
        tokio::time::sleep(PENDING_RETRY_MAX * 2).await;
        assert_eq!(
            recorder.full_scans().len(),
            4,
            "retries after the work landed"
        );
    })
    .await;
}

/// A path written over and over is cycled at most `PATH_BURST` times back to back, then at
/// most once per `PATH_CYCLE_INTERVAL`; its last version always lands.
#[tokio::test(start_paused = true)]
async fn a_busy_path_is_paced_and_its_last_version_lands() {
    let mut rig = Rig::new();
    let recorder = rig.recorder.clone();
    rig.run(|h| async move {
        recorder.clear();
        let writes = 40;
        let start = Instant::now();
        for i in 0..writes {
            write(&h.host, "log.txt", format!("line {i}\n").repeat(i + 1));
            h.hint(&["log.txt"]);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let last = format!("line {}\n", writes - 1).repeat(writes);
        h.landed("log.txt", last.as_bytes(), Duration::from_secs(5))
            .await;
        let cycles: Vec<Duration> = recorder
            .targeted_scans()
            .iter()
            .map(|(t, _)| *t - start)
            .collect();
        // Written for 200 ms: the burst, then about one cycle per interval.
        let allowed = PATH_BURST as usize + (200 / PATH_CYCLE_INTERVAL.as_millis() as usize) + 2;
        assert!(
            cycles.len() <= allowed,
            "{} cycles for {writes} writes (at most {allowed}): {cycles:?}",
            cycles.len()
        );
        for pair in cycles.windows(2).skip(PATH_BURST as usize) {
            assert!(
                pair[1] - pair[0] >= PATH_CYCLE_INTERVAL - Duration::from_millis(5),
                "{cycles:?}"
            );
        }
    })
    .await;
}

/// A big file crossing in bulk steps does not hold up a small file hinted meanwhile: the small
/// one lands first.
#[tokio::test(start_paused = true)]
async fn hints_go_before_bulk_steps() {
    let mut rig = Rig::new();
    let recorder = rig.recorder.clone();
    let host = rig.host();
    let hints = rig.hints_tx.clone();
    rig.run(|h| async move {
        recorder.clear();
        let big = random_bytes(7, (BULK_MIN_BYTES + (4 << 20)) as usize);
        write(&h.host, "big.bin", &big);
        // While the big file is staged, a small file is written and hinted: it waits only for
        // the cycle under way, never for the bulk transfer.
        *recorder.on_stage.lock().unwrap() = Some((
            "big.bin".into(),
            Box::new(move || {
                write(&host, "small.txt", "small");
                let path = RelPath::from_bytes(b"small.txt").unwrap();
                let _ = hints.try_send((
                    0,
                    ChangeHints {
                        paths: vec![path],
                        rescan: false,
                    },
                ));
            }),
        ));
        h.hint(&["big.bin"]);
        h.landed("big.bin", &big, Duration::from_secs(60)).await;
        h.landed("small.txt", b"small", Duration::from_secs(1))
            .await;
        let order: Vec<Vec<String>> = recorder
            .events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Event::Transition(paths) if !paths.is_empty() => Some(paths),
                _ => None,
            })
            .collect();
        let small = order
            .iter()
            .position(|p| p.contains(&"small.txt".to_string()));
        let big = order
            .iter()
            .position(|p| p.contains(&"big.bin".to_string()));
        assert!(small.is_some() && small < big, "transitions: {order:?}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn commands_are_answered_by_the_loop() {
    let mut rig = Rig::new();
    let recorder = rig.recorder.clone();
    rig.run(|h| async move {
        recorder.clear();
        // `sync` answers after a full cycle, which found the unhinted file.
        write(&h.host, "unhinted.txt", "no hint for this one");
        h.ask(Command::Sync).await.unwrap();
        assert_eq!(read(&h.guest, "unhinted.txt"), b"no hint for this one");
        assert_eq!(recorder.full_scans().len(), 1);
        // `resume` of a share that is not halted, and of one that does not exist.
        let not_halted = h
            .ask(|reply| Command::Resume {
                share: "s".into(),
                reply,
            })
            .await;
        assert_eq!(not_halted, Err("share `s` is not halted".into()));
        let unknown = h
            .ask(|reply| Command::Resume {
                share: "nope".into(),
                reply,
            })
            .await;
        assert_eq!(unknown, Err("no share named `nope`".into()));
        // `resolve` of a path in no conflict, and of the root.
        let path = RelPath::from_bytes(b"unhinted.txt").unwrap();
        let resolve = |path: RelPath| {
            move |reply| Command::Resolve {
                share: "s".into(),
                path,
                keep: vmsync_core::reconcile::Side::Host,
                aside: false,
                reply,
            }
        };
        let not_in_conflict = h.ask(resolve(path)).await.unwrap_err();
        assert!(
            not_in_conflict.contains("is not in conflict"),
            "{not_in_conflict}"
        );
        let root = h.ask(resolve(RelPath::root())).await.unwrap_err();
        assert!(root.contains("not the share root"), "{root}");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn without_a_connection_sync_is_refused_and_resume_still_answers() {
    let mut rig = Rig::new();
    let (tx, mut rx) = (
        rig.commands_tx.clone(),
        std::mem::replace(&mut rig.commands_rx, mpsc::channel(1).1),
    );
    let idle = schedule::idle(&mut rig.shares, &mut rx, Duration::from_secs(10));
    let started = Instant::now();
    let asks = async {
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Sync(reply)).await.unwrap();
        assert_eq!(
            answer.await.unwrap(),
            Err("not connected to the guest".into())
        );
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Resume {
            share: "s".into(),
            reply,
        })
        .await
        .unwrap();
        assert_eq!(answer.await.unwrap(), Err("share `s` is not halted".into()));
    };
    tokio::join!(idle, asks);
    // Idle returns when its delay is over, not before.
    assert_eq!(Instant::now() - started, Duration::from_secs(10));
}

/// A guest that asks for a full rescan on every poll gets the host's limit on them
/// (`GUEST_RESCANS`): three at once, then one every 5 s, never rescans back to back. The
/// host's own watcher is not limited.
#[tokio::test(start_paused = true)]
async fn a_side_asking_for_a_rescan_on_every_poll_is_paced() {
    struct AlwaysRescan;
    impl Hooks for AlwaysRescan {
        fn changes(&mut self) -> Option<ChangeHints> {
            Some(ChangeHints {
                paths: Vec::new(),
                rescan: true,
            })
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("host")).unwrap();
    std::fs::create_dir_all(tmp.path().join("guest")).unwrap();
    let (_host, guest, _controller) = local_pair(tmp.path(), &PairOptions::default());
    let guest = Intercept {
        inner: guest,
        hooks: AlwaysRescan,
    };
    let (tx, mut rx) = mpsc::channel(1);
    let t0 = Instant::now();
    let forward = tokio::spawn(schedule::forward_changes(guest, 0, tx, Some(GUEST_RESCANS)));
    let mut at = Vec::new();
    while let Some((share, hints)) = rx.recv().await {
        assert_eq!(share, 0);
        assert!(hints.rescan);
        let t = Instant::now() - t0;
        // (Unpaced, the rescans would come back to back at 0 s: stop counting at 100.)
        if t >= Duration::from_secs(60) || at.len() == 100 {
            break;
        }
        at.push(t.as_secs());
    }
    forward.abort();
    assert_eq!(at, [0, 0, 0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]);
    assert_eq!(GUEST_RESCANS.burst, 3);
}
