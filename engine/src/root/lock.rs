//! The share's agent lock, `.vmsync/agent.lock`: one vmsync agent per share directory. Two
//! agents on one directory (two host controllers with different state directories, a guest
//! agent exporting a host's share through a shared filesystem) would each take the other's
//! changes for the user's, delete each other's temp files and record conflicting ancestors.
//! The lock is an exclusive `flock` on a file in the reserved directory, held by the
//! agent's [`LocalShare`](crate::local) for as long as it serves the share; the kernel drops
//! it when the process ends, however it ends.

use super::error::{fail, Loc};
use super::{to_u64, ShareRoot};
use crate::root::FsError;
use rustix::fd::OwnedFd;
use rustix::fs::{self as rfs, AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

const LOCK_NAME: &str = "agent.lock";
const LOCK_SHOWN: &[u8] = b".vmsync/agent.lock";

/// An exclusive lock on a share's `.vmsync/agent.lock`, held while this value lives.
#[derive(Debug)]
pub struct AgentLock {
    _fd: OwnedFd,
    dev: u64,
    ino: u64,
}

impl ShareRoot {
    /// Takes the share's agent lock: `Ok(None)` when another process holds it.
    pub fn lock_for_agent(&self) -> Result<Option<AgentLock>, FsError> {
        const OP: &str = "lock the share for this agent";
        let loc = Loc {
            base: LOCK_SHOWN,
            name: None,
        };
        let fd = rfs::openat(
            &self.meta,
            LOCK_NAME,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| fail(OP, loc, e))?;
        match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(fail(OP, loc, e)),
        }
        let st = rfs::fstat(&fd).map_err(|e| fail(OP, loc, e))?;
        Ok(Some(AgentLock {
            _fd: fd,
            dev: to_u64(st.st_dev),
            ino: to_u64(st.st_ino),
        }))
    }

    /// Whether `lock` is this root's lock file (and not one of a reserved directory since
    /// removed or replaced, which locks nothing any more).
    pub fn is_locked_by(&self, lock: &AgentLock) -> bool {
        rfs::statat(&self.meta, LOCK_NAME, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| to_u64(st.st_dev) == lock.dev && to_u64(st.st_ino) == lock.ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_replaced_reserved_directory_frees_nothing_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ShareRoot::open(tmp.path()).unwrap();
        let held = first.lock_for_agent().unwrap().expect("the first lock");
        assert!(first.is_locked_by(&held));
        // Another open file description (another agent) cannot take it.
        let second = ShareRoot::open(tmp.path()).unwrap();
        assert!(second.lock_for_agent().unwrap().is_none());
        drop(held);
        let again = second.lock_for_agent().unwrap().expect("free once dropped");
        // The reserved directory removed and made again: the old lock is not this root's.
        std::fs::remove_dir_all(tmp.path().join(".vmsync")).unwrap();
        let reopened = ShareRoot::open(tmp.path()).unwrap();
        assert!(!reopened.is_locked_by(&again));
        assert!(reopened.lock_for_agent().unwrap().is_some());
    }
}
