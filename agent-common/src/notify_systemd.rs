//! systemd readiness: `sd_notify(READY=1)` without libsystemd. When systemd starts a unit with
//! `Type=notify` it passes `NOTIFY_SOCKET`; a datagram saying `READY=1` there marks the unit
//! started. The host agent sends it after its first full sync, so units ordered after it start
//! on a complete tree; the guest agent once it listens. Without `NOTIFY_SOCKET` this does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`, `"STATUS=..."`) to systemd if it asked for notifications.
/// Failures are logged and otherwise ignored: readiness is a courtesy, not a reason to stop.
pub fn notify(socket: Option<std::ffi::OsString>, state: &str) {
    let Some(path) = socket else { return };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd uses these in containers).
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abstract_name,
        )
        .and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr))
    } else {
        UnixDatagram::unbound().and_then(|s| s.send_to(state.as_bytes(), &path))
    };
    if let Err(e) = result {
        tracing::warn!("telling systemd `{state}` failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        notify(Some(path.clone().into()), "READY=1");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        notify(None, "READY=1"); // no socket: nothing to do, no panic
    }
}
