//! Lingering close: a refused request body must not cost the client its answer.
//!
//! When `tidepool web` refuses a body (413 for a declared or streamed size
//! over the limit, 404 or 405 before reading it, 408), the client may still
//! be sending it. hyper answers, then closes the connection. Closing a TCP
//! socket with unread data in its receive buffer makes the kernel send a
//! reset instead of a FIN, and a reset discards what the client has not read
//! yet: the client sees "connection reset" or a broken pipe instead of the
//! 413, depending on how far it got. Which one wins is a race, so it shows
//! up at random, more on a busy machine.
//!
//! Mature servers close such connections in two steps (nginx's
//! `lingering_close`, Apache's `lingering_close`): shut down the write side
//! (the client gets the response and a FIN), then read and discard what the
//! client still sends until it hangs up, for a bounded time and amount, and
//! only then close. This module does that:
//! - [`UnreadBody`] is a per-connection flag; the request handler sets it
//!   while the current request has a body it has not read to the end;
//! - [`LingeringStream`] wraps the connection's socket. When hyper shuts it
//!   down with the flag set, it shuts down the write side and discards input
//!   until end of stream, [`Linger::timeout`] or [`Linger::max_bytes`],
//!   whichever comes first. A client that keeps sending past the cap is cut
//!   off (the close then resets the connection).
//!
//! A request sent with `Expect: 100-continue` whose declared length is over
//! the limit gets its 413 without hyper asking for the body, as HTTP/1.1
//! intends; the client then sends nothing more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long, and how much, a connection with a refused body is drained
/// before it is closed.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    /// Longest the drain lasts.
    pub timeout: Duration,
    /// Most bytes it discards.
    pub max_bytes: u64,
}

/// Set while the connection's current request has a body that was not read
/// to its end. Cheap to clone: one per connection, shared by the handler and
/// the socket.
#[derive(Debug, Clone, Default)]
pub struct UnreadBody(Arc<AtomicBool>);

impl UnreadBody {
    /// Records whether the current request's body is still unread.
    pub fn set(&self, unread: bool) {
        self.0.store(unread, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Size of the buffer input is discarded into, allocated only while lingering.
const DISCARD_CHUNK: usize = 16 * 1024;

/// A connection's socket that lingers on shutdown when [`UnreadBody`] is set.
pub struct LingeringStream<S> {
    inner: S,
    unread_body: UnreadBody,
    linger: Linger,
    state: Option<Lingering>,
}

struct Lingering {
    write_closed: bool,
    deadline: Pin<Box<Sleep>>,
    discarded: u64,
    scratch: Box<[u8]>,
}

impl<S> LingeringStream<S> {
    /// Wraps a connection's stream.
    pub fn new(inner: S, unread_body: UnreadBody, linger: Linger) -> Self {
        Self { inner, unread_body, linger, state: None }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LingeringStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LingeringStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.is_none() {
            if !this.unread_body.get() {
                return Pin::new(&mut this.inner).poll_shutdown(cx);
            }
            this.state = Some(Lingering {
                write_closed: false,
                deadline: Box::pin(tokio::time::sleep(this.linger.timeout)),
                discarded: 0,
                scratch: vec![0; DISCARD_CHUNK].into_boxed_slice(),
            });
        }
        let Some(lingering) = this.state.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !lingering.write_closed {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            lingering.write_closed = true;
        }
        loop {
            if lingering.deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(discarded = lingering.discarded, "lingering close: time is up; closing");
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut lingering.scratch);
            match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                // The peer hung up, or reset: either way it has what it needs.
                Err(_) => return Poll::Ready(Ok(())),
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {
                    lingering.discarded += buf.filled().len() as u64;
                    if lingering.discarded > this.linger.max_bytes {
                        tracing::debug!(
                            discarded = lingering.discarded,
                            "lingering close: the client sent more than the cap; cutting it off"
                        );
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LINGER: Linger = Linger { timeout: Duration::from_secs(30), max_bytes: 1024 };

    #[tokio::test]
    async fn without_an_unread_body_shutdown_closes_at_once() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut stream = LingeringStream::new(server, UnreadBody::default(), LINGER);
        client.write_all(b"pending input").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("the write side is closed");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn with_an_unread_body_input_is_drained_until_the_client_hangs_up() {
        let (server, mut client) = tokio::io::duplex(64);
        let unread = UnreadBody::default();
        unread.set(true);
        let mut stream = LingeringStream::new(server, unread, LINGER);
        let shutdown = tokio::spawn(async move {
            stream.write_all(b"HTTP/1.1 413").await?;
            stream.shutdown().await
        });
        // The client writes more than the duplex buffer holds: that only
        // completes because the server drains it.
        tokio::time::timeout(Duration::from_secs(10), client.write_all(&[b'x'; 512]))
            .await
            .expect("the body is drained")
            .expect("write");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read the answer");
        assert_eq!(answer, b"HTTP/1.1 413");
        assert!(!shutdown.is_finished(), "it lingers while the client is connected");
        drop(client);
        shutdown.await.expect("join").expect("shutdown");
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_is_cut_off_at_the_cap() {
        let (server, mut client) = tokio::io::duplex(64);
        let unread = UnreadBody::default();
        unread.set(true);
        let mut stream = LingeringStream::new(server, unread, LINGER);
        let shutdown = tokio::spawn(async move { stream.shutdown().await });
        let mut sent = 0u64;
        while client.write_all(&[b'x'; 64]).await.is_ok() {
            sent += 64;
            assert!(sent <= 100 * LINGER.max_bytes, "never cut off");
        }
        shutdown.await.expect("join").expect("shutdown");
        assert!(sent > LINGER.max_bytes, "cut off early, after {sent} bytes");
        assert!(sent <= LINGER.max_bytes + 2 * 64 + 64, "cut off late, after {sent} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_given_up_on_at_the_timeout() {
        let (server, _client) = tokio::io::duplex(64);
        let unread = UnreadBody::default();
        unread.set(true);
        let mut stream = LingeringStream::new(server, unread, LINGER);
        let started = tokio::time::Instant::now();
        stream.shutdown().await.expect("shutdown");
        assert_eq!(started.elapsed(), LINGER.timeout);
    }
}
