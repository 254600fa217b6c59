//! Fake upstreams: the backends (revision pods, activator stand-ins) that
//! Envoy routes test traffic to.
//!
//! Each answers every request with its name as the body and in `x-upstream`,
//! so a test sees which backend got a request, and echoes request headers
//! named `x-*`, `knative-*` or `k-*` back as `x-echo-<name>`, so a test sees
//! what Envoy added or rewrote on the way. It also reports what reached it:
//! `x-upstream-proto` (`HTTP/1.1` or `HTTP/2`), `x-upstream-host` (the Host or
//! `:authority`) and `x-upstream-path` (path and query). HTTP/1.1 and h2c are
//! both served.
//!
//! Like a queue-proxy, it answers Knative's probes itself (see
//! [`UpstreamBuilder::answer_probes`]): `K-Network-Probe: probe` gets 200, body
//! `probe` and the request's `K-Network-Hash` echoed back; `K-Network-Probe:
//! queue` gets 200, body `queue`. Probes are counted apart from requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Request header prefixes that are echoed back.
const ECHOED_PREFIXES: [&str; 3] = ["x-", "knative-", "k-"];

/// Knative's probe request header; its value says which kind of probe.
const PROBE_HEADER: &str = "k-network-probe";
/// Knative's probe hash header, echoed back on `probe` probes.
const HASH_HEADER: &str = "k-network-hash";

/// The body of an upstream's response.
type ResponseBody = BoxBody<Bytes, Infallible>;

/// A running fake upstream on `127.0.0.1:<ephemeral>`. Stops serving, and
/// closes its open connections, when dropped.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    counters: Arc<Counters>,
    server: JoinHandle<()>,
}

/// Options for an [`Upstream`]; from [`Upstream::builder`].
#[derive(Clone, Debug)]
pub struct UpstreamBuilder {
    name: String,
    status: StatusCode,
    delay: Duration,
    body_delay: Duration,
    fail_first: u64,
    fail_status: StatusCode,
    answer_probes: bool,
    count_by: Vec<HeaderName>,
    listen: SocketAddr,
}

/// What every connection's service needs.
#[derive(Debug)]
struct Behaviour {
    name: String,
    name_header: HeaderValue,
    status: StatusCode,
    delay: Duration,
    body_delay: Duration,
    fail_first: u64,
    fail_status: StatusCode,
    answer_probes: bool,
    counters: Arc<Counters>,
}

/// What an upstream has seen, shared with its [`Upstream`] handle.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    probes: AtomicU64,
    /// Per declared header, requests per value ("" when absent).
    by_header: Mutex<HashMap<HeaderName, HashMap<String, u64>>>,
}

impl Upstream {
    /// Starts an upstream named `name` that answers 200.
    pub async fn start(name: &str) -> anyhow::Result<Upstream> {
        Self::builder(name).start().await
    }

    /// Options beyond the defaults (200, no delay, probes answered).
    pub fn builder(name: &str) -> UpstreamBuilder {
        UpstreamBuilder {
            name: name.to_owned(),
            status: StatusCode::OK,
            delay: Duration::ZERO,
            body_delay: Duration::ZERO,
            fail_first: 0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            answer_probes: true,
            count_by: Vec::new(),
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

    /// Requests received so far (counted on arrival, before any delay), not
    /// counting the Knative probes it answered (see [`Upstream::probes`]).
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Knative probes (`K-Network-Probe`) answered so far.
    pub fn probes(&self) -> u64 {
        self.counters.probes.load(Ordering::SeqCst)
    }

    /// Requests so far per value of request header `name`, which must have
    /// been declared with [`UpstreamBuilder::count_by_header`]. Requests
    /// without the header count under `""`; probes are not counted.
    ///
    /// # Panics
    /// If `name` was not declared.
    pub fn requests_by_header(&self, name: &str) -> HashMap<String, u64> {
        let by_header = self.counters.by_header.lock().unwrap();
        HeaderName::from_bytes(name.as_bytes())
            .ok()
            .and_then(|key| by_header.get(&key))
            .unwrap_or_else(|| {
                panic!("header {name:?} was not declared with UpstreamBuilder::count_by_header")
            })
            .clone()
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
    /// timeout and concurrency tests. Same as
    /// [`delay_before_headers`](Self::delay_before_headers).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Wait `delay` before sending each response's headers.
    pub fn delay_before_headers(self, delay: Duration) -> Self {
        self.delay(delay)
    }

    /// Send each response's headers at once, then its body (still the name)
    /// in two chunks `delay` apart: a backend that is slow *between* writes.
    /// A one-character name is sent as one chunk, `delay` before the end.
    pub fn delay_in_body(mut self, delay: Duration) -> Self {
        self.body_delay = delay;
        self
    }

    /// Answer the first `n` requests with `status` (e.g. 503) and later ones
    /// as usual: a client that sees `status` got no retry.
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn fail_first(mut self, n: u64, status: u16) -> Self {
        self.fail_first = n;
        self.fail_status = StatusCode::from_u16(status).expect("valid HTTP status code");
        self
    }

    /// Whether to answer Knative probes (`K-Network-Probe: probe|queue`)
    /// itself, as a queue-proxy does (default `true`). When `false` they are
    /// plain requests.
    pub fn answer_probes(mut self, answer: bool) -> Self {
        self.answer_probes = answer;
        self
    }

    /// Count requests per value of request header `name`; read the counts
    /// with [`Upstream::requests_by_header`]. May be given several times.
    ///
    /// # Panics
    /// If `name` is not a valid header name.
    pub fn count_by_header(mut self, name: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        self.count_by.push(name);
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
        let counters = Arc::new(Counters {
            by_header: Mutex::new(
                self.count_by
                    .into_iter()
                    .map(|name| (name, HashMap::new()))
                    .collect(),
            ),
            ..Counters::default()
        });
        let behaviour = Arc::new(Behaviour {
            name: self.name.clone(),
            name_header,
            status: self.status,
            delay: self.delay,
            body_delay: self.body_delay,
            fail_first: self.fail_first,
            fail_status: self.fail_status,
            answer_probes: self.answer_probes,
            counters: counters.clone(),
        });
        let server = tokio::spawn(serve(listener, behaviour));
        tracing::debug!(name = %self.name, %addr, "upstream started");
        Ok(Upstream {
            name: self.name,
            addr,
            counters,
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

async fn respond(behaviour: &Behaviour, req: &Request<Incoming>) -> Response<ResponseBody> {
    if behaviour.answer_probes {
        if let Some(resp) = probe_answer(behaviour, req) {
            behaviour.counters.probes.fetch_add(1, Ordering::SeqCst);
            return resp;
        }
    }
    let nth = behaviour.counters.requests.fetch_add(1, Ordering::SeqCst);
    behaviour.counters.count(req.headers());
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    let mut resp = Response::new(body(behaviour));
    *resp.status_mut() = if nth < behaviour.fail_first {
        behaviour.fail_status
    } else {
        behaviour.status
    };
    let headers = resp.headers_mut();
    headers.insert("x-upstream", behaviour.name_header.clone());
    headers.insert("x-upstream-proto", HeaderValue::from_static(proto(req)));
    if let Some(host) = seen_host(req) {
        headers.insert("x-upstream-host", host);
    }
    if let Some(path) = req.uri().path_and_query() {
        if let Ok(path) = HeaderValue::from_str(path.as_str()) {
            headers.insert("x-upstream-path", path);
        }
    }
    for (name, value) in echoed(req.headers()) {
        headers.append(name, value.clone());
    }
    resp
}

/// The answer to a Knative probe, if `req` is one.
fn probe_answer(behaviour: &Behaviour, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    let kind = req.headers().get(PROBE_HEADER)?;
    let body = match kind.as_bytes() {
        b"probe" => "probe",
        b"queue" => "queue",
        _ => return None,
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    let headers = resp.headers_mut();
    headers.insert("x-upstream", behaviour.name_header.clone());
    if body == "probe" {
        if let Some(hash) = req.headers().get(HASH_HEADER) {
            headers.insert(HASH_HEADER, hash.clone());
        }
    }
    Some(resp)
}

/// The response body: the name, at once or in two delayed chunks.
fn body(behaviour: &Behaviour) -> ResponseBody {
    let name = Bytes::from(behaviour.name.clone());
    if behaviour.body_delay.is_zero() {
        return Full::new(name).boxed();
    }
    let mut mid = name.len().div_ceil(2);
    while !behaviour.name.is_char_boundary(mid) {
        mid += 1;
    }
    let (first, second) = (name.slice(..mid), name.slice(mid..));
    let delay = behaviour.body_delay;
    let (mut tx, body) = http_body_util::channel::Channel::new(2);
    // Outlives the connection at worst by `delay`; a send to a closed
    // connection just fails.
    tokio::spawn(async move {
        if tx.send_data(first).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        if !second.is_empty() {
            let _ = tx.send_data(second).await;
        }
    });
    body.boxed()
}

/// The protocol the request arrived over, as reported in `x-upstream-proto`.
fn proto(req: &Request<Incoming>) -> &'static str {
    match req.version() {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// The virtual host the request named: `:authority` (h2, or an absolute URI)
/// else `Host`.
fn seen_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

impl Counters {
    fn count(&self, headers: &http::HeaderMap) {
        let mut by_header = self.by_header.lock().unwrap();
        for (name, counts) in by_header.iter_mut() {
            let value = headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            *counts.entry(value).or_default() += 1;
        }
    }
}

/// The request headers to echo, renamed `x-echo-<name>`.
pub(crate) fn echoed(
    headers: &http::HeaderMap,
) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
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

    #[tokio::test]
    async fn reports_protocol_host_and_path_it_saw() {
        let up = Upstream::start("seen").await.unwrap();
        let h1 = http_get(up.addr(), "a.example.com", "/p/q?x=1")
            .await
            .unwrap();
        assert_eq!(h1.header("x-upstream-proto"), Some("HTTP/1.1"));
        assert_eq!(h1.header("x-upstream-host"), Some("a.example.com"));
        assert_eq!(h1.header("x-upstream-path"), Some("/p/q?x=1"));
        let h2 = HttpClient::h2c(up.addr())
            .get("b.example.com:8080", "/r")
            .await
            .unwrap();
        assert_eq!(h2.header("x-upstream-proto"), Some("HTTP/2"));
        assert_eq!(h2.header("x-upstream-host"), Some("b.example.com:8080"));
        assert_eq!(h2.header("x-upstream-path"), Some("/r"));
    }

    fn probe(kind: &str, hash: Option<&str>) -> Request<Bytes> {
        let mut req = Request::get("/healthz")
            .header("host", "svc.example.com")
            .header("K-Network-Probe", kind);
        if let Some(hash) = hash {
            req = req.header("K-Network-Hash", hash);
        }
        req.body(Bytes::new()).unwrap()
    }

    #[tokio::test]
    async fn answers_knative_probes_and_counts_them_apart() {
        let up = Upstream::builder("rev").status(500).start().await.unwrap();
        let reply = http_send(up.addr(), probe("probe", Some("abc123")))
            .await
            .unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "probe"));
        assert_eq!(reply.header("k-network-hash"), Some("abc123"));
        let reply = http_send(up.addr(), probe("queue", None)).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "queue"));
        assert_eq!(reply.header("k-network-hash"), None);
        // An unknown probe kind is an ordinary request.
        let reply = http_send(up.addr(), probe("other", None)).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (500, "rev"));
        assert_eq!((up.probes(), up.requests()), (2, 1));
    }

    #[tokio::test]
    async fn probes_can_be_left_to_the_ordinary_path() {
        let up = Upstream::builder("rev")
            .answer_probes(false)
            .start()
            .await
            .unwrap();
        let reply = http_send(up.addr(), probe("probe", Some("h")))
            .await
            .unwrap();
        assert_eq!(reply.body, "rev");
        assert_eq!(reply.header("x-echo-k-network-hash"), Some("h"));
        assert_eq!((up.probes(), up.requests()), (0, 1));
    }

    #[tokio::test]
    async fn fails_the_first_requests_then_answers() {
        let up = Upstream::builder("flaky")
            .fail_first(2, 503)
            .start()
            .await
            .unwrap();
        // Probes do not use up the failures.
        http_send(up.addr(), probe("probe", Some("h")))
            .await
            .unwrap();
        let client = HttpClient::new(up.addr());
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(client.get("x", "/").await.unwrap().status);
        }
        assert_eq!(statuses, [503, 503, 200, 200]);
    }

    #[tokio::test]
    async fn delay_in_body_sends_headers_first() {
        let delay = Duration::from_millis(400);
        let up = Upstream::builder("slow-body")
            .delay_in_body(delay)
            .start()
            .await
            .unwrap();
        let stream = tokio::net::TcpStream::connect(up.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let started = tokio::time::Instant::now();
        let req = Request::get("/")
            .header("host", "x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(
            started.elapsed() < delay,
            "headers and first chunk were late"
        );
        assert_eq!(first, "slow-");
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(started.elapsed() >= delay, "body was not delayed");
        assert_eq!(rest, "body");
    }

    #[tokio::test]
    async fn delay_before_headers_delays_the_response() {
        let delay = Duration::from_millis(200);
        let up = Upstream::builder("slow")
            .delay_before_headers(delay)
            .start()
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let reply = http_get(up.addr(), "x", "/").await.unwrap();
        assert!(started.elapsed() >= delay);
        assert_eq!((reply.status, reply.body.as_str()), (200, "slow"));
    }

    #[tokio::test]
    async fn counts_requests_per_declared_header_value() {
        let up = Upstream::builder("counted")
            .count_by_header("Knative-Serving-Revision")
            .start()
            .await
            .unwrap();
        let client = HttpClient::new(up.addr());
        for rev in ["a", "b", "a"] {
            let req = Request::get("/")
                .header("host", "x")
                .header("knative-serving-revision", rev)
                .body(Bytes::new())
                .unwrap();
            client.send(req).await.unwrap();
        }
        client.get("x", "/").await.unwrap();
        let counts = up.requests_by_header("knative-serving-revision");
        let expected: HashMap<String, u64> = [("a", 2), ("b", 1), ("", 1)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        assert_eq!(counts, expected);
    }

    #[tokio::test]
    #[should_panic(expected = "count_by_header")]
    async fn counts_for_an_undeclared_header_panic() {
        let up = Upstream::start("plain").await.unwrap();
        let _ = up.requests_by_header("x-anything");
    }
}
