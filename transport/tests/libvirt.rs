//! `libvirt:` resolution end to end, against a stand-in `virsh`: a shell script written into a
//! temporary directory that is put first on the `PATH` virsh is looked up on. It prints canned
//! domain XML, fails, floods or hangs; the tests check the real process handling (spawn, PATH
//! lookup, arguments, stderr, timeout, kill, reaping) up to the resolved `vsock://CID:PORT`
//! value. Nothing dials it: no AF_VSOCK socket is opened.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmsync_transport::libvirt::{LibvirtError, Virsh, STDERR_SHOWN_CHARS, VSOCK_SNIPPET};
use vmsync_transport::{EndpointAddr, LibvirtDomain};

/// One test at a time writes and runs its script: a script written while another thread forks
/// could be held open for writing by that fork, and exec fails with ETXTBSY.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A temporary directory holding a stand-in `virsh` that runs `body` (sh), and a `Virsh` that
/// finds it first on its PATH. `$DIR` in `body` is the directory.
struct StandIn {
    dir: tempfile::TempDir,
    virsh: Virsh,
}

impl StandIn {
    fn new(body: &str) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("virsh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nDIR='{}'\nprintf '%s\\n' \"$@\" > \"$DIR/args\"\n{body}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let inherited = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
        let path = std::env::join_paths(
            std::iter::once(dir.path().to_path_buf()).chain(std::env::split_paths(&inherited)),
        )
        .unwrap();
        let virsh = Virsh {
            path: Some(path),
            ..Virsh::default()
        };
        StandIn { dir, virsh }
    }

    /// A stand-in that prints `xml` and succeeds.
    fn printing(xml: &str) -> StandIn {
        let stand_in = StandIn::new("cat \"$DIR/domain.xml\"");
        std::fs::write(stand_in.file("domain.xml"), xml).unwrap();
        stand_in
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The arguments the stand-in was run with.
    fn args(&self) -> Vec<String> {
        std::fs::read_to_string(self.file("args"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn resolve(&self, target: &LibvirtDomain) -> Result<EndpointAddr, LibvirtError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(self.virsh.resolve(target))
    }
}

fn target(domain: &str, uri: Option<&str>, port: Option<u32>) -> LibvirtDomain {
    LibvirtDomain {
        domain: domain.into(),
        uri: uri.map(String::from),
        port,
    }
}

/// What `virsh dumpxml` prints for a running domain with `<cid auto='yes'/>`, trimmed.
const RUNNING: &str = "<domain type='kvm' id='7'>
  <name>dev-vm</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <vsock model='virtio'>
      <cid auto='yes' address='5'/>
      <alias name='vsock0'/>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </vsock>
  </devices>
</domain>
";

#[test]
fn resolves_a_domain_to_its_vsock_address() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stand_in = StandIn::printing(RUNNING);
    assert_eq!(
        stand_in.resolve(&target("dev-vm", None, None)).unwrap(),
        EndpointAddr::Vsock { cid: 5, port: 786 }
    );
    assert_eq!(
        stand_in.args(),
        ["--readonly", "dumpxml", "--domain", "dev-vm"]
    );
    // The parsed form, with a connection URI and a port.
    let EndpointAddr::Libvirt(with_uri) = "libvirt:my vm@qemu:///system:1024".parse().unwrap()
    else {
        panic!("not a libvirt address");
    };
    assert_eq!(
        stand_in.resolve(&with_uri).unwrap(),
        EndpointAddr::Vsock { cid: 5, port: 1024 }
    );
    assert_eq!(
        stand_in.args(),
        [
            "--readonly",
            "-c",
            "qemu:///system",
            "dumpxml",
            "--domain",
            "my vm"
        ]
    );
}

#[test]
fn a_domain_without_vsock_gets_the_snippet_and_the_edit_command() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stand_in = StandIn::printing(
        "<domain type='kvm'><name>dev-vm</name><devices><emulator>/usr/bin/qemu</emulator>\
         </devices></domain>",
    );
    let error = stand_in
        .resolve(&target("dev-vm", Some("qemu:///system"), None))
        .unwrap_err();
    assert!(matches!(error, LibvirtError::NoVsock { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(VSOCK_SNIPPET), "{message}");
    assert!(
        message.contains("`virsh -c qemu:///system edit dev-vm`"),
        "{message}"
    );
}

#[test]
fn a_stopped_domain_has_no_cid_yet() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stand_in = StandIn::printing(
        "<domain type='kvm'><name>dev-vm</name><devices>\
         <vsock model='virtio'><cid auto='yes'/></vsock></devices></domain>",
    );
    let error = stand_in.resolve(&target("dev-vm", None, None)).unwrap_err();
    assert!(matches!(error, LibvirtError::NoCid { .. }), "{error:?}");
}

#[test]
fn output_that_is_not_domain_xml_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stand_in = StandIn::new("echo 'Welcome to virsh'");
    let error = stand_in.resolve(&target("dev-vm", None, None)).unwrap_err();
    assert!(matches!(error, LibvirtError::BadXml { .. }), "{error:?}");
    // More than a domain's XML could be: read up to the limit, the rest drained, refused.
    let stand_in = StandIn::new("head -c 5000000 /dev/zero");
    let error = stand_in.resolve(&target("dev-vm", None, None)).unwrap_err();
    assert!(
        matches!(error, LibvirtError::TooMuchOutput { .. }),
        "{error:?}"
    );
}

#[test]
fn a_failing_virsh_reports_its_stderr_escaped_and_cut() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let stand_in = StandIn::new(
        "echo \"error: failed to get domain 'nope'\" >&2\n\
         printf 'error: Domain not found: \\033[31mno domain\\n' >&2\n\
         exit 1",
    );
    let error = stand_in.resolve(&target("nope", None, None)).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, LibvirtError::VirshFailed { .. }),
        "{error:?}"
    );
    assert!(
        message.contains("`virsh --readonly dumpxml --domain nope` failed (exit status: 1)"),
        "{message}"
    );
    assert!(
        message.contains(
            "error: failed to get domain 'nope' / error: Domain not found: \\u{1b}[31mno domain"
        ),
        "{message}"
    );
    assert!(!message.chars().any(char::is_control), "{message:?}");

    let stand_in = StandIn::new("head -c 100000 /dev/zero | tr '\\0' x >&2; exit 3");
    let error = stand_in.resolve(&target("dev-vm", None, None)).unwrap_err();
    let LibvirtError::VirshFailed { stderr, status, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(status, "exit status: 3");
    assert_eq!(stderr.chars().count(), STDERR_SHOWN_CHARS + 1, "{stderr}");
    assert!(stderr.ends_with("x…"), "{stderr}");
}

#[test]
fn no_virsh_on_path_says_so() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let empty = tempfile::tempdir().unwrap();
    let virsh = Virsh {
        path: Some(empty.path().as_os_str().to_owned()),
        ..Virsh::default()
    };
    let error = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(virsh.resolve(&target("dev-vm", None, None)))
        .unwrap_err();
    assert!(
        matches!(error, LibvirtError::VirshMissing { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("cannot find `virsh` on PATH"), "{message}");
    assert!(message.contains("`dev-vm`"), "{message}");
}

/// True once `pid` is gone or a zombie that is not ours to reap (reparented).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `PID (comm) STATE ...`; comm may contain spaces, so read after the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_hanging_virsh_is_killed_and_reaped() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The script and a child of its own (as `ssh` would be for a remote URI), both holding
    // the output pipes open.
    let mut stand_in =
        StandIn::new("echo $$ > \"$DIR/pid\"\nsleep 60 &\necho $! > \"$DIR/grandchild\"\nwait");
    stand_in.virsh.timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = stand_in.resolve(&target("dev-vm", None, None)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(error, LibvirtError::TimedOut { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("`virsh --readonly dumpxml --domain dev-vm` did not finish within 1 s"),
        "{error}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The child was waited for: no zombie of ours (its /proc entry is gone at once).
    let pid = read_pid(&stand_in.file("pid"));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{pid} not reaped"
    );
    // Its own child went with its process group (whoever reaps it now).
    let grandchild = read_pid(&stand_in.file("grandchild"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(grandchild) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gone(grandchild),
        "the stand-in's child {grandchild} survived"
    );
}
