//! The network edge every server of acme-sds shares: binding listeners (TCP and Unix sockets with their
//! modes), who a connection comes from ([`peer`]) and the caps per listener and per source, accept errors
//! that back off ([`accept`]), the TLS handshake and HTTP/2 preface deadline ([`preface`]), the Unix-socket
//! `:authority` fix for gRPC-core clients ([`authority`]), write batching ([`batching`]), log throttling
//! ([`throttle`]), and one hardened HTTP/1 server with caps and drain ([`http1`]) that the admin endpoint
//! and the HTTP-01 responder both run on. It knows nothing of SDS or of the config file: the SDS service
//! is handed to [`listen::serve`] as any gRPC service, and the settings as values.

/// `AsyncWrite` for a connection wrapper that changes only what is read ([`preface::Rewind`],
/// [`authority::AuthorityFix`]): every write goes straight to the wrapped connection, `self.io`.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
            }
        }
    };
}

pub(crate) mod accept;
pub mod authority;
mod batching;
pub(crate) mod http1;
pub mod listen;
pub mod peer;
pub mod preface;
pub(crate) mod throttle;
