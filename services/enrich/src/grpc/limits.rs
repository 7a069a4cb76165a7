//! What one client of the gRPC port may cost: connections, calls running at
//! once, and how much of its input an error message repeats.
//!
//! Without these, anyone who can reach the port could hold memory for good:
//! hundreds of slow request bodies buffered at once, or a few concurrent
//! multi-megabyte `EnrichBatch` calls each expanding into far more than the
//! stage's memory limit. The bounds here make that cost a function of the
//! settings: at most `grpc.max_concurrent_calls` requests have their bodies
//! read and decoded at a time (the others wait with no more than HTTP/2's
//! flow-control window buffered), and at most `grpc.max_connections` are
//! open, each for at most `grpc.max_connection_age`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// At most so many calls of the wrapped service at once, over every
/// connection. The permit is taken before the inner service reads the
/// request body, so a call that waits costs only what HTTP/2 buffered for
/// it. Wrapping one service (the Enrich API) leaves health checks and
/// reflection outside the queue: a busy API still answers its probes.
#[derive(Debug, Clone)]
pub struct CallLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> CallLimit<S> {
    /// `inner`, with at most `calls` of its calls running at once.
    pub fn new(inner: S, calls: usize) -> Self {
        Self { inner, permits: Arc::new(Semaphore::new(calls.max(1))) }
    }
}

impl<S: NamedService> NamedService for CallLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for CallLimit<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the permit's, awaited inside the call (hyper drives
        // each request as its own future, so waiting here would not queue).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let permits = self.permits.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            // The semaphore is never closed, so this always gives a permit.
            let _permit = permits.acquire_owned().await.ok();
            std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(request).await
        })
    }
}

/// A TCP connection holding one of `grpc.max_connections` slots until it
/// closes.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener`, at most `max` open at once: one more is
/// accepted and closed at once (the client sees the connection reset, not a
/// hang), and counted in `refused`. An accept error (out of file
/// descriptors, say) is logged and retried, never the end of the server.
pub fn limited_connections(
    listener: TcpListener,
    max: usize,
    refused: Arc<AtomicU64>,
) -> impl Stream<Item = io::Result<LimitedConnection>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| {
        let refused = refused.clone();
        async move {
            loop {
                match listener.accept().await {
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                        Ok(slot) => return Some((Ok(LimitedConnection { stream, _slot: slot }), (listener, slots))),
                        Err(_) => {
                            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                            // 1st, 2nd, 4th, 8th...: a flood logs a few lines, not one per connection.
                            if n.is_power_of_two() {
                                tracing::warn!(
                                    %peer, refused = n,
                                    "refusing a gRPC connection: grpc.max_connections ({max}) are open"
                                );
                            }
                        }
                    },
                }
            }
        }
    })
}

/// How much of a client's input an error may quote.
pub const QUOTED_CHARS: usize = 64;

/// The longest status message sent back: gRPC carries it in a header, and
/// default clients refuse headers over 16 KiB (and then report nothing).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `text` as an error quotes it: debug-escaped, at most [`QUOTED_CHARS`]
/// characters of it, and its length when cut.
pub fn quoted(text: &str) -> String {
    if text.chars().count() <= QUOTED_CHARS {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(QUOTED_CHARS).collect();
    format!("{head:?}... ({} bytes)", text.len())
}

/// `message` cut to [`MAX_STATUS_MESSAGE`] bytes, on a character boundary.
pub fn status_message(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE {
        let mut cut = MAX_STATUS_MESSAGE - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_messages_stay_short() {
        assert_eq!(quoted("1.2.3"), "\"1.2.3\"");
        let huge = "é".repeat(1 << 20);
        let q = quoted(&huge);
        assert!(q.len() < 200 && q.ends_with("(2097152 bytes)"), "{q}");
        let m = status_message(format!("bad: {huge}"));
        assert!(m.len() <= MAX_STATUS_MESSAGE && m.ends_with("..."), "{}", m.len());
        assert_eq!(status_message("short".into()), "short");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_counted() -> anyhow::Result<()> {
        use futures_util::StreamExt;
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let refused = Arc::new(AtomicU64::new(0));
        let mut incoming = Box::pin(limited_connections(listener, 2, refused.clone()));
        let _a = TcpStream::connect(addr).await?;
        let first = incoming.next().await;
        let _b = TcpStream::connect(addr).await?;
        let second = incoming.next().await;
        assert!(matches!((&first, &second), (Some(Ok(_)), Some(Ok(_)))));
        // The third is accepted and dropped while two are open: its client reads EOF.
        let mut c = TcpStream::connect(addr).await?;
        let pending = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(pending.is_err(), "no third connection handed to the server");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut byte)).await?;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        // A slot freed is a slot taken again.
        drop(first);
        let _d = TcpStream::connect(addr).await?;
        let again = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?;
        assert!(matches!(again, Some(Ok(_))));
        Ok(())
    }
}
