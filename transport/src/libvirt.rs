//! `libvirt:DOMAIN[@URI][:PORT]`: finding a libvirt domain's vsock CID, so that a host config
//! can name the VM instead of its CID (which libvirt picks anew at each start with
//! `<cid auto='yes'/>`).
//!
//! [`resolve`] runs `virsh --readonly [-c URI] dumpxml --domain DOMAIN` (`virsh` found on
//! `PATH`), reads `<domain><devices><vsock><cid address='N'/></vsock></devices></domain>` from
//! its output with a real XML parser and answers `vsock://N:PORT`. The host agent calls it at
//! every connect and reconnect, so a restarted VM's new CID is picked up.
//!
//! - Read-only connection: `dumpxml` needs no more, and libvirt's default policy lets any local
//!   user open a read-only connection to `qemu:///system` (its `-ro` socket), so the
//!   unprivileged agent needs no membership in the `libvirt` group.
//! - Bounded: virsh gets [`VIRSH_TIMEOUT`]; past it, it is killed with SIGKILL (its own process
//!   group, so an `ssh` it started for a remote URI goes too, then the child by its PID) and
//!   reaped. What it prints is read up to [`MAX_XML_BYTES`] (stdout) and [`MAX_STDERR_BYTES`]
//!   (stderr); the rest is drained unread so virsh never blocks on a full pipe.
//! - Every failure is a [`LibvirtError`] that says what to do; what virsh said on stderr is
//!   escaped (it reaches logs and `status`) and cut to [`STDERR_SHOWN_CHARS`].
//!
//! The XML reading ([`cid_from_domain_xml`]) is a pure function, tested on its own.

use crate::endpoint_addr::{EndpointAddr, LibvirtDomain};
use std::ffi::OsString;
use std::io;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use vmsync_core::text::escape_text;

/// How long `virsh dumpxml` may take before it is killed.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of virsh's stdout that is read: a domain's XML is a few KiB to tens of KiB.
pub const MAX_XML_BYTES: usize = 4 << 20;
/// The most of virsh's stderr that is kept.
pub const MAX_STDERR_BYTES: usize = 64 << 10;
/// The most of virsh's stderr (in characters, before escaping) that an error message shows.
pub const STDERR_SHOWN_CHARS: usize = 300;

/// `VMADDR_CID_HYPERVISOR`, `VMADDR_CID_LOCAL`, `VMADDR_CID_HOST`: never a guest.
const FIRST_GUEST_CID: u32 = 3;
/// `VMADDR_CID_ANY`: never a guest.
const CID_ANY: u32 = u32::MAX;

/// The vsock device libvirt needs for a domain to get a CID: in the messages.
pub const VSOCK_SNIPPET: &str = "<vsock model='virtio'><cid auto='yes'/></vsock>";

/// Why a libvirt domain could not be resolved to a vsock address.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "cannot find `virsh` on PATH to look up the vsock CID of libvirt domain `{domain}`; \
         install libvirt's client tools (Debian/Ubuntu: libvirt-clients, Fedora: libvirt-client)"
    )]
    VirshMissing { domain: String },
    #[error("running `{command}`: {error}")]
    Run { command: String, error: io::Error },
    #[error("`{command}` did not finish within {} s and was killed", timeout.as_secs_f64())]
    TimedOut { command: String, timeout: Duration },
    #[error("`{command}` failed ({status}): {stderr}")]
    VirshFailed {
        command: String,
        status: String,
        /// What virsh printed on stderr: escaped, cut to [`STDERR_SHOWN_CHARS`].
        stderr: String,
    },
    #[error("`{command}` printed more than {limit} bytes; that is not a domain's XML")]
    TooMuchOutput { command: String, limit: usize },
    #[error("libvirt domain `{domain}`: virsh printed no usable domain XML: {reason}")]
    BadXml { domain: String, reason: String },
    #[error(
        "libvirt domain `{domain}` has no vsock device, so it has no CID to dial; add \
         `{VSOCK_SNIPPET}` inside its <devices> with `{edit}`, then shut the domain down and \
         start it again"
    )]
    NoVsock {
        domain: String,
        /// The `virsh edit` command line for this domain (and connection).
        edit: String,
    },
    #[error(
        "libvirt domain `{domain}` has {count} vsock devices; vmsync cannot tell which one the \
         guest agent listens on: keep one"
    )]
    SeveralVsock { domain: String, count: usize },
    #[error(
        "libvirt domain `{domain}`: its vsock device has no CID (no <cid address='N'/>); with \
         <cid auto='yes'/> libvirt assigns one when the domain starts: is it running?"
    )]
    NoCid { domain: String },
    #[error(
        "libvirt domain `{domain}`: vsock CID `{value}` is not a guest's (guest CIDs are 3 to \
         4294967294)"
    )]
    BadCid { domain: String, value: String },
}

/// How to run virsh: [`Virsh::default`] is what the host agent uses.
#[derive(Debug, Clone)]
pub struct Virsh {
    /// The program, looked up on `PATH` unless it contains a `/`.
    pub program: OsString,
    /// The `PATH` virsh is looked up on and runs with; `None`: this process's.
    pub path: Option<OsString>,
    /// How long it may run before it is killed.
    pub timeout: Duration,
}

impl Default for Virsh {
    fn default() -> Self {
        Virsh {
            program: "virsh".into(),
            path: None,
            timeout: VIRSH_TIMEOUT,
        }
    }
}

/// Resolves `target` to `vsock://CID:PORT` with the default [`Virsh`].
pub async fn resolve(target: &LibvirtDomain) -> Result<EndpointAddr, LibvirtError> {
    Virsh::default().resolve(target).await
}

impl Virsh {
    /// Resolves `target` to `vsock://CID:PORT`: runs `dumpxml` and reads the CID from it.
    pub async fn resolve(&self, target: &LibvirtDomain) -> Result<EndpointAddr, LibvirtError> {
        let xml = self.dumpxml(target).await?;
        let cid = cid_from_domain_xml(target, &xml)?;
        Ok(EndpointAddr::Vsock {
            cid,
            port: target.port(),
        })
    }

    /// The arguments after the program.
    fn args(target: &LibvirtDomain) -> Vec<&str> {
        let mut args = vec!["--readonly"];
        if let Some(uri) = &target.uri {
            args.extend(["-c", uri]);
        }
        // `--domain NAME` rather than a positional argument: never read as an option.
        args.extend(["dumpxml", "--domain", &target.domain]);
        args
    }

    /// `virsh dumpxml`'s stdout, as text.
    pub async fn dumpxml(&self, target: &LibvirtDomain) -> Result<String, LibvirtError> {
        let args = Self::args(target);
        let command = shown_command(&self.program.to_string_lossy(), &args);
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, to be killed whole on timeout.
            .process_group(0)
            // Should this future be dropped mid-run (shutdown), the child is killed and tokio
            // reaps it.
            .kill_on_drop(true);
        if let Some(path) = &self.path {
            cmd.env("PATH", path);
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(LibvirtError::VirshMissing {
                    domain: escape_text(&target.domain),
                })
            }
            Err(error) => return Err(LibvirtError::Run { command, error }),
        };
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let finished = tokio::time::timeout(self.timeout, async {
            tokio::join!(
                read_capped(stdout, MAX_XML_BYTES),
                read_capped(stderr, MAX_STDERR_BYTES),
                child.wait()
            )
        })
        .await;
        let Ok((stdout, stderr, status)) = finished else {
            kill(pid, &mut child).await;
            return Err(LibvirtError::TimedOut {
                command,
                timeout: self.timeout,
            });
        };
        let run_error = |error| LibvirtError::Run {
            command: command.clone(),
            error,
        };
        let status = status.map_err(run_error)?;
        let (stderr, _) = stderr.map_err(run_error)?;
        if !status.success() {
            return Err(LibvirtError::VirshFailed {
                command,
                status: status.to_string(),
                stderr: summarize(&stderr),
            });
        }
        let (stdout, over) = stdout.map_err(run_error)?;
        if over {
            return Err(LibvirtError::TooMuchOutput {
                command,
                limit: MAX_XML_BYTES,
            });
        }
        String::from_utf8(stdout).map_err(|_| LibvirtError::BadXml {
            domain: escape_text(&target.domain),
            reason: "it is not UTF-8".into(),
        })
    }
}

/// Kills a timed-out virsh and reaps it.
async fn kill(pid: Option<u32>, child: &mut tokio::process::Child) {
    // The group first: the child leads it (`process_group(0)`), so its id is the child's PID,
    // which stays reserved while the child is unreaped or any member of the group lives.
    if let Some(pid) = pid
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    // Then the child by its PID (a no-op if the group kill got it) and wait for it: no zombie.
    let _ = child.kill().await;
}

/// Reads up to `limit` bytes, then drains (and drops) the rest so the writer never blocks.
/// Returns the bytes and whether there were more.
async fn read_capped<R: AsyncRead + Unpin>(
    reader: Option<R>,
    limit: usize,
) -> io::Result<(Vec<u8>, bool)> {
    let Some(mut reader) = reader else {
        return Ok((Vec::new(), false));
    };
    let mut bytes = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    (&mut reader).take(cap).read_to_end(&mut bytes).await?;
    let over = bytes.len() > limit;
    if over {
        bytes.truncate(limit);
        tokio::io::copy(&mut reader, &mut tokio::io::sink()).await?;
    }
    Ok((bytes, over))
}

/// virsh's stderr for a message: its non-blank lines joined by ` / `, cut to
/// [`STDERR_SHOWN_CHARS`], control characters escaped.
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    if joined.is_empty() {
        return "it printed nothing on stderr".into();
    }
    let mut cut: String = joined.chars().take(STDERR_SHOWN_CHARS).collect();
    if cut.len() < joined.len() {
        cut.push('…');
    }
    escape_text(&cut)
}

/// A command line as a user would type it: words quoted for a POSIX shell where needed,
/// control characters escaped.
fn shown_command(program: &str, args: &[&str]) -> String {
    let words: Vec<String> = std::iter::once(program)
        .chain(args.iter().copied())
        .map(shell_word)
        .collect();
    escape_text(&words.join(" "))
}

fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.,:/@%+=".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `virsh edit` command line for `target`.
fn edit_command(target: &LibvirtDomain) -> String {
    let mut args = Vec::new();
    if let Some(uri) = &target.uri {
        args.extend(["-c", uri.as_str()]);
    }
    args.extend(["edit", target.domain.as_str()]);
    shown_command("virsh", &args)
}

/// The guest CID in a domain's XML (`virsh dumpxml`): the `address` of the `<cid>` of the one
/// `<vsock>` in `<domain><devices>`. Errors say what is missing and how to add it.
pub fn cid_from_domain_xml(target: &LibvirtDomain, xml: &str) -> Result<u32, LibvirtError> {
    let domain = || escape_text(&target.domain);
    let bad_xml = |reason: String| LibvirtError::BadXml {
        domain: domain(),
        reason: escape_text(&reason),
    };
    // roxmltree's defaults refuse a DTD, so no entity is ever expanded.
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad_xml(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(bad_xml(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let vsocks: Vec<roxmltree::Node> = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|devices| devices.children().filter(|n| n.has_tag_name("vsock")))
        .collect();
    let vsock = match vsocks.as_slice() {
        [] => {
            return Err(LibvirtError::NoVsock {
                domain: domain(),
                edit: edit_command(target),
            })
        }
        [vsock] => *vsock,
        several => {
            return Err(LibvirtError::SeveralVsock {
                domain: domain(),
                count: several.len(),
            })
        }
    };
    let cids: Vec<roxmltree::Node> = vsock.children().filter(|n| n.has_tag_name("cid")).collect();
    let address = match cids.as_slice() {
        [] => None,
        [cid] => cid.attribute("address"),
        _ => {
            return Err(bad_xml(
                "its vsock device has several <cid> elements".into(),
            ))
        }
    };
    let Some(value) = address else {
        return Err(LibvirtError::NoCid { domain: domain() });
    };
    let cid = Some(value)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&cid| cid >= FIRST_GUEST_CID && cid != CID_ANY);
    cid.ok_or_else(|| LibvirtError::BadCid {
        domain: domain(),
        value: escape_text(value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(domain: &str, uri: Option<&str>) -> LibvirtDomain {
        LibvirtDomain {
            domain: domain.into(),
            uri: uri.map(String::from),
            port: None,
        }
    }

    /// A domain's XML as `virsh dumpxml` prints it, with `devices` inside `<devices>`.
    fn domain_xml(devices: &str) -> String {
        format!(
            "<domain type='kvm' id='4'>\n  <name>dev-vm</name>\n  \
             <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>\n  <metadata>\n    \
             <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
             <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo>\n  </metadata>\n  \
             <memory unit='KiB'>2097152</memory>\n  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os>\n  \
             <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
             <disk type='file' device='disk'><source file='/var/lib/libvirt/images/dev.qcow2'/>\
             <target dev='vda' bus='virtio'/></disk>\n{devices}\n  </devices>\n</domain>\n"
        )
    }

    #[test]
    fn reads_the_cid_or_says_what_is_wrong() {
        // (case, XML, Ok(cid) or fragments of the error)
        let auto = domain_xml(
            "<vsock model='virtio'><cid auto='yes' address='3'/><alias name='vsock0'/>\
             <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/></vsock>",
        );
        /// The CID, or fragments of the error message.
        type Want = Result<u32, &'static [&'static str]>;
        let cases: Vec<(&str, String, Want)> = vec![
            ("auto CID", auto, Ok(3)),
            (
                "fixed CID",
                domain_xml("<vsock model='virtio'><cid auto='no' address='42'/></vsock>"),
                Ok(42),
            ),
            (
                "largest CID",
                domain_xml("<vsock model='virtio'><cid auto='no' address='4294967294'/></vsock>"),
                Ok(4_294_967_294),
            ),
            (
                "no vsock",
                domain_xml("<interface type='network'><source network='default'/></interface>"),
                Err(&[
                    "libvirt domain `dev-vm` has no vsock device",
                    "<vsock model='virtio'><cid auto='yes'/></vsock>",
                    "`virsh edit dev-vm`",
                ]),
            ),
            (
                "no devices at all",
                "<domain type='kvm'><name>dev-vm</name></domain>".into(),
                Err(&["has no vsock device"]),
            ),
            (
                "vsock outside devices",
                "<domain type='kvm'><vsock model='virtio'><cid address='3'/></vsock></domain>"
                    .into(),
                Err(&["has no vsock device"]),
            ),
            (
                "vsock without cid",
                domain_xml("<vsock model='virtio'/>"),
                Err(&["its vsock device has no CID", "is it running?"]),
            ),
            (
                "auto CID of a domain that is not running",
                domain_xml("<vsock model='virtio'><cid auto='yes'/></vsock>"),
                Err(&["has no CID"]),
            ),
            (
                "several vsock elements",
                domain_xml(
                    "<vsock model='virtio'><cid address='3'/></vsock>\
                     <vsock model='virtio'><cid address='4'/></vsock>",
                ),
                Err(&["has 2 vsock devices"]),
            ),
            (
                "several cid elements",
                domain_xml("<vsock><cid address='3'/><cid address='4'/></vsock>"),
                Err(&["several <cid> elements"]),
            ),
            (
                "hypervisor CID",
                domain_xml("<vsock><cid address='0'/></vsock>"),
                Err(&["vsock CID `0` is not a guest's"]),
            ),
            (
                "local CID",
                domain_xml("<vsock><cid address='1'/></vsock>"),
                Err(&["CID `1`"]),
            ),
            (
                "host CID",
                domain_xml("<vsock><cid address='2'/></vsock>"),
                Err(&["CID `2`"]),
            ),
            (
                "any CID",
                domain_xml("<vsock><cid address='4294967295'/></vsock>"),
                Err(&["CID `4294967295`"]),
            ),
            (
                "CID too large",
                domain_xml("<vsock><cid address='99999999999'/></vsock>"),
                Err(&["CID `99999999999`"]),
            ),
            (
                "signed CID",
                domain_xml("<vsock><cid address='+3'/></vsock>"),
                Err(&["CID `+3`"]),
            ),
            (
                "empty CID",
                domain_xml("<vsock><cid address=''/></vsock>"),
                Err(&["CID ``"]),
            ),
            (
                "CID with a control character",
                domain_xml("<vsock><cid address='3&#9;'/></vsock>"),
                Err(&["CID `3\\u{9}`"]),
            ),
            (
                "garbage",
                "error: not xml at all".into(),
                Err(&["no usable domain XML"]),
            ),
            ("empty", String::new(), Err(&["no usable domain XML"])),
            (
                "truncated",
                "<domain><devices><vsock><cid address='3'/>".into(),
                Err(&["no usable domain XML"]),
            ),
            (
                "other root",
                "<network><name>default</name></network>".into(),
                Err(&["the root element is <network>, not <domain>"]),
            ),
            (
                "DTD",
                "<!DOCTYPE domain [<!ENTITY x 'y'>]><domain/>".into(),
                Err(&["no usable domain XML"]),
            ),
        ];
        let dev = target("dev-vm", None);
        for (case, xml, want) in cases {
            let got = cid_from_domain_xml(&dev, &xml);
            match (got, want) {
                (Ok(cid), Ok(want)) => assert_eq!(cid, want, "{case}"),
                (Err(e), Err(fragments)) => {
                    let message = e.to_string();
                    for fragment in fragments {
                        assert!(message.contains(fragment), "{case}: {message}");
                    }
                    assert!(
                        !message.chars().any(char::is_control),
                        "{case}: {message:?}"
                    );
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn no_vsock_names_the_connection_and_quotes_the_domain() {
        let xml = domain_xml("");
        let e = cid_from_domain_xml(&target("my vm", Some("qemu:///system")), &xml).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("`virsh -c qemu:///system edit 'my vm'`"),
            "{message}"
        );
        assert!(matches!(e, LibvirtError::NoVsock { .. }));
        let e = cid_from_domain_xml(&target("it's", None), &xml).unwrap_err();
        assert!(e.to_string().contains(r"`virsh edit 'it'\''s'`"), "{e}");
    }

    #[test]
    fn stderr_is_joined_escaped_and_cut() {
        assert_eq!(
            summarize(b"error: failed to get domain 'x'\n\n  error: no domain\n"),
            "error: failed to get domain 'x' / error: no domain"
        );
        assert_eq!(summarize(b"a\x1b[2Jb\n"), "a\\u{1b}[2Jb");
        assert_eq!(summarize(b"\n \n"), "it printed nothing on stderr");
        let long = summarize("é".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), STDERR_SHOWN_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(summarize(b"\xff\xfe bad"), "\u{fffd}\u{fffd} bad");
    }

    #[test]
    fn virsh_arguments() {
        assert_eq!(
            Virsh::args(&target("dev-vm", None)),
            ["--readonly", "dumpxml", "--domain", "dev-vm"]
        );
        assert_eq!(
            Virsh::args(&target("dev-vm", Some("qemu:///system"))),
            [
                "--readonly",
                "-c",
                "qemu:///system",
                "dumpxml",
                "--domain",
                "dev-vm"
            ]
        );
    }
}
