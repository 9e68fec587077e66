//! The bounded HTTP/1 server every Tidepool process serves with: the web
//! tier's application server, the worker's probes and metrics
//! ([`HEALTH_PATH`](crate::HEALTH_PATH), [`READY_PATH`](crate::READY_PATH),
//! [`METRICS_PATH`](crate::METRICS_PATH)) and the operator's endpoints.
//!
//! - [`accept`] is the accept loop: at most a given number of connections
//!   at once (the next waits in the kernel's listen backlog, not in
//!   memory), each served on a task of its own that holds its slot until it
//!   ends; a failed accept (out of file descriptors, say) is logged and
//!   retried after [`ACCEPT_ERROR_BACKOFF`]; it returns when `stop`
//!   resolves, leaving the accepted connections to finish.
//! - [`http1()`] is hyper's connection settings from the [`Limits`]: a client
//!   gets [`Limits::header_read_timeout`] to send a request's headers.
//! - [`serve`] joins the two for a plain handler: what the probe servers
//!   need. The web tier calls [`accept`] and [`http1()`] itself, to add its
//!   own request limits, lingering close and graceful drain around them.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The pause after a failed `accept`, so the loop does not spin while the
/// process is out of file descriptors.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How much a server takes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// The most a client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

/// Binds `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// hyper's HTTP/1 connection settings for `limits`.
pub fn http1(limits: &Limits) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    http
}

/// Accepts connections on `listener`, at most `connections` at once, until
/// `stop` resolves (checked first). Each accepted stream and its peer go to
/// `connect`, whose future serves it on a task of its own and holds the
/// connection's slot until it ends.
pub async fn accept<C, F>(
    listener: &TcpListener,
    connections: usize,
    stop: impl Future<Output = ()>,
    mut connect: C,
) where
    C: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(connections));
    tokio::pin!(stop);
    loop {
        let next = async {
            let slot = slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            biased;
            () = &mut stop => return,
            next = next => next,
        };
        // The semaphore is never closed: an error here cannot happen.
        let Ok(slot) = slot else { return };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        // `map`, not an `async move` block around it: such a block keeps
        // the connection's future twice (as its capture and as what it
        // awaits), which is about 2 KB more per open connection.
        tokio::spawn(connect(stream, peer).map(move |()| drop(slot)));
    }
}

/// Serves `handler` on `listener` within `limits` until `stop` resolves
/// (connections already accepted finish on their own tasks).
pub async fn serve<H, F, B>(listener: TcpListener, limits: Limits, handler: H, stop: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = http1(&limits);
    accept(&listener, limits.connections, stop, |stream, _| {
        http.serve_connection(TokioIo::new(stream), service_fn(handler.clone())).map(|_| ())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn ok(_: Request<Incoming>) -> Result<Response<Full<&'static [u8]>>, Infallible> {
        Ok(Response::new(Full::new(&b"ok\n"[..])))
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    fn limits(connections: usize) -> Limits {
        Limits { connections, header_read_timeout: Duration::from_secs(2) }
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_waits_for_a_slot() -> std::io::Result<()> {
        let listener = bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicUsize::new(0));
        let counted = served.clone();
        let handler = move |request| {
            counted.fetch_add(1, Ordering::SeqCst);
            ok(request)
        };
        let server = tokio::spawn(serve(listener, limits(1), handler, std::future::pending()));
        // The one slot, held by a client that sends nothing yet.
        let mut holder = TcpStream::connect(addr).await?;
        let mut waiting = tokio::spawn(get(addr));
        // Not answered while the slot is held (a limit that did not hold
        // would answer it within this time on any machine not starved).
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(),
            "served beyond the limit"
        );
        assert_eq!(served.load(Ordering::SeqCst), 0);
        // Answered once the holder's connection ends.
        holder.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
        let mut first = String::new();
        holder.read_to_string(&mut first).await?;
        let second = waiting.await.map_err(std::io::Error::other)??;
        assert!(
            first.starts_with("HTTP/1.1 200") && second.starts_with("HTTP/1.1 200"),
            "{first} / {second}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 2);
        server.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_sends_no_headers_is_dropped_after_the_timeout() -> std::io::Result<()> {
        let listener = bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await?;
        let addr = listener.local_addr()?;
        let limits = Limits { connections: 1, header_read_timeout: Duration::from_millis(200) };
        let server = tokio::spawn(serve(listener, limits, ok, std::future::pending()));
        let mut silent = TcpStream::connect(addr).await?;
        let mut rest = Vec::new();
        // The server closes it (with a 408 or without a word) and frees the slot.
        tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut rest)).await??;
        let answer = tokio::time::timeout(Duration::from_secs(30), get(addr)).await??;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.abort();
        Ok(())
    }

    #[tokio::test]
    async fn the_server_returns_when_told_to_stop() -> std::io::Result<()> {
        let listener = bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await?;
        let (tell, told) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, limits(4), ok, async move {
            let _ = told.await;
        }));
        let _ = tell.send(());
        tokio::time::timeout(Duration::from_secs(30), server).await?.map_err(std::io::Error::other)?;
        Ok(())
    }

    #[tokio::test]
    async fn a_busy_address_is_named() -> std::io::Result<()> {
        let taken = bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await?;
        let addr = taken.local_addr()?;
        let error = bind(addr).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.starts_with(&format!("cannot listen on {addr}: ")), "{error}");
        Ok(())
    }
}
