//! Free space on a share's (or the state directory's) filesystem, against its reserve
//! (`min_free`, see [`vmsync_core::reserve`]). One `fstatvfs`; no decision beyond the
//! comparison, which is pure and lives in the core.

use rustix::fd::AsFd;
use vmsync_core::endpoint::EndpointError;
use vmsync_core::reserve::MinFree;

/// Bytes an unprivileged writer may still use on `fd`'s filesystem, and the filesystem's size.
pub fn free_and_total(fd: impl AsFd) -> std::io::Result<(u64, u64)> {
    let st = rustix::fs::fstatvfs(fd)?;
    let unit = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    };
    Ok((
        st.f_bavail.saturating_mul(unit),
        st.f_blocks.saturating_mul(unit),
    ))
}

/// [`check_room`] for the filesystem holding `path` (the host's state directory).
pub fn check_path(path: &std::path::Path, min_free: MinFree) -> Result<(), EndpointError> {
    match std::fs::File::open(path) {
        Ok(dir) => check_room(&dir, min_free, 0),
        Err(_) => Ok(()),
    }
}

/// `Err(DiskFull)` when writing `incoming` more bytes to `fd`'s filesystem would leave less
/// than `min_free` free (`free` in the error is what would be left). A filesystem that cannot
/// be measured is not refused: the writes themselves will say what is wrong.
pub fn check_room(fd: impl AsFd, min_free: MinFree, incoming: u64) -> Result<(), EndpointError> {
    let Ok((free, total)) = free_and_total(fd) else {
        return Ok(());
    };
    let left = free.saturating_sub(incoming);
    match min_free.shortfall(left, total) {
        Some(reserve) => Err(EndpointError::DiskFull {
            free: left,
            reserve,
        }),
        None => Ok(()),
    }
}
