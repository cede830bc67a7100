//! vm-ctl: the VM test's remote shell, so tests/vm/run.sh can act inside the guest.
//!
//! - `vm-ctl serve PORT` (guest only): listens on AF_VSOCK `any:PORT`; per connection, reads one
//!   command line, runs it with `/bin/sh -c` (stdout and stderr go to the connection), then
//!   sends `\n<MARKER> rc=N\n`. It refuses to run unless `/.vmsync-vm-guest` exists, a file
//!   only the test initramfs has: AF_VSOCK on a development or CI host belongs to the
//!   infrastructure and must never be opened there.
//! - `vm-ctl run UDS PORT TIMEOUT_S COMMAND` (host): Unix socket only. Connects to the VMM's
//!   hybrid socket, sends `CONNECT PORT\n`, reads the `OK` line byte by byte, sends the command,
//!   copies the output to stdout up to the marker and exits with the command's status (124 on
//!   timeout, 125 on a transport error).
//!
//! The end is a marker rather than EOF because a command may leave a background process (the
//! agent) holding the connection open.
//!
//! No dependencies: the handful of socket calls are declared by hand.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "VMCTL-END-7f3a";
const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const VMADDR_CID_ANY: u32 = u32::MAX;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept4(fd: i32, addr: *mut u8, len: *mut u32, flags: i32) -> i32;
}

fn die(msg: &str) -> ! {
    eprintln!("vm-ctl: {msg}");
    std::process::exit(125);
}

/// A failure before the command reached the guest: nothing ran, the caller may retry.
/// (vhost-device-vsock 0.3.0 now and then drops a fresh host-initiated connection right after
/// a previous one to the same port closed; the caller's retry absorbs that.)
fn early(msg: &str) -> ! {
    eprintln!("vm-ctl: {msg}");
    std::process::exit(126);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") if args.len() == 3 => {
            serve(args[2].parse().unwrap_or_else(|_| die("bad port")))
        }
        Some("run") if args.len() == 6 => {
            let port: u32 = args[3].parse().unwrap_or_else(|_| die("bad port"));
            let secs: u64 = args[4].parse().unwrap_or_else(|_| die("bad timeout"));
            std::process::exit(run(&args[2], port, Duration::from_secs(secs), &args[5]));
        }
        _ => die("usage: vm-ctl serve PORT | vm-ctl run UDS PORT TIMEOUT_S COMMAND"),
    }
}

fn serve(port: u32) -> ! {
    if !std::path::Path::new("/.vmsync-vm-guest").exists() {
        die("refusing to open AF_VSOCK outside the test guest (no /.vmsync-vm-guest)");
    }
    // SAFETY: plain socket syscalls on a fd this function owns; the address struct is the
    // kernel's sockaddr_vm layout (16 bytes).
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        die(&format!("socket: {}", std::io::Error::last_os_error()));
    }
    let addr = SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid: VMADDR_CID_ANY,
        flags: 0,
        zero: [0; 3],
    };
    if unsafe { bind(fd, &addr, std::mem::size_of::<SockaddrVm>() as u32) } < 0 {
        die(&format!("bind: {}", std::io::Error::last_os_error()));
    }
    if unsafe { listen(fd, 16) } < 0 {
        die(&format!("listen: {}", std::io::Error::last_os_error()));
    }
    println!("VMCTL-LISTENING port={port}");
    loop {
        let conn = unsafe { accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), SOCK_CLOEXEC) };
        if conn < 0 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // SAFETY: accept4 returned a fresh fd that nothing else owns.
        let stream = unsafe { std::fs::File::from_raw_fd(conn) };
        std::thread::spawn(move || handle(stream));
    }
}

fn handle(mut stream: std::fs::File) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1 << 20 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == 0 => break,
            Ok(1) => line.push(byte[0]),
            _ => return,
        }
    }
    let cmd = String::from_utf8_lossy(&line).into_owned();
    let (Ok(out), Ok(err)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let rc = Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .status()
        .map(|s| s.code().unwrap_or(128))
        .unwrap_or(127);
    let _ = write!(stream, "\n{MARKER} rc={rc}\n");
}

fn run(uds: &str, port: u32, timeout: Duration, cmd: &str) -> i32 {
    let deadline = Instant::now() + timeout;
    let mut s = match UnixStream::connect(uds) {
        Ok(s) => s,
        Err(e) => early(&format!("connect {uds}: {e}")),
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if let Err(e) = write!(s, "CONNECT {port}\n") {
        early(&format!("write CONNECT: {e}"));
    }
    // The reply is read one byte at a time: what follows the newline is the guest's.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if Instant::now() > deadline || reply.len() > 32 {
            early("no hybrid reply");
        }
        match s.read(&mut byte) {
            Ok(0) => early(&format!(
                "CONNECT {port}: closed without reply (guest not listening)"
            )),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => early(&format!("read reply: {e}")),
        }
    }
    if !reply.starts_with(b"OK ") {
        die(&format!(
            "CONNECT {port}: reply {:?}",
            String::from_utf8_lossy(&reply)
        ));
    }
    if let Err(e) = s.write_all(format!("{cmd}\0").as_bytes()) {
        // The guest runs a command only once its terminating NUL arrived.
        early(&format!("write command: {e}"));
    }
    let mut acc: Vec<u8> = Vec::new();
    let mut buf = [0u8; 65536];
    let mut stdout = std::io::stdout();
    let tail = format!("\n{MARKER} rc=");
    loop {
        if Instant::now() > deadline {
            let _ = stdout.write_all(&acc);
            eprintln!("vm-ctl: timed out after {} s: {cmd}", timeout.as_secs());
            return 124;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => acc.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => die(&format!("read: {e}")),
        }
        if let Some(pos) = find(&acc, tail.as_bytes()) {
            let rest = &acc[pos + tail.len()..];
            if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let rc = String::from_utf8_lossy(&rest[..nl]).parse().unwrap_or(125);
                let _ = stdout.write_all(&acc[..pos]);
                let _ = stdout.flush();
                return rc;
            }
        }
        // Flush what cannot be part of the marker, to keep memory bounded on big outputs.
        if acc.len() > tail.len() * 4 + 65536 {
            let keep = acc.len() - tail.len() * 2;
            let _ = stdout.write_all(&acc[..keep]);
            acc.drain(..keep);
        }
    }
    let _ = stdout.write_all(&acc);
    eprintln!("vm-ctl: connection closed before the command finished: {cmd}");
    125
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
