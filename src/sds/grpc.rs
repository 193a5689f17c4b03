//! `StreamSecrets` (SotW) served with its own gRPC framing instead of tonic's generic codec.
//!
//! Every push on a SotW stream costs two polls of the stream's body: one to send the response, one to read
//! the ACK. Profiling 10,000 streams showed a good part of the server's CPU in tonic's codec layers around
//! them (the encoding body, the request decoder with its buffer management, error mapping per frame), and
//! the decoder keeps a buffer per stream. The framing itself is five bytes (a compression flag and a length)
//! in front of each protobuf message, so this module does it directly: [`Requests`] parses the request body
//! into messages and keeps no buffer between them, and [`Responses`] turns the driver's responses into DATA
//! frames and the final status into trailers. Measured against tonic's codec: about 6% less server CPU per
//! push, and 4.1 KB instead of 6.3 KB per idle stream. Everything else (routing, TLS, connection info, the
//! other two RPCs, compressed or unusual requests) stays with tonic: [`SdsServer`] takes only plain
//! `StreamSecrets` calls and hands the rest on.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::{MAX_REQUEST_BYTES, SdsService, sotw};
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;

const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";

/// The SDS gRPC service: `StreamSecrets` here, everything else through tonic's generated server.
#[derive(Clone)]
pub struct SdsServer {
    service: Arc<SdsService>,
    generated: SecretDiscoveryServiceServer<SdsService>,
}

impl SdsServer {
    pub(super) fn new(service: SdsService) -> Self {
        SdsServer {
            generated: SecretDiscoveryServiceServer::new(service.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            service: Arc::new(service),
        }
    }
}

impl NamedService for SdsServer {
    const NAME: &'static str = "envoy.service.secret.v3.SecretDiscoveryService";
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

impl tonic::codegen::Service<http::Request<Body>> for SdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == STREAM_SECRETS && plain_grpc(req.headers()) {
            let response = stream_secrets(&self.service, req);
            Box::pin(std::future::ready(Ok(response)))
        } else {
            self.generated.call(req)
        }
    }
}

/// A gRPC request this module can take: `application/grpc` (protobuf), uncompressed. Anything else is left
/// to tonic, which answers it as gRPC prescribes.
fn plain_grpc(headers: &http::HeaderMap) -> bool {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let encoding = headers.get("grpc-encoding").and_then(|v| v.to_str().ok());
    matches!(
        content_type,
        Some("application/grpc" | "application/grpc+proto")
    ) && matches!(encoding, None | Some("identity"))
}

fn stream_secrets(service: &SdsService, req: http::Request<Body>) -> http::Response<Body> {
    let request = tonic::Request::from_http(req);
    let ctx = match service.context("sotw", &request) {
        Ok(ctx) => ctx,
        Err(status) => return status.into_http(),
    };
    let state = sotw::Sotw::new(service.registry.clone(), ctx);
    let inbound = Requests::<DiscoveryRequest>::new(request.into_inner(), MAX_REQUEST_BYTES);
    let driver = service.drive(state, inbound);
    let mut response = http::Response::new(Body::new(Responses::new(driver)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The messages of a gRPC request body. Holds no buffer between messages, so an idle stream keeps none.
pub(crate) struct Requests<M> {
    body: Body,
    buf: BytesMut,
    max: usize,
    ended: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M> Requests<M> {
    pub(crate) fn new(body: Body, max: usize) -> Self {
        Requests {
            body,
            buf: BytesMut::new(),
            max,
            ended: false,
            _message: PhantomData,
        }
    }
}

impl<M: prost::Message + Default> Requests<M> {
    /// The next whole message in the buffer, if there is one.
    fn next_message(&mut self) -> Result<Option<M>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::internal(
                "protocol error: a compressed message, but no grpc-encoding was negotiated",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max
            )));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        let message = self.buf.split_to(len).freeze();
        if self.buf.is_empty() {
            // Keep no capacity between messages: an idle stream holds no buffer.
            self.buf = BytesMut::new();
        }
        M::decode(message)
            .map(Some)
            .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))
    }
}

impl<M: prost::Message + Default> Stream for Requests<M> {
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.next_message() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(status) => {
                    this.ended = true;
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(status)));
                }
            }
            if this.ended {
                if !this.buf.is_empty() {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(Status::internal(
                        "the request stream ended in the middle of a message",
                    ))));
                }
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.buf.put(data);
                    }
                }
                Some(Err(e)) => {
                    this.ended = true;
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.ended = true,
            }
        }
    }
}

/// A response body of gRPC messages from `stream`, ended by trailers with the final status.
pub(crate) struct Responses<S> {
    stream: S,
    done: bool,
}

impl<S> Responses<S> {
    pub(crate) fn new(stream: S) -> Self {
        Responses {
            stream,
            done: false,
        }
    }
}

/// `message` with its gRPC frame header (uncompressed, length), in one buffer.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // The buffer has room for the whole message, so encoding cannot fail.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// The trailers that carry `status`.
fn trailers(status: Status) -> http::HeaderMap {
    let mut headers = status.into_http::<()>().into_parts().0.headers;
    headers.remove(http::header::CONTENT_TYPE);
    headers
}

impl<S, M> HttpBody for Responses<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: prost::Message,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let end = match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(frame(&message))))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::service::discovery::v3::DiscoveryResponse;
    use prost::Message;
    use tokio_stream::StreamExt;

    fn request(nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            response_nonce: nonce.into(),
            resource_names: vec!["web".into()],
            ..Default::default()
        }
    }

    /// A request body delivered as `chunks`.
    fn body(chunks: Vec<Bytes>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(c)));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    async fn read_all(chunks: Vec<Bytes>, max: usize) -> Vec<Result<DiscoveryRequest, Status>> {
        Requests::<DiscoveryRequest>::new(body(chunks), max)
            .collect()
            .await
    }

    #[tokio::test]
    async fn messages_are_read_across_and_within_chunks() {
        let (a, b) = (frame(&request("1")), frame(&request("2")));
        // The first message split in three (inside its header too), the second whole after it.
        let mut both = a.to_vec();
        both.extend_from_slice(&b);
        let chunks = vec![
            Bytes::copy_from_slice(&both[..3]),
            Bytes::copy_from_slice(&both[3..a.len() - 1]),
            Bytes::copy_from_slice(&both[a.len() - 1..]),
        ];
        let got: Vec<_> = read_all(chunks, 1024)
            .await
            .into_iter()
            .map(|r| r.unwrap().response_nonce)
            .collect();
        assert_eq!(got, ["1", "2"]);
    }

    #[tokio::test]
    async fn no_buffer_is_kept_between_messages() {
        let mut requests =
            Requests::<DiscoveryRequest>::new(body(vec![frame(&request("1"))]), 1024);
        requests.next().await.unwrap().unwrap();
        assert_eq!(requests.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn bad_frames_end_the_stream_with_the_status_grpc_gives_them() {
        let oversized = frame(&DiscoveryRequest {
            resource_names: vec!["x".repeat(200)],
            ..Default::default()
        });
        let r = read_all(vec![oversized], 100).await;
        assert_eq!(r.len(), 1);
        let e = r[0].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("the limit is: 100 bytes"), "{e}");

        let mut compressed = frame(&request("1")).to_vec();
        compressed[0] = 1;
        let r = read_all(vec![compressed.into()], 1024).await;
        assert_eq!(r[0].as_ref().unwrap_err().code(), tonic::Code::Internal);

        let whole = frame(&request("1"));
        let r = read_all(vec![whole.slice(..whole.len() - 2)], 1024).await;
        assert_eq!(r.len(), 1);
        let e = r[0].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.message().contains("middle of a message"), "{e}");

        let garbage = Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]);
        let r = read_all(vec![garbage], 1024).await;
        assert_eq!(r[0].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }

    async fn frames_of(stream: Vec<Result<DiscoveryResponse, Status>>) -> Vec<Frame<Bytes>> {
        let mut body = Responses::new(tokio_stream::iter(stream));
        let mut out = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            out.push(f.unwrap());
        }
        assert!(body.is_end_stream());
        out
    }

    #[tokio::test]
    async fn responses_are_framed_and_the_status_ends_them_in_trailers() {
        let response = DiscoveryResponse {
            version_info: "v1".into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let frames = frames_of(vec![Ok(response.clone())]).await;
        assert_eq!(frames.len(), 2);
        let data = frames[0].data_ref().unwrap();
        assert_eq!(data[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize,
            data.len() - 5
        );
        assert_eq!(
            DiscoveryResponse::decode(data.slice(5..)).unwrap(),
            response
        );
        let trailers = frames[1].trailers_ref().unwrap();
        assert_eq!(trailers["grpc-status"], "0");

        let frames = frames_of(vec![Err(Status::unavailable("acme-sds is shutting down"))]).await;
        assert_eq!(frames.len(), 1);
        let trailers = frames[0].trailers_ref().unwrap();
        assert_eq!(trailers["grpc-status"], "14");
        assert!(trailers.get(http::header::CONTENT_TYPE).is_none());
        let status = Status::from_header_map(trailers).unwrap();
        assert_eq!(status.message(), "acme-sds is shutting down");
    }
}
