//! The data-path toolkit the queue-proxy and the activator share. Both
//!
//! - serve HTTP/1.1 and h2c on one port, upgrades included ([`serve_requests`]);
//! - forward each request as an HTTP intermediary: upgrades told apart, hop-by-hop headers left
//!   on their hop both ways, the upstream's address put in the URI ([`forward`]);
//! - stream the response back while something must stay held (the request's place in the
//!   concurrency count, a breaker slot, a pod's capacity) until its last byte, under the
//!   revision's total and idle timeouts ([`GuardedBody`]) — a refused upgrade's response too;
//! - serve their small admin and metrics ports ([`admin`]);
//! - stop on SIGTERM or SIGINT ([`wait_for_signal`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::debug;

pub mod admin;
pub mod forward;

/// Errors of a streamed body, boxed as hyper's bodies box them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`GuardedBody`] was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the request took longer than the revision timeout")]
    Timeout,
    #[error("the upstream sent nothing for longer than the idle timeout")]
    Idle,
}

/// An upstream response body, streamed as it comes, holding `guards` until its last byte (or
/// until it fails), and failing with [`StreamError`] once the total `deadline` passes or nothing
/// arrives for `idle_timeout`.
pub struct GuardedBody<B, G> {
    inner: B,
    guards: Option<G>,
    deadline: Pin<Box<Sleep>>,
    idle_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guards: G, deadline: Instant, idle_timeout: Option<Duration>) -> Self {
        GuardedBody {
            inner,
            guards: Some(guards),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            idle_timeout,
            idle: idle_timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        }
    }
}

impl<B, G> Body for GuardedBody<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.guards = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                if let (Some(t), Some(idle)) = (this.idle_timeout, this.idle.as_mut()) {
                    idle.as_mut().reset(Instant::now() + t);
                }
                if frame.is_err() {
                    this.guards = None;
                }
                Poll::Ready(Some(frame.map_err(|e| Box::new(e) as BoxError)))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.guards = None;
                    return Poll::Ready(Some(Err(Box::new(StreamError::Timeout))));
                }
                if let Some(idle) = this.idle.as_mut() {
                    if idle.as_mut().poll(cx).is_ready() {
                        this.guards = None;
                        return Poll::Ready(Some(Err(Box::new(StreamError::Idle))));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves HTTP/1.1 and h2c on one listener (upgrades such as websockets included), each request
/// answered by `handle(request, peer)`, until `stop` turns true; then stops accepting and waits
/// for the open connections to finish. The queue-proxy's and the activator's request ports.
pub async fn serve_requests<F, Fut, B>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let service = service_fn(move |req| {
            let answer = handle(req, peer);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let conn = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits for SIGTERM or SIGINT and names it. SIGHUP (which would otherwise end the process) is
/// logged and ignored: neither binary has configuration to reload. Without signal handlers,
/// waits forever.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => tracing::info!("SIGHUP ignored: nothing to reload"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::{BodyExt as _, Full};

    use super::*;

    /// Counts itself while alive.
    struct Held(Arc<AtomicUsize>);

    impl Held {
        fn new(count: &Arc<AtomicUsize>) -> Held {
            count.fetch_add(1, Ordering::SeqCst);
            Held(count.clone())
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A body that never sends anything.
    struct Silent;

    impl Body for Silent {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn guards_are_held_until_the_last_byte() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut body = GuardedBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Held::new(&count),
            far(),
            None,
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(body.frame().await.is_none());
        assert_eq!(count.load(Ordering::SeqCst), 0, "released at the end");
    }

    #[tokio::test]
    async fn a_silent_upstream_fails_on_the_idle_timeout_and_releases() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut body = GuardedBody::new(
            Silent,
            Held::new(&count),
            far(),
            Some(Duration::from_millis(20)),
        );
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            error.downcast_ref::<StreamError>(),
            Some(&StreamError::Idle)
        );
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_total_deadline_cuts_the_body() {
        let count = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + Duration::from_millis(20);
        let mut body = GuardedBody::new(Silent, Held::new(&count), deadline, None);
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            error.downcast_ref::<StreamError>(),
            Some(&StreamError::Timeout)
        );
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn dropping_the_body_releases_the_guards() {
        let count = Arc::new(AtomicUsize::new(0));
        let body = GuardedBody::new(Silent, Held::new(&count), far(), None);
        drop(body);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
