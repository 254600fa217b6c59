//! Test support: fake pods (queue-proxy stand-ins on 127.0.0.1:0), a client, and waits that poll
//! a condition instead of sleeping.

#![allow(dead_code)] // each test file uses a different part

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use knarr_activator::{stats_channel, Config, Running};
use knarr_proto::activator::{Endpoint, Revision, RevisionStats};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Longest any wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` every 5 ms until true; panics naming `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `f`, failing the test after [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A fake pod: answers `K-Network-Probe: queue` like a queue-proxy (200 `queue` when ready, 503
/// when not), answers other requests with its name, echoes what it received in `x-seen-*`
/// headers, and counts. Upgrade requests get 101 and an echo of the bytes sent (or, refusing
/// upgrades, a 400 whose body stops after its first bytes). Optionally slow, or gated: responses
/// wait until the test lets them go.
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<PodState>,
    server: JoinHandle<()>,
}

struct PodState {
    name: String,
    ready: AtomicBool,
    delay: Duration,
    gate: Option<Semaphore>,
    refuse_upgrades: bool,
    probes: AtomicU64,
    requests: AtomicU64,
    requests_while_unready: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    last_headers: Mutex<Option<HeaderMap>>,
    /// `x-order` of each request, in arrival order.
    arrivals: Mutex<Vec<String>>,
}

#[derive(Clone)]
pub struct PodBuilder {
    name: String,
    ready: bool,
    delay: Duration,
    gated: bool,
    refuse_upgrades: bool,
    listen: SocketAddr,
}

impl PodBuilder {
    /// Probes fail (503) until [`Pod::set_ready`].
    pub fn unready(mut self) -> Self {
        self.ready = false;
        self
    }

    /// Each response waits `delay` (load simulation, not synchronisation).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Each response waits for [`Pod::release`] / [`Pod::open`].
    pub fn gated(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Upgrade requests get 400 and a body that sends `refused` and then nothing, never ending.
    pub fn refuse_upgrades(mut self) -> Self {
        self.refuse_upgrades = true;
        self
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    pub async fn start(self) -> Pod {
        let listener = TcpListener::bind(self.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(PodState {
            name: self.name.clone(),
            ready: AtomicBool::new(self.ready),
            delay: self.delay,
            gate: self.gated.then(|| Semaphore::new(0)),
            refuse_upgrades: self.refuse_upgrades,
            probes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            requests_while_unready: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            last_headers: Mutex::new(None),
            arrivals: Mutex::new(Vec::new()),
        });
        let server_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            // Dropping the set (when the server task is aborted) closes every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&server_state);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.serve(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Pod {
            name: self.name,
            addr,
            state,
            server,
        }
    }
}

impl PodState {
    async fn serve(&self, mut req: Request<Incoming>) -> Response<PodBody> {
        if req.headers().contains_key("k-network-probe") {
            self.probes.fetch_add(1, Ordering::SeqCst);
            return if self.ready.load(Ordering::SeqCst) {
                Response::new(Full::new(Bytes::from_static(b"queue")).boxed())
            } else {
                status(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        if !self.ready.load(Ordering::SeqCst) {
            self.requests_while_unready.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        *self.last_headers.lock().unwrap() = Some(req.headers().clone());
        if let Some(order) = req.headers().get("x-order") {
            self.arrivals
                .lock()
                .unwrap()
                .push(order.to_str().unwrap().to_owned());
        }
        let version = req.version();

        if req.headers().contains_key(http::header::UPGRADE) && self.refuse_upgrades {
            let stalled = tokio_stream::StreamExt::chain(
                tokio_stream::once(Ok(Frame::data(Bytes::from_static(b"refused")))),
                tokio_stream::pending(),
            );
            let mut resp = Response::new(StreamBody::new(stalled).boxed());
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
        if req.headers().contains_key(http::header::UPGRADE) {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let mut resp = status(StatusCode::SWITCHING_PROTOCOLS, "");
            resp.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            resp.headers_mut()
                .insert("upgrade", "echo".parse().unwrap());
            return resp;
        }

        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(gate) = &self.gate {
            // A closed gate is open for good.
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut resp = Response::new(Full::new(Bytes::from(self.name.clone())).boxed());
        let h = resp.headers_mut();
        h.insert("x-pod", self.name.parse().unwrap());
        h.insert("x-seen-version", format!("{version:?}").parse().unwrap());
        h.insert(
            "x-seen-body-len",
            body.map_or(-1, |b| b.len() as i64).into(),
        );
        // Hop-by-hop headers the activator must not pass back.
        h.insert("connection", "x-pod-private".parse().unwrap());
        h.insert("x-pod-private", "1".parse().unwrap());
        resp
    }
}

/// What a fake pod answers with.
type PodBody = BoxBody<Bytes, Infallible>;

fn status(code: StatusCode, body: &'static str) -> Response<PodBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *resp.status_mut() = code;
    resp
}

impl Pod {
    pub fn builder(name: &str) -> PodBuilder {
        PodBuilder {
            name: name.into(),
            ready: true,
            delay: Duration::ZERO,
            gated: false,
            refuse_upgrades: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    pub async fn start(name: &str) -> Pod {
        Pod::builder(name).start().await
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            address: self.addr.ip().to_string(),
            port: u32::from(self.addr.port()),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.state.ready.store(ready, Ordering::SeqCst);
    }

    pub fn probes(&self) -> u64 {
        self.state.probes.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn requests_while_unready(&self) -> u64 {
        self.state.requests_while_unready.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.state
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .expect("the pod got a request")
    }

    /// The `x-order` header of every request so far, in arrival order.
    pub fn arrivals(&self) -> Vec<String> {
        self.state.arrivals.lock().unwrap().clone()
    }

    /// Lets `n` gated responses go.
    pub fn release(&self, n: usize) {
        self.state
            .gate
            .as_ref()
            .expect("a gated pod")
            .add_permits(n);
    }

    /// Lets every gated response go, now and later.
    pub fn open(&self) {
        self.state.gate.as_ref().expect("a gated pod").close();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A revision named `name` in namespace `default`.
pub fn revision(name: &str, cc: i64, timeout_seconds: i64, pods: &[&Pod]) -> Revision {
    Revision {
        namespace: "default".into(),
        name: name.into(),
        container_concurrency: cc,
        timeout_seconds,
        response_start_timeout_seconds: 0,
        idle_timeout_seconds: 0,
        endpoints: pods.iter().map(|p| p.endpoint()).collect(),
    }
}

/// An activator on 127.0.0.1:0 with its stats receiver.
pub async fn activator(config: Config) -> (Running, mpsc::Receiver<RevisionStats>) {
    let (tx, rx) = stats_channel();
    let running = Running::start(config, tx).await.unwrap();
    (running, rx)
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A request for revision `default/<name>` (or none, with `name` empty).
pub fn request(addr: SocketAddr, name: &str) -> http::request::Builder {
    let mut req = Request::get(format!("http://{addr}/hello?x=1"));
    if !name.is_empty() {
        req = req
            .header("knative-serving-namespace", "default")
            .header("knative-serving-revision", name);
    }
    req
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.expect("the activator answers");
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET for revision `default/<name>`.
pub async fn get(client: &TestClient, addr: SocketAddr, name: &str) -> Reply {
    send(client, request(addr, name).body(Full::default()).unwrap()).await
}

/// Sends a GET in the background.
pub fn spawn_get(client: &TestClient, addr: SocketAddr, name: &str) -> JoinHandle<Reply> {
    let (client, name) = (client.clone(), name.to_owned());
    tokio::spawn(async move { get(&client, addr, &name).await })
}

/// Sends `req` in the background.
pub fn spawn_send(client: &TestClient, req: Request<Full<Bytes>>) -> JoinHandle<Reply> {
    let client = client.clone();
    tokio::spawn(async move { send(&client, req).await })
}

/// GET on the admin port.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client
        .request(
            Request::get(format!("http://{addr}{path}"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("the admin server answers");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of an unlabelled metric line (`name value`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn version_of(reply: &Reply) -> Version {
    match reply
        .headers
        .get("x-seen-version")
        .map(|v| v.to_str().unwrap())
    {
        Some("HTTP/2.0") => Version::HTTP_2,
        _ => Version::HTTP_11,
    }
}
