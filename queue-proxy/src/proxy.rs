//! The request path: probes answered here, everything else through the breaker and the stats to
//! the app on `127.0.0.1:$USER_PORT`, streaming both ways, with Knative's timeouts.
//!
//! Errors say who failed: 503 when the queue is full (us, retryable), 502 when the app cannot be
//! reached (upstream), 504 when it is too slow (upstream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use knarr_data_path::GuardedBody;
use tokio::time::Instant;
use tracing::debug;

use crate::breaker::{Breaker, Permit};
use crate::config::Config;
use crate::drain::Drainer;
use crate::probe::{answer_probe, Readiness};
use crate::stats::{InFlight, Stats};

/// Headers the gateway adds for routing; the app does not see them.
const INTERNAL_HEADERS: [&str; 2] = ["knative-serving-revision", "knative-serving-namespace"];
/// Marks requests that came through the activator.
const PROXY_HEADER: &str = "k-proxy-request";

/// A response body that can come from the app or from us.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn ours(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The shared state of the request path.
pub struct QueueProxy {
    user: SocketAddr,
    /// `127.0.0.1:$USER_PORT`, parsed once.
    authority: http::uri::Authority,
    revision_timeout: Duration,
    response_start_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    breaker: Option<Breaker>,
    pub stats: Arc<Stats>,
    pub readiness: Arc<Readiness>,
    pub drainer: Arc<Drainer>,
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
}

impl QueueProxy {
    pub fn new(
        config: &Config,
        stats: Arc<Stats>,
        readiness: Arc<Readiness>,
        drainer: Arc<Drainer>,
    ) -> QueueProxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // Keep-alive connections to the app, reused across requests.
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let user = SocketAddr::from(([127, 0, 0, 1], config.user_port));
        QueueProxy {
            user,
            authority: user
                .to_string()
                .parse()
                .expect("a socket address is a URI authority"),
            revision_timeout: config.revision_timeout,
            response_start_timeout: config.response_start_timeout,
            idle_timeout: config.idle_timeout,
            breaker: Breaker::new(config.container_concurrency),
            stats,
            readiness,
            drainer,
            http1,
            http2,
        }
    }

    /// Serves one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(probe) = answer_probe(
            req.headers(),
            self.readiness.is_ready(),
            self.drainer.is_draining(),
        ) {
            return probe.map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync());
        }
        self.drainer.request_seen();
        let proxied = req
            .headers()
            .get(PROXY_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"activator"));
        let in_flight = self.stats.request(proxied);
        let permit = match &self.breaker {
            None => None,
            Some(breaker) => match breaker.acquire().await {
                Ok(p) => Some(p),
                Err(_) => {
                    return ours(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "pending request queue full\n",
                    )
                }
            },
        };
        let deadline = Instant::now() + self.revision_timeout;
        let guards = Guards {
            _in_flight: in_flight,
            _permit: permit,
        };
        if is_upgrade(&req) {
            return self.upgrade(req, guards, deadline).await;
        }
        self.forward(req, guards, deadline).await
    }

    fn to_app(&self, mut req: Request<Incoming>) -> Request<Incoming> {
        for h in INTERNAL_HEADERS {
            req.headers_mut().remove(h);
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        *req.uri_mut() =
            http::Uri::from_parts(parts).expect("scheme, authority and path make a URI");
        req
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        guards: Guards,
        deadline: Instant,
    ) -> Response<ProxyBody> {
        let http2 = req.version() == Version::HTTP_2;
        let mut req = self.to_app(req);
        let client = if http2 { &self.http2 } else { &self.http1 };
        if !http2 {
            *req.version_mut() = Version::HTTP_11;
        }
        let headers_by = match self.response_start_timeout {
            Some(t) => deadline.min(Instant::now() + t),
            None => deadline,
        };
        let resp = match tokio::time::timeout_at(headers_by, client.request(req)).await {
            Err(_) => {
                return ours(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the app did not respond in time\n",
                )
            }
            Ok(Err(e)) if e.is_connect() => {
                debug!(error = %e, "app unreachable");
                return ours(StatusCode::BAD_GATEWAY, "the app is not reachable\n");
            }
            Ok(Err(e)) => {
                debug!(error = %e, "app failed");
                return ours(StatusCode::BAD_GATEWAY, "the app closed the connection\n");
            }
            Ok(Ok(resp)) => resp,
        };
        let (parts, body) = resp.into_parts();
        let body = GuardedBody::new(body, guards, deadline, self.idle_timeout);
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// WebSocket and other HTTP/1.1 upgrades: a dedicated connection to the app, then bytes
    /// copied both ways until either side closes.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        guards: Guards,
        deadline: Instant,
    ) -> Response<ProxyBody> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let app_req = self.to_app(req);
        let connect = async {
            let stream = tokio::net::TcpStream::connect(self.user).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn.with_upgrades());
            Ok::<_, BoxError>(sender.send_request(app_req).await?)
        };
        let mut resp = match tokio::time::timeout_at(deadline, connect).await {
            Err(_) => {
                return ours(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the app did not respond in time\n",
                )
            }
            Ok(Err(e)) => {
                debug!(error = %e, "upgrade to the app failed");
                return ours(StatusCode::BAD_GATEWAY, "the app is not reachable\n");
            }
            Ok(Ok(resp)) => resp,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            return Response::from_parts(
                parts,
                body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
            );
        }
        let app_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _guards = guards;
            match tokio::try_join!(client_upgrade, app_upgrade) {
                Ok((client, app)) => {
                    let mut client = TokioIo::new(client);
                    let mut app = TokioIo::new(app);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
                }
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(
            parts,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get(CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// Held for as long as a request is in flight, response body included.
struct Guards {
    _in_flight: InFlight,
    _permit: Option<Permit>,
}
