//! The handshake's decisions, as pure functions: what the guest answers to a `Hello`, and what the
//! host accepts as a `Welcome`. The transport does the I/O and maps share names to local shares.
//!
//! The guest refuses (with a reason shown on both sides) when the magic is wrong, the version
//! ranges do not meet, the chunker parameters differ, a share name is malformed or repeated, or
//! it does not export a requested share. Otherwise both sides speak the highest common version.

use crate::limits::MAX_SHARE_NAME_BYTES;
use crate::messages::{
    ChunkerParams, Hello, ShareOpen, Welcome, MAGIC, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use std::collections::BTreeSet;
use vmsync_core::path::escape_bytes;

/// What one side speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalParams {
    pub min_version: u16,
    pub max_version: u16,
    pub chunker: ChunkerParams,
}

impl Default for LocalParams {
    fn default() -> Self {
        LocalParams {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            chunker: ChunkerParams::PINNED,
        }
    }
}

/// Why a guest refuses a `Hello`. The `Display` text is the `Refused::reason` sent to the host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a vmsync peer: bad magic")]
    BadMagic,
    #[error("invalid protocol version range {min}..={max}")]
    BadVersionRange { min: u16, max: u16 },
    #[error(
        "no common protocol version: host speaks {host_min}..={host_max}, \
         guest speaks {guest_min}..={guest_max}"
    )]
    NoCommonVersion {
        host_min: u16,
        host_max: u16,
        guest_min: u16,
        guest_max: u16,
    },
    #[error(
        "chunker parameters differ: host uses min/avg/max {}/{}/{} bytes, guest {}/{}/{}",
        host.min, host.avg, host.max, guest.min, guest.avg, guest.max
    )]
    ChunkerMismatch {
        host: ChunkerParams,
        guest: ChunkerParams,
    },
    #[error(
        "share name `{0}` is invalid: use 1 to {MAX_SHARE_NAME_BYTES} ASCII letters, digits, \
         `.`, `_` or `-`, not starting with `.`"
    )]
    BadShareName(String),
    #[error("share `{0}` is requested twice")]
    DuplicateShare(String),
}

/// What the guest agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    pub version: u16,
}

/// The refusal reason for a share the guest does not export. Guests use it from their `exports`
/// mapping so the text is the same everywhere.
pub fn share_not_exported(name: &str) -> String {
    format!(
        "share `{}` is not exported by this guest",
        escape_bytes(name.as_bytes())
    )
}

/// Share names are short, printable, path-free identifiers: `[A-Za-z0-9._-]{1,64}`, not starting
/// with `.` (so none is `.`, `..` or hidden). They end up in logs, unit names and file names.
pub fn is_valid_share_name(name: &str) -> bool {
    share_name_error(name).is_none()
}

/// `None` when `name` is a valid share name (see [`is_valid_share_name`]), else why not, in
/// words for a config file's user. The one place the rule lives: the guest's handshake and both
/// agents' config checks use it.
pub fn share_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_string());
    }
    if name.len() > MAX_SHARE_NAME_BYTES {
        return Some(format!(
            "is {} bytes; the limit is {MAX_SHARE_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "contains {bad:?}; use only letters, digits, `.`, `_` and `-`"
        ));
    }
    // It becomes a directory name under `state_dir`: never `.`, `..` or hidden.
    if name.starts_with('.') {
        return Some("must not start with `.`".to_string());
    }
    None
}

/// The host's `Hello` for these shares, speaking everything this build speaks.
pub fn hello(agent_version: &str, shares: Vec<ShareOpen>) -> Hello {
    let local = LocalParams::default();
    Hello {
        magic: MAGIC,
        min_version: local.min_version,
        max_version: local.max_version,
        agent_version: agent_version.to_owned(),
        chunker: local.chunker,
        shares,
    }
}

/// The guest's decision on a `Hello` (share names are checked for form and uniqueness here;
/// whether they are exported is the caller's business).
pub fn accept_hello(hello: &Hello, local: &LocalParams) -> Result<Agreement, Refusal> {
    if hello.magic != MAGIC {
        return Err(Refusal::BadMagic);
    }
    if hello.min_version > hello.max_version {
        return Err(Refusal::BadVersionRange {
            min: hello.min_version,
            max: hello.max_version,
        });
    }
    let version = hello.max_version.min(local.max_version);
    if version < hello.min_version.max(local.min_version) {
        return Err(Refusal::NoCommonVersion {
            host_min: hello.min_version,
            host_max: hello.max_version,
            guest_min: local.min_version,
            guest_max: local.max_version,
        });
    }
    if hello.chunker != local.chunker {
        return Err(Refusal::ChunkerMismatch {
            host: hello.chunker,
            guest: local.chunker,
        });
    }
    let mut seen = BTreeSet::new();
    for share in &hello.shares {
        if !is_valid_share_name(&share.name) {
            return Err(Refusal::BadShareName(escape_bytes(share.name.as_bytes())));
        }
        if !seen.insert(share.name.as_str()) {
            return Err(Refusal::DuplicateShare(share.name.clone()));
        }
    }
    Ok(Agreement { version })
}

/// The guest's `Welcome` for an agreement.
pub fn welcome(agreement: Agreement, agent_version: &str, local: &LocalParams) -> Welcome {
    Welcome {
        version: agreement.version,
        agent_version: agent_version.to_owned(),
        chunker: local.chunker,
    }
}

/// Why a host rejects a `Welcome`: the guest agreed to something that was not on offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeError {
    #[error("guest chose protocol version {version}, outside the offered {min}..={max}")]
    Version { version: u16, min: u16, max: u16 },
    #[error("guest answered with different chunker parameters")]
    Chunker,
}

/// The host's check of the guest's `Welcome` against its own `Hello`.
pub fn check_welcome(hello: &Hello, welcome: &Welcome) -> Result<(), WelcomeError> {
    if welcome.version < hello.min_version || welcome.version > hello.max_version {
        return Err(WelcomeError::Version {
            version: welcome.version,
            min: hello.min_version,
            max: hello.max_version,
        });
    }
    if welcome.chunker != hello.chunker {
        return Err(WelcomeError::Chunker);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(name: &str) -> ShareOpen {
        ShareOpen {
            name: name.to_owned(),
            ignore: vec![],
            respect_gitignore: false,
        }
    }

    #[test]
    fn accepts_matching_hello() {
        let h = hello("0.1.0", vec![share("src"), share("out")]);
        let a = accept_hello(&h, &LocalParams::default()).unwrap();
        assert_eq!(
            a,
            Agreement {
                version: PROTOCOL_VERSION_MAX,
            }
        );
        let w = welcome(a, "0.1.0", &LocalParams::default());
        assert_eq!(check_welcome(&h, &w), Ok(()));
    }

    #[test]
    fn picks_highest_common_version() {
        let mut h = hello("x", vec![]);
        h.min_version = 1;
        h.max_version = 9;
        let local = LocalParams {
            min_version: 2,
            max_version: 5,
            ..LocalParams::default()
        };
        assert_eq!(accept_hello(&h, &local).unwrap().version, 5);
        h.max_version = 3;
        assert_eq!(accept_hello(&h, &local).unwrap().version, 3);
    }

    #[test]
    fn refusals() {
        let local = LocalParams::default();
        let base = hello("x", vec![share("a")]);
        let cases: Vec<(Hello, Refusal)> = vec![
            (
                Hello {
                    magic: *b"VMSYNC\0\x02",
                    ..base.clone()
                },
                Refusal::BadMagic,
            ),
            (
                Hello {
                    min_version: 3,
                    max_version: 2,
                    ..base.clone()
                },
                Refusal::BadVersionRange { min: 3, max: 2 },
            ),
            (
                Hello {
                    min_version: 3,
                    max_version: 7,
                    ..base.clone()
                },
                Refusal::NoCommonVersion {
                    host_min: 3,
                    host_max: 7,
                    guest_min: PROTOCOL_VERSION_MIN,
                    guest_max: PROTOCOL_VERSION_MAX,
                },
            ),
            (
                Hello {
                    chunker: ChunkerParams {
                        min: 1,
                        avg: 2,
                        max: 3,
                    },
                    ..base.clone()
                },
                Refusal::ChunkerMismatch {
                    host: ChunkerParams {
                        min: 1,
                        avg: 2,
                        max: 3,
                    },
                    guest: ChunkerParams::PINNED,
                },
            ),
            (
                Hello {
                    shares: vec![share("a"), share("a")],
                    ..base.clone()
                },
                Refusal::DuplicateShare("a".into()),
            ),
            (
                Hello {
                    shares: vec![share("../etc")],
                    ..base.clone()
                },
                Refusal::BadShareName("../etc".into()),
            ),
            (
                Hello {
                    shares: vec![share("")],
                    ..base.clone()
                },
                Refusal::BadShareName(String::new()),
            ),
            (
                Hello {
                    shares: vec![share("a\nb")],
                    ..base.clone()
                },
                Refusal::BadShareName("a\\x0ab".into()),
            ),
        ];
        for (h, want) in cases {
            assert_eq!(accept_hello(&h, &local), Err(want));
        }
        assert!(Refusal::NoCommonVersion {
            host_min: 2,
            host_max: 7,
            guest_min: 1,
            guest_max: 1
        }
        .to_string()
        .contains("host speaks 2..=7, guest speaks 1..=1"));
    }

    #[test]
    fn share_names() {
        for ok in [
            "a",
            "src",
            "my-share_2.0",
            &"x".repeat(MAX_SHARE_NAME_BYTES),
        ] {
            assert!(is_valid_share_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(MAX_SHARE_NAME_BYTES + 1),
        ] {
            assert!(!is_valid_share_name(bad), "{bad}");
        }
        assert_eq!(
            share_not_exported("x"),
            "share `x` is not exported by this guest"
        );
    }

    #[test]
    fn welcome_checks() {
        let h = hello("x", vec![]);
        let good = welcome(
            Agreement {
                version: PROTOCOL_VERSION_MAX,
            },
            "y",
            &LocalParams::default(),
        );
        assert_eq!(
            check_welcome(
                &h,
                &Welcome {
                    version: PROTOCOL_VERSION_MAX + 1,
                    ..good.clone()
                }
            ),
            Err(WelcomeError::Version {
                version: PROTOCOL_VERSION_MAX + 1,
                min: PROTOCOL_VERSION_MIN,
                max: PROTOCOL_VERSION_MAX
            })
        );
        assert_eq!(
            check_welcome(
                &h,
                &Welcome {
                    chunker: ChunkerParams {
                        min: 1,
                        avg: 1,
                        max: 1
                    },
                    ..good
                }
            ),
            Err(WelcomeError::Chunker)
        );
    }
}
