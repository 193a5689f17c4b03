//! Write batching for SDS connections: the frames a connection produces in one burst go out in one write.
//!
//! When a secret rotates, every stream on a connection is woken at once and each hands HTTP/2 one DATA frame
//! of a few KiB. `h2` writes a frame of that size on its own (it chains the payload instead of copying it and
//! flushes per frame), so 100 streams on a connection cost 100 `writev` calls, 100 TCP segments and 100
//! reads at the other end. [`BatchedWrites`] sits under HTTP/2 (and under TLS, when used): writes are copied
//! into a buffer, and the first flush of a burst is deferred by waking the connection's task, which the
//! runtime then polls after the stream tasks already queued. Its next flush writes everything they queued in
//! one call. Nothing waits on a timer: a lone push goes out on the connection task's next poll.
//!
//! "Next poll" is recognised by the read side: both HTTP/2 and the TLS handshake begin every poll by reading
//! (HTTP/2 reads until the socket has nothing more, then writes), so a deferred flush is carried out by the
//! next read, before it reads. A flush while one is deferred adds to the batch; shutdown writes everything.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Buffered bytes beyond which writes go out without waiting for the burst to end.
const HIGH_WATER: usize = 256 * 1024;
/// A drained buffer larger than this is freed: idle connections keep no burst-sized memory.
const KEEP_CAPACITY: usize = 16 * 1024;

/// An I/O object whose writes are collected and written out once per burst. See the module docs.
#[derive(Debug)]
pub struct BatchedWrites<IO> {
    io: IO,
    buf: Vec<u8>,
    /// How much of `buf` is already written.
    written: usize,
    /// A flush was deferred, and the task woken to come back and read (which writes the batch out).
    deferred: bool,
}

impl<IO> BatchedWrites<IO> {
    pub fn new(io: IO) -> Self {
        BatchedWrites {
            io,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<IO: AsyncWrite + Unpin> BatchedWrites<IO> {
    /// Writes buffered bytes until none are left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        // A burst can grow the buffer large; do not keep that memory on an idle connection.
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for more bytes: over the high-water mark, writes first (and waits if the socket is full).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending() >= HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for BatchedWrites<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deferred {
            // The task is back: the batch is complete. If the socket is full, read anyway (the peer may be
            // waiting for us to read before it reads); the write is retried on the next call.
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => this.deferred = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() == 0 {
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if this.pending() >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
            this.deferred = false;
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.deferred {
            // First flush of a burst: let the tasks already woken add their frames first. Waking ourselves
            // puts this task behind them in the run queue; its next read writes the batch.
            this.deferred = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.deferred = false;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for BatchedWrites<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Counts wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_burst_goes_out_in_one_write_at_the_next_read() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut io = BatchedWrites::new(ours);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for frame in [&b"one"[..], b"two", b"three"] {
            assert!(matches!(
                Pin::new(&mut io).poll_write(&mut cx, frame),
                Poll::Ready(Ok(_))
            ));
            // Flushing defers the write and asks to be polled again, once per burst.
            assert!(matches!(
                Pin::new(&mut io).poll_flush(&mut cx),
                Poll::Ready(Ok(()))
            ));
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let mut probe = [0u8; 16];
        let mut probe = ReadBuf::new(&mut probe);
        assert!(
            Pin::new(&mut peer)
                .poll_read(&mut cx, &mut probe)
                .is_pending(),
            "nothing is written before the task comes back"
        );
        // The task comes back and reads: the whole burst is written first.
        let mut buf = [0u8; 16];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut rb).is_pending());
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwothree");
        // The next burst defers again, and asks again to be polled.
        let before = count.0.load(Ordering::SeqCst);
        io.write_all(b"four").await.unwrap();
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(count.0.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn shutdown_and_large_bursts_write_at_once() {
        let (ours, mut peer) = duplex(4 << 20);
        let mut io = BatchedWrites::new(ours);
        let big = vec![7u8; HIGH_WATER];
        io.write_all(&big).await.unwrap();
        io.flush().await.unwrap();
        let mut got = vec![0u8; HIGH_WATER];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        io.write_all(b"last words").await.unwrap();
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last words");
    }
}
