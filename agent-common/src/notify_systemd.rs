//! systemd readiness: `sd_notify(READY=1)` without libsystemd. When systemd starts a unit with
//! `Type=notify` it passes `NOTIFY_SOCKET`; a datagram saying `READY=1` there marks the unit
//! started. The host agent sends it after its first full sync, so units ordered after it start
//! on a complete tree; the guest agent once it listens. Without `NOTIFY_SOCKET` this does nothing.
//!
//! With `WatchdogSec=` systemd also passes `WATCHDOG_USEC`: [`spawn_watchdog`] then sends
//! `WATCHDOG=1` at half that interval from a task on the agent's runtime, so an agent whose
//! runtime no longer runs tasks (every worker thread stuck) is restarted.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

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

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (`usec`), when it is set for this
/// process (`WATCHDOG_PID`, `pid`, unset or `own`, this process's id); `None` otherwise.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(own)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Starts the watchdog pings on the current tokio runtime if systemd asked for them (see the
/// module docs).
pub fn spawn_watchdog() {
    let var = |name| std::env::var(name).ok();
    let every = watchdog_interval(
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    );
    let Some(every) = every else { return };
    let socket = std::env::var_os("NOTIFY_SOCKET");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify(socket.clone(), "WATCHDOG=1");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_interval_and_only_for_this_process() {
        let ms = |n| Some(Duration::from_millis(n));
        for (usec, pid, want) in [
            (Some("30000000"), None, ms(15_000)),
            (Some("30000000"), Some("42"), ms(15_000)),
            (Some(" 200000\n"), Some("42"), ms(100)),
            (Some("30000000"), Some("43"), None),
            (Some("30000000"), Some("x"), None),
            (None, None, None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("soon"), None, None),
            (Some("1"), None, ms(1)),
        ] {
            assert_eq!(watchdog_interval(usec, pid, 42), want, "{usec:?} {pid:?}");
        }
    }

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
