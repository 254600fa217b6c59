//! Fake upstreams: the backends (revision pods, user apps behind a queue-proxy, activator
//! stand-ins) that a proxy under test sends traffic to.
//!
//! Each answers every request with its name as the body and in `x-upstream`,
//! so a test sees which backend got a request, and echoes request headers
//! named `x-*`, `knative-*` or `k-*` back as `x-echo-<name>`, so a test sees
//! what the proxy added or rewrote on the way. It also reports what reached it:
//! `x-upstream-proto` (`HTTP/1.1` or `HTTP/2`), `x-upstream-host` (the Host or
//! `:authority`) and `x-upstream-path` (path and query); the test can read the
//! last request itself with [`Upstream::last_request`]. HTTP/1.1 and h2c are
//! both served.
//!
//! Like a queue-proxy, it answers Knative's probes itself (see
//! [`UpstreamBuilder::answer_probes`]): `K-Network-Probe: probe` gets 200, body
//! `probe` and the request's `K-Network-Hash` echoed back; `K-Network-Probe:
//! queue` gets 200, body `queue`; both get 503 while it is not ready (see
//! [`UpstreamBuilder::unready`]). Probes are counted apart from requests.
//!
//! The builder adds the behaviours proxy tests need: a status (fixed, for the
//! first requests, or changed at run time), a delay before the headers or
//! inside the body, responses held until the test releases them
//! ([`UpstreamBuilder::gated`]), upgrades echoed or refused with a body the test
//! streams, the request body read and its length reported, a hop-by-hop header
//! the proxy must drop, and per-header counts and records.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Request header prefixes that are echoed back.
const ECHOED_PREFIXES: [&str; 3] = ["x-", "knative-", "k-"];

/// Knative's probe request header; its value says which kind of probe.
const PROBE_HEADER: &str = "k-network-probe";
/// Knative's probe hash header, echoed back on `probe` probes.
const HASH_HEADER: &str = "k-network-hash";

/// The response header that [`UpstreamBuilder::hop_by_hop_header`] adds and names in
/// `Connection`, so a proxy must not pass it on.
pub const PRIVATE_HEADER: &str = "x-upstream-private";

/// The response header that reports the request body's length (see
/// [`UpstreamBuilder::read_body`]).
pub const BODY_LEN_HEADER: &str = "x-upstream-body-len";

/// The body of an upstream's response.
type ResponseBody = BoxBody<Bytes, Infallible>;

/// A running fake upstream on `127.0.0.1:<ephemeral>`. Stops serving, and
/// closes its open connections (upgraded ones included), when dropped.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    state: Arc<State>,
    refusals: tokio::sync::Mutex<mpsc::UnboundedReceiver<BodyWriter>>,
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
    ready: bool,
    gated: bool,
    upgrades: Upgrades,
    read_body: bool,
    hop_by_hop: bool,
    count_by: Vec<HeaderName>,
    record: Vec<HeaderName>,
    listen: SocketAddr,
}

/// What an upstream does with a request carrying `Upgrade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upgrades {
    /// Answer it as an ordinary request.
    Ignore,
    /// 101, then echo the upgraded bytes.
    Echo,
    /// This status, with a body the test streams.
    Refuse(StatusCode),
}

/// A request as it reached an [`Upstream`] (its body aside).
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// The method.
    pub method: Method,
    /// The URI as received (origin-form over HTTP/1.1, `/path?query`).
    pub uri: Uri,
    /// The protocol version it arrived over.
    pub version: Version,
    /// Its headers.
    pub headers: HeaderMap,
}

/// The test's end of a streamed response body (see [`UpstreamBuilder::refuse_upgrades`]): each
/// [`send`](Self::send) is one chunk; the body ends when the writer is dropped, and stays open,
/// sending nothing, while it is kept.
#[derive(Debug)]
pub struct BodyWriter(mpsc::UnboundedSender<Bytes>);

impl BodyWriter {
    /// Sends one chunk; fails if the response (or its connection) is gone.
    pub fn send(&self, chunk: impl Into<Bytes>) -> anyhow::Result<()> {
        self.0
            .send(chunk.into())
            .map_err(|_| anyhow::anyhow!("the streamed response body is gone"))
    }
}

/// What the handle and every connection share.
#[derive(Debug)]
struct State {
    name: String,
    name_header: HeaderValue,
    status: AtomicU16,
    delay: Duration,
    body_delay: Duration,
    fail_first: u64,
    fail_status: StatusCode,
    answer_probes: bool,
    upgrades: Upgrades,
    read_body: bool,
    hop_by_hop: bool,
    ready: AtomicBool,
    /// Responses wait for a permit; a closed gate is open for good.
    gate: Option<Semaphore>,
    refusals: mpsc::UnboundedSender<BodyWriter>,
    /// Echo tasks of upgraded connections, aborted with the state.
    upgraded: Mutex<JoinSet<()>>,
    requests: AtomicU64,
    probes: AtomicU64,
    requests_while_unready: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Seen>,
}

/// What the requests carried, as declared in the builder.
#[derive(Debug, Default)]
struct Seen {
    /// Per declared header, requests per value ("" when absent).
    by_header: HashMap<HeaderName, HashMap<String, u64>>,
    /// Per declared header, its values in arrival order (requests without it left out).
    recorded: HashMap<HeaderName, Vec<String>>,
    last: Option<SeenRequest>,
}

impl Upstream {
    /// Starts an upstream named `name` that answers 200.
    pub async fn start(name: &str) -> anyhow::Result<Upstream> {
        Self::builder(name).start().await
    }

    /// Options beyond the defaults (200, no delay, ready, probes answered,
    /// upgrades answered as ordinary requests, request bodies not read).
    pub fn builder(name: &str) -> UpstreamBuilder {
        UpstreamBuilder {
            name: name.to_owned(),
            status: StatusCode::OK,
            delay: Duration::ZERO,
            body_delay: Duration::ZERO,
            fail_first: 0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            answer_probes: true,
            ready: true,
            gated: false,
            upgrades: Upgrades::Ignore,
            read_body: false,
            hop_by_hop: false,
            count_by: Vec::new(),
            record: Vec::new(),
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

    /// Requests received so far (counted on arrival, before any delay, upgrades
    /// included), not counting the Knative probes it answered (see
    /// [`Upstream::probes`]).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Knative probes (`K-Network-Probe`) answered so far, ready or not.
    pub fn probes(&self) -> u64 {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Requests that arrived while it was not ready (a proxy that sends traffic
    /// to a pod it should not).
    pub fn requests_while_unready(&self) -> u64 {
        self.state.requests_while_unready.load(Ordering::SeqCst)
    }

    /// Requests being handled now: arrived, response headers not sent yet
    /// (delayed, gated or reading their body).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests so far per value of request header `name`, which must have
    /// been declared with [`UpstreamBuilder::count_by_header`]. Requests
    /// without the header count under `""`; probes are not counted.
    ///
    /// # Panics
    /// If `name` was not declared.
    pub fn requests_by_header(&self, name: &str) -> HashMap<String, u64> {
        let seen = self.state.seen.lock().unwrap();
        HeaderName::from_bytes(name.as_bytes())
            .ok()
            .and_then(|key| seen.by_header.get(&key))
            .unwrap_or_else(|| {
                panic!("header {name:?} was not declared with UpstreamBuilder::count_by_header")
            })
            .clone()
    }

    /// The values of request header `name`, in arrival order, for every
    /// request that had it (probes aside); `name` must have been declared with
    /// [`UpstreamBuilder::record_header`].
    ///
    /// # Panics
    /// If `name` was not declared.
    pub fn recorded(&self, name: &str) -> Vec<String> {
        let seen = self.state.seen.lock().unwrap();
        HeaderName::from_bytes(name.as_bytes())
            .ok()
            .and_then(|key| seen.recorded.get(&key))
            .unwrap_or_else(|| {
                panic!("header {name:?} was not declared with UpstreamBuilder::record_header")
            })
            .clone()
    }

    /// The last request that reached it (probes aside), if any.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.state.seen.lock().unwrap().last.clone()
    }

    /// Makes its probes pass (`true`) or fail with 503 (`false`); requests are
    /// answered either way.
    pub fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::SeqCst);
    }

    /// Answers later requests with `status` (see [`UpstreamBuilder::status`]).
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn set_status(&self, status: u16) {
        let status = StatusCode::from_u16(status).expect("valid HTTP status code");
        self.state.status.store(status.as_u16(), Ordering::SeqCst);
    }

    /// Lets `n` held responses go (see [`UpstreamBuilder::gated`]).
    ///
    /// # Panics
    /// If it is not gated.
    pub fn release(&self, n: usize) {
        self.gate().add_permits(n);
    }

    /// Lets every held response go, now and from then on.
    ///
    /// # Panics
    /// If it is not gated.
    pub fn open(&self) {
        self.gate().close();
    }

    /// Waits for the next refused upgrade (see
    /// [`UpstreamBuilder::refuse_upgrades`]) and returns the writer of its
    /// response body. Refusals are handed out in arrival order.
    pub async fn refused_upgrade(&self) -> BodyWriter {
        self.refusals
            .lock()
            .await
            .recv()
            .await
            .expect("the upstream keeps its refusal channel open")
    }

    fn gate(&self) -> &Semaphore {
        self.state
            .gate
            .as_ref()
            .expect("a gated upstream (UpstreamBuilder::gated)")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task with it.
        self.server.abort();
        // Upgraded connections no longer belong to a connection task.
        self.state.upgraded.lock().unwrap().abort_all();
    }
}

impl UpstreamBuilder {
    /// Answer every request with `status` (body and headers unchanged); see
    /// also [`Upstream::set_status`].
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

    /// Start not ready: probes get 503 `not ready` until
    /// [`Upstream::set_ready`]. Requests are still answered (and counted in
    /// [`Upstream::requests_while_unready`]).
    pub fn unready(mut self) -> Self {
        self.ready = false;
        self
    }

    /// Hold each response (after any delay) until the test lets it go with
    /// [`Upstream::release`] or [`Upstream::open`]: deterministic concurrency
    /// without timing.
    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Accept upgrades (`Upgrade: <protocol>` over HTTP/1.1): 101 with the
    /// same `Upgrade`, then the upgraded connection echoes every byte back.
    /// By default upgrade requests are answered as ordinary requests.
    pub fn echo_upgrades(mut self) -> Self {
        self.upgrades = Upgrades::Echo;
        self
    }

    /// Refuse upgrades with `status` and an ordinary response whose body the
    /// test streams: [`Upstream::refused_upgrade`] hands it the
    /// [`BodyWriter`].
    ///
    /// # Panics
    /// If `status` is not a valid HTTP status code.
    pub fn refuse_upgrades(mut self, status: u16) -> Self {
        let status = StatusCode::from_u16(status).expect("valid HTTP status code");
        self.upgrades = Upgrades::Refuse(status);
        self
    }

    /// Read each request's body before answering and report its length in
    /// [`BODY_LEN_HEADER`] (`-1` if reading it failed). By default bodies are
    /// not read, so a client that streams one gets its answer without ending it.
    pub fn read_body(mut self) -> Self {
        self.read_body = true;
        self
    }

    /// Add a hop-by-hop header to every ordinary response: `Connection:
    /// x-upstream-private` and [`PRIVATE_HEADER`]`: 1`, which a proxy must drop
    /// (RFC 9110 §7.6.1); `x-upstream` is the public header beside it.
    pub fn hop_by_hop_header(mut self) -> Self {
        self.hop_by_hop = true;
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

    /// Record the value of request header `name` of every request, in arrival
    /// order; read them with [`Upstream::recorded`]. May be given several times.
    ///
    /// # Panics
    /// If `name` is not a valid header name.
    pub fn record_header(mut self, name: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        self.record.push(name);
        self
    }

    /// Listen on `addr` instead of `127.0.0.1:0` (to come back on the address
    /// of an upstream that went away, or for demos; tests keep port 0).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Binds (by default `127.0.0.1:0`) and starts serving.
    pub async fn start(self) -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("binding upstream to {}", self.listen))?;
        self.start_on(listener)
    }

    /// Starts serving on a std listener, such as one bound inside a test host by
    /// [`NetHost::bind`](crate::NetHost::bind) (a backend at a real, non-loopback address).
    /// Must be called within a tokio runtime.
    pub fn start_on_std(self, listener: std::net::TcpListener) -> anyhow::Result<Upstream> {
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let listener =
            TcpListener::from_std(listener).context("registering the listener with tokio")?;
        self.start_on(listener)
    }

    /// Starts serving on a listener the test already bound (e.g. from
    /// [`ReservedPort::listen`](crate::ReservedPort::listen)).
    pub fn start_on(self, listener: TcpListener) -> anyhow::Result<Upstream> {
        let name_header = HeaderValue::from_str(&self.name).with_context(|| {
            format!("upstream name {:?} is not a valid header value", self.name)
        })?;
        let addr = listener.local_addr()?;
        let (refusals, refusals_rx) = mpsc::unbounded_channel();
        let seen = Seen {
            by_header: self
                .count_by
                .into_iter()
                .map(|name| (name, HashMap::new()))
                .collect(),
            recorded: self
                .record
                .into_iter()
                .map(|name| (name, Vec::new()))
                .collect(),
            last: None,
        };
        let state = Arc::new(State {
            name: self.name.clone(),
            name_header,
            status: AtomicU16::new(self.status.as_u16()),
            delay: self.delay,
            body_delay: self.body_delay,
            fail_first: self.fail_first,
            fail_status: self.fail_status,
            answer_probes: self.answer_probes,
            upgrades: self.upgrades,
            read_body: self.read_body,
            hop_by_hop: self.hop_by_hop,
            ready: AtomicBool::new(self.ready),
            gate: self.gated.then(|| Semaphore::new(0)),
            refusals,
            upgraded: Mutex::new(JoinSet::new()),
            requests: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            requests_while_unready: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            seen: Mutex::new(seen),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        tracing::debug!(name = %self.name, %addr, "upstream started");
        Ok(Upstream {
            name: self.name,
            addr,
            state,
            refusals: tokio::sync::Mutex::new(refusals_rx),
            server,
        })
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Transient (e.g. EMFILE under load); keep serving.
                        tracing::warn!(name = %state.name, error = %e, "upstream accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&state, req).await) }
                    });
                    // Errors here are clients going away mid-request; not ours.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Counts a request in flight while alive.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn respond(state: &State, mut req: Request<Incoming>) -> Response<ResponseBody> {
    if state.answer_probes {
        if let Some(resp) = probe_answer(state, &req) {
            state.probes.fetch_add(1, Ordering::SeqCst);
            return resp;
        }
    }
    let nth = state.requests.fetch_add(1, Ordering::SeqCst);
    if !state.ready.load(Ordering::SeqCst) {
        state.requests_while_unready.fetch_add(1, Ordering::SeqCst);
    }
    state.see(&req);
    let _in_flight = InFlight::enter(state);
    if req.headers().contains_key(header::UPGRADE) {
        match state.upgrades {
            Upgrades::Ignore => {}
            Upgrades::Echo => return echo_upgrade(state, &mut req),
            Upgrades::Refuse(status) => return refuse_upgrade(state, status),
        }
    }
    let (parts, body) = req.into_parts();
    // An unread body is kept until the response is built, as a server that
    // ignores it would.
    let (body_len, _unread) = if state.read_body {
        let len = body
            .collect()
            .await
            .map_or(-1, |b| b.to_bytes().len() as i64);
        (Some(len), None)
    } else {
        (None, Some(body))
    };
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    if let Some(gate) = &state.gate {
        // A closed gate is open for good.
        if let Ok(permit) = gate.acquire().await {
            permit.forget();
        }
    }
    let mut resp = Response::new(body_of(state));
    *resp.status_mut() = if nth < state.fail_first {
        state.fail_status
    } else {
        StatusCode::from_u16(state.status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    };
    let headers = resp.headers_mut();
    headers.insert("x-upstream", state.name_header.clone());
    headers.insert("x-upstream-proto", HeaderValue::from_static(proto(&parts)));
    if let Some(host) = seen_host(&parts) {
        headers.insert("x-upstream-host", host);
    }
    if let Some(path) = parts.uri.path_and_query() {
        if let Ok(path) = HeaderValue::from_str(path.as_str()) {
            headers.insert("x-upstream-path", path);
        }
    }
    if let Some(len) = body_len {
        headers.insert(BODY_LEN_HEADER, HeaderValue::from(len));
    }
    if state.hop_by_hop {
        headers.insert(header::CONNECTION, HeaderValue::from_static(PRIVATE_HEADER));
        headers.insert(PRIVATE_HEADER, HeaderValue::from_static("1"));
    }
    for (name, value) in echoed(&parts.headers) {
        headers.append(name, value.clone());
    }
    resp
}

impl State {
    /// Records what the declared headers and the last request need.
    fn see(&self, req: &Request<Incoming>) {
        let mut seen = self.seen.lock().unwrap();
        let headers = req.headers();
        let value_of = |name: &HeaderName| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        for (name, counts) in seen.by_header.iter_mut() {
            *counts
                .entry(value_of(name).unwrap_or_default())
                .or_default() += 1;
        }
        for (name, values) in seen.recorded.iter_mut() {
            values.extend(value_of(name));
        }
        seen.last = Some(SeenRequest {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: headers.clone(),
        });
    }
}

/// The answer to a Knative probe, if `req` is one.
fn probe_answer(state: &State, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    let kind = req.headers().get(PROBE_HEADER)?;
    let body = match kind.as_bytes() {
        b"probe" => "probe",
        b"queue" => "queue",
        _ => return None,
    };
    let ready = state.ready.load(Ordering::SeqCst);
    let text = if ready { body } else { "not ready" };
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    let headers = resp.headers_mut();
    headers.insert("x-upstream", state.name_header.clone());
    if !ready {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    } else if body == "probe" {
        if let Some(hash) = req.headers().get(HASH_HEADER) {
            headers.insert(HASH_HEADER, hash.clone());
        }
    }
    Some(resp)
}

/// 101, then the upgraded connection echoes what it gets.
fn echo_upgrade(state: &State, req: &mut Request<Incoming>) -> Response<ResponseBody> {
    let protocol = req.headers()[header::UPGRADE].clone();
    let upgrade = hyper::upgrade::on(req);
    let mut upgraded = state.upgraded.lock().unwrap();
    while upgraded.try_join_next().is_some() {}
    upgraded.spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::new(Empty::new().boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
    headers.insert("x-upstream", state.name_header.clone());
    resp
}

/// `status`, with a body the test writes through the [`BodyWriter`] it gets.
fn refuse_upgrade(state: &State, status: StatusCode) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::unbounded_channel();
    // The handle keeps the receiver for as long as the state lives.
    let _ = state.refusals.send(BodyWriter(tx));
    let mut resp = Response::new(FedBody(rx).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-upstream", state.name_header.clone());
    resp
}

/// A response body fed chunk by chunk by a [`BodyWriter`]; it ends when the writer is dropped.
struct FedBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for FedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

/// The response body: the name, at once or in two delayed chunks.
fn body_of(state: &State) -> ResponseBody {
    let name = Bytes::from(state.name.clone());
    if state.body_delay.is_zero() {
        return Full::new(name).boxed();
    }
    let mut mid = name.len().div_ceil(2);
    while !state.name.is_char_boundary(mid) {
        mid += 1;
    }
    let (first, second) = (name.slice(..mid), name.slice(mid..));
    let delay = state.body_delay;
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
fn proto(req: &http::request::Parts) -> &'static str {
    match req.version {
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
fn seen_host(req: &http::request::Parts) -> Option<HeaderValue> {
    match req.uri.authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => req.headers.get(header::HOST).cloned(),
    }
}

/// The request headers an [`Upstream`] echoes (`x-*`, `knative-*`, `k-*`),
/// renamed `x-echo-<name>`; for other fake backends that report the same way.
pub fn echoed(headers: &http::HeaderMap) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
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

    #[tokio::test]
    async fn unready_probes_fail_until_set_ready_and_requests_still_answer() {
        let up = Upstream::builder("pod").unready().start().await.unwrap();
        let reply = http_send(up.addr(), probe("queue", None)).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (503, "not ready"));
        let reply = http_get(up.addr(), "x", "/").await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "pod"));
        assert_eq!(up.requests_while_unready(), 1);
        up.set_ready(true);
        let reply = http_send(up.addr(), probe("queue", None)).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "queue"));
        http_get(up.addr(), "x", "/").await.unwrap();
        assert_eq!((up.probes(), up.requests()), (2, 2));
        assert_eq!(up.requests_while_unready(), 1);
    }

    #[tokio::test]
    async fn gated_responses_wait_for_release_then_open() {
        let up = Upstream::builder("held").gated().start().await.unwrap();
        let client = HttpClient::new(up.addr());
        let pending: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.get("x", "/").await.unwrap() })
            })
            .collect();
        crate::wait_until("three held", || up.in_flight() == 3).await;
        up.release(1);
        crate::wait_until("one released", || up.in_flight() == 2).await;
        up.open();
        for p in pending {
            let reply = crate::within("a held response", p).await.unwrap();
            assert_eq!((reply.status, reply.body.as_str()), (200, "held"));
        }
        assert_eq!((up.in_flight(), up.max_in_flight()), (0, 3));
        // Open for good.
        assert_eq!(client.get("x", "/").await.unwrap().status, 200);
    }

    /// An HTTP/1.1 connection that can be upgraded.
    async fn upgradable(
        addr: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    fn upgrade_request() -> Request<http_body_util::Empty<Bytes>> {
        Request::get("/ws")
            .header(header::HOST, "x")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "echo")
            .body(http_body_util::Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn echoes_upgraded_bytes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let up = Upstream::builder("ws")
            .echo_upgrades()
            .start()
            .await
            .unwrap();
        let mut conn = upgradable(up.addr()).await;
        let resp = conn.send_request(upgrade_request()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()[header::UPGRADE], "echo");
        let mut upgraded = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        upgraded.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        crate::within("the echo", upgraded.read_exact(&mut echo))
            .await
            .unwrap();
        assert_eq!(&echo, b"ping");
        assert_eq!(up.requests(), 1);
    }

    #[tokio::test]
    async fn upgrades_are_ordinary_requests_by_default() {
        let up = Upstream::start("plain").await.unwrap();
        let resp = upgradable(up.addr())
            .await
            .send_request(upgrade_request())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.collect().await.unwrap().to_bytes(), "plain");
    }

    #[tokio::test]
    async fn refused_upgrades_stream_the_body_the_test_writes() {
        let up = Upstream::builder("no-ws")
            .refuse_upgrades(400)
            .start()
            .await
            .unwrap();
        let resp = upgradable(up.addr())
            .await
            .send_request(upgrade_request())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let writer = crate::within("the refusal", up.refused_upgrade()).await;
        let mut body = resp.into_body();
        writer.send("one ").unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "one ");
        writer.send(Bytes::from_static(b"two")).unwrap();
        drop(writer);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "two");
        // Ordinary requests are answered as usual.
        assert_eq!(http_get(up.addr(), "x", "/").await.unwrap().body, "no-ws");
    }

    #[tokio::test]
    async fn reads_the_body_and_adds_a_hop_by_hop_header_when_asked() {
        let up = Upstream::builder("full")
            .read_body()
            .hop_by_hop_header()
            .start()
            .await
            .unwrap();
        let req = Request::post("/")
            .header("host", "x")
            .body(Bytes::from_static(b"0123456789"))
            .unwrap();
        let reply = http_send(up.addr(), req).await.unwrap();
        assert_eq!(reply.header(BODY_LEN_HEADER), Some("10"));
        assert_eq!(reply.header("connection"), Some(PRIVATE_HEADER));
        assert_eq!(reply.header(PRIVATE_HEADER), Some("1"));

        let plain = Upstream::start("plain").await.unwrap();
        let reply = http_get(plain.addr(), "x", "/").await.unwrap();
        assert_eq!(reply.header(BODY_LEN_HEADER), None);
        assert_eq!(reply.header(PRIVATE_HEADER), None);
    }

    #[tokio::test]
    async fn records_headers_in_order_the_last_request_and_status_changes() {
        let up = Upstream::builder("rec")
            .record_header("x-order")
            .start()
            .await
            .unwrap();
        assert!(up.last_request().is_none());
        let client = HttpClient::new(up.addr());
        for i in ["2", "0", "1"] {
            client
                .get_with("a.example.com", "/p?q=1", &[("x-order", i)])
                .await
                .unwrap();
        }
        client.get("a.example.com", "/none").await.unwrap();
        assert_eq!(up.recorded("x-order"), ["2", "0", "1"]);
        let last = up.last_request().unwrap();
        assert_eq!(
            (last.method, last.uri.to_string(), last.version),
            (Method::GET, "/none".to_owned(), Version::HTTP_11)
        );
        assert_eq!(last.headers["host"], "a.example.com");

        up.set_status(302);
        assert_eq!(client.get("x", "/").await.unwrap().status, 302);
    }

    #[tokio::test]
    #[should_panic(expected = "record_header")]
    async fn records_for_an_undeclared_header_panic() {
        let up = Upstream::start("plain").await.unwrap();
        let _ = up.recorded("x-anything");
    }

    #[tokio::test]
    async fn starts_on_a_reserved_port() {
        let reserved = crate::ReservedPort::new().unwrap();
        let addr = reserved.addr();
        assert!(http_get(addr, "x", "/").await.is_err(), "not listening yet");
        let up = Upstream::builder("late")
            .start_on(reserved.listen().unwrap())
            .unwrap();
        assert_eq!(up.addr(), addr);
        assert_eq!(http_get(addr, "x", "/").await.unwrap().body, "late");
    }
}
