//! Fake upstreams: the backends (revision pods, activator stand-ins) that
//! Envoy routes test traffic to.
//!
//! Each answers every request with its name as the body and in `x-upstream`,
//! so a test sees which backend got a request, and echoes request headers
//! named `x-*`, `knative-*` or `k-*` back as `x-echo-<name>`, so a test sees
//! what Envoy added or rewrote on the way. HTTP/1.1 and h2c are both served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Request header prefixes that are echoed back.
const ECHOED_PREFIXES: [&str; 3] = ["x-", "knative-", "k-"];

/// A running fake upstream on `127.0.0.1:<ephemeral>`. Stops serving, and
/// closes its open connections, when dropped.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

/// Options for an [`Upstream`]; from [`Upstream::builder`].
#[derive(Clone, Debug)]
pub struct UpstreamBuilder {
    name: String,
    status: StatusCode,
    delay: Duration,
    listen: SocketAddr,
}

/// What every connection's service needs.
#[derive(Debug)]
struct Behaviour {
    name: String,
    name_header: HeaderValue,
    status: StatusCode,
    delay: Duration,
    requests: Arc<AtomicU64>,
}

impl Upstream {
    /// Starts an upstream named `name` that answers 200.
    pub async fn start(name: &str) -> anyhow::Result<Upstream> {
        Self::builder(name).start().await
    }

    /// Options beyond the defaults (200, no delay).
    pub fn builder(name: &str) -> UpstreamBuilder {
        UpstreamBuilder {
            name: name.to_owned(),
            status: StatusCode::OK,
            delay: Duration::ZERO,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Its name, as sent in bodies and `x-upstream`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port (what a cluster's endpoint needs).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests received so far (counted on arrival, before any delay).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task with it.
        self.server.abort();
    }
}

impl UpstreamBuilder {
    /// Answer every request with `status` (body and headers unchanged).
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn status(mut self, status: u16) -> Self {
        self.status = StatusCode::from_u16(status).expect("valid HTTP status code");
        self
    }

    /// Wait `delay` before answering each request: a slow backend, for
    /// timeout and concurrency tests.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Listen on `addr` instead of `127.0.0.1:0` (for demos; tests keep port 0).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Binds (by default `127.0.0.1:0`) and starts serving.
    pub async fn start(self) -> anyhow::Result<Upstream> {
        let name_header = HeaderValue::from_str(&self.name).with_context(|| {
            format!("upstream name {:?} is not a valid header value", self.name)
        })?;
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("binding upstream to {}", self.listen))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let behaviour = Arc::new(Behaviour {
            name: self.name.clone(),
            name_header,
            status: self.status,
            delay: self.delay,
            requests: requests.clone(),
        });
        let server = tokio::spawn(serve(listener, behaviour));
        tracing::debug!(name = %self.name, %addr, "upstream started");
        Ok(Upstream {
            name: self.name,
            addr,
            requests,
            server,
        })
    }
}

async fn serve(listener: TcpListener, behaviour: Arc<Behaviour>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Transient (e.g. EMFILE under load); keep serving.
                        tracing::warn!(name = %behaviour.name, error = %e, "upstream accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let behaviour = behaviour.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let behaviour = behaviour.clone();
                        async move { Ok::<_, Infallible>(respond(&behaviour, &req).await) }
                    });
                    // Errors here are clients going away mid-request; not ours.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn respond(behaviour: &Behaviour, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    behaviour.requests.fetch_add(1, Ordering::SeqCst);
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(behaviour.name.clone())));
    *resp.status_mut() = behaviour.status;
    let headers = resp.headers_mut();
    headers.insert("x-upstream", behaviour.name_header.clone());
    for (name, value) in echoed(req.headers()) {
        headers.append(name, value.clone());
    }
    resp
}

/// The request headers to echo, renamed `x-echo-<name>`.
fn echoed(headers: &http::HeaderMap) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
    headers.iter().filter_map(|(name, value)| {
        let name = name.as_str();
        if !ECHOED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return None;
        }
        let echo = HeaderName::from_bytes(format!("x-echo-{name}").as_bytes()).ok()?;
        Some((echo, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http_get, http_send, HttpClient};

    #[tokio::test]
    async fn answers_with_name_and_echoes_selected_headers() {
        let up = Upstream::start("rev-1").await.unwrap();
        let req = Request::get("/some/path?q=1")
            .header("host", "svc.example.com")
            .header("x-request-id", "abc")
            .header("knative-serving-tag", "blue")
            .header("k-original-host", "o.example.com")
            .header("user-agent", "not-echoed")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .body(Bytes::new())
            .unwrap();
        let reply = http_send(up.addr(), req).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "rev-1");
        assert_eq!(reply.header("x-upstream"), Some("rev-1"));
        assert_eq!(reply.header("x-echo-x-request-id"), Some("abc"));
        assert_eq!(reply.header("x-echo-knative-serving-tag"), Some("blue"));
        assert_eq!(
            reply.header("x-echo-k-original-host"),
            Some("o.example.com")
        );
        assert_eq!(reply.header("x-echo-user-agent"), None);
        assert_eq!(reply.header("x-echo-host"), None);
        let multi: Vec<_> = reply.headers.get_all("x-echo-x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        assert_eq!(up.requests(), 1);
    }

    #[tokio::test]
    async fn fixed_status() {
        let up = Upstream::builder("down").status(503).start().await.unwrap();
        let reply = http_get(up.addr(), "x", "/").await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (503, "down"));
    }

    #[tokio::test]
    async fn keep_alive_client_over_http1_and_h2c() {
        let up = Upstream::start("pool").await.unwrap();
        for client in [HttpClient::new(up.addr()), HttpClient::h2c(up.addr())] {
            for _ in 0..5 {
                let reply = client.get("svc.example.com", "/").await.unwrap();
                assert_eq!(reply.status, 200);
                assert_eq!(reply.body, "pool");
            }
        }
        assert_eq!(up.requests(), 10);
    }

    #[tokio::test]
    async fn keep_alive_client_sends_the_virtual_host() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = HttpClient::new(listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed early");
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        });
        let reply = client.get("svc.example.com", "/p?q=1").await.unwrap();
        assert_eq!(reply.status, 204);
        let head = server.await.unwrap();
        assert!(head.starts_with("get /p?q=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nhost: svc.example.com\r\n"), "{head}");
    }

    #[tokio::test]
    async fn drop_stops_serving_and_closes_connections() {
        let up = Upstream::start("gone").await.unwrap();
        let client = HttpClient::new(up.addr());
        assert_eq!(client.get("x", "/").await.unwrap().status, 200);
        drop(up);
        crate::poll_until(
            "upstream to stop answering",
            Duration::from_secs(5),
            || async { client.get("x", "/").await.is_err() },
        )
        .await
        .unwrap();
    }
}
