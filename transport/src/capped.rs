//! [`CappedWrite`]: a stream wrapper that hands the inner stream at most `max` bytes per write.
//!
//! Why: with guest kernels 6.12 and newer, a vsock `write()` larger than 32 KiB is sent as one
//! packet spread over several virtqueue descriptors, and some device backends
//! (vhost-device-vsock 0.3.0, Cloud Hypervisor before #7680) read only the first descriptor:
//! guest→host bytes are lost and the stream stalls. Keeping every guest write at or below
//! 32 KiB avoids multi-descriptor packets. The guest agent wraps its accepted stream in this
//! with the configured `max_write_bytes`. Reads pass through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest write that older vsock device backends take whole from new guest kernels.
pub const SAFE_VSOCK_WRITE_BYTES: usize = 32 * 1024;

/// Wraps a stream so that no single write to it exceeds `max` bytes.
#[derive(Debug)]
pub struct CappedWrite<S> {
    inner: S,
    max: usize,
}

impl<S> CappedWrite<S> {
    /// `max` of 0 is treated as 1 (a zero cap would make every write a no-op).
    pub fn new(inner: S, max: usize) -> Self {
        Self {
            inner,
            max: max.max(1),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CappedWrite<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CappedWrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.max);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    // Vectored writes are not forwarded: the default implementation writes the first non-empty
    // buffer through `poll_write`, which applies the cap. `is_write_vectored` stays false so
    // callers do not build large iovecs for us.

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Records the size of every write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        data: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.len());
            self.data.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn no_write_exceeds_the_cap() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut w = CappedWrite::new(Recorder::default(), SAFE_VSOCK_WRITE_BYTES);
        w.write_all(&payload).await.unwrap();
        let slices = [
            io::IoSlice::new(&payload[..40_000]),
            io::IoSlice::new(&payload[40_000..]),
        ];
        let n = w.write_vectored(&slices).await.unwrap();
        assert!(n <= SAFE_VSOCK_WRITE_BYTES);
        let inner = w.into_inner();
        assert!(inner.writes.iter().all(|&n| n <= SAFE_VSOCK_WRITE_BYTES));
        assert_eq!(&inner.data[..payload.len()], &payload[..]);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = CappedWrite::new(a, 0);
        assert_eq!(w.max(), 1);
        b.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 3];
        w.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
        w.write_all(b"xyz").await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"xyz");
    }
}
