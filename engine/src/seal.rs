//! Early sealing: runs a staged file's seal (mode, mtime, fsync: a [`SealJob`]) on a pool of
//! background threads as soon as the file is complete, so the disk flush overlaps the rest of
//! the transfer instead of all of it waiting for the transition.
//!
//! What it must not do: touch the share's state (it runs while the share's lock is held by
//! others, and never takes it), decide anything (the transition takes the result and is the
//! only one to act on it), or use a temp's own descriptor (each job owns a `dup`, so closing
//! or discarding the temp while its seal runs is safe).
//!
//! A [`SealHandle`] is the one claim on a job's outcome. Dropping it cancels the job: a queued
//! job is dropped unrun, a running one finishes and its result is thrown away. So a staged
//! file that is unstaged, restaged or discarded by a full scan simply drops its handle, and a
//! result can only reach the handle (and so the staged file) it was submitted with; the
//! [`crate::root::Sealed`] proof is moreover accepted only by the temp it was made from.

use crate::root::{FsError, SealJob, Sealed};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Most background threads per share that run seals. Concurrency is what makes fsyncs cheap
/// (one thread fsyncing 1,000 small new files took 2.5-3 s on the bench VM, sixteen 0.05 s:
/// concurrent fsyncs share the disk's cache flushes), and a worker spends its time waiting
/// on the disk, not on a CPU. Measured with bench/syncbench.py, see the commit that set it.
pub const SEAL_WORKERS: usize = 16;

/// How long a worker with nothing to do waits for a job before it ends: an idle share holds
/// no sealing threads.
#[cfg(not(test))]
const WORKER_IDLE_MS: u64 = 5_000;
#[cfg(test)]
const WORKER_IDLE_MS: u64 = 50;

/// The background sealer of one share. Its threads start as jobs queue up (one per job
/// waiting, up to [`SEAL_WORKERS`]), end after [`WORKER_IDLE_MS`] without work, and end when
/// the sealer is dropped (after the seal each is running, if any; they are never joined:
/// dropping must not wait for an fsync).
pub struct Sealer {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or the sealer closes.
    work: Condvar,
    /// Signalled when a worker finishes a job (tests wait for the sealer to be idle).
    #[cfg(test)]
    idle: Condvar,
    /// Runs in the worker before each job: may block (to hold a seal "in flight") or return
    /// an error to fail the job with.
    #[cfg(test)]
    hook: Mutex<Option<Hook>>,
}

#[cfg(test)]
pub(crate) type Hook = Arc<dyn Fn() -> Option<rustix::io::Errno> + Send + Sync>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<Ticket>>,
    /// Jobs a worker is running now.
    running: usize,
    /// Worker threads alive (or being started).
    workers: usize,
    closed: bool,
}

/// One submitted seal, shared by its [`SealHandle`] and (while queued) the queue.
struct Ticket {
    state: Mutex<State>,
    changed: Condvar,
}

enum State {
    Queued(SealJob),
    Running,
    Done(Result<Sealed, FsError>),
    /// Taken back by its handle (claimed, cancelled) or its result collected.
    Gone,
}

/// The claim on one submitted seal. Dropping it cancels the seal (see the module docs).
pub struct SealHandle {
    ticket: Arc<Ticket>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Sealer {
    fn default() -> Self {
        Sealer::new()
    }
}

impl Sealer {
    pub fn new() -> Sealer {
        Sealer {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                work: Condvar::new(),
                #[cfg(test)]
                idle: Condvar::new(),
                #[cfg(test)]
                hook: Mutex::new(None),
            }),
        }
    }

    /// Queues `job` and returns the claim on its outcome. Should no worker thread start, the
    /// job stays queued until its handle claims it back ([`SealHandle::claim`]).
    pub fn submit(&mut self, job: SealJob) -> SealHandle {
        let ticket = Arc::new(Ticket {
            state: Mutex::new(State::Queued(job)),
            changed: Condvar::new(),
        });
        let spawn = {
            let mut q = lock(&self.shared.queue);
            q.jobs.push_back(ticket.clone());
            let spawn = q.workers < SEAL_WORKERS && q.jobs.len() + q.running > q.workers;
            if spawn {
                q.workers += 1;
            }
            spawn
        };
        self.shared.work.notify_one();
        if spawn {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("vmsync-seal".into())
                .spawn(move || work(&shared));
            if let Err(e) = spawned {
                lock(&self.shared.queue).workers -= 1;
                tracing::debug!("cannot start a seal thread ({e}); sealing inline");
            }
        }
        SealHandle { ticket }
    }

    /// Installs a hook that each worker runs before a job (see [`Shared::hook`]).
    #[cfg(test)]
    pub(crate) fn set_hook(&self, hook: Option<Hook>) {
        *lock(&self.shared.hook) = hook;
    }

    /// Worker threads alive.
    #[cfg(test)]
    pub(crate) fn workers(&self) -> usize {
        lock(&self.shared.queue).workers
    }

    /// Waits until no job is queued or running.
    #[cfg(test)]
    pub(crate) fn wait_idle(&self) {
        let mut q = lock(&self.shared.queue);
        while !q.jobs.is_empty() || q.running > 0 {
            q = self
                .shared
                .idle
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        let queued = {
            let mut q = lock(&self.shared.queue);
            q.closed = true;
            std::mem::take(&mut q.jobs)
        };
        self.shared.work.notify_all();
        // Jobs nobody will run: their handles see them as gone, their descriptors close now.
        for ticket in queued {
            let mut state = lock(&ticket.state);
            if matches!(*state, State::Queued(_)) {
                *state = State::Gone;
            }
            drop(state);
            ticket.changed.notify_all();
        }
    }
}

/// A worker: takes queued jobs and runs them until the sealer closes or it has been idle
/// for [`WORKER_IDLE_MS`].
fn work(shared: &Shared) {
    let idle = std::time::Duration::from_millis(WORKER_IDLE_MS);
    loop {
        let ticket = {
            let mut q = lock(&shared.queue);
            let mut waited = false;
            loop {
                if q.closed {
                    q.workers -= 1;
                    return;
                }
                if let Some(t) = q.jobs.pop_front() {
                    q.running += 1;
                    break t;
                }
                if waited {
                    q.workers -= 1;
                    return;
                }
                let (guard, timeout) = shared
                    .work
                    .wait_timeout(q, idle)
                    .unwrap_or_else(PoisonError::into_inner);
                q = guard;
                waited = timeout.timed_out();
            }
        };
        let job = {
            let mut state = lock(&ticket.state);
            match std::mem::replace(&mut *state, State::Running) {
                State::Queued(job) => Some(job),
                // Claimed or cancelled before we got to it.
                other => {
                    *state = other;
                    None
                }
            }
        };
        if let Some(job) = job {
            let result = run(shared, job);
            let mut state = lock(&ticket.state);
            // A handle dropped meanwhile left `Gone`; the result then goes nowhere.
            if matches!(*state, State::Running) {
                *state = State::Done(result);
            }
            drop(state);
            ticket.changed.notify_all();
        }
        lock(&shared.queue).running -= 1;
        #[cfg(test)]
        shared.idle.notify_all();
    }
}

fn run(_shared: &Shared, job: SealJob) -> Result<Sealed, FsError> {
    #[cfg(test)]
    {
        let hook = lock(&_shared.hook).clone();
        if let Some(errno) = hook.and_then(|h| h()) {
            return Err(job.fail(errno));
        }
    }
    job.run()
}

impl SealHandle {
    /// Takes the job back if no worker has started it, for the caller to run itself.
    pub fn claim(&self) -> Option<SealJob> {
        let mut state = lock(&self.ticket.state);
        match std::mem::replace(&mut *state, State::Gone) {
            State::Queued(job) => Some(job),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Waits for the job to finish and takes its result. `None` if there is none to take:
    /// claimed back, or dropped unrun because the sealer closed.
    pub fn wait(self) -> Option<Result<Sealed, FsError>> {
        let mut state = lock(&self.ticket.state);
        loop {
            match std::mem::replace(&mut *state, State::Gone) {
                State::Done(result) => return Some(result),
                State::Gone => return None,
                other => {
                    *state = other;
                    state = self
                        .ticket
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// True once the job has finished (its result waits to be taken).
    pub fn is_done(&self) -> bool {
        matches!(*lock(&self.ticket.state), State::Done(_))
    }
}

impl Drop for SealHandle {
    fn drop(&mut self) {
        // Queued: the job (and its descriptor) goes now, unrun. Running: the worker finds
        // `Gone` when it finishes and drops the result. Done: the result goes.
        let mut state = lock(&self.ticket.state);
        *state = State::Gone;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::ShareRoot;
    use std::os::unix::fs::MetadataExt;
    use vmsync_core::entry::Timestamp;

    fn root() -> (tempfile::TempDir, ShareRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = ShareRoot::open(dir.path()).unwrap();
        (dir, root)
    }

    const MTIME: Timestamp = Timestamp {
        secs: 1_600_000_000,
        nanos: 5,
    };

    #[test]
    fn submitted_job_runs_in_the_background() {
        let (_d, root) = root();
        let mut temp = root.create_temp().unwrap();
        let mut sealer = Sealer::new();
        let handle = sealer.submit(temp.seal_job(0o640, MTIME).unwrap());
        sealer.wait_idle();
        assert!(handle.is_done());
        let meta = temp.file.metadata().unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_600_000_000, 5));
        let proof = handle.wait().unwrap().unwrap();
        assert!(temp.accept_seal(proof));
        assert!(temp.is_sealed(0o640, MTIME));
        assert!(!temp.is_sealed(0o644, MTIME), "sealed with another mode");
    }

    #[test]
    fn proof_is_refused_by_another_temp() {
        let (_d, root) = root();
        let a = root.create_temp().unwrap();
        let mut b = root.create_temp().unwrap();
        let proof = a.seal_job(0o644, MTIME).unwrap().run().unwrap();
        assert!(!b.accept_seal(proof));
        assert!(!b.is_sealed(0o644, MTIME));
    }

    #[test]
    fn dropped_handle_cancels_a_queued_job() {
        let (_d, root) = root();
        let temp = root.create_temp().unwrap();
        let mut sealer = Sealer::new();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        // Hold every worker in its first job, so the last job stays queued.
        sealer.set_hook(Some(Arc::new(move || {
            let _ = lock(&rx).recv();
            None
        })));
        let busy: Vec<SealHandle> = (0..SEAL_WORKERS)
            .map(|_| sealer.submit(temp.seal_job(0o644, MTIME).unwrap()))
            .collect();
        let queued = sealer.submit(temp.seal_job(0o600, MTIME).unwrap());
        drop(queued);
        for _ in 0..=SEAL_WORKERS {
            let _ = tx.send(());
        }
        sealer.wait_idle();
        for h in busy {
            assert!(h.wait().unwrap().is_ok());
        }
        // The cancelled job (mode 0600 after the others' 0644) never ran.
        assert_eq!(temp.file.metadata().unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn claimed_job_is_not_run_by_a_worker() {
        let (_d, root) = root();
        let temp = root.create_temp().unwrap();
        let mut sealer = Sealer::new();
        sealer.set_hook(Some(Arc::new(|| Some(rustix::io::Errno::IO))));
        let handle = sealer.submit(temp.seal_job(0o644, MTIME).unwrap());
        match handle.claim() {
            // Claimed before a worker took it: ours to run, and the handle has nothing.
            Some(job) => {
                assert!(job.run().is_ok());
                assert!(handle.wait().is_none());
            }
            // A worker was quicker: its (injected) failure is the result.
            None => assert!(handle.wait().unwrap().is_err()),
        }
    }

    #[test]
    fn idle_workers_end_and_come_back() {
        let (_d, root) = root();
        let mut temp = root.create_temp().unwrap();
        let mut sealer = Sealer::new();
        let first = sealer.submit(temp.seal_job(0o644, MTIME).unwrap());
        assert!(first.wait().unwrap().is_ok());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while sealer.workers() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "idle workers never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let again = sealer.submit(temp.seal_job(0o640, MTIME).unwrap());
        assert!(temp.accept_seal(again.wait().unwrap().unwrap()));
        assert!(temp.is_sealed(0o640, MTIME));
    }

    #[test]
    fn dropped_sealer_leaves_no_waiter_hanging() {
        let (_d, root) = root();
        let temp = root.create_temp().unwrap();
        let mut sealer = Sealer::new();
        let handle = sealer.submit(temp.seal_job(0o644, MTIME).unwrap());
        drop(sealer);
        // Run by a worker before the close, or dropped unrun: either way `wait` returns.
        let _ = handle.wait();
    }
}
