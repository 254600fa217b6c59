//! The read-only status API (`--api-addr`, loopback by default), which `knarr get` reads:
//!
//! - `GET /api/v1/ingresses` → `{"items": [...]}`: every ingress with Knative's status
//!   conditions, the hosts it serves, and any source error;
//! - `GET /api/v1/ingresses/{namespace}/{name}`;
//! - `GET /api/v1/errors` → `{"errors": [...]}`: every problem the source reported.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{reply, serve_http};
use crate::ingress_controller::IngressController;
use crate::serving_controller::ServingController;

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn handle(controller: &IngressController, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only API: GET only\n",
        );
    }
    let path = req.uri().path().trim_end_matches('/');
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "api", "v1", "ingresses"] => {
            json(&serde_json::json!({ "items": controller.reports() }))
        }
        ["", "api", "v1", "ingresses", namespace, name] => {
            match controller
                .reports()
                .into_iter()
                .find(|r| r.metadata.namespace == *namespace && r.metadata.name == *name)
            {
                Some(report) => json(&report),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no ingress {namespace}/{name}\n"),
                ),
            }
        }
        ["", "api", "v1", "errors"] => json(&serde_json::json!({ "errors": controller.errors() })),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /api/v1/ingresses or /api/v1/errors\n",
        ),
    }
}

/// What the API reads (and, under `knarr up`, writes).
#[derive(Clone)]
pub struct ApiState {
    pub ingress: Arc<IngressController>,
    /// Present under `knarr up`: Knative Services, Configurations, Revisions, Routes, pods.
    pub serving: Option<Arc<ServingController>>,
}

/// Serves the API until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: watch::Receiver<bool>) {
    serve_http(listener, shutdown, move |req| handle(&state.ingress, req)).await;
}
