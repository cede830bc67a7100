//! Where a peer is: the address syntax of configs and the CLI, parsed strictly and printed back
//! the same way. Parsing only; connecting is [`crate::stream`].
//!
//! | form                       | meaning                                                      |
//! |----------------------------|--------------------------------------------------------------|
//! | `unix:/abs/path`           | a Unix stream socket (local development, tests)              |
//! | `vsock://CID:PORT`         | AF_VSOCK: the host dials a guest (QEMU/KVM + vhost-vsock)    |
//! | `vsock://any:PORT`         | AF_VSOCK listen form: the guest accepts from any CID          |
//! | `hybrid:/abs/path.sock:PORT` | the VMM's Unix socket + `CONNECT PORT` (Firecracker, Cloud Hypervisor) |
//!
//! Numbers are plain decimal without sign or leading zeros, so every accepted string prints back
//! identically. Error messages quote the input (escaped) and say what is wrong with it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use vmsync_core::path::escape_bytes;

/// The vsock port vmsync uses unless configured otherwise. Below 1024, so on Linux only a
/// privileged process (CAP_NET_BIND_SERVICE) can listen on it inside the guest: an unprivileged
/// guest user cannot impersonate the agent by grabbing the port first.
pub const DEFAULT_VSOCK_PORT: u32 = 786;
/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes including the NUL).
pub const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;
/// `VMADDR_CID_ANY` / `VMADDR_PORT_ANY`: reserved, never a concrete address.
const VSOCK_ANY: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    /// `unix:/abs/path`
    Unix(PathBuf),
    /// `vsock://CID:PORT`
    Vsock { cid: u32, port: u32 },
    /// `vsock://any:PORT` (listen only)
    VsockAny { port: u32 },
    /// `hybrid:/abs/path.sock:PORT`
    Hybrid { path: PathBuf, port: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error(
        "`{input}`: unknown address form; expected unix:/PATH, vsock://CID:PORT, \
         vsock://any:PORT or hybrid:/PATH:PORT"
    )]
    UnknownScheme { input: String },
    #[error("`{input}`: the socket path is empty")]
    EmptyPath { input: String },
    #[error("`{input}`: the socket path must be absolute (start with `/`)")]
    RelativePath { input: String },
    #[error("`{input}`: the socket path contains a NUL byte")]
    NulInPath { input: String },
    #[error("`{input}`: the socket path is {len} bytes, longer than the {max} the kernel allows")]
    PathTooLong {
        input: String,
        len: usize,
        max: usize,
    },
    #[error("`{input}`: missing `:PORT` at the end")]
    MissingPort { input: String },
    #[error("`{input}`: missing `CID:PORT` after `vsock://`")]
    MissingCid { input: String },
    #[error(
        "`{input}`: {what} `{value}` is not a decimal number from 0 to 4294967294 \
         (no sign, no leading zeros)"
    )]
    BadNumber {
        input: String,
        what: &'static str,
        value: String,
    },
}

impl EndpointAddr {
    /// True for the forms a listener can bind (`unix:`, `vsock://any:` and `vsock://CID:`).
    pub fn can_listen(&self) -> bool {
        !matches!(self, EndpointAddr::Hybrid { .. })
    }

    /// True for the forms a client can dial (everything but `vsock://any:`).
    pub fn can_connect(&self) -> bool {
        !matches!(self, EndpointAddr::VsockAny { .. })
    }
}

fn quote(input: &str) -> String {
    escape_bytes(input.as_bytes())
}

/// A `u32` in canonical decimal, excluding the reserved `u32::MAX`.
fn number(input: &str, what: &'static str, value: &str) -> Result<u32, AddrError> {
    let bad = || AddrError::BadNumber {
        input: quote(input),
        what,
        value: quote(value),
    };
    let canonical = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'));
    if !canonical {
        return Err(bad());
    }
    match value.parse::<u32>() {
        Ok(n) if n != VSOCK_ANY => Ok(n),
        _ => Err(bad()),
    }
}

fn socket_path(input: &str, path: &str) -> Result<PathBuf, AddrError> {
    if path.is_empty() {
        return Err(AddrError::EmptyPath {
            input: quote(input),
        });
    }
    if !path.starts_with('/') {
        return Err(AddrError::RelativePath {
            input: quote(input),
        });
    }
    if path.contains('\0') {
        return Err(AddrError::NulInPath {
            input: quote(input),
        });
    }
    if path.len() > MAX_UNIX_SOCKET_PATH_BYTES {
        return Err(AddrError::PathTooLong {
            input: quote(input),
            len: path.len(),
            max: MAX_UNIX_SOCKET_PATH_BYTES,
        });
    }
    Ok(PathBuf::from(path))
}

impl FromStr for EndpointAddr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Self, AddrError> {
        if let Some(path) = input.strip_prefix("unix:") {
            return Ok(EndpointAddr::Unix(socket_path(input, path)?));
        }
        if let Some(rest) = input.strip_prefix("vsock://") {
            let Some((cid, port)) = rest.split_once(':') else {
                return Err(if rest.is_empty() {
                    AddrError::MissingCid {
                        input: quote(input),
                    }
                } else {
                    AddrError::MissingPort {
                        input: quote(input),
                    }
                });
            };
            let port = number(input, "port", port)?;
            if cid == "any" {
                return Ok(EndpointAddr::VsockAny { port });
            }
            let cid = number(input, "CID", cid)?;
            return Ok(EndpointAddr::Vsock { cid, port });
        }
        if let Some(rest) = input.strip_prefix("hybrid:") {
            // The port is after the last `:`; the path itself may contain colons.
            let Some((path, port)) = rest.rsplit_once(':') else {
                return Err(AddrError::MissingPort {
                    input: quote(input),
                });
            };
            let path = socket_path(input, path)?;
            let port = number(input, "port", port)?;
            return Ok(EndpointAddr::Hybrid { path, port });
        }
        Err(AddrError::UnknownScheme {
            input: quote(input),
        })
    }
}

fn show(path: &Path) -> std::path::Display<'_> {
    path.display()
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Unix(path) => write!(f, "unix:{}", show(path)),
            EndpointAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            EndpointAddr::VsockAny { port } => write!(f, "vsock://any:{port}"),
            EndpointAddr::Hybrid { path, port } => write!(f, "hybrid:{}:{port}", show(path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        let cases = [
            (
                "unix:/run/vmsync/dev.sock",
                EndpointAddr::Unix("/run/vmsync/dev.sock".into()),
            ),
            ("unix:/a:b", EndpointAddr::Unix("/a:b".into())),
            ("vsock://3:786", EndpointAddr::Vsock { cid: 3, port: 786 }),
            ("vsock://0:0", EndpointAddr::Vsock { cid: 0, port: 0 }),
            (
                "vsock://4294967294:1",
                EndpointAddr::Vsock {
                    cid: 4_294_967_294,
                    port: 1,
                },
            ),
            ("vsock://any:786", EndpointAddr::VsockAny { port: 786 }),
            (
                "hybrid:/run/fc/vm1.vsock:786",
                EndpointAddr::Hybrid {
                    path: "/run/fc/vm1.vsock".into(),
                    port: 786,
                },
            ),
            (
                "hybrid:/odd:name.sock:52",
                EndpointAddr::Hybrid {
                    path: "/odd:name.sock".into(),
                    port: 52,
                },
            ),
        ];
        for (input, want) in cases {
            let got: EndpointAddr = input.parse().unwrap();
            assert_eq!(got, want, "{input}");
            assert_eq!(got.to_string(), input);
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_SOCKET_PATH_BYTES));
        let cases: Vec<(&str, &str)> = vec![
            ("", "unknown address form"),
            ("tcp://1.2.3.4:5", "unknown address form"),
            ("/run/x.sock", "unknown address form"),
            ("unix:", "socket path is empty"),
            ("unix:run/x.sock", "must be absolute"),
            ("unix:/a\0b", "NUL byte"),
            (&long, "longer than the 107"),
            ("vsock://", "missing `CID:PORT`"),
            ("vsock://3", "missing `:PORT`"),
            ("vsock://3:", "port `` is not a decimal number"),
            ("vsock://x:786", "CID `x` is not a decimal number"),
            ("vsock://3:+786", "port `+786`"),
            ("vsock://03:786", "CID `03`"),
            ("vsock://3:4294967295", "port `4294967295`"),
            ("vsock://4294967295:786", "CID `4294967295`"),
            ("vsock://3:99999999999", "port `99999999999`"),
            ("vsock://-1:786", "CID `-1`"),
            ("vsock://any:", "port ``"),
            ("hybrid:/x.sock", "missing `:PORT`"),
            ("hybrid:x.sock:786", "must be absolute"),
            ("hybrid:/x.sock:port", "port `port`"),
            ("hybrid::786", "socket path is empty"),
            ("bogus\x1b[31m", "bogus\\x1b[31m"),
        ];
        for (input, want) in cases {
            match input.parse::<EndpointAddr>() {
                Ok(a) => panic!("{input:?} parsed as {a:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{input:?}: {msg}");
                    assert!(!msg.chars().any(char::is_control), "{input:?}: {msg:?}");
                }
            }
        }
    }

    #[test]
    fn listen_and_connect_forms() {
        let any: EndpointAddr = "vsock://any:786".parse().unwrap();
        assert!(any.can_listen() && !any.can_connect());
        let hybrid: EndpointAddr = "hybrid:/x:1".parse().unwrap();
        assert!(!hybrid.can_listen() && hybrid.can_connect());
        assert_eq!(DEFAULT_VSOCK_PORT, 786);
    }
}
