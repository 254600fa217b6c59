//! The status API (`--api-addr`, loopback by default), which `knarr get`, `apply`, `delete`,
//! `describe` and `logs` talk to. JSON in and out; errors are plain text.
//!
//! Always (`knarr serve` and `knarr up`):
//!
//! - `GET /api/v1/ingresses` → `{"items": [...]}`: every ingress with Knative's status
//!   conditions, the hosts it serves, and any source error;
//! - `GET /api/v1/ingresses/{namespace}/{name}`;
//! - `GET /api/v1/errors` → `{"errors": [...]}`: every problem the source reported.
//!
//! Under `knarr up` only (`knarr serve` answers 404 and says so):
//!
//! - `GET /api/v1/{services|configurations|revisions|routes}[?namespace=NS]` →
//!   `{"items": [...]}`, full manifests with status;
//! - `GET /api/v1/{plural}/{namespace}/{name}` → one manifest;
//! - `DELETE /api/v1/{plural}/{namespace}/{name}` → `{"deleted": "Service default/hello"}`
//!   (404 unknown, 409 owned by a Service);
//! - `POST /api/v1/apply`, body the manifest text, `X-Knarr-Source` naming the file in errors and
//!   `X-Knarr-Base-Dir` the absolute directory relative `workingDir`s are resolved against
//!   (both percent-encoded, see [`encode_header_text`]) → `{"applied": [...]}` or 422
//!   `{"errors": [...]}`;
//! - `GET /api/v1/pods/{namespace}/{name}` → `{"items": [...]}`: the pods of a Service,
//!   Configuration or Revision.
//!
//! Applying a manifest runs its `command` on this machine, so requests that change anything are
//! refused when they come from a browser (they carry `Origin`) or name the API by a host name
//! other than `localhost` (DNS rebinding): a web page must not be able to start processes.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use knarr_model::serving::{ServingKey, ServingKind, ServingObject};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{reply, serve_http_with_body};
use crate::ingress_controller::IngressController;
use crate::serving_controller::{Applied, DeleteError, PodInfo, ServingController};
use crate::table;

/// The answer to `POST /api/v1/apply`: what was applied (200), or every error (422, nothing
/// applied). The CLI reads the same type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyAnswer {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<Applied>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A list answer, serialized from borrowed items.
#[derive(Serialize)]
struct Items<'a, T> {
    items: &'a [T],
}

/// The answer to `GET /api/v1/pods/{namespace}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodList {
    pub items: Vec<PodInfo>,
}

/// The largest manifest `POST /api/v1/apply` takes.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The header naming the applied file in error messages.
pub const SOURCE_HEADER: &str = "x-knarr-source";
/// The header with the directory a manifest's relative `workingDir`s are resolved against.
pub const BASE_DIR_HEADER: &str = "x-knarr-base-dir";

/// What the API reads (and, under `knarr up`, writes).
#[derive(Clone)]
pub struct ApiState {
    pub ingress: Arc<IngressController>,
    /// Present under `knarr up`: Knative Services, Configurations, Revisions, Routes, pods.
    pub serving: Option<Arc<ServingController>>,
}

/// Serves the API until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: watch::Receiver<bool>) {
    serve_http_with_body(listener, shutdown, MAX_BODY_BYTES, move |req| {
        handle(&state, req)
    })
    .await;
}

/// What a request path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'p> {
    Ingresses,
    Ingress(&'p str, &'p str),
    Errors,
    List(ServingKind),
    Object(ServingKind, &'p str, &'p str),
    Apply,
    Pods(&'p str, &'p str),
}

impl Endpoint<'_> {
    fn parse(path: &str) -> Option<Endpoint<'_>> {
        let path = path.trim_end_matches('/');
        let endpoint = match path.split('/').collect::<Vec<_>>().as_slice() {
            ["", "api", "v1", "ingresses"] => Endpoint::Ingresses,
            ["", "api", "v1", "ingresses", ns, name] => Endpoint::Ingress(ns, name),
            ["", "api", "v1", "errors"] => Endpoint::Errors,
            ["", "api", "v1", "apply"] => Endpoint::Apply,
            ["", "api", "v1", "pods", ns, name] => Endpoint::Pods(ns, name),
            ["", "api", "v1", plural] => Endpoint::List(kind_of_plural(plural)?),
            ["", "api", "v1", plural, ns, name] => {
                Endpoint::Object(kind_of_plural(plural)?, ns, name)
            }
            _ => return None,
        };
        Some(endpoint)
    }

    fn allows(self) -> &'static [Method] {
        match self {
            Endpoint::Object(..) => &[Method::GET, Method::DELETE],
            Endpoint::Apply => &[Method::POST],
            _ => &[Method::GET],
        }
    }

    fn needs_serving(self) -> bool {
        matches!(
            self,
            Endpoint::List(_) | Endpoint::Object(..) | Endpoint::Apply | Endpoint::Pods(..)
        )
    }
}

/// The path segment of a serving kind (`/api/v1/services`).
pub fn plural(kind: ServingKind) -> &'static str {
    match kind {
        ServingKind::Service => "services",
        ServingKind::Configuration => "configurations",
        ServingKind::Revision => "revisions",
        ServingKind::Route => "routes",
    }
}

fn kind_of_plural(plural: &str) -> Option<ServingKind> {
    match plural {
        "services" => Some(ServingKind::Service),
        "configurations" => Some(ServingKind::Configuration),
        "revisions" => Some(ServingKind::Revision),
        "routes" => Some(ServingKind::Route),
        _ => None,
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn text(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

fn handle(state: &ApiState, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let Some(endpoint) = Endpoint::parse(req.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "not found; try /api/v1/ingresses, /api/v1/errors, /api/v1/services, \
             /api/v1/configurations, /api/v1/revisions, /api/v1/routes or /api/v1/pods/NS/NAME",
        );
    };
    let allowed = endpoint.allows();
    if !allowed.contains(req.method()) {
        let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} {}: use {}",
                req.method(),
                req.uri().path(),
                names.join(", ")
            ),
        );
        if let Ok(value) = names.join(", ").parse() {
            resp.headers_mut().insert(header::ALLOW, value);
        }
        return resp;
    }
    if req.method() != Method::GET {
        if let Err(why) = check_local_client(req) {
            return text(StatusCode::FORBIDDEN, why);
        }
    }
    if let (Endpoint::Errors, Some(serving)) = (&endpoint, &state.serving) {
        // Source errors, and the manifests the serving controller refused.
        let mut errors = state.ingress.errors();
        errors.extend(serving.errors());
        return json(StatusCode::OK, &serde_json::json!({ "errors": errors }));
    }
    if !endpoint.needs_serving() {
        return ingress_endpoint(&state.ingress, endpoint);
    }
    let Some(serving) = &state.serving else {
        return text(
            StatusCode::NOT_FOUND,
            "`knarr serve` runs no Knative Services (it programs Envoy from KIngresses); \
             use `knarr up` for Services, Configurations, Revisions, Routes and pods",
        );
    };
    match (endpoint, req.method()) {
        (Endpoint::List(kind), _) => {
            let query = req.uri().query();
            let namespace = query_param(query, "namespace");
            let view = serving.view();
            if query_param(query, "as") == Some("table") {
                return json(StatusCode::OK, &table::view_table(&view, kind, namespace));
            }
            let objects = view.objects(kind, namespace);
            let items: Vec<serde_json::Value> =
                objects.iter().map(ServingObject::manifest).collect();
            json(StatusCode::OK, &Items { items: &items })
        }
        (Endpoint::Object(kind, ns, name), &Method::DELETE) => {
            match serving.delete(&ServingKey::new(kind, ns, name)) {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "deleted": ServingKey::new(kind, ns, name).to_string() }),
                ),
                Err(e @ DeleteError::NotFound(..)) => text(StatusCode::NOT_FOUND, e),
                Err(e @ DeleteError::Owned(..)) => text(StatusCode::CONFLICT, e),
            }
        }
        (Endpoint::Object(kind, ns, name), _) => {
            let key = ServingKey::new(kind, ns, name);
            match serving.view().get(&key) {
                Some(object) if query_param(req.uri().query(), "as") == Some("table") => {
                    json(StatusCode::OK, &table::table(kind, [&object]))
                }
                Some(object) => json(StatusCode::OK, &object.manifest()),
                None => text(StatusCode::NOT_FOUND, format!("{key} not found")),
            }
        }
        (Endpoint::Pods(ns, name), _) => match serving.pods(ns, name) {
            Some(items) => json(StatusCode::OK, &PodList { items }),
            None => text(
                StatusCode::NOT_FOUND,
                format!("no Service, Configuration or Revision {ns}/{name}"),
            ),
        },
        (Endpoint::Apply, _) => apply(serving, req),
        _ => unreachable!("the other endpoints do not need the serving controller"),
    }
}

fn ingress_endpoint(
    controller: &IngressController,
    endpoint: Endpoint<'_>,
) -> Response<Full<Bytes>> {
    match endpoint {
        Endpoint::Ingresses => json(
            StatusCode::OK,
            &serde_json::json!({ "items": controller.reports() }),
        ),
        Endpoint::Ingress(namespace, name) => match controller
            .reports()
            .into_iter()
            .find(|r| r.metadata.namespace == namespace && r.metadata.name == name)
        {
            Some(report) => json(StatusCode::OK, &report),
            None => text(
                StatusCode::NOT_FOUND,
                format!("no ingress {namespace}/{name}"),
            ),
        },
        Endpoint::Errors => json(
            StatusCode::OK,
            &serde_json::json!({ "errors": controller.errors() }),
        ),
        _ => unreachable!("serving endpoints are answered by the serving controller"),
    }
}

fn apply(serving: &ServingController, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    let header_text = |name: &str| -> Result<Option<String>, String> {
        match req.headers().get(name) {
            None => Ok(None),
            Some(value) => decode_header_text(value.as_bytes())
                .map(Some)
                .ok_or_else(|| format!("{name}: not percent-encoded UTF-8")),
        }
    };
    let (source, base_dir) = match (header_text(SOURCE_HEADER), header_text(BASE_DIR_HEADER)) {
        (Ok(source), Ok(base_dir)) => (source, base_dir),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, e),
    };
    let source = source.unwrap_or_else(|| "manifest".into());
    if let Some(dir) = &base_dir {
        if !Path::new(dir).is_absolute() {
            return text(
                StatusCode::BAD_REQUEST,
                format!("{BASE_DIR_HEADER}: {dir:?} is not an absolute path"),
            );
        }
    }
    let Ok(manifest) = std::str::from_utf8(req.body()) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{source}: the manifest is not UTF-8 text"),
        );
    };
    match serving.apply_manifest(&source, manifest, base_dir.as_deref().map(Path::new)) {
        Ok(applied) => json(
            StatusCode::OK,
            &ApplyAnswer {
                applied,
                errors: Vec::new(),
            },
        ),
        Err(errors) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &ApplyAnswer {
                applied: Vec::new(),
                errors,
            },
        ),
    }
}

/// Refuses requests a web page could have made: browsers send `Origin` with every `POST` and
/// `DELETE`, and a DNS-rebound page names the API by its own host name. `knarr` itself sends
/// neither, and uses the address it connects to as `Host`.
fn check_local_client(req: &Request<Bytes>) -> Result<(), String> {
    if req.headers().contains_key(header::ORIGIN) {
        return Err(
            "requests from web pages (with an Origin header) may not change objects".into(),
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    // An IP literal cannot be rebound; `localhost` resolves locally.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    if name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        Ok(())
    } else {
        Err(format!(
            "Host {host:?}: changes are only taken with an IP address or localhost as Host"
        ))
    }
}

/// The first value of `name` in a query string (values here are Kubernetes names, which need
/// no decoding).
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// Percent-encodes `text` for a header value: file names may hold any character, header values
/// only visible ASCII.
pub fn encode_header_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_graphic() && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_header_text`]; `None` when the result is not UTF-8 or an escape is
/// malformed.
pub fn decode_header_text(value: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        if byte == b'%' {
            let hex = [*bytes.next()?, *bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(byte);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use knarr_runtime::{PodStatus, RevisionRef, Runtime, RuntimeError};
    use knarr_translate::kingress::GatewayConfig;
    use knarr_translate::reconcile::{ClassFilter, IngressIndex};
    use knarr_xds::{Clients, NodeGrouping, SnapshotCache};

    use crate::routes_file::Routes;
    use crate::status::LoadBalancerNames;

    /// A runtime with no pods.
    struct NoPods(watch::Sender<u64>);

    impl Runtime for NoPods {
        fn scale(&self, _: &RevisionRef, _: usize) -> Result<(), RuntimeError> {
            Ok(())
        }
        fn pods(&self, _: &str) -> Vec<PodStatus> {
            Vec::new()
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.0.subscribe()
        }
        fn changed_since(&self, since: u64) -> (u64, Vec<String>) {
            (since, Vec::new())
        }
    }

    fn ingress() -> Arc<IngressController> {
        Arc::new(IngressController::new(
            IngressIndex::new(GatewayConfig::default(), ClassFilter::default()),
            Arc::new(SnapshotCache::new(NodeGrouping::NodeId)),
            Arc::new(Clients::default()),
            Routes::default(),
            LoadBalancerNames::default(),
        ))
    }

    /// As under `knarr serve`.
    fn serve_state() -> ApiState {
        ApiState {
            ingress: ingress(),
            serving: None,
        }
    }

    /// As under `knarr up`, with nothing applied.
    fn up_state() -> ApiState {
        let ingress = ingress();
        let runtime = Arc::new(NoPods(watch::Sender::new(0)));
        ApiState {
            serving: Some(ServingController::new(
                "example.com",
                ingress.clone(),
                runtime,
            )),
            ingress,
        }
    }

    fn request(method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:18001")
    }

    fn call(state: &ApiState, req: &Request<Bytes>) -> (StatusCode, String) {
        use http_body_util::BodyExt as _;
        let resp = handle(state, req);
        let status = resp.status();
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn send(state: &ApiState, method: Method, path: &str) -> (StatusCode, String) {
        call(state, &request(method, path).body(Bytes::new()).unwrap())
    }

    #[test]
    fn ingresses_and_errors_are_served_by_both_commands() {
        for state in [serve_state(), up_state()] {
            let (status, body) = send(&state, Method::GET, "/api/v1/ingresses");
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&body).unwrap(),
                serde_json::json!({ "items": [] })
            );
            let (status, _) = send(&state, Method::GET, "/api/v1/errors/");
            assert_eq!(status, StatusCode::OK);
            let (status, body) = send(&state, Method::GET, "/api/v1/ingresses/default/hello");
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert_eq!(body, "no ingress default/hello\n");
        }
    }

    #[test]
    fn knarr_serve_says_to_use_knarr_up_for_serving_objects() {
        let state = serve_state();
        for (method, path) in [
            (Method::GET, "/api/v1/services"),
            (Method::GET, "/api/v1/revisions/default/hello-00001"),
            (Method::DELETE, "/api/v1/routes/default/hello"),
            (Method::POST, "/api/v1/apply"),
            (Method::GET, "/api/v1/pods/default/hello"),
        ] {
            let (status, body) = send(&state, method.clone(), path);
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(body.contains("use `knarr up`"), "{method} {path}: {body}");
        }
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let state = up_state();
        for path in [
            "/",
            "/api/v1",
            "/api/v1/widgets",
            "/api/v1/services/default",
            "/api/v1/pods/default",
        ] {
            assert_eq!(
                send(&state, Method::GET, path).0,
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
        for (method, path, allow) in [
            (Method::POST, "/api/v1/ingresses", "GET"),
            (Method::DELETE, "/api/v1/services", "GET"),
            (Method::PUT, "/api/v1/services/default/hello", "GET, DELETE"),
            (Method::GET, "/api/v1/apply", "POST"),
            (Method::DELETE, "/api/v1/pods/default/hello", "GET"),
        ] {
            let resp = handle(
                &state,
                &request(method.clone(), path).body(Bytes::new()).unwrap(),
            );
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(resp.headers()[header::ALLOW], allow, "{method} {path}");
        }
    }

    #[test]
    fn serving_endpoints_reach_the_controller() {
        let state = up_state();
        let (status, body) = send(&state, Method::GET, "/api/v1/services?namespace=default");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({ "items": [] })
        );
        let (status, body) = send(&state, Method::GET, "/api/v1/services/default/hello");
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::NOT_FOUND, "Service default/hello not found\n")
        );
        let (status, body) = send(&state, Method::DELETE, "/api/v1/routes/default/hello");
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::NOT_FOUND, "Route default/hello not found\n")
        );
        let (status, body) = send(&state, Method::GET, "/api/v1/pods/default/hello");
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            "no Service, Configuration or Revision default/hello\n"
        );
    }

    #[test]
    fn changes_from_web_pages_are_refused() {
        let state = up_state();
        let from_page = request(Method::DELETE, "/api/v1/services/default/hello")
            .header(header::ORIGIN, "https://example.com")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(call(&state, &from_page).0, StatusCode::FORBIDDEN);
        let rebound = Request::delete("/api/v1/services/default/hello")
            .header(header::HOST, "attacker.example:18001")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(call(&state, &rebound).0, StatusCode::FORBIDDEN);
        for host in ["localhost:18001", "[::1]:18001", "127.0.0.1"] {
            let local = Request::delete("/api/v1/services/default/hello")
                .header(header::HOST, host)
                .body(Bytes::new())
                .unwrap();
            assert_eq!(call(&state, &local).0, StatusCode::NOT_FOUND, "{host}");
        }
    }

    #[test]
    fn apply_checks_its_headers() {
        let state = up_state();
        let relative = request(Method::POST, "/api/v1/apply")
            .header(BASE_DIR_HEADER, "examples/hello")
            .body(Bytes::new())
            .unwrap();
        let (status, body) = call(&state, &relative);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("not an absolute path"), "{body}");
        let not_utf8 = request(Method::POST, "/api/v1/apply")
            .header(SOURCE_HEADER, "hello.yaml")
            .body(Bytes::from_static(b"\xff\xfe"))
            .unwrap();
        let (status, body) = call(&state, &not_utf8);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, "hello.yaml: the manifest is not UTF-8 text\n");
    }

    #[test]
    fn header_text_round_trips() {
        for text in ["hello.yaml", "/tmp/my apps/ünïcode%20.yaml", "a\nb", ""] {
            let encoded = encode_header_text(text);
            assert!(http::HeaderValue::from_str(&encoded).is_ok(), "{encoded}");
            assert_eq!(
                decode_header_text(encoded.as_bytes()).as_deref(),
                Some(text)
            );
        }
        assert_eq!(decode_header_text(b"50%"), None);
        assert_eq!(decode_header_text(b"%zz"), None);
        assert_eq!(decode_header_text(b"%ff"), None);
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("namespace=prod"), "namespace"),
            Some("prod")
        );
        assert_eq!(query_param(Some("a=b&namespace=x"), "namespace"), Some("x"));
        assert_eq!(query_param(Some("namespace="), "namespace"), None);
        assert_eq!(query_param(None, "namespace"), None);
    }
}
