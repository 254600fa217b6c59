//! The request path: probes are answered here; other requests name their revision in
//! `Knative-Serving-Namespace` / `Knative-Serving-Revision`, wait for a slot on one of its ready
//! pods ([`Throttler`](crate::throttler)), and are forwarded there — streaming both ways, upgrades
//! (WebSockets) included — with `K-Proxy-Request: activator` added and the revision headers kept
//! (the pod's queue-proxy needs nothing else and strips them).
//!
//! Errors say who failed: 404 an unknown revision (the caller), 503 a full queue or a revision
//! removed while waiting (us, retryable), 504 no capacity or no response within the revision's
//! timeout, 502 a pod that cannot be reached or drops the connection (upstream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use knarr_data_path::{forward, GuardedBody};
use tokio::time::Instant;
use tracing::debug;

use crate::drain::Drainer;
use crate::metrics::Refusal;
use crate::probe;
use crate::revisions::Revisions;
use crate::throttler::{InFlight, Lease, Refused, Spec};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body that can come from a pod or from us.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// A request body to a pod: the client's, or none (probes).
pub(crate) type UpstreamBody = Either<Incoming, Empty<Bytes>>;

pub const REVISION_HEADER: HeaderName = HeaderName::from_static("knative-serving-revision");
pub const NAMESPACE_HEADER: HeaderName = HeaderName::from_static("knative-serving-namespace");
/// Tells the queue-proxy the request came through the activator (it counts those apart).
pub const PROXY_HEADER: HeaderName = HeaderName::from_static("k-proxy-request");

/// The 504 body, Knative's.
pub const TIMEOUT_BODY: &str = "activator request timeout";
/// The 503 body when too many requests wait, Knative's.
pub const QUEUE_FULL_BODY: &str = "pending request queue full";

pub(crate) fn ours(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Connection pools to pods, shared by every revision (and the probes, so a probe's connection
/// serves the first request).
pub(crate) struct PodClients {
    pub http1: Client<HttpConnector, UpstreamBody>,
    /// h2c with prior knowledge, for requests that arrived over HTTP/2.
    pub http2: Client<HttpConnector, UpstreamBody>,
}

impl PodClients {
    pub fn new() -> PodClients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        PodClients {
            http1: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector.clone()),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }
}

/// The shared state of the request path.
pub struct Proxy {
    revisions: Revisions,
    drainer: Arc<Drainer>,
}

impl Proxy {
    pub fn new(revisions: Revisions, drainer: Arc<Drainer>) -> Proxy {
        Proxy { revisions, drainer }
    }

    /// Serves one request from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        if let Some(resp) = probe::answer(req.headers(), self.drainer.is_draining()) {
            return resp;
        }
        let metrics = &self.revisions.shared().metrics;
        let named = |h: &HeaderName| {
            req.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let (Some(namespace), Some(name)) = (named(&NAMESPACE_HEADER), named(&REVISION_HEADER))
        else {
            metrics.refused(Refusal::UnknownRevision);
            return ours(
                StatusCode::NOT_FOUND,
                "activator: the request names no revision \
                 (Knative-Serving-Namespace and Knative-Serving-Revision headers)\n",
            );
        };
        let Some(throttler) = self.revisions.lookup(namespace, name) else {
            metrics.refused(Refusal::UnknownRevision);
            return ours(
                StatusCode::NOT_FOUND,
                format!("activator: unknown revision {namespace}/{name}\n"),
            );
        };
        self.drainer.request_seen();
        metrics.requests.inc();
        let in_flight = throttler.arrive();
        let spec = throttler.spec();
        let deadline = Instant::now() + spec.timeout;
        let lease = match throttler.acquire(deadline).await {
            Ok(lease) => lease,
            Err(refused) => {
                let (why, status, body) = match refused {
                    Refused::QueueFull => (
                        Refusal::QueueFull,
                        StatusCode::SERVICE_UNAVAILABLE,
                        QUEUE_FULL_BODY.to_owned(),
                    ),
                    Refused::Timeout => (
                        Refusal::Timeout,
                        StatusCode::GATEWAY_TIMEOUT,
                        TIMEOUT_BODY.to_owned(),
                    ),
                    Refused::Removed => (
                        Refusal::RevisionRemoved,
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("activator: revision {namespace}/{name} was removed while the request waited\n"),
                    ),
                };
                metrics.refused(why);
                return ours(status, body);
            }
        };
        metrics.proxied.inc();
        let guards = Guards {
            _in_flight: in_flight,
            lease,
        };
        if forward::is_upgrade(req.version(), req.headers()) {
            return self.upgrade(req, peer, guards, spec, deadline).await;
        }
        self.forward(req, peer, guards, spec, deadline).await
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        guards: Guards,
        spec: Spec,
        deadline: Instant,
    ) -> Response<ProxyBody> {
        let metrics = &self.revisions.shared().metrics;
        let clients = &self.revisions.shared().clients;
        let http2 = req.version() == Version::HTTP_2;
        let client = if http2 {
            &clients.http2
        } else {
            &clients.http1
        };
        let req = to_pod(req, guards.lease.target().authority.clone(), peer, false);
        // The response-start timeout counts from forwarding: a cold start's wait is bounded by
        // the total timeout only.
        let headers_by = match spec.response_start_timeout {
            Some(t) => deadline.min(Instant::now() + t),
            None => deadline,
        };
        let resp = match tokio::time::timeout_at(headers_by, client.request(req)).await {
            Err(_) => {
                metrics.refused(Refusal::Timeout);
                return ours(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY);
            }
            Ok(Err(e)) if e.is_connect() => {
                debug!(error = %e, pod = %guards.lease.target().addr, "pod unreachable");
                guards.lease.pod_unreachable();
                metrics.refused(Refusal::PodUnreachable);
                return ours(
                    StatusCode::BAD_GATEWAY,
                    "activator: cannot reach the revision's pod\n",
                );
            }
            Ok(Err(e)) => {
                debug!(error = %e, pod = %guards.lease.target().addr, "pod failed");
                metrics.refused(Refusal::PodFailed);
                return ours(
                    StatusCode::BAD_GATEWAY,
                    "activator: the revision's pod closed the connection\n",
                );
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers, false);
        let body = GuardedBody::new(body, guards, deadline, spec.idle_timeout);
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// WebSocket and other HTTP/1.1 upgrades: a dedicated connection to the pod, then bytes
    /// copied both ways until either side closes. The slot stays taken meanwhile.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        guards: Guards,
        spec: Spec,
        deadline: Instant,
    ) -> Response<ProxyBody> {
        let metrics = &self.revisions.shared().metrics;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let target_addr = guards.lease.target().addr;
        let pod_req = to_pod(req, guards.lease.target().authority.clone(), peer, true);
        let connect = async {
            let stream = tokio::net::TcpStream::connect(target_addr)
                .await
                .map_err(UpgradeError::Connect)?;
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(UpgradeError::Exchange)?;
            tokio::spawn(conn.with_upgrades());
            sender
                .send_request(pod_req)
                .await
                .map_err(UpgradeError::Exchange)
        };
        let mut resp = match tokio::time::timeout_at(deadline, connect).await {
            Err(_) => {
                metrics.refused(Refusal::Timeout);
                return ours(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY);
            }
            Ok(Err(UpgradeError::Connect(e))) => {
                debug!(error = %e, pod = %target_addr, "pod unreachable");
                guards.lease.pod_unreachable();
                metrics.refused(Refusal::PodUnreachable);
                return ours(
                    StatusCode::BAD_GATEWAY,
                    "activator: cannot reach the revision's pod\n",
                );
            }
            Ok(Err(UpgradeError::Exchange(e))) => {
                debug!(error = %e, pod = %target_addr, "upgrade to the pod failed");
                metrics.refused(Refusal::PodFailed);
                return ours(
                    StatusCode::BAD_GATEWAY,
                    "activator: the revision's pod closed the connection\n",
                );
            }
            Ok(Ok(resp)) => resp,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused: an ordinary response, under the same timeouts.
            let (mut parts, body) = resp.into_parts();
            forward::strip_hop_by_hop(&mut parts.headers, false);
            let body = GuardedBody::new(body, guards, deadline, spec.idle_timeout);
            return Response::from_parts(parts, body.boxed_unsync());
        }
        let pod_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _guards = guards;
            match tokio::try_join!(client_upgrade, pod_upgrade) {
                Ok((client, pod)) => {
                    let mut client = TokioIo::new(client);
                    let mut pod = TokioIo::new(pod);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut pod).await;
                }
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers, true);
        Response::from_parts(
            parts,
            Empty::new().map_err(|never| match never {}).boxed_unsync(),
        )
    }
}

#[derive(Debug)]
enum UpgradeError {
    Connect(std::io::Error),
    Exchange(hyper::Error),
}

/// The request as the pod gets it: its address in the URI (the `Host` header stays), hop-by-hop
/// headers gone, `K-Proxy-Request: activator` and the client in `X-Forwarded-For` added.
fn to_pod(
    req: Request<Incoming>,
    authority: http::uri::Authority,
    peer: SocketAddr,
    upgrade: bool,
) -> Request<UpstreamBody> {
    let (mut parts, body) = req.into_parts();
    forward::to_upstream(&mut parts, authority, upgrade);
    let headers = &mut parts.headers;
    headers.insert(PROXY_HEADER, HeaderValue::from_static("activator"));
    // As any HTTP proxy: the client joins the end of the list (several headers fold into one).
    let mut forwarded: Vec<String> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    forwarded.push(peer.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&forwarded.join(", ")) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    Request::from_parts(parts, Either::Left(body))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Held for as long as a request is in flight, response body included.
struct Guards {
    _in_flight: InFlight,
    lease: Lease,
}
