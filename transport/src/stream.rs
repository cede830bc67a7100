//! Opening byte streams: dial an [`EndpointAddr`] or listen on one, and hand back a boxed
//! `AsyncRead + AsyncWrite` that the RPC layer is generic over. Nothing here reads or writes
//! protocol bytes.
//!
//! - `unix:` dials and listens on a Unix stream socket.
//! - `hybrid:PATH:PORT` dials the VMM's Unix socket and runs the `CONNECT` handshake
//!   ([`crate::hybrid`]); it cannot be listened on (it is the host side of a guest port).
//! - `vsock://CID:PORT` dials and `vsock://any:PORT` / `vsock://CID:PORT` listen with AF_VSOCK
//!   (tokio-vsock, Linux only). The guest listens; a host dials a guest by CID only with
//!   in-kernel vhost-vsock. Nothing in this crate's tests opens AF_VSOCK: on development and CI
//!   machines the vsock device belongs to the infrastructure; tests/vm runs it inside a guest.
//! - `libvirt:DOMAIN[@URI][:PORT]` is resolved to `vsock://CID:PORT` ([`crate::libvirt`]) at
//!   every dial, then dialled as such; it cannot be listened on.
//!
//! A Unix listener ([`bind_unix`]) replaces a stale socket file left by a previous run, but only
//! if it is a socket nobody is listening on (never a regular file, directory or symlink, and
//! never a live socket of another instance). The socket is bound inside a new private
//! directory (mode 0700) beside its path, set to mode 0600 there, and only then renamed into
//! place (never over anything): nobody else can reach it before its mode is right, whatever
//! the umask.

use crate::endpoint_addr::EndpointAddr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};

/// Mode of a listening Unix socket: owner read/write only.
pub const UNIX_SOCKET_MODE: u32 = 0o600;

/// Any bidirectional byte stream the RPC layer can run over.
pub trait IoStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> IoStream for T {}

/// A connected stream of whichever kind.
pub type BoxedStream = Box<dyn IoStream>;

#[cfg(not(target_os = "linux"))]
fn unsupported(addr: &EndpointAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{addr}: AF_VSOCK is supported on Linux only"),
    )
}

/// Dials `addr`. A `libvirt:` address is resolved first (see [`crate::libvirt::resolve`]; its
/// error is the [`crate::libvirt::LibvirtError`] inside the `io::Error`); a caller that wants
/// the resolution bounded or reported apart from the dial resolves it itself.
pub async fn connect(addr: &EndpointAddr) -> io::Result<BoxedStream> {
    match addr {
        EndpointAddr::Libvirt(target) => {
            let resolved = crate::libvirt::resolve(target)
                .await
                .map_err(io::Error::other)?;
            connect_resolved(&resolved).await
        }
        _ => connect_resolved(addr).await,
    }
}

/// Dials `addr`, any form but `libvirt:`.
async fn connect_resolved(addr: &EndpointAddr) -> io::Result<BoxedStream> {
    match addr {
        EndpointAddr::Libvirt(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} must be resolved to a vsock address before it is dialled"),
        )),
        EndpointAddr::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|e| with_path(e, "connect to", path))?;
            Ok(Box::new(stream))
        }
        EndpointAddr::VsockAny { .. } => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} is a listen address; it cannot be dialled"),
        )),
        EndpointAddr::Hybrid { path, port } => {
            let stream = crate::hybrid::connect(path, *port).await?;
            Ok(Box::new(stream))
        }
        #[cfg(target_os = "linux")]
        EndpointAddr::Vsock { cid, port } => {
            let stream =
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                    .await
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}"))
                    })?;
            Ok(Box::new(stream))
        }
        #[cfg(not(target_os = "linux"))]
        EndpointAddr::Vsock { .. } => Err(unsupported(addr)),
    }
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    addr: EndpointAddr,
    inner: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Unix(UnixListener),
    #[cfg(target_os = "linux")]
    Vsock(tokio_vsock::VsockListener),
}

impl Listener {
    /// Waits for the next connection. The returned string describes the peer for logs: the
    /// listen address for Unix sockets (peers have no useful name), the peer's CID and port
    /// for vsock (the transport's word on who connected, never a claim from the peer).
    pub async fn accept(&self) -> io::Result<(BoxedStream, String)> {
        match &self.inner {
            ListenerKind::Unix(unix) => {
                let (stream, _) = unix.accept().await?;
                Ok((Box::new(stream), self.addr.to_string()))
            }
            #[cfg(target_os = "linux")]
            ListenerKind::Vsock(vsock) => {
                let (stream, peer) = vsock.accept().await?;
                Ok((
                    Box::new(stream),
                    format!("vsock://{}:{}", peer.cid(), peer.port()),
                ))
            }
        }
    }

    pub fn local_addr(&self) -> &EndpointAddr {
        &self.addr
    }
}

/// Listens on `addr`.
pub async fn listen(addr: &EndpointAddr) -> io::Result<Listener> {
    match addr {
        EndpointAddr::Unix(path) => {
            let unix = bind_unix(path).await?;
            Ok(Listener {
                addr: addr.clone(),
                inner: ListenerKind::Unix(unix),
            })
        }
        EndpointAddr::Hybrid { .. } => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{addr}: a hybrid address is dialled through the VMM's socket, not listened on"
            ),
        )),
        EndpointAddr::Libvirt(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: a libvirt domain is dialled by its vsock CID, not listened on"),
        )),
        #[cfg(target_os = "linux")]
        EndpointAddr::Vsock { cid, port } => listen_vsock(addr, *cid, *port),
        #[cfg(target_os = "linux")]
        EndpointAddr::VsockAny { port } => listen_vsock(addr, tokio_vsock::VMADDR_CID_ANY, *port),
        #[cfg(not(target_os = "linux"))]
        EndpointAddr::Vsock { .. } | EndpointAddr::VsockAny { .. } => Err(unsupported(addr)),
    }
}

#[cfg(target_os = "linux")]
fn listen_vsock(addr: &EndpointAddr, cid: u32, port: u32) -> io::Result<Listener> {
    let vsock = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(cid, port))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    Ok(Listener {
        addr: addr.clone(),
        inner: ListenerKind::Vsock(vsock),
    })
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

/// Listens on the Unix socket `path` (mode 0600; see the module docs for how a stale socket is
/// replaced and why no one can connect before the mode is set).
pub async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    remove_stale_socket(path).await?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a socket path needs a name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Short: a socket path is at most 107 bytes.
    let private = parent.join(format!(".bind-{}", std::process::id()));
    match std::fs::remove_dir_all(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "remove", &private)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| with_path(e, "create", &private))?;
    let inner = private.join(name);
    let bound = (|| {
        let listener = UnixListener::bind(&inner).map_err(|e| with_path(e, "listen on", path))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))
            .map_err(|e| with_path(e, "set the mode of", path))?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &inner,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            rustix::io::Errno::EXIST => io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} appeared while binding: another process is listening",
                    path.display()
                ),
            ),
            e => with_path(e.into(), "move the socket to", path),
        })?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Removes `path` if it is a socket that nobody accepts connections on. Anything else there is
/// left alone and reported.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, "inspect", path)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "refusing to replace {}: it exists and is not a socket",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another process is listening on it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| with_path(e, "remove stale socket", path))
        }
        Err(e) => Err(with_path(e, "probe existing socket", path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn unix(path: &Path) -> EndpointAddr {
        EndpointAddr::Unix(path.to_path_buf())
    }

    #[tokio::test]
    async fn unix_listen_connect_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = listen(&unix(&path)).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, UNIX_SOCKET_MODE);
        let client = tokio::spawn({
            let addr = unix(&path);
            async move {
                let mut s = connect(&addr).await.unwrap();
                s.write_all(b"hi").await.unwrap();
            }
        });
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        client.await.unwrap();
    }

    #[tokio::test]
    async fn replaces_stale_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket: bound, then the listener dropped (the file stays).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = listen(&unix(&path)).await.unwrap();
        // A live one is not stolen.
        let err = listen(&unix(&path)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(listener);

        let file = dir.path().join("file");
        std::fs::write(&file, b"precious").unwrap();
        let err = listen(&unix(&file)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = listen(&unix(&link)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    /// The socket is 0600 whatever the umask, nothing of the private directory it was bound in
    /// is left, and it answers at its path.
    #[tokio::test]
    async fn a_socket_is_private_from_the_start_and_reachable_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind_unix(&path).await.unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, UNIX_SOCKET_MODE);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ctl.sock"]);
        let (client, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        client.unwrap();
        accepted.unwrap();
    }

    // No test here dials or binds a vsock address: AF_VSOCK on this machine belongs to the
    // infrastructure. Only the forms that are refused before any socket is made are checked.
    #[tokio::test]
    async fn forms_that_cannot_be_used_that_way_are_refused() {
        let any: EndpointAddr = "vsock://any:786".parse().unwrap();
        assert_eq!(
            connect(&any).await.err().unwrap().kind(),
            io::ErrorKind::InvalidInput
        );
        let hybrid: EndpointAddr = "hybrid:/x.sock:786".parse().unwrap();
        assert_eq!(
            listen(&hybrid).await.err().unwrap().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[tokio::test]
    async fn connect_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let err = connect(&unix(&path)).await.err().unwrap();
        assert!(err.to_string().contains("missing.sock"));
    }
}
