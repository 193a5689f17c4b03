//! Serving gRPC clients that send a socket path as `:authority` on Unix sockets.
//!
//! gRPC-core (Python grpcio, C++, Envoy's own `google_grpc` client), grpc-java, Bazel and kubelet send the
//! socket path, or its %-encoding, as the `:authority` of every request over a Unix socket
//! (`tmp%2Facme%2Fsds.sock`). That is not a valid URI authority, and h2 (under hyper and tonic) resets every
//! such stream with `PROTOCOL_ERROR` (hyperium/h2#487, open since 2020). On a Unix socket the authority
//! means nothing: the socket is the destination, and acme-sds never reads it.
//!
//! So on Unix sockets, and only there, [`AuthorityFix`] reads the client's HTTP/2 frames before h2 does.
//! Every header block (HEADERS plus CONTINUATION frames) is decoded with the client's HPACK state mirrored
//! (`loona-hpack`, a decoder its authors test against h2spec), a `:authority` that is not a valid authority
//! is dropped (h2 accepts a request without one), and the block is re-encoded as plain literals that never
//! enter h2's dynamic table, so the two HPACK states cannot drift apart. Every other frame passes through
//! unchanged, and h2 still checks everything else. TCP listeners do not get this: there h2's checks stand
//! as they are.
//!
//! Cost: a header block is decoded and re-encoded once per request (a stream opening; see the README for
//! the measurement); other frames are copied once more on their way in.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use super::preface::PREFACE;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame h2 accepts (SETTINGS_MAX_FRAME_SIZE, which acme-sds leaves at its default).
const MAX_FRAME: usize = 16_384;
/// The HPACK table size h2 offers clients (SETTINGS_HEADER_TABLE_SIZE, left at its default).
const TABLE_SIZE: usize = 4_096;
/// Largest header block accepted, compressed and decoded (h2 itself refuses lists over 16 KiB).
const MAX_BLOCK: usize = 64 * 1024;

/// A header block being collected.
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

/// See the module docs. Wraps the connection below the HTTP/2 server; writes pass straight through.
pub struct AuthorityFix<IO> {
    io: IO,
    /// Bytes read and not yet processed.
    inbuf: BytesMut,
    /// Processed bytes ready for h2.
    out: BytesMut,
    /// Bytes still to pass through unchanged (the preface, the rest of a non-header frame).
    pass: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
    /// How many `:authority` values were dropped (for the debug log).
    dropped: u64,
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 protocol error: {what}"),
    )
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), `first` holding the bits above the prefix.
fn put_int(out: &mut BytesMut, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.put_u8(first | v as u8);
        return;
    }
    out.put_u8(first | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.put_u8(v as u8);
}

/// A header field as a literal without indexing, new name, no Huffman coding (RFC 7541 §6.2.2).
fn put_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    put_int(out, 0, 7, name.len());
    out.put_slice(name);
    put_int(out, 0, 7, value.len());
    out.put_slice(value);
}

/// Whether h2 would take `value` as `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<IO> AuthorityFix<IO> {
    /// `io` must start with the client's connection preface.
    pub fn new(io: IO) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AuthorityFix {
            io,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            pass: PREFACE.len(),
            block: None,
            decoder,
            eof: false,
            dropped: 0,
        }
    }

    /// Moves every whole unit of `inbuf` to `out`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.pass > 0 {
                let n = self.pass.min(self.inbuf.len());
                if n == 0 {
                    return Ok(());
                }
                self.out.extend_from_slice(&self.inbuf[..n]);
                self.inbuf.advance(n);
                self.pass -= n;
                continue;
            }
            if self.inbuf.len() < 9 {
                return Ok(());
            }
            let h = &self.inbuf[..9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if kind != HEADERS && kind != CONTINUATION {
                if self.block.is_some() {
                    return Err(protocol_error(
                        "a header block interrupted by another frame",
                    ));
                }
                self.pass = 9 + len;
                continue;
            }
            if len > MAX_FRAME {
                return Err(protocol_error(
                    "a header frame larger than the maximum frame size",
                ));
            }
            if self.inbuf.len() < 9 + len {
                self.inbuf.reserve(9 + len - self.inbuf.len());
                return Ok(());
            }
            let frame = self.inbuf.split_to(9 + len);
            let mut payload = &frame[9..];
            if kind == HEADERS {
                if self.block.is_some() {
                    return Err(protocol_error("HEADERS inside a header block"));
                }
                if flags & PADDED != 0 {
                    let pad = usize::from(
                        *payload
                            .first()
                            .ok_or_else(|| protocol_error("bad padding"))?,
                    );
                    payload = payload
                        .get(1..payload.len().saturating_sub(pad))
                        .filter(|_| pad < payload.len())
                        .ok_or_else(|| protocol_error("bad padding"))?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let p: [u8; 5] = payload
                        .get(..5)
                        .and_then(|p| p.try_into().ok())
                        .ok_or_else(|| protocol_error("bad priority"))?;
                    payload = &payload[5..];
                    Some(p)
                } else {
                    None
                };
                self.block = Some(Block {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: BytesMut::from(payload),
                });
            } else {
                match &mut self.block {
                    Some(b) if b.stream_id == stream_id => b.fragment.extend_from_slice(payload),
                    _ => return Err(protocol_error("CONTINUATION outside a header block")),
                }
            }
            if self
                .block
                .as_ref()
                .is_some_and(|b| b.fragment.len() > MAX_BLOCK)
            {
                return Err(protocol_error("header block too large"));
            }
            if flags & END_HEADERS != 0
                && let Some(block) = self.block.take()
            {
                self.rewrite(block)?;
            }
        }
    }

    /// Decodes a whole header block and writes it to `out` as HEADERS (+ CONTINUATION) frames.
    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        let mut encoded = BytesMut::with_capacity(block.fragment.len() * 2);
        let mut decoded = 0usize;
        let mut dropped = 0;
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                decoded += name.len() + value.len() + 32;
                if decoded > MAX_BLOCK {
                    return;
                }
                if &*name == b":authority" && !valid_authority(&value) {
                    dropped += 1;
                    return;
                }
                put_literal(&mut encoded, &name, &value);
            })
            .map_err(|e| protocol_error(&format!("HPACK: {e}")))?;
        if decoded > MAX_BLOCK {
            return Err(protocol_error("header list too large"));
        }
        if dropped > 0 {
            self.dropped += dropped;
            if self.dropped == dropped {
                tracing::debug!(
                    stream = block.stream_id,
                    "Unix socket client sent an :authority that is not a URI authority (a socket path); ignored"
                );
            }
        }
        let mut first = true;
        let mut rest = &encoded[..];
        loop {
            let room = if first && block.priority.is_some() {
                MAX_FRAME - 5
            } else {
                MAX_FRAME
            };
            let (chunk, after) = rest.split_at(rest.len().min(room));
            let mut flags = if after.is_empty() { END_HEADERS } else { 0 };
            let mut len = chunk.len();
            if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= PRIORITY;
                    len += 5;
                }
            }
            self.out.put_uint(len as u64, 3);
            self.out.put_u8(if first { HEADERS } else { CONTINUATION });
            self.out.put_u8(flags);
            self.out.put_u32(block.stream_id);
            if first && let Some(p) = block.priority {
                self.out.put_slice(&p);
            }
            self.out.put_slice(chunk);
            first = false;
            rest = after;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.process()?;
            if !this.out.is_empty() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The client closed: whatever is left (a cut-off frame) goes to h2, which says what it is.
                this.eof = true;
                let rest = this.inbuf.split();
                this.out.extend_from_slice(&rest);
                if let Some(b) = this.block.take() {
                    this.out.extend_from_slice(&b.fragment);
                }
                continue;
            }
            this.inbuf.extend_from_slice(rb.filled());
        }
    }
}

write_through!(AuthorityFix);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = BytesMut::new();
        f.put_uint(payload.len() as u64, 3);
        f.put_u8(kind);
        f.put_u8(flags);
        f.put_u32(stream);
        f.put_slice(payload);
        f.to_vec()
    }

    /// Encodes with incremental indexing and Huffman coding, as gRPC-core does.
    fn client_block(encoder: &mut loona_hpack::Encoder<'_>, headers: &[(&str, &str)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn grpc_request(authority: &str) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (
                ":path",
                "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
            ),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "grpc-python/1.85.3"),
        ]
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        Ok(out)
    }

    /// The frames after the preface: (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&b[..24], PREFACE);
        b = &b[24..];
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            out.push((
                b[3],
                b[4],
                u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
                b[9..9 + len].to_vec(),
            ));
            b = &b[9 + len..];
        }
        out
    }

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn a_socket_path_authority_is_dropped_and_everything_else_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[]);
        input.extend(&settings);
        // Two requests: the second reuses the client's dynamic table entries made by the first.
        for (stream, authority) in [(1, "tmp%2Facme%2Fsds.sock"), (3, "/tmp/acme/sds.sock")] {
            let block = client_block(&mut enc, &grpc_request(authority));
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, 0, stream, b"\0\0\0\0\x05hello"));
        }
        // A valid authority stays.
        let block = client_block(&mut enc, &grpc_request("localhost"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &block));

        let out = through(input).await.unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 6);
        assert_eq!(f[0].0, 0x4);
        // h2 sees every block as literals: each decodes with a fresh decoder.
        for (i, stream) in [(1, 1), (3, 3)] {
            assert_eq!((f[i].0, f[i].1, f[i].2), (HEADERS, END_HEADERS, stream));
            let headers = decode(&f[i].3);
            assert!(
                !headers.iter().any(|(n, _)| n == ":authority"),
                "{headers:?}"
            );
            assert_eq!(headers.len(), 6);
            assert!(headers.contains(&("user-agent".into(), "grpc-python/1.85.3".into())));
            assert_eq!(f[i + 1].3, b"\0\0\0\0\x05hello", "DATA unchanged");
        }
        assert_eq!(f[5].1, END_HEADERS | END_STREAM);
        assert!(decode(&f[5].3).contains(&(":authority".into(), "localhost".into())));
    }

    #[tokio::test]
    async fn continuation_padding_and_priority_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let mut headers = grpc_request("tmp%2Fs.sock");
        let big = "x".repeat(20_000);
        headers.push(("x-big", &big));
        let block = client_block(&mut enc, &headers);
        let (a, b) = block.split_at(block.len() / 2);
        let mut first = vec![3u8]; // pad length
        first.extend_from_slice(&[0, 0, 0, 0, 16]); // priority: stream 0, weight 16
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &first));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let out = through(input).await.unwrap();
        let f = frames(&out);
        // Literal, unencoded: over one frame, so split again, priority kept on the first.
        assert!(f.len() >= 2, "split into HEADERS + CONTINUATION");
        assert_eq!(f[0].1 & PRIORITY, PRIORITY);
        assert_eq!(f[0].1 & PADDED, 0);
        let mut block = f[0].3[5..].to_vec();
        for c in &f[1..] {
            assert_eq!(c.0, CONTINUATION);
            block.extend_from_slice(&c.3);
        }
        assert_eq!(f.last().unwrap().1 & END_HEADERS, END_HEADERS);
        let decoded = decode(&block);
        assert!(!decoded.iter().any(|(n, _)| n == ":authority"));
        assert!(decoded.contains(&("x-big".into(), big.clone())));
    }

    #[tokio::test]
    async fn malformed_blocks_and_bombs_end_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        assert_eq!(
            through(input).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[]));
        input.extend(frame(0x0, 0, 1, b"x"));
        assert!(
            through(input).await.is_err(),
            "a block cut by another frame"
        );

        // One 4 KiB entry in the table, then thousands of one-byte references to it.
        let mut block = BytesMut::new();
        block.put_u8(0x40); // literal with incremental indexing, new name
        put_int(&mut block, 0, 7, 3);
        block.put_slice(b"x-a");
        put_int(&mut block, 0, 7, 4000);
        block.put_slice(&[b'v'; 4000]);
        block.extend(std::iter::repeat_n(0xbe_u8, 5_000)); // indexed: dynamic entry 62, 5,000 times
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let err = through(input).await.unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn hpack_integers() {
        let mut b = BytesMut::new();
        put_int(&mut b, 0, 7, 10);
        put_int(&mut b, 0, 7, 127);
        put_int(&mut b, 0x80, 7, 1337);
        assert_eq!(&b[..], &[10, 127, 0, 0xff, 0xba, 0x09][..]);
    }
}
