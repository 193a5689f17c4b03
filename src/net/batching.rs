//! Write batching for SDS connections: the frames a connection produces in one burst go out in one write.
//!
//! When a secret rotates, every stream on a connection is woken at once and each hands HTTP/2 one DATA frame
//! of a few KiB. `h2` writes a frame of that size on its own (it chains the payload instead of copying it and
//! flushes per frame), so 100 streams on a connection cost 100 `writev` calls, 100 TCP segments and 100
//! reads at the other end. [`BatchedWrites`] sits under HTTP/2 (and under TLS, when used): writes are copied
//! into a buffer, and a flush is deferred by waking the connection's task, which the runtime then polls after
//! the stream tasks already queued. Its next flush writes everything they queued in one call. Nothing waits
//! on a timer.
//!
//! The first flush after the peer last sent something is not deferred: it is most likely an answer (a
//! handshake message, a response) or a lone push, and deferring it would only cost a trip through the run
//! queue (and the wake-up of an idle worker thread) before the same write. The flushes after it, in the same
//! burst, are deferred and batched; so a rotation on a connection with 100 streams costs two writes.
//!
//! "Next poll" is recognised by the read side: both HTTP/2 and the TLS handshake begin every poll by reading
//! (HTTP/2 reads until the socket has nothing more, then writes), so a deferred flush is carried out by the
//! next read, before it reads. A flush while one is deferred adds to the batch; shutdown writes everything.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    /// The next flush writes at once: nothing was flushed since the peer last sent something.
    armed: bool,
}

impl<IO> BatchedWrites<IO> {
    pub fn new(io: IO) -> Self {
        BatchedWrites {
            io,
            buf: Vec::new(),
            written: 0,
            deferred: false,
            armed: true,
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
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.armed = true;
        }
        read
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
        if this.armed && !this.deferred {
            this.armed = false;
            ready!(this.poll_drain(cx))?;
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.deferred {
            // Later in a burst: let the tasks already woken add their frames first. Waking ourselves puts
            // this task behind them in the run queue; its next read writes the batch.
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

    fn flush_now(
        io: &mut BatchedWrites<tokio::io::DuplexStream>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) {
        assert!(matches!(
            Pin::new(&mut *io).poll_write(cx, data),
            Poll::Ready(Ok(_))
        ));
        assert!(matches!(
            Pin::new(&mut *io).poll_flush(cx),
            Poll::Ready(Ok(()))
        ));
    }

    /// Whether the peer has nothing to read (asked with a waker of its own, not the counted one).
    fn nothing_to_read(peer: &mut tokio::io::DuplexStream) -> bool {
        let mut probe = [0u8; 16];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(peer).poll_read(&mut cx, &mut probe).is_pending()
    }

    #[tokio::test]
    async fn an_answer_goes_out_at_once_and_the_rest_of_a_burst_in_one_write_at_the_next_read() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut io = BatchedWrites::new(ours);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || count.0.load(Ordering::SeqCst);

        // Nothing flushed yet on this connection: the first flush writes at once.
        flush_now(&mut io, &mut cx, b"zero");
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"zero");
        assert_eq!(wakes(), 0);

        // The rest of the burst is deferred, with one request to be polled again.
        for frame in [&b"one"[..], b"two", b"three"] {
            flush_now(&mut io, &mut cx, frame);
        }
        assert_eq!(wakes(), 1);
        assert!(
            nothing_to_read(&mut peer),
            "nothing is written before the task comes back"
        );
        // The task comes back and reads: the whole burst is written first.
        let mut buf = [0u8; 16];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut rb).is_pending());
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwothree");

        // The peer said nothing since: the next burst is deferred as well.
        flush_now(&mut io, &mut cx, b"four");
        assert_eq!(wakes(), 2);
        assert!(nothing_to_read(&mut peer));

        // The peer sends (an ACK): reading it writes the batch, and the next flush goes out at once.
        peer.write_all(b"ack").await.unwrap();
        let mut rb = ReadBuf::new(&mut buf);
        assert!(matches!(
            Pin::new(&mut io).poll_read(&mut cx, &mut rb),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(rb.filled(), b"ack");
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"four");
        let before = wakes();
        flush_now(&mut io, &mut cx, b"five");
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"five");
        assert_eq!(wakes(), before, "a write at once asks for no second poll");
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
