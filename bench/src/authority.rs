//! `authority`: the cost of the Unix-socket `:authority` fix, in memory.

use std::time::Instant;

use anyhow::Result;

use crate::Sizes;
use crate::report::Csv;

/// The cost of the Unix-socket `:authority` fix (`acme_sds::net::authority`), in memory: per request
/// header block as gRPC-core sends them (the socket path as `:authority`, HPACK with incremental indexing,
/// so later blocks are mostly references into the client's table), and per byte of DATA passed through.
pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    use acme_sds::net::authority::AuthorityFix;
    use acme_sds::net::preface::PREFACE;
    use tokio::io::AsyncReadExt;
    fn frame_bytes(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let blocks = if a.quick { 1_000 } else { 200_000 };
    let headers: [(&[u8], &[u8]); 9] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (
            b":path",
            b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        ),
        (b":authority", b"run%2Facme-sds%2Fsds.sock"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (
            b"user-agent",
            b"grpc-python/1.76.0 grpc-c/51.0.0 (linux; chttp2)",
        ),
        (b"grpc-accept-encoding", b"identity, deflate, gzip"),
        (b"grpc-timeout", b"9999999m"),
    ];
    let mut encoder = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    for i in 0..blocks {
        let block = encoder.encode(headers.iter().copied());
        frame_bytes(&mut input, 0x1, 0x4, 2 * i as u32 + 1, &block);
    }
    let started = Instant::now();
    let mut out = Vec::with_capacity(input.len() * 4);
    AuthorityFix::new(&input[..]).read_to_end(&mut out).await?;
    let per_block = started.elapsed().as_secs_f64() * 1e9 / blocks as f64;

    let data_bytes = if a.quick { 1 << 20 } else { 256 << 20 };
    let mut input = PREFACE.to_vec();
    let payload = vec![0u8; 16_384];
    for i in 0..data_bytes / payload.len() {
        frame_bytes(&mut input, 0x0, 0, 2 * i as u32 + 1, &payload);
    }
    let started = Instant::now();
    let mut out = Vec::with_capacity(input.len());
    AuthorityFix::new(&input[..]).read_to_end(&mut out).await?;
    let gib_s = input.len() as f64 / started.elapsed().as_secs_f64() / f64::from(1u32 << 30);
    let param = format!("{blocks} gRPC-core header blocks");
    csv.row(
        "authority",
        &param,
        "rewrite_per_block",
        per_block / 1000.0,
        "us",
    );
    let param = format!("{} MiB of DATA frames", data_bytes >> 20);
    csv.row("authority", &param, "pass_through", gib_s, "GiB/s");
    Ok(())
}
