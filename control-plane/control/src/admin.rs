//! The loopback admin endpoint: `/healthz`, `/readyz`, Prometheus `/metrics`, and `/clients`
//! (the Envoys connected over xDS and what they have accepted).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
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

/// A small HTTP server for requests without a body: `handler` answers each request; runs until
/// `shutdown`.
pub async fn serve_http<F>(listener: TcpListener, shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    serve_connections(listener, shutdown, move |req| {
        std::future::ready(handler(&req))
    })
    .await;
}

/// Like [`serve_http`], for requests with a body: each body is read whole first (at most
/// `limit` bytes; larger ones get 413 without reaching `handler`).
pub async fn serve_http_with_body<F>(
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
    limit: usize,
    handler: F,
) where
    F: Fn(&Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    serve_connections(listener, shutdown, move |req| {
        let handler = handler.clone();
        async move {
            let (parts, body) = req.into_parts();
            match Limited::new(body, limit).collect().await {
                Ok(body) => handler(&Request::from_parts(parts, body.to_bytes())),
                Err(e) if e.is::<LengthLimitError>() => reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    format!("request body larger than {limit} bytes\n"),
                ),
                Err(e) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("cannot read the request body: {e}\n"),
                ),
            }
        }
    })
    .await;
}

/// Accepts connections until `shutdown` and answers every request on them with `respond`.
async fn serve_connections<F, R>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> R + Send + Sync + 'static,
    R: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let respond = Arc::new(respond);
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
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = respond(req);
                async move { Ok::<_, Infallible>(resp.await) }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(addr: std::net::SocketAddr, body: &'static str) -> (StatusCode, Bytes) {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn bodies_are_read_whole_up_to_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve_http_with_body(listener, stopped, 8, |req| {
            reply(StatusCode::OK, "text/plain", req.body().clone())
        }));
        assert_eq!(
            post(addr, "12345678").await,
            (StatusCode::OK, Bytes::from_static(b"12345678"))
        );
        assert_eq!(
            post(addr, "123456789").await.0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        stop.send(true).unwrap();
        server.await.unwrap();
    }
}
