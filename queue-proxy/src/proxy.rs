//! The request path: probes answered here, everything else through the breaker and the stats to
//! the app on `127.0.0.1:$USER_PORT`, streaming both ways, with Knative's timeouts.
//!
//! Errors say who failed: 503 when the queue is full (us, retryable), 502 when the app cannot be
//! reached (upstream), 504 when it is too slow (upstream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use knarr_data_path::{forward, GuardedBody};
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
        if forward::is_upgrade(req.version(), req.headers()) {
            return self.upgrade(req, guards, deadline).await;
        }
        self.forward(req, guards, deadline).await
    }

    /// The request as the app gets it: its address in the URI (the `Host` header stays),
    /// hop-by-hop and routing headers gone.
    fn to_app(&self, req: Request<Incoming>, upgrade: bool) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        forward::to_upstream(&mut parts, self.authority.clone(), upgrade);
        for h in INTERNAL_HEADERS {
            parts.headers.remove(h);
        }
        Request::from_parts(parts, body)
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        guards: Guards,
        deadline: Instant,
    ) -> Response<ProxyBody> {
        let http2 = req.version() == Version::HTTP_2;
        let req = self.to_app(req, false);
        let client = if http2 { &self.http2 } else { &self.http1 };
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
        let (mut parts, body) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers, false);
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
        let app_req = self.to_app(req, true);
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
            // Refused: an ordinary response, whose body holds the slot and runs under the
            // timeouts until its last byte.
            let (mut parts, body) = resp.into_parts();
            forward::strip_hop_by_hop(&mut parts.headers, false);
            let body = GuardedBody::new(body, guards, deadline, self.idle_timeout);
            return Response::from_parts(parts, body.boxed_unsync());
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
        let (mut parts, _) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers, true);
        Response::from_parts(
            parts,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
    }
}

/// Held for as long as a request is in flight, response body included.
struct Guards {
    _in_flight: InFlight,
    _permit: Option<Permit>,
}

#[cfg(test)]
mod tests {
    use http_body_util::Empty;
    use knarr_test_support::{wait_until, within, Upstream};

    use http::header::{CONNECTION, UPGRADE};

    use super::*;
    use crate::app::Running;

    /// The app: answers ordinary requests with its name, `app` (and a header that only its
    /// `Connection` names), and refuses every upgrade with `status` and a body the test streams.
    async fn app(status: u16) -> Upstream {
        Upstream::builder("app")
            .refuse_upgrades(status)
            .hop_by_hop_header()
            .start()
            .await
            .unwrap()
    }

    fn config(user_port: u16, container_concurrency: usize, idle: Option<Duration>) -> Config {
        Config {
            namespace: "default".into(),
            configuration: "hello".into(),
            revision: "hello-00001".into(),
            pod: "hello-00001-pod".into(),
            pod_ip: "127.0.0.1".into(),
            service: None,
            serving_port: 0,
            user_port,
            container_concurrency,
            revision_timeout: Duration::from_secs(300),
            response_start_timeout: None,
            idle_timeout: idle,
            readiness_probe: None,
            admin_port: 0,
            metrics_port: 0,
            user_metrics_port: 0,
            bind: [127, 0, 0, 1].into(),
            drain_quiet_period: Duration::from_millis(100),
        }
    }

    /// An HTTP/1.1 connection to `addr`.
    async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        sender
    }

    fn upgrade_request() -> Request<Empty<Bytes>> {
        Request::get("/ws")
            .header(http::header::HOST, "x")
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "websocket")
            .body(Empty::new())
            .unwrap()
    }

    /// An app that refuses an upgrade (200 or 400) streams an ordinary body: until its last
    /// byte, the request keeps its breaker slot and its place in the concurrency count, so with
    /// CONTAINER_CONCURRENCY 1 the next request waits instead of reaching the app alongside it.
    #[tokio::test]
    async fn a_refused_upgrade_holds_its_slot_until_its_body_ends() {
        for status in [StatusCode::OK, StatusCode::BAD_REQUEST] {
            let app = app(status.as_u16()).await;
            let qp = Running::start(config(app.port(), 1, None)).await.unwrap();
            let breaker = qp.proxy.breaker.as_ref().unwrap();

            let mut upgrade_conn = connect(qp.serving_addr).await;
            let resp = upgrade_conn.send_request(upgrade_request()).await.unwrap();
            let chunks = within("the app to refuse the upgrade", app.refused_upgrade()).await;
            assert_eq!(resp.status(), status);
            let mut body = resp.into_body();
            chunks.send("one ").unwrap();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, "one ");

            // The refused upgrade's body is still streaming; an ordinary request arrives.
            let mut ordinary_conn = connect(qp.serving_addr).await;
            let ordinary = tokio::spawn(async move {
                let req = Request::get("/")
                    .header(http::header::HOST, "x")
                    .body(Empty::new())
                    .unwrap();
                let resp = ordinary_conn.send_request(req).await.unwrap();
                let status = resp.status();
                (status, resp.into_body().collect().await.unwrap().to_bytes())
            });
            wait_until("the ordinary request to queue (or reach the app)", || {
                breaker.waiting() == 1 || app.requests() > 1
            })
            .await;
            assert_eq!(
                app.requests(),
                1,
                "{status}: the ordinary request reached the app while the refused upgrade's body \
                 was still streaming (CONTAINER_CONCURRENCY 1)"
            );
            assert_eq!(breaker.in_flight(), 1);
            assert_eq!(qp.proxy.stats.in_flight(), 2);

            // The body ends; only then does the ordinary request go through.
            chunks.send("two ").unwrap();
            chunks.send("three").unwrap();
            drop(chunks);
            let rest = body.collect().await.unwrap().to_bytes();
            assert_eq!(rest, "two three");
            let (ordinary_status, ordinary_body) =
                within("the ordinary request", ordinary).await.unwrap();
            assert_eq!(ordinary_status, StatusCode::OK);
            assert_eq!(ordinary_body, "app");
            assert_eq!(app.requests(), 2);
            wait_until("nothing in flight", || qp.proxy.stats.in_flight() == 0).await;
            assert_eq!(breaker.in_flight(), 0);
        }
    }

    /// A refused upgrade's body is under the idle timeout like any response: an app that stops
    /// sending is cut off and the request's slot comes back.
    #[tokio::test]
    async fn a_refused_upgrade_body_is_cut_by_the_idle_timeout() {
        let app = app(400).await;
        let idle = Duration::from_millis(200);
        let qp = Running::start(config(app.port(), 1, Some(idle)))
            .await
            .unwrap();
        let mut conn = connect(qp.serving_addr).await;
        let resp = conn.send_request(upgrade_request()).await.unwrap();
        let chunks = within("the app to refuse the upgrade", app.refused_upgrade()).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        chunks.send("partial").unwrap();
        // Then nothing, with the app's side still open.
        let cut = within("the idle timeout", resp.into_body().collect()).await;
        assert!(
            cut.is_err(),
            "a stalled refused upgrade must fail on the idle timeout, not hang"
        );
        wait_until("nothing in flight", || qp.proxy.stats.in_flight() == 0).await;
        drop(chunks);
    }

    /// Hop-by-hop headers stay on their hop both ways (RFC 9110 §7.6.1), the headers a
    /// `Connection` names included; the gateway's routing headers stop here too.
    #[tokio::test]
    async fn hop_by_hop_headers_stay_behind() {
        let app = app(400).await;
        let qp = Running::start(config(app.port(), 0, None)).await.unwrap();
        let mut conn = connect(qp.serving_addr).await;
        let req = Request::get("/")
            .header(http::header::HOST, "x")
            .header(CONNECTION, "keep-alive, X-Client-Private")
            .header("keep-alive", "timeout=5")
            .header("x-client-private", "1")
            .header("x-client-public", "1")
            .header("knative-serving-revision", "hello-00001")
            .body(Empty::new())
            .unwrap();
        let resp = conn.send_request(req).await.unwrap();
        let at_app = app.last_request().expect("the app saw the request").headers;
        for gone in [
            "connection",
            "keep-alive",
            "x-client-private",
            "knative-serving-revision",
        ] {
            assert!(!at_app.contains_key(gone), "{gone} reached the app");
        }
        assert_eq!(at_app.get("x-client-public").unwrap(), "1");
        assert_eq!(at_app.get("host").unwrap(), "x");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp
            .headers()
            .contains_key(knarr_test_support::upstream::PRIVATE_HEADER));
        assert_eq!(resp.headers().get("x-upstream").unwrap(), "app");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "app");
    }
}
