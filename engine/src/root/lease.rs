//! Keeping other programs' writes out of a file while sync writes into it in place (an append,
//! see `ShareRoot::append_in_place`), with the kernel's file leases (`fcntl(F_SETLEASE)`).
//!
//! Every other change is written beside the file and exchanged with it, so a program writing
//! the old file meanwhile writes into the inode the trash keeps. An append writes into the file
//! itself: a program that writes it between sync's last look and sync's write would have its
//! bytes overwritten by sync's, kept nowhere. So an append goes ahead only where:
//!
//! - sync holds a write lease on its descriptor: no other descriptor is open on the file, and
//!   an `open` or `truncate` by another program waits until sync lets go (the kernel waits at
//!   most `/proc/sys/fs/lease-break-time`, 45 s by default, then breaks the lease); or
//! - the file is open elsewhere only for reading (a `tail -f` following it), which a read lease
//!   taken and let go right before sync opens it shows. A program that opens the file to write
//!   in the instant between that look and sync's write is not kept out: the one window left.
//!
//! Otherwise (a program has it open to write, or the filesystem or the file's owner refuses
//! leases) the file is replaced instead, as every other change is. Docs: docs/safety.md.

use rustix::fd::{AsRawFd, BorrowedFd};
use rustix::io::Errno;
use std::sync::Once;

/// Takes a write lease on `fd` (open for writing): `Ok(true)` when held, `Ok(false)` when
/// another descriptor is open on the file. Other errors: no leases here (the filesystem does
/// not support them, or this process neither owns the file nor has `CAP_LEASE`).
pub(super) fn lease_for_writing(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    quiet_lease_breaks();
    match set_lease(fd, libc::F_WRLCK) {
        Ok(()) => Ok(true),
        Err(Errno::AGAIN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether nobody has the file of `fd` (opened read-only) open for writing, by taking a read
/// lease on it and letting it go.
pub(super) fn nobody_writing(fd: BorrowedFd<'_>) -> bool {
    quiet_lease_breaks();
    match set_lease(fd, libc::F_RDLCK) {
        Ok(()) => {
            let _ = set_lease(fd, libc::F_UNLCK);
            true
        }
        Err(_) => false,
    }
}

fn set_lease(fd: BorrowedFd<'_>, kind: libc::c_int) -> Result<(), Errno> {
    // SAFETY: fcntl(F_SETLEASE) takes an open descriptor, which `fd` borrows for the call, and
    // an integer; it touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, kind) };
    if rc == -1 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(Errno::from_raw_os_error(errno));
    }
    Ok(())
}

/// A lease held while another program opens the file is broken with a signal to its holder,
/// `SIGIO`, whose default action ends the process. Sync does not need the notice (the opener
/// simply waits until the write is done), so the signal is ignored, once, unless something in
/// this process already handles it.
fn quiet_lease_breaks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a null new action only reads the current one into `old`, a
        // zeroed sigaction we own; setting SIG_IGN installs no handler code. Both are
        // async-signal-safe and affect only SIGIO.
        #[allow(unsafe_code)]
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGIO, std::ptr::null(), &mut old) != 0 {
                return;
            }
            if old.sa_sigaction == libc::SIG_DFL {
                let mut ignore: libc::sigaction = std::mem::zeroed();
                ignore.sa_sigaction = libc::SIG_IGN;
                libc::sigaction(libc::SIGIO, &ignore, std::ptr::null_mut());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fd::AsFd;
    use std::fs::OpenOptions;

    #[test]
    fn a_write_lease_needs_the_file_to_itself_and_a_read_lease_sees_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let ours = OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(lease_for_writing(ours.as_fd()), Ok(true));
        drop(ours);
        let ours = OpenOptions::new().write(true).open(&path).unwrap();
        let reader = std::fs::File::open(&path).unwrap();
        assert_eq!(lease_for_writing(ours.as_fd()), Ok(false));
        drop(ours);
        let probe = std::fs::File::open(&path).unwrap();
        assert!(nobody_writing(probe.as_fd()), "only readers");
        let writer = OpenOptions::new().write(true).open(&path).unwrap();
        assert!(!nobody_writing(probe.as_fd()), "a writer");
        drop((reader, writer));
    }
}
