//! Stream wrappers under the codecs: byte counting both ways, the silence limit on reads and the
//! stall limit on writes.
//!
//! [`MeteredRead`] fails a read with `TimedOut` once it has waited longer than the silence limit
//! for a byte; [`MeteredWrite`] likewise fails a write the peer has not taken a byte of for that
//! long. Both measure only time spent waiting: the clock starts when an operation first comes
//! back `Pending` after progress, so a task that was busy elsewhere and reads or writes late is
//! not punished for it.

use super::stats::Stats;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub(crate) struct MeteredRead<R> {
    inner: R,
    stats: Arc<Stats>,
    silence_limit: Duration,
    deadline: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<R> MeteredRead<R> {
    pub(crate) fn new(inner: R, stats: Arc<Stats>, silence_limit: Duration) -> Self {
        MeteredRead {
            inner,
            stats,
            silence_limit,
            deadline: Box::pin(tokio::time::sleep(silence_limit)),
            waiting: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MeteredRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.waiting = false;
                let n = buf.filled().len().saturating_sub(before);
                this.stats
                    .add_wire_received(u64::try_from(n).unwrap_or(u64::MAX));
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let at = Instant::now() + this.silence_limit;
                    this.deadline.as_mut().reset(at);
                }
                match this.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no data from the peer for {} ms (missed heartbeats)",
                            this.silence_limit.as_millis()
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

pub(crate) struct MeteredWrite<W> {
    inner: W,
    stats: Arc<Stats>,
    stall_limit: Duration,
    deadline: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<W> MeteredWrite<W> {
    pub(crate) fn new(inner: W, stats: Arc<Stats>, stall_limit: Duration) -> Self {
        MeteredWrite {
            inner,
            stats,
            stall_limit,
            deadline: Box::pin(tokio::time::sleep(stall_limit)),
            waiting: false,
        }
    }

    /// Turns a `Pending` write or flush into `TimedOut` once the peer has not taken a byte
    /// for the stall limit (it is not reading: dead, or hostile).
    fn stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                self.waiting = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.waiting {
                    self.waiting = true;
                    let at = Instant::now() + self.stall_limit;
                    self.deadline.as_mut().reset(at);
                }
                match self.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the peer has not read anything for {} ms",
                            self.stall_limit.as_millis()
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for MeteredWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.stats
                .add_wire_sent(u64::try_from(*n).unwrap_or(u64::MAX));
        }
        this.stalled(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.stalled(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn silence_limit_fires_only_while_waiting() {
        let (mut a, b) = tokio::io::duplex(64);
        let stats = Arc::new(Stats::default());
        let mut r = MeteredRead::new(b, stats.clone(), Duration::from_secs(10));
        a.write_all(b"x").await.unwrap();
        // Not reading for a long time does not count as silence.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut buf = [0u8; 1];
        r.read_exact(&mut buf).await.unwrap();
        // Waiting does.
        let started = Instant::now();
        let err = r.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(stats.snapshot().wire_bytes_received, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn data_resets_the_clock() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = MeteredRead::new(b, Arc::new(Stats::default()), Duration::from_secs(10));
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                a.write_all(b"y").await.unwrap();
            }
            a
        });
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"yyyyy");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn write_to_a_peer_that_never_reads_times_out() {
        let (a, _b) = tokio::io::duplex(16);
        let stats = Arc::new(Stats::default());
        let mut w = MeteredWrite::new(a, stats.clone(), Duration::from_secs(10));
        let started = Instant::now();
        let err = w.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(stats.snapshot().wire_bytes_sent, 16);
    }
}
