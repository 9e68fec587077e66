//! A small HTTP/1 server for probes and metrics, bounded: at most
//! [`Limits::connections`] connections at once (the next waits in the
//! listen backlog), each with [`Limits::header_read_timeout`] to send its
//! headers. The worker serves [`HEALTH_PATH`](crate::HEALTH_PATH),
//! [`READY_PATH`](crate::READY_PATH) and
//! [`METRICS_PATH`](crate::METRICS_PATH) with it, the operator its own
//! endpoints; the web tier has a server of its own with the request limits
//! an application needs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How much a probe server takes at once.
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

/// Serves `handler` on `listener` within `limits` until `stop` resolves
/// (connections already accepted finish on their own tasks). A failed
/// accept (say, out of file descriptors) is retried after 100 ms.
pub async fn serve<H, F, B>(listener: TcpListener, limits: Limits, handler: H, stop: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    tokio::pin!(stop);
    loop {
        let next = async {
            let slot = slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            () = &mut stop => return,
            next = next => next,
        };
        let Ok(slot) = slot else { return };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handler = handler.clone();
        let connection = http.serve_connection(TokioIo::new(stream), service_fn(handler));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
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
