//! How long a share's watch keeps an edit back after a burst of directory work, for vmsync's
//! watch and, in the same run on the same trees, `notify`'s recursive inotify mode (what the
//! agents used before; see docs/performance.md, "Watching").
//!
//! ```text
//! cargo run --release -p vmsync-engine --example watchbench [-- TOP_DIRS [SECONDS]]
//! ```
//!
//! An overflowed event queue counts as hearing the edit (a rescan would find it), for both.
//! The tree is TOP_DIRS directories of 10 subdirectories each (default 2,000: 22,000
//! directories). Each step does its work, then writes `marker` at the root and times how long
//! from that write until the watch reports it: starting the watch, removing a tenth of the tree (`rm -rf`),
//! copying a tenth back in (directories with a file each), and making a chain 1,500
//! directories deep. A step that takes longer than SECONDS (default 120) is cut off and shown
//! as such; the watch is then abandoned.

// A benchmark, not the daemon: it may stop at the first failure, and it counts the heap with a
// global allocator of its own.
#![allow(clippy::expect_used, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use vmsync_engine::filter::Filter;
use vmsync_engine::watch::{ShareWatcher, WatchRules};

/// The heap in use, counted: what a watch's tables take is the difference across its start.
struct Counting;

static HEAP: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One watch under test: how many times it has reported `marker` so far.
trait Marked {
    fn marks(&self) -> u64;
}

struct Vmsync {
    marks: Arc<AtomicU64>,
    /// Runs the task that holds the watch: dropped, it drops the watch too.
    _runtime: tokio::runtime::Runtime,
}

impl Marked for Vmsync {
    fn marks(&self) -> u64 {
        self.marks.load(Ordering::Relaxed)
    }
}

fn start_vmsync(root: &Path) -> Vmsync {
    let rules = Arc::new(RwLock::new(WatchRules::new(Filter::none())));
    let watcher = ShareWatcher::start(root, rules).expect("watch");
    let marks = Arc::new(AtomicU64::new(0));
    let counted = marks.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.spawn(async move {
        loop {
            let hints = watcher.next().await;
            if hints.rescan || hints.paths.iter().any(|p| p.as_bytes() == b"marker") {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Vmsync {
        marks,
        _runtime: runtime,
    }
}

struct Notify {
    marks: Arc<AtomicU64>,
    _watcher: notify::RecommendedWatcher,
}

impl Marked for Notify {
    fn marks(&self) -> u64 {
        self.marks.load(Ordering::Relaxed)
    }
}

fn start_notify(root: &Path) -> Notify {
    use notify::Watcher as _;
    let marks = Arc::new(AtomicU64::new(0));
    let counted = marks.clone();
    let marker = root.join("marker");
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An overflow counts as heard, as for the other: a rescan would find the edit.
        if event.is_ok_and(|e| e.need_rescan() || e.paths.contains(&marker)) {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    })
    .expect("notify");
    watcher
        .watch(root, notify::RecursiveMode::Recursive)
        .expect("notify watch");
    Notify {
        marks,
        _watcher: watcher,
    }
}

/// Writes the marker and waits until `w` reports it: how long after the marker was written
/// (the step's work is done by then), or `None` past `limit`.
fn marked(root: &Path, w: &dyn Marked, limit: Duration) -> Option<Duration> {
    let before = w.marks();
    let t = Instant::now();
    std::fs::write(root.join("marker"), format!("{t:?}")).expect("marker");
    while w.marks() == before {
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Some(t.elapsed())
}

fn make_tree(root: &Path, top: usize) {
    for i in 0..top {
        for j in 0..10 {
            std::fs::create_dir_all(root.join(format!("t{i}/s{j}"))).expect("mkdir");
        }
    }
}

fn show(d: Option<Duration>, limit: Duration) -> String {
    match d {
        Some(d) => format!("{:>9.3} s", d.as_secs_f64()),
        None => format!("  >{:>4} s", limit.as_secs()),
    }
}

/// Runs every step against one watch; `None` entries were cut off (and so is the rest).
fn run(
    root: &Path,
    top: usize,
    limit: Duration,
    start: fn(&Path) -> Box<dyn Marked>,
) -> (Vec<(&'static str, Option<Duration>)>, u64) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).expect("root");
    make_tree(root, top);
    let mut out = Vec::new();
    let heap = HEAP.load(Ordering::Relaxed);
    let t = Instant::now();
    let w = start(root);
    out.push(("starting the watch (not a lag)", Some(t.elapsed())));
    out.push(("an edit after the start", marked(root, &*w, limit)));
    let tables = HEAP.load(Ordering::Relaxed).saturating_sub(heap);
    for i in 0..top / 10 {
        std::fs::remove_dir_all(root.join(format!("t{i}"))).expect("rm");
    }
    out.push(("rm -rf a tenth of the tree", marked(root, &*w, limit)));

    if out.iter().all(|(_, d)| d.is_some()) {
        for i in 0..top / 10 {
            for j in 0..10 {
                let d = root.join(format!("t{i}/s{j}"));
                std::fs::create_dir_all(&d).expect("mkdir");
                std::fs::write(d.join("f"), "x").expect("write");
            }
        }
        out.push(("copy a tenth back in", marked(root, &*w, limit)));
    }
    if out.iter().all(|(_, d)| d.is_some()) {
        let mut deep: PathBuf = root.join("chain");
        for _ in 0..1500 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).expect("chain");
        out.push(("a chain 1,500 directories deep", marked(root, &*w, limit)));
    }
    if out.iter().any(|(_, d)| d.is_none()) {
        // Its thread may be busy for minutes more: leave it behind.
        std::mem::forget(w);
    }
    (out, tables)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let top: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let limit = Duration::from_secs(args.next().and_then(|a| a.parse().ok()).unwrap_or(120));
    let dir = tempfile::tempdir().expect("tempdir");
    // notify first: after the other, the kernel may still be freeing the other's watches.
    let (theirs, their_heap) = run(&dir.path().join("b"), top, limit, |r| {
        Box::new(start_notify(r))
    });
    let (ours, our_heap) = run(&dir.path().join("a"), top, limit, |r| {
        Box::new(start_vmsync(r))
    });
    let dirs = top as u64 * 11 + 1;
    println!(
        "watch lag, {} directories (from an edit made after the step until the watch reports it)",
        dirs
    );
    println!(
        "{:<34} {:>11} {:>11} {:>8}",
        "step", "vmsync", "notify", "ratio"
    );
    for (i, (step, d)) in ours.iter().enumerate() {
        let other = theirs.get(i).and_then(|(_, d)| *d);
        let ratio = match (d, other) {
            (Some(a), Some(b)) if a.as_secs_f64() > 0.0 => {
                format!("{:>7.1}x", b.as_secs_f64() / a.as_secs_f64())
            }
            (Some(_), None) => "     cut".into(),
            _ => "       -".into(),
        };
        println!(
            "{step:<34} {} {} {ratio}",
            show(*d, limit),
            if i < theirs.len() {
                show(other, limit)
            } else {
                "          -".into()
            }
        );
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "{:<34} {:>7.1} MiB {:>7.1} MiB   ({} / {} bytes a directory)",
        "heap for the watch after its start",
        mib(our_heap),
        mib(their_heap),
        our_heap / dirs,
        their_heap / dirs
    );
}
