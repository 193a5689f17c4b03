//! The gRPC codec for SDS: prost encoding with small per-stream buffers.
//!
//! tonic's default codec gives every RPC an 8 KiB encode buffer and an 8 KiB decode buffer. SDS streams
//! are long-lived and mostly idle (Envoy opens one per secret; a fleet means tens of thousands), and their
//! requests are a few hundred bytes: 1 KiB buffers (grown on demand for a large push) cut the idle cost per
//! stream by about half. Measured by `acme-sds-bench memory` (see BENCHMARKS.md). `StreamSecrets`, which
//! holds most of a fleet's streams, no longer uses it: [`super::grpc`] frames it with no buffer at all
//! between messages. DeltaSecrets and FetchSecrets still do.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
const BUFFER: usize = 1024;
/// Flush encoded messages once this much is buffered (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone)]
/// The SDS messages' codec: prost's, with small per-stream buffers.
pub struct SdsCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SdsCodec<T, U> {
    fn default() -> Self {
        SdsCodec(PhantomData)
    }
}

impl<T, U> Codec for SdsCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
