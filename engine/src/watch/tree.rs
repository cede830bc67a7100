//! The kernel side of watching a share: one inotify instance, a watch on every directory of the
//! tree, and a thread that reads the events and keeps the watches following the tree. What it
//! hears becomes [`Heard`] items, handed to the share's watcher ([`super::ShareWatcher`]) one
//! read batch at a time.
//!
//! The tree of watches is kept as the kernel's watch descriptors linked to their parents by
//! name, so every event costs O(depth) (its path is put together from the links), a new
//! directory costs a watch and a listing of its own entries, never a walk of what is already
//! watched, a renamed directory costs relinking one node, and a removed one forgetting its
//! node. `notify`'s recursive mode, used before, walked the whole subtree of every new
//! directory again and looked through every watch for each removed directory: a chain of
//! 1,500 new directories held events back 16 s, removing 9,900 of 99,000 watched directories
//! held them back for minutes (docs/performance.md, "Watching").
//!
//! Rules:
//! - Every directory beneath the root is watched, ignored ones included, but the reserved
//!   directory and directories deeper than [`MAX_PATH_DEPTH`] components less one (nothing
//!   inside those has a share path). A directory that cannot be watched (the watch limit, a
//!   path too long for the kernel) is reported once as [`Heard::Unwatched`], with nothing
//!   beneath it watched: the caller rescans it periodically.
//! - A directory created or moved in is watched first and listed after, so each entry beneath
//!   it is either found by the listing or reported by the new watch (both, at worst).
//! - A directory moved out of the share (the first half of a rename with no second half in the
//!   same read) loses its watches, with everything beneath it; should the second half come in
//!   a later read after all, the directory is watched anew there.
//! - After an overflowed event queue ([`Heard::Overflow`]), creations may have gone unheard:
//!   the whole tree is walked again and every directory found gets its watch; watches whose
//!   directory was not found are dropped.
//! - Events are hints, never facts: a path is put together from what the tree knows at the
//!   time, and an event for a watch the tree no longer knows is dropped.
//!
//! Must not: follow a symlink beneath the root (watches are added with `IN_DONT_FOLLOW` and
//! `IN_ONLYDIR`), or hold the caller up: `start` returns once the initial watches are in place
//! and everything after runs on the thread, which stops when the [`TreeWatch`] is dropped.

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vmsync_core::limits::MAX_PATH_DEPTH;
use vmsync_core::path::is_reserved;
use vmsync_core::RelPath;

/// What the watch heard, by share path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// An entry was created, written, closed after writing, or removed.
    Changed(RelPath),
    /// An entry's own attributes changed (mode, owner, times), nothing else known.
    Attrs(RelPath),
    /// An entry was renamed away from this path (the new name follows as `MovedTo`, unless it
    /// left the share).
    MovedFrom(RelPath),
    /// An entry was renamed to this path.
    MovedTo(RelPath),
    /// The kernel's event queue overflowed: anything may have changed.
    Overflow,
    /// This directory could not be watched, so nothing beneath it is heard of. `limit`: the
    /// reason is the inotify watch limit (`fs.inotify.max_user_watches`).
    Unwatched {
        dir: RelPath,
        limit: bool,
        why: String,
    },
}

/// The events each directory is watched for. Reads and opens are left out: the agent's own
/// scans read every file, and those events would wake the watch for nothing.
const WATCH_EVENTS: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO);

/// Size of the buffer events are read into (the kernel's queue is read in as few calls as
/// this allows).
const READ_BUFFER: usize = 64 * 1024;

/// A running recursive watch. Dropping it stops the thread, which closes the inotify
/// descriptor and with it every watch.
pub struct TreeWatch {
    stop: Arc<Stop>,
    watched: Arc<AtomicU64>,
    #[cfg(test)]
    inotify_fd: i32,
}

/// How the thread is told to stop: a flag it checks between steps of a long walk, and an
/// eventfd that wakes it from `poll`.
struct Stop {
    flag: AtomicBool,
    fd: OwnedFd,
}

/// Why the watch could not start.
#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct StartError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl StartError {
    /// The inotify watch limit (`fs.inotify.max_user_watches`) was reached.
    pub fn is_watch_limit(&self) -> bool {
        self.source.raw_os_error() == Some(Errno::NOSPC.raw_os_error())
    }
}

impl TreeWatch {
    /// Watches `root` and every directory beneath it, then hands everything heard to
    /// `handler` (on a thread of its own) until dropped. What could not be watched during the
    /// initial walk reaches `handler` before this returns; hitting the watch limit there fails
    /// the whole watch instead (the caller then rescans on a timer).
    pub fn start(
        root: &Path,
        mut handler: impl FnMut(Vec<Heard>) + Send + 'static,
    ) -> Result<TreeWatch, StartError> {
        let failed = |source: std::io::Error| StartError {
            path: root.to_path_buf(),
            source,
        };
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| failed(e.into()))?;
        let stop_fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| failed(e.into()))?;
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            fd: stop_fd,
        });
        let mut tree = Tree::new(root.to_path_buf(), inotify, stop.clone());
        tree.watch_root().map_err(|e| failed(e.into()))?;
        let mut heard = Vec::new();
        tree.watch_beneath(tree.root_wd, Vec::new(), &mut heard);
        if heard
            .iter()
            .any(|h| matches!(h, Heard::Unwatched { limit: true, .. }))
        {
            return Err(failed(Errno::NOSPC.into()));
        }
        if !heard.is_empty() {
            handler(std::mem::take(&mut heard));
        }
        let watched = Arc::new(AtomicU64::new(tree.nodes.len() as u64));
        #[cfg(test)]
        let inotify_fd = {
            use std::os::fd::AsRawFd;
            tree.inotify.as_raw_fd()
        };
        let thread_watched = watched.clone();
        std::thread::Builder::new()
            .name("vmsync-watch".into())
            .spawn(move || tree.run(&thread_watched, &mut handler))
            .map_err(failed)?;
        Ok(TreeWatch {
            stop,
            watched,
            #[cfg(test)]
            inotify_fd,
        })
    }

    /// How many directories are watched now (the root included).
    pub fn watched(&self) -> u64 {
        self.watched.load(Ordering::Relaxed)
    }

    /// How many watches the kernel lists for this watch's inotify descriptor.
    #[cfg(test)]
    pub fn kernel_watches(&self) -> u64 {
        kernel_watch_count(self.inotify_fd)
    }
}

/// How many watches the kernel lists for the inotify descriptor `fd` of this process.
#[cfg(test)]
fn kernel_watch_count(fd: i32) -> u64 {
    std::fs::read(format!("/proc/self/fdinfo/{fd}"))
        .map(|info| {
            info.split(|&b| b == b'\n')
                .filter(|line| line.starts_with(b"inotify wd:"))
                .count() as u64
        })
        .unwrap_or(0)
}

impl Drop for TreeWatch {
    fn drop(&mut self) {
        self.stop.flag.store(true, Ordering::Relaxed);
        // Full only if already written to: the thread wakes either way.
        let _ = rustix::io::write(&self.stop.fd, &1u64.to_ne_bytes());
    }
}

/// A watched directory: its parent's watch and its name there (none for the root), and its
/// watched subdirectories by name.
#[derive(Debug)]
struct Node {
    parent: Option<i32>,
    name: Box<[u8]>,
    children: HashMap<Box<[u8]>, i32>,
}

impl Node {
    /// A node not linked anywhere yet (or the root).
    fn unlinked() -> Node {
        Node {
            parent: None,
            name: Box::default(),
            children: HashMap::new(),
        }
    }
}

/// The watches of one tree, owned by the watch's thread (and by `start` before it).
struct Tree {
    root: PathBuf,
    inotify: OwnedFd,
    stop: Arc<Stop>,
    root_wd: i32,
    nodes: HashMap<i32, Node>,
}

impl Tree {
    fn new(root: PathBuf, inotify: OwnedFd, stop: Arc<Stop>) -> Tree {
        Tree {
            root,
            inotify,
            stop,
            root_wd: -1,
            nodes: HashMap::new(),
        }
    }

    /// Watches the root itself (a symlink given as the root is followed: it is configuration).
    fn watch_root(&mut self) -> Result<(), Errno> {
        let wd = inotify::add_watch(
            &self.inotify,
            &self.root,
            WATCH_EVENTS | WatchFlags::ONLYDIR,
        )?;
        self.root_wd = wd;
        self.nodes.insert(wd, Node::unlinked());
        Ok(())
    }

    /// The share path of the directory watched as `wd`, as components; `None` for a watch
    /// the tree no longer knows.
    fn components(&self, wd: i32) -> Option<Vec<&[u8]>> {
        let mut names = Vec::new();
        let mut at = wd;
        loop {
            let node = self.nodes.get(&at)?;
            match node.parent {
                None => break,
                Some(parent) => {
                    names.push(&*node.name);
                    at = parent;
                }
            }
            if names.len() > MAX_PATH_DEPTH {
                return None;
            }
        }
        names.reverse();
        Some(names)
    }

    /// The share path of `name` inside the directory watched as `wd` (`name` none: the
    /// directory itself); `None` when it has none (unknown watch, the reserved directory, too
    /// deep).
    fn path_of(&self, wd: i32, name: Option<&[u8]>) -> Option<RelPath> {
        let mut components = self.components(wd)?;
        if let Some(name) = name {
            if wd == self.root_wd && is_reserved(name) {
                return None;
            }
            components.push(name);
        }
        RelPath::from_components(components).ok()
    }

    /// Where the directory watched as `wd` is, as a path the kernel can resolve.
    fn abs_path(&self, components: &[&[u8]]) -> PathBuf {
        let mut path = self.root.clone();
        for c in components {
            path.push(OsStr::from_bytes(c));
        }
        path
    }

    /// Links `wd` as `name` inside `parent`, replacing whatever was linked there.
    fn link(&mut self, parent: i32, name: &[u8], wd: i32) {
        let replaced = self
            .nodes
            .get_mut(&parent)
            .and_then(|p| p.children.insert(name.into(), wd));
        if let Some(old) = replaced.filter(|&old| old != wd) {
            // A directory renamed over another: the one replaced is gone.
            self.forget(old, true);
        }
        if let Some(node) = self.nodes.get_mut(&wd) {
            node.parent = Some(parent);
            node.name = name.into();
        }
    }

    /// Unlinks `wd` from its parent (if it is still linked there).
    fn unlink(&mut self, wd: i32) {
        let Some((Some(parent), name)) = self.nodes.get(&wd).map(|n| (n.parent, n.name.clone()))
        else {
            return;
        };
        if let Some(p) = self.nodes.get_mut(&parent) {
            if p.children.get(&name) == Some(&wd) {
                p.children.remove(&name);
            }
        }
    }

    /// Forgets the watch `wd` and everything beneath it; `remove`: drops the kernel's
    /// watches too (they are still there: a directory moved out, or renamed over).
    fn forget(&mut self, wd: i32, remove: bool) {
        self.unlink(wd);
        let mut stack = vec![wd];
        while let Some(wd) = stack.pop() {
            let Some(node) = self.nodes.remove(&wd) else {
                continue;
            };
            stack.extend(node.children.into_values());
            if remove {
                // Already gone: the kernel dropped it with its directory.
                let _ = inotify::remove_watch(&self.inotify, wd);
            }
        }
    }

    /// Watches the directory `name` inside the one watched as `parent`, and everything
    /// beneath it that has no watch yet.
    fn watch_new(&mut self, parent: i32, name: &[u8], heard: &mut Vec<Heard>) {
        let Some(mut components) = self.components(parent) else {
            return;
        };
        if parent == self.root_wd && is_reserved(name) {
            return;
        }
        components.push(name);
        let components: Vec<Vec<u8>> = components.into_iter().map(<[u8]>::to_vec).collect();
        self.watch_dir(parent, components, heard);
    }

    /// Watches everything beneath the directory watched as `wd` (whose share path is
    /// `components`) that has no watch yet.
    fn watch_beneath(&mut self, wd: i32, components: Vec<Vec<u8>>, heard: &mut Vec<Heard>) {
        let mut stack = Vec::new();
        self.list(wd, &components, &mut stack, heard);
        self.walk(stack, heard);
    }

    /// Watches the directory at `components` (linked inside `parent`) and what is beneath it.
    fn watch_dir(&mut self, parent: i32, components: Vec<Vec<u8>>, heard: &mut Vec<Heard>) {
        self.walk(vec![(parent, components)], heard);
    }

    /// Watches each directory on `stack` (its parent's watch and its share path) and, for
    /// each that got a new watch, its subdirectories in turn.
    fn walk(&mut self, mut stack: Vec<(i32, Vec<Vec<u8>>)>, heard: &mut Vec<Heard>) {
        while let Some((parent, components)) = stack.pop() {
            if self.stop.flag.load(Ordering::Relaxed) {
                return;
            }
            let Some(name) = components.last().cloned() else {
                continue;
            };
            if components.len() >= MAX_PATH_DEPTH {
                continue;
            }
            let Some(parent_node) = self.nodes.get(&parent) else {
                continue;
            };
            if parent_node.children.contains_key(&name[..]) {
                // Watched already, and so is what is beneath it (or its own events say).
                continue;
            }
            let refs: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
            let path = self.abs_path(&refs);
            let flags = WATCH_EVENTS | WatchFlags::ONLYDIR | WatchFlags::DONT_FOLLOW;
            let wd = match inotify::add_watch(&self.inotify, &path, flags) {
                Ok(wd) => wd,
                // Gone again, or not a directory (any more): nothing to watch.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(e) => {
                    if let Ok(dir) = RelPath::from_components(refs) {
                        heard.push(Heard::Unwatched {
                            dir,
                            limit: e == Errno::NOSPC,
                            why: std::io::Error::from(e).to_string(),
                        });
                    }
                    continue;
                }
            };
            if self.nodes.contains_key(&wd) {
                // This directory was watched already under another name (a rename whose
                // halves came apart): it is here now, and so is what is beneath it.
                self.unlink(wd);
                self.link(parent, &name, wd);
                continue;
            }
            self.nodes.insert(wd, Node::unlinked());
            self.link(parent, &name, wd);
            self.list(wd, &components, &mut stack, heard);
        }
    }

    /// Puts the subdirectories of the directory watched as `wd` (at `components`) on `stack`,
    /// unless they would be too deep to have share paths beneath them.
    fn list(
        &mut self,
        wd: i32,
        components: &[Vec<u8>],
        stack: &mut Vec<(i32, Vec<Vec<u8>>)>,
        heard: &mut Vec<Heard>,
    ) {
        if components.len() + 1 >= MAX_PATH_DEPTH {
            return;
        }
        let refs: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
        let path = self.abs_path(&refs);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if let Ok(dir) = RelPath::from_components(refs) {
                    heard.push(Heard::Unwatched {
                        dir,
                        limit: false,
                        why: format!("cannot list it: {e}"),
                    });
                }
                return;
            }
        };
        for entry in entries.flatten() {
            let is_dir = match entry.file_type() {
                Ok(t) => t.is_dir(),
                Err(_) => false,
            };
            let name = entry.file_name();
            let name = name.as_bytes();
            if !is_dir || (wd == self.root_wd && is_reserved(name)) {
                continue;
            }
            let mut child = components.to_vec();
            child.push(name.to_vec());
            stack.push((wd, child));
        }
    }

    /// Reads and handles events until told to stop.
    fn run(mut self, watched: &AtomicU64, handler: &mut dyn FnMut(Vec<Heard>)) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUFFER];
        loop {
            let mut fds = [
                PollFd::new(&self.inotify, PollFlags::IN),
                PollFd::new(&self.stop.fd, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(root = %self.root.display(), "watch stopped: {e}");
                    handler(vec![Heard::Overflow]);
                    return;
                }
            }
            if self.stop.flag.load(Ordering::Relaxed) {
                return;
            }
            let heard = self.read_all(&mut buf);
            watched.store(self.nodes.len() as u64, Ordering::Relaxed);
            if !heard.is_empty() {
                handler(heard);
            }
        }
    }

    /// Reads every event queued now, and handles them.
    fn read_all(&mut self, buf: &mut [MaybeUninit<u8>]) -> Vec<Heard> {
        let mut heard = Vec::new();
        // Directories renamed away in this read, by cookie: their watches, unlinked (a new
        // directory may take the name meanwhile).
        let mut moved_away: HashMap<u32, i32> = HashMap::new();
        let mut events = Vec::new();
        {
            let mut reader = inotify::Reader::new(&self.inotify, buf);
            loop {
                match reader.next() {
                    Ok(e) => events.push((
                        e.wd(),
                        e.events(),
                        e.cookie(),
                        e.file_name().map(|n| n.to_bytes().to_vec()),
                    )),
                    Err(Errno::AGAIN | Errno::INTR) => break,
                    Err(e) => {
                        tracing::warn!(root = %self.root.display(), "reading the watch's events: {e}");
                        heard.push(Heard::Overflow);
                        break;
                    }
                }
                if reader.is_buffer_empty() && events.len() >= 4096 {
                    // Handled in turns: a rename's halves stay in one turn unless the kernel
                    // split them across reads, which is allowed for.
                    break;
                }
            }
        }
        let mut overflow = false;
        for (wd, mask, cookie, name) in events {
            if mask.contains(ReadFlags::QUEUE_OVERFLOW) {
                overflow = true;
                continue;
            }
            if mask.contains(ReadFlags::IGNORED) {
                // The kernel dropped this watch: its directory is gone.
                self.forget(wd, false);
                continue;
            }
            let is_dir = mask.contains(ReadFlags::ISDIR);
            let Some(name) = name else {
                // The watched directory itself: only its attributes are of interest (its
                // parent's watch reports the rest).
                if mask.contains(ReadFlags::ATTRIB) {
                    if let Some(path) = self.path_of(wd, None).filter(|p| !p.is_root()) {
                        heard.push(Heard::Attrs(path));
                    }
                }
                continue;
            };
            let Some(path) = self.path_of(wd, Some(&name)) else {
                continue;
            };
            if mask.contains(ReadFlags::MOVED_FROM) {
                let child = self.nodes.get(&wd).and_then(|n| n.children.get(&name[..]));
                if let (true, Some(child)) = (is_dir, child.copied()) {
                    self.unlink(child);
                    moved_away.insert(cookie, child);
                }
                heard.push(Heard::MovedFrom(path));
            } else if mask.contains(ReadFlags::MOVED_TO) {
                heard.push(Heard::MovedTo(path));
                if is_dir {
                    match moved_away.remove(&cookie) {
                        Some(child) if self.nodes.contains_key(&child) => {
                            self.link(wd, &name, child);
                        }
                        _ => self.watch_new(wd, &name, &mut heard),
                    }
                }
            } else if mask.contains(ReadFlags::CREATE) {
                heard.push(Heard::Changed(path));
                if is_dir {
                    self.watch_new(wd, &name, &mut heard);
                }
            } else if mask.contains(ReadFlags::DELETE) {
                heard.push(Heard::Changed(path));
                if is_dir {
                    let child = self.nodes.get(&wd).and_then(|n| n.children.get(&name[..]));
                    if let Some(child) = child.copied() {
                        self.unlink(child);
                    }
                }
            } else if mask.intersects(ReadFlags::MODIFY | ReadFlags::CLOSE_WRITE) {
                heard.push(Heard::Changed(path));
            } else if mask.contains(ReadFlags::ATTRIB) {
                heard.push(Heard::Attrs(path));
            }
        }
        // Renamed away and not back in: moved out of the share.
        for child in moved_away.into_values() {
            self.forget(child, true);
        }
        if overflow {
            heard.push(Heard::Overflow);
            self.rewatch(&mut heard);
        }
        heard
    }

    /// After an overflow: walks the whole tree again, watching every directory found (the
    /// kernel hands back the watch a directory has already), and drops the watches of
    /// directories not found.
    fn rewatch(&mut self, heard: &mut Vec<Heard>) {
        let old: HashSet<i32> = self.nodes.keys().copied().collect();
        let root_wd = self.root_wd;
        self.nodes.clear();
        self.nodes.insert(root_wd, Node::unlinked());
        self.watch_beneath(root_wd, Vec::new(), heard);
        for wd in old {
            if !self.nodes.contains_key(&wd) {
                let _ = inotify::remove_watch(&self.inotify, wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn p(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes()).unwrap()
    }

    /// A watch whose batches arrive on a channel.
    fn watch(root: &Path) -> (TreeWatch, mpsc::Receiver<Vec<Heard>>) {
        let (tx, rx) = mpsc::channel();
        let w = TreeWatch::start(root, move |batch| {
            let _ = tx.send(batch);
        })
        .unwrap();
        (w, rx)
    }

    /// Everything heard until `done` says enough (or 10 s pass: then it fails).
    fn hear_until(rx: &mpsc::Receiver<Vec<Heard>>, done: impl Fn(&[Heard]) -> bool) -> Vec<Heard> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut all = Vec::new();
        while !done(&all) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(batch) => all.extend(batch),
                Err(_) => panic!("not heard in time; heard {all:?}"),
            }
        }
        all
    }

    fn changed(heard: &[Heard], path: &str) -> bool {
        heard.iter().any(|h| match h {
            Heard::Changed(p) | Heard::MovedTo(p) | Heard::MovedFrom(p) | Heard::Attrs(p) => {
                p.escaped() == path
            }
            _ => false,
        })
    }

    /// Waits until the watch counts `want` directories, and checks the kernel agrees.
    fn settles_at(w: &TreeWatch, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (w.watched() != want || w.kernel_watches() != want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!((w.watched(), w.kernel_watches()), (want, want));
    }

    #[test]
    fn files_in_directories_made_after_the_start_are_heard_with_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let (w, rx) = watch(root);
        settles_at(&w, 3);
        // Made in one go: the walk after the watch on `n` finds what the kernel made first.
        std::fs::create_dir_all(root.join("n/m/o")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        hear_until(&rx, |h| changed(h, "n") && changed(h, "a/b/f"));
        settles_at(&w, 6);
        std::fs::write(root.join("n/m/o/deep"), "y").unwrap();
        hear_until(&rx, |h| changed(h, "n/m/o/deep"));
    }

    #[test]
    fn a_renamed_directory_is_heard_under_its_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(root.join("x")).unwrap();
        let (w, rx) = watch(root);
        settles_at(&w, 5);
        std::fs::rename(root.join("a/b"), root.join("x/moved")).unwrap();
        let heard = hear_until(&rx, |h| changed(h, "x/moved"));
        assert!(changed(&heard, "a/b"), "{heard:?}");
        std::fs::write(root.join("x/moved/c/f"), "z").unwrap();
        hear_until(&rx, |h| changed(h, "x/moved/c/f"));
        settles_at(&w, 5);
    }

    #[test]
    fn a_directory_moved_out_loses_its_watches_and_one_moved_in_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("share");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(outside.join("in/deeper")).unwrap();
        let (w, rx) = watch(&root);
        settles_at(&w, 4);
        std::fs::rename(root.join("a"), outside.join("a")).unwrap();
        hear_until(&rx, |h| changed(h, "a"));
        settles_at(&w, 1);
        // Written outside now: unheard.
        std::fs::write(outside.join("a/b/c/f"), "o").unwrap();
        std::fs::rename(outside.join("in"), root.join("in")).unwrap();
        hear_until(&rx, |h| changed(h, "in"));
        settles_at(&w, 3);
        std::fs::write(root.join("in/deeper/g"), "i").unwrap();
        let heard = hear_until(&rx, |h| changed(h, "in/deeper/g"));
        assert!(!changed(&heard, "a/b/c/f"), "{heard:?}");
    }

    #[test]
    fn removed_trees_drop_their_watches_and_the_reserved_directory_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for i in 0..50 {
            std::fs::create_dir_all(root.join(format!("t/{i}/x"))).unwrap();
        }
        std::fs::create_dir_all(root.join(".vmsync/trash/b/c")).unwrap();
        let (w, rx) = watch(root);
        settles_at(&w, 102);
        std::fs::remove_dir_all(root.join("t")).unwrap();
        std::fs::create_dir_all(root.join(".vmsync/trash/new/d")).unwrap();
        std::fs::write(root.join(".vmsync/trash/new/d/f"), "t").unwrap();
        std::fs::write(root.join("after"), "a").unwrap();
        let heard = hear_until(&rx, |h| changed(h, "after"));
        settles_at(&w, 1);
        assert!(
            heard.iter().all(|h| !format!("{h:?}").contains(".vmsync")),
            "{heard:?}"
        );
    }

    /// A chain made faster than it is watched costs a watch and a listing per directory, and
    /// stops at the depth past which nothing has a share path.
    #[test]
    fn a_deep_chain_is_watched_down_to_the_depth_bound_and_heard_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (w, rx) = watch(root);
        let mut path = root.to_path_buf();
        for _ in 0..1500 {
            path.push("d");
        }
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(root.join("marker"), "m").unwrap();
        hear_until(&rx, |h| changed(h, "marker"));
        // The root and a directory at each depth from 1 to MAX_PATH_DEPTH - 1.
        settles_at(&w, MAX_PATH_DEPTH as u64);
        let shallow: PathBuf = root.join("d/d/d/f");
        std::fs::write(&shallow, "s").unwrap();
        hear_until(&rx, |h| changed(h, "d/d/d/f"));
    }

    #[test]
    fn writes_attributes_and_renames_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("f"), "1").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        let (_w, rx) = watch(root);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let heard = hear_until(&rx, |h| h.contains(&Heard::Attrs(p("f"))));
        assert!(!heard.contains(&Heard::Changed(p("f"))), "{heard:?}");
        std::fs::set_permissions(root.join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        hear_until(&rx, |h| h.contains(&Heard::Attrs(p("d"))));
        std::fs::rename(root.join("f"), root.join("g")).unwrap();
        let heard = hear_until(&rx, |h| h.contains(&Heard::MovedTo(p("g"))));
        assert!(heard.contains(&Heard::MovedFrom(p("f"))), "{heard:?}");
        std::fs::write(root.join("g"), "2").unwrap();
        hear_until(&rx, |h| h.contains(&Heard::Changed(p("g"))));
        let names: BTreeSet<String> = heard.iter().map(|h| format!("{h:?}")).collect();
        assert!(names.iter().all(|n| !n.contains("Overflow")), "{names:?}");
    }

    /// After an overflow, directories made and removed unheard get and lose their watches.
    #[test]
    fn after_an_overflow_the_tree_is_watched_again_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("gone/x")).unwrap();
        std::fs::create_dir_all(root.join("kept")).unwrap();
        let mut tree = manual(root);
        assert_eq!(tree.nodes.len(), 4);
        // Nothing read meanwhile: as if the events were lost.
        std::fs::create_dir_all(root.join("kept/new/deeper")).unwrap();
        std::fs::remove_dir_all(root.join("gone")).unwrap();
        let mut heard = Vec::new();
        tree.rewatch(&mut heard);
        assert!(heard.is_empty(), "{heard:?}");
        assert_eq!(
            watched_paths(&tree),
            ["", "kept", "kept/new", "kept/new/deeper"]
        );
        let kernel = {
            use std::os::fd::AsRawFd;
            kernel_watch_count(tree.inotify.as_raw_fd())
        };
        assert_eq!(kernel, 4);
    }

    /// A tree whose events are read by hand (no thread): what one read holds is known.
    fn manual(root: &Path) -> Tree {
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).unwrap();
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            fd: rustix::event::eventfd(0, EventfdFlags::CLOEXEC).unwrap(),
        });
        let mut tree = Tree::new(root.to_path_buf(), inotify, stop);
        tree.watch_root().unwrap();
        let mut heard = Vec::new();
        tree.watch_beneath(tree.root_wd, Vec::new(), &mut heard);
        assert!(heard.is_empty(), "{heard:?}");
        tree
    }

    fn watched_paths(tree: &Tree) -> Vec<String> {
        let mut paths: Vec<String> = tree
            .nodes
            .keys()
            .filter_map(|&wd| tree.path_of(wd, None))
            .map(|p| p.escaped())
            .collect();
        paths.sort();
        paths
    }

    /// In one read: a directory moved out, another made under its name, and a third renamed
    /// in a circle. The new one is watched, the one moved out is not, the renamed one follows.
    #[test]
    fn a_name_taken_by_a_new_directory_in_the_same_read_gets_its_watch() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("share");
        std::fs::create_dir_all(root.join("a/inner")).unwrap();
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        let mut tree = manual(&root);
        assert_eq!(watched_paths(&tree), ["", "a", "a/inner", "b", "b/c"]);
        std::fs::rename(root.join("a"), dir.path().join("a-outside")).unwrap();
        std::fs::create_dir_all(root.join("a/new")).unwrap();
        std::fs::rename(root.join("b"), root.join("b2")).unwrap();
        std::fs::rename(root.join("b2"), root.join("b")).unwrap();
        std::fs::rename(root.join("b/c"), root.join("c")).unwrap();
        let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUFFER];
        let heard = tree.read_all(&mut buf);
        assert!(heard.contains(&Heard::MovedFrom(p("a"))), "{heard:?}");
        assert!(heard.contains(&Heard::Changed(p("a"))), "{heard:?}");
        assert_eq!(watched_paths(&tree), ["", "a", "a/new", "b", "c"]);
        assert_eq!(tree.nodes.len(), 5);
    }

    #[test]
    fn dropping_the_watch_stops_its_thread_and_frees_its_watches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let (w, rx) = watch(dir.path());
        settles_at(&w, 3);
        drop(w);
        // The thread ends, and with it the handler and its sender.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                _ if Instant::now() > deadline => panic!("the watch thread still runs"),
                _ => {}
            }
        }
    }
}
