//! The loopback admin endpoint: `/healthz`, `/readyz`, Prometheus `/metrics`, and `/clients`
//! (the Envoys connected over xDS and what they have accepted).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use knarr_xds::{Clients, SnapshotCache, DEFAULT_GROUP};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

/// What the admin endpoint reports on.
pub struct AdminState {
    pub registry: Registry,
    pub cache: Arc<SnapshotCache>,
    pub clients: Arc<Clients>,
}

pub(crate) fn reply(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            // Ready once there is a config to serve; Envoys that connect get it at once.
            if state.cache.get(DEFAULT_GROUP).is_some() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no config loaded yet\n",
                )
            }
        }
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/clients" => {
            let mut text = String::new();
            for c in state.clients.list() {
                let _ = writeln!(
                    text,
                    "node={} cluster={} group={} mode={} synced_generation={:?}",
                    c.node_id,
                    c.node_cluster,
                    c.group,
                    c.mode.as_str(),
                    c.synced_generation
                );
                for (ty, v) in &c.acked {
                    let _ = writeln!(text, "  {ty} acked {v}");
                }
                for (ty, e) in &c.rejected {
                    let _ = writeln!(text, "  {ty} REJECTED: {e}");
                }
            }
            if text.is_empty() {
                text.push_str("no Envoy connected\n");
            }
            reply(StatusCode::OK, "text/plain", text)
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: watch::Receiver<bool>) {
    serve_http(listener, shutdown, move |req| handle(&state, req)).await;
}

/// A small read-only HTTP server: `handler` answers each request; runs until `shutdown`.
pub async fn serve_http<F>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = knarr_xds::server::stopped(&mut shutdown) => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "accept failed");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = handler(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "HTTP connection error");
            }
        });
    }
}
