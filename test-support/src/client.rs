//! A minimal HTTP client for driving test traffic through Envoy and reading
//! its admin API. Whole bodies are buffered; every call has a
//! [`REQUEST_TIMEOUT`] so a wedged proxy fails a test instead of hanging it.
//!
//! Requests name a virtual host (`Host` / `:authority`) independently of the
//! socket address they are sent to, since that is how Envoy routes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Upper bound on one request, connect to last body byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A buffered HTTP response.
#[derive(Clone, Debug)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body, decoded as UTF-8 (lossily).
    pub body: String,
    /// The body as received (for binary bodies such as protobuf).
    pub raw: bytes::Bytes,
}

impl HttpReply {
    /// The first value of header `name`, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `GET {path}` with `Host: {host}`, sent to `addr` over a fresh HTTP/1.1
/// connection.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<HttpReply> {
    http_send(addr, get_request(host, path)?).await
}

/// Sends `req` to `addr` over a fresh HTTP/1.1 connection.
///
/// The URI should be origin-form (`/path?query`); set `Host` yourself, else
/// `addr` is used.
pub async fn http_send(addr: SocketAddr, mut req: Request<Bytes>) -> anyhow::Result<HttpReply> {
    let what = format!("{} {} via {addr}", req.method(), req.uri());
    if !req.headers().contains_key(header::HOST) {
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_str(&addr.to_string())?);
    }
    let exchange = async {
        let stream = TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(req.map(Full::new))
            .await
            .context("sending request")?;
        let reply = buffer(resp).await;
        conn.abort();
        reply
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what)
}

/// A client bound to one address (an Envoy listener, an admin port) that
/// keeps connections alive between requests, for load loops and repeated
/// polling. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    inner: Client<FixedAddr, Full<Bytes>>,
}

impl HttpClient {
    /// HTTP/1.1 with keep-alive to `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            inner: Client::builder(TokioExecutor::new()).build(FixedAddr(addr)),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (h2c) to `addr`; requests to
    /// the same host share one multiplexed connection.
    pub fn h2c(addr: SocketAddr) -> Self {
        Self {
            addr,
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(FixedAddr(addr)),
        }
    }

    /// The address every request goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET {path}` for virtual host `host`.
    pub async fn get(&self, host: &str, path: &str) -> anyhow::Result<HttpReply> {
        self.send(get_request(host, path)?).await
    }

    /// GET `path` on virtual host `host` with extra request headers.
    pub async fn get_with(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<HttpReply> {
        let mut req = get_request(host, path)?;
        for (name, value) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes())?,
                http::HeaderValue::from_str(value)?,
            );
        }
        self.send(req).await
    }

    /// Sends `req`. Its URI is origin-form (`/path?query`); the virtual host
    /// comes from its `Host` header (sent as `:authority` over h2), else the
    /// client's address.
    pub async fn send(&self, mut req: Request<Bytes>) -> anyhow::Result<HttpReply> {
        let what = format!("{} {} via {}", req.method(), req.uri(), self.addr);
        // hyper derives Host (h1) and :authority (h2) from an absolute URI;
        // the connector ignores it and always dials `addr`.
        let host = match req.headers_mut().remove(header::HOST) {
            Some(h) => h.to_str().context("Host header is not ASCII")?.to_owned(),
            None => self.addr.to_string(),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("http://{host}{path}")
            .parse()
            .with_context(|| format!("{what}: bad host {host:?}"))?;
        *req.uri_mut() = uri;
        let exchange = async {
            let resp = self
                .inner
                .request(req.map(Full::new))
                .await
                .context("request")?;
            buffer(resp).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| what)
    }
}

fn get_request(host: &str, path: &str) -> anyhow::Result<Request<Bytes>> {
    Request::get(path)
        .header(header::HOST, host)
        .body(Bytes::new())
        .with_context(|| format!("building GET {host}{path}"))
}

/// Reads a whole response into an [`HttpReply`] (for clients of other kinds, e.g. over TLS).
pub async fn buffer(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<HttpReply> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading response body")?
        .to_bytes();
    Ok(HttpReply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        raw: body.clone(),
    })
}

/// Connector that dials one address whatever the URI says, so the URI can
/// carry the virtual host.
#[derive(Clone, Copy, Debug)]
struct FixedAddr(SocketAddr);

impl tower_service::Service<Uri> for FixedAddr {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}
