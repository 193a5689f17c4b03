//! The HTTP/2 connection preface, read before the connection is handed to the HTTP/2 server.
//!
//! hyper waits for a client's preface for as long as the client likes, so a peer that connects and says
//! nothing holds a file descriptor and a connection slot forever. The listener reads the 24-byte preface
//! itself, under the connection's deadline, checks it, and hands hyper the connection with the preface put
//! back in front ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads and checks the preface; the connection is returned with it put back.
pub async fn read_preface<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<Rewind<IO>> {
    let mut buf = [0u8; PREFACE.len()];
    io.read_exact(&mut buf).await?;
    if &buf != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 (gRPC) client: the connection did not start with the HTTP/2 preface",
        ));
    }
    Ok(Rewind {
        prefix: Bytes::from_static(PREFACE),
        io,
    })
}

/// A connection with bytes already read put back in front of it.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

write_through!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_preface_is_put_back_and_anything_else_refused() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(b"rest");
        let mut io = read_preface(&input[..]).await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, input);

        let err = read_preface(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = read_preface(&b"PRI"[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
