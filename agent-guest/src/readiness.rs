//! When the guest tells systemd it is ready (docs/cli.md, "Progress and readiness"): once every
//! share the host opened has converged in the host's first full sync of the session, so a unit
//! ordered `After=vmsync-guest.service` starts on a complete tree. Until then, and after,
//! `STATUS=` says how each share stands as the host tells it (`Endpoint::note_sync`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmsync_core::progress::SyncState;

/// What the host has said this session, and what systemd has been told.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The shares the current session opened, in order; empty while no host is connected.
    opened: Vec<String>,
    connected: bool,
    /// Counts sessions: the end of one that a newer one replaced changes nothing.
    session: u64,
    /// What the host last said of each share this session.
    states: BTreeMap<String, SyncState>,
    ready_sent: bool,
    last_status: String,
}

impl Readiness {
    /// A host connected: nothing it said before holds for this session, which is
    /// [`Readiness::session`] from now on.
    pub fn session_started(&mut self) -> Vec<String> {
        self.session += 1;
        self.connected = true;
        self.opened.clear();
        self.states.clear();
        self.messages()
    }

    /// The session opened `share`.
    pub fn opened(&mut self, share: &str) {
        self.opened.push(share.to_string());
    }

    /// The current session's number.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Session `session` ended (nothing changes if a newer one has started).
    pub fn session_ended(&mut self, session: u64) -> Vec<String> {
        if session != self.session {
            return Vec::new();
        }
        self.connected = false;
        self.opened.clear();
        self.states.clear();
        self.messages()
    }

    /// The host says `share` stands at `state`.
    pub fn heard(&mut self, share: &str, state: SyncState) -> Vec<String> {
        self.states.insert(share.to_string(), state);
        self.messages()
    }

    /// What the host last said of `share` this session.
    pub fn state(&self, share: &str) -> Option<&SyncState> {
        self.states.get(share)
    }

    /// The messages for systemd now (`STATUS=...` when it changed, `READY=1` the first time
    /// every opened share has converged), each to be sent as it is.
    fn messages(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let status = self.status_line();
        if status != self.last_status {
            out.push(format!("STATUS={status}"));
            self.last_status = status;
        }
        if !self.ready_sent && self.all_converged() {
            self.ready_sent = true;
            out.push("READY=1".to_string());
        }
        out
    }

    fn all_converged(&self) -> bool {
        self.connected
            && !self.opened.is_empty()
            && self
                .opened
                .iter()
                .all(|name| self.states.get(name).is_some_and(SyncState::converged))
    }

    fn status_line(&self) -> String {
        if !self.connected {
            return "waiting for the host to connect".into();
        }
        if self.opened.is_empty() {
            return "host connected".into();
        }
        self.opened
            .iter()
            .map(|name| match self.states.get(name) {
                Some(state) => format!("{name}: {state}"),
                None => format!("{name}: waiting for the host's first sync"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// [`Readiness`] shared by the session task and the shares' observers, sending what it says
/// to systemd (`NOTIFY_SOCKET`; nothing without it).
#[derive(Clone, Default)]
pub struct Notifier {
    state: Arc<Mutex<Readiness>>,
}

impl Notifier {
    /// Applies `f` and sends the messages it returns.
    pub fn update(&self, f: impl FnOnce(&mut Readiness) -> Vec<String>) {
        let messages = match self.state.lock() {
            Ok(mut r) => f(&mut r),
            Err(_) => return,
        };
        for m in messages {
            vmsync_agent_common::notify_systemd::notify(std::env::var_os("NOTIFY_SOCKET"), &m);
        }
    }

    /// What the host last said of `share` this session.
    pub fn state(&self, share: &str) -> Option<SyncState> {
        self.state.lock().ok()?.state(share).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmsync_core::progress::Progress;

    #[test]
    fn ready_once_every_opened_share_has_converged_and_status_follows_the_host() {
        let mut r = Readiness::default();
        assert_eq!(r.messages(), ["STATUS=waiting for the host to connect"]);
        assert_eq!(r.session_started(), ["STATUS=host connected"]);
        r.opened("src");
        r.opened("doc");
        let p = Progress {
            files_done: 10,
            files_total: 20,
            bytes_done: 1024,
            bytes_total: 2048,
        };
        assert_eq!(
            r.heard("src", SyncState::Syncing(Some(p))),
            ["STATUS=src: syncing 10/20 files, 1 KiB/2 KiB; doc: waiting for the host's first sync"]
        );
        // One share in sync is not enough.
        assert_eq!(
            r.heard("src", SyncState::InSync),
            ["STATUS=src: in sync; doc: waiting for the host's first sync"]
        );
        // A share halted on the host holds readiness back.
        assert_eq!(
            r.heard(
                "doc",
                SyncState::Halted {
                    code: "mass-deletion".into()
                }
            ),
            ["STATUS=src: in sync; doc: halted (mass-deletion) on the host"]
        );
        // Conflicts wait for the user; the rest of the tree is complete.
        assert_eq!(
            r.heard("doc", SyncState::Conflicted { conflicts: 1 }),
            [
                "STATUS=src: in sync; doc: in sync but for 1 in conflict",
                "READY=1"
            ]
        );
        // READY=1 once per process, however often the host reconnects.
        let first = r.session();
        r.session_started();
        // The replaced session's end changes nothing.
        assert!(r.session_ended(first).is_empty());
        assert_eq!(
            r.session_ended(r.session()),
            ["STATUS=waiting for the host to connect"]
        );
        r.session_started();
        r.opened("src");
        assert_eq!(r.heard("src", SyncState::InSync), ["STATUS=src: in sync"]);
        // Nothing new, nothing sent.
        assert!(r.heard("src", SyncState::InSync).is_empty());
    }

    #[test]
    fn a_share_heard_of_but_not_opened_does_not_count() {
        let mut r = Readiness::default();
        r.session_started();
        r.opened("src");
        r.heard("other", SyncState::InSync);
        assert!(!r.all_converged());
        r.heard("src", SyncState::Syncing(None));
        assert!(!r.all_converged());
        assert!(r
            .heard("src", SyncState::InSync)
            .contains(&"READY=1".to_string()));
    }
}
