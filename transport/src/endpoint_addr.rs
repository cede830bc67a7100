//! Where a peer is: the address syntax of configs and the CLI, parsed strictly and printed back
//! the same way. Parsing only; connecting is [`crate::stream`].
//!
//! | form                       | meaning                                                      |
//! |----------------------------|--------------------------------------------------------------|
//! | `unix:/abs/path`           | a Unix stream socket (local development, tests)              |
//! | `vsock://CID:PORT`         | AF_VSOCK: the host dials a guest (QEMU/KVM + vhost-vsock)    |
//! | `vsock://any:PORT`         | AF_VSOCK listen form: the guest accepts from any CID          |
//! | `hybrid:/abs/path.sock:PORT` | the VMM's Unix socket + `CONNECT PORT` (Firecracker, Cloud Hypervisor) |
//! | `libvirt:DOMAIN[@URI][:PORT]` | a libvirt domain whose vsock CID is looked up at each connect ([`crate::libvirt`]) |
//!
//! Numbers are plain decimal without sign or leading zeros, so every accepted string prints back
//! identically. Error messages quote the input (escaped) and say what is wrong with it.
//!
//! The `libvirt:` grammar, read left to right:
//! - `DOMAIN` runs to the first `@` or `:`. It is what `virsh dumpxml` takes (a name, UUID or
//!   ID): not empty, no NUL or other control character, not starting with `-` (it would read as
//!   an option), and no `@` or `:` (they delimit it).
//! - `@URI` (optional) is the libvirt connection URI (`virsh -c URI`), e.g. `qemu:///system`;
//!   it may contain `@` and `:` itself (`qemu+ssh://root@host:22/system`). Not empty, no
//!   whitespace or control character, not starting with `-`.
//! - `:PORT` (optional, default [`DEFAULT_VSOCK_PORT`]) is the last `:` of the string when what
//!   follows it contains no `/`. So `libvirt:vm@qemu:///system:786` has the port 786 and
//!   `libvirt:vm@qemu:///system` none (`///system` is part of the URI). A URI that itself ends
//!   in `:SOMETHING` without a `/` (a bare `host:port`) needs the vsock port written after it.
//!
//! The port is kept as written (`None` when absent), so `libvirt:vm` and `libvirt:vm:786` each
//! print back as they were given; both dial port 786.

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
    /// `libvirt:DOMAIN[@URI][:PORT]` (dial only): resolved to [`EndpointAddr::Vsock`] by
    /// [`crate::libvirt::resolve`] each time it is dialled.
    Libvirt(LibvirtDomain),
}

/// A libvirt domain to reach over vsock: which domain, on which libvirt connection, and the
/// guest port. See the module documentation for the grammar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LibvirtDomain {
    /// Name, UUID or ID, as `virsh dumpxml` takes it.
    pub domain: String,
    /// The connection URI (`virsh -c`); `None`: virsh's default.
    pub uri: Option<String>,
    /// The guest's vsock port as written; `None`: [`DEFAULT_VSOCK_PORT`].
    pub port: Option<u32>,
}

impl LibvirtDomain {
    /// The vsock port to dial.
    pub fn port(&self) -> u32 {
        self.port.unwrap_or(DEFAULT_VSOCK_PORT)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error(
        "`{input}`: unknown address form; expected unix:/PATH, vsock://CID:PORT, \
         vsock://any:PORT, hybrid:/PATH:PORT or libvirt:DOMAIN[@URI][:PORT]"
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
    #[error("`{input}`: the libvirt domain {reason}")]
    BadDomain { input: String, reason: &'static str },
    #[error("`{input}`: the libvirt URI after `@` {reason}")]
    BadUri { input: String, reason: &'static str },
}

impl EndpointAddr {
    /// True for the forms a listener can bind (`unix:`, `vsock://any:` and `vsock://CID:`).
    pub fn can_listen(&self) -> bool {
        !matches!(self, EndpointAddr::Hybrid { .. } | EndpointAddr::Libvirt(_))
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

/// Why a libvirt domain or URI cannot be used, if it cannot: the checks both share.
fn libvirt_text_error(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("is empty")
    } else if text.contains('\0') {
        Some("contains a NUL byte")
    } else if text.chars().any(char::is_control) {
        Some("contains a control character")
    } else if text.starts_with('-') {
        Some("starts with `-`")
    } else {
        None
    }
}

/// `rest` is what follows `libvirt:`; see the module documentation for the grammar.
fn libvirt(input: &str, rest: &str) -> Result<LibvirtDomain, AddrError> {
    let bad_domain = |reason| AddrError::BadDomain {
        input: quote(input),
        reason,
    };
    let (domain, uri, port) = match rest.split_once('@') {
        None => match rest.split_once(':') {
            Some((domain, port)) => (domain, None, Some(port)),
            None => (rest, None, None),
        },
        Some((domain, after)) => {
            if domain.contains(':') {
                return Err(bad_domain(
                    "contains `:`; the port goes last: libvirt:DOMAIN@URI:PORT",
                ));
            }
            match after.rsplit_once(':') {
                Some((uri, port)) if !port.contains('/') => (domain, Some(uri), Some(port)),
                _ => (domain, Some(after), None),
            }
        }
    };
    if let Some(reason) = libvirt_text_error(domain) {
        return Err(bad_domain(reason));
    }
    if let Some(uri) = uri {
        let reason = libvirt_text_error(uri).or_else(|| {
            uri.contains(char::is_whitespace)
                .then_some("contains whitespace")
        });
        if let Some(reason) = reason {
            return Err(AddrError::BadUri {
                input: quote(input),
                reason,
            });
        }
    }
    let port = port.map(|port| number(input, "port", port)).transpose()?;
    Ok(LibvirtDomain {
        domain: domain.to_string(),
        uri: uri.map(str::to_string),
        port,
    })
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
        if let Some(rest) = input.strip_prefix("libvirt:") {
            return Ok(EndpointAddr::Libvirt(libvirt(input, rest)?));
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
            EndpointAddr::Libvirt(domain) => domain.fmt(f),
        }
    }
}

impl fmt::Display for LibvirtDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "libvirt:{}", self.domain)?;
        if let Some(uri) = &self.uri {
            write!(f, "@{uri}")?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each input is refused with a message that contains its `want` and no control character.
    fn assert_refused(cases: &[(&str, &str)]) {
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
        assert_refused(&cases);
    }

    #[test]
    fn listen_and_connect_forms() {
        let any: EndpointAddr = "vsock://any:786".parse().unwrap();
        assert!(any.can_listen() && !any.can_connect());
        let hybrid: EndpointAddr = "hybrid:/x:1".parse().unwrap();
        assert!(!hybrid.can_listen() && hybrid.can_connect());
        let libvirt: EndpointAddr = "libvirt:vm".parse().unwrap();
        assert!(!libvirt.can_listen() && libvirt.can_connect());
        assert_eq!(DEFAULT_VSOCK_PORT, 786);
    }

    fn domain(domain: &str, uri: Option<&str>, port: Option<u32>) -> EndpointAddr {
        EndpointAddr::Libvirt(LibvirtDomain {
            domain: domain.into(),
            uri: uri.map(String::from),
            port,
        })
    }

    #[test]
    fn libvirt_forms_parse_and_print_back() {
        let system = Some("qemu:///system");
        let cases = [
            ("libvirt:dev-vm", domain("dev-vm", None, None)),
            ("libvirt:dev-vm:786", domain("dev-vm", None, Some(786))),
            ("libvirt:dev-vm:0", domain("dev-vm", None, Some(0))),
            (
                "libvirt:dev-vm@qemu:///system",
                domain("dev-vm", system, None),
            ),
            (
                "libvirt:dev-vm@qemu:///system:786",
                domain("dev-vm", system, Some(786)),
            ),
            (
                "libvirt:dev-vm@qemu:///session:1024",
                domain("dev-vm", Some("qemu:///session"), Some(1024)),
            ),
            (
                // `@` and `:` inside the URI: the port is only a last `:` without a `/` after it.
                "libvirt:vm@qemu+ssh://root@kvm1:22/system",
                domain("vm", Some("qemu+ssh://root@kvm1:22/system"), None),
            ),
            (
                "libvirt:vm@qemu+ssh://root@kvm1:22/system:52",
                domain("vm", Some("qemu+ssh://root@kvm1:22/system"), Some(52)),
            ),
            // A URI alias from libvirt.conf.
            ("libvirt:vm@hail", domain("vm", Some("hail"), None)),
            ("libvirt:vm@hail:786", domain("vm", Some("hail"), Some(786))),
            (
                "libvirt:4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
                domain("4dea22b3-1d52-d8f3-2516-782e98ab3fa0", None, None),
            ),
            ("libvirt:7", domain("7", None, None)),
            ("libvirt:my vm.2", domain("my vm.2", None, None)),
            ("libvirt:vm-ü", domain("vm-ü", None, None)),
        ];
        for (input, want) in cases {
            let got: EndpointAddr = input.parse().unwrap();
            assert_eq!(got, want, "{input}");
            assert_eq!(got.to_string(), input);
        }
        let EndpointAddr::Libvirt(d) = "libvirt:vm".parse().unwrap() else {
            unreachable!()
        };
        assert_eq!(d.port(), DEFAULT_VSOCK_PORT);
        let EndpointAddr::Libvirt(d) = "libvirt:vm@x:9".parse().unwrap() else {
            unreachable!()
        };
        assert_eq!(d.port(), 9);
    }

    #[test]
    fn libvirt_forms_reject_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("libvirt:", "the libvirt domain is empty"),
            ("libvirt::786", "the libvirt domain is empty"),
            ("libvirt:@qemu:///system", "the libvirt domain is empty"),
            ("libvirt:a\0b", "domain contains a NUL byte"),
            ("libvirt:a\nb", "domain contains a control character"),
            ("libvirt:a\x1b[31mb", "domain contains a control character"),
            ("libvirt:a\u{85}b", "domain contains a control character"),
            ("libvirt:-vm", "domain starts with `-`"),
            ("libvirt:--help", "domain starts with `-`"),
            ("libvirt:vm:", "port `` is not a decimal number"),
            ("libvirt:vm:x", "port `x` is not a decimal number"),
            ("libvirt:vm:0786", "port `0786`"),
            ("libvirt:vm:+786", "port `+786`"),
            ("libvirt:vm:4294967295", "port `4294967295`"),
            ("libvirt:my:vm", "port `vm`"),
            ("libvirt:vm:786:1", "port `786:1`"),
            (
                "libvirt:vm:786@qemu:///system",
                "domain contains `:`; the port goes last: libvirt:DOMAIN@URI:PORT",
            ),
            ("libvirt:vm@", "the libvirt URI after `@` is empty"),
            ("libvirt:vm@:786", "the libvirt URI after `@` is empty"),
            ("libvirt:vm@-c", "URI after `@` starts with `-`"),
            (
                "libvirt:vm@qemu:///sys tem",
                "URI after `@` contains whitespace",
            ),
            (
                "libvirt:vm@qemu:///sys\ttem",
                "URI after `@` contains a control character",
            ),
            ("libvirt:vm@qemu:///\0", "URI after `@` contains a NUL byte"),
            ("libvirt:vm@qemu:///system:", "port ``"),
            ("libvirt:vm@qemu:///system:abc", "port `abc`"),
            ("libvirt:vm@qemu+tcp://h:16509:x", "port `x`"),
            ("libvirt:\x1b]0;x\x07", "libvirt:\\x1b]0;x\\x07"),
            ("Libvirt:vm", "unknown address form"),
            ("libvirt//vm", "unknown address form"),
        ];
        assert_refused(cases);
    }
}
