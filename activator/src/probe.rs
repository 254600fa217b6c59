//! Probes both ways: the ones the activator answers itself, and the one it sends a new pod
//! before using it.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::proxy::{ours, ProxyBody, UpstreamBody};

/// `K-Network-Probe`: marks a probe; its value says what is being probed.
pub const K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
/// `K-Network-Hash`: the ingress prober's hash, echoed back.
pub const K_NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
/// Set by the kubelet on Knative's probes.
pub const K_KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");
/// How long a pod probe may take (Knative: 300 ms).
pub const POD_PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// The user agent of the activator's pod probes; the queue-proxy treats it as a health check.
pub const PROBE_USER_AGENT: &str = "Knative-Activator-Probe";

/// The activator's answer to a probe, or `None` for a request to proxy.
///
/// - `K-Network-Probe: activator` (is the activator in the path?): 200 `activator`.
/// - `K-Network-Probe: probe` with `K-Network-Hash` (the ingress prober): 200, hash echoed.
/// - any other `K-Network-Probe` value: 400, as Knative's activator.
/// - kubelet probes (`K-Kubelet-Probe`, `User-Agent: kube-probe/…`): 200, 503 once draining.
pub fn answer(headers: &HeaderMap, draining: bool) -> Option<Response<ProxyBody>> {
    let kubelet = headers.contains_key(&K_KUBELET_PROBE)
        || headers
            .get(header::USER_AGENT)
            .is_some_and(|ua| ua.as_bytes().starts_with(b"kube-probe/"));
    match headers.get(&K_NETWORK_PROBE).map(HeaderValue::as_bytes) {
        Some(b"activator") => Some(ours(StatusCode::OK, "activator")),
        Some(b"probe") => Some(match headers.get(&K_NETWORK_HASH) {
            Some(hash) if !hash.is_empty() => {
                let mut resp = ours(StatusCode::OK, "probe");
                resp.headers_mut().insert(K_NETWORK_HASH, hash.clone());
                resp
            }
            _ => ours(
                StatusCode::BAD_REQUEST,
                "a probe request must contain a non-empty K-Network-Hash header\n",
            ),
        }),
        Some(other) if !kubelet => {
            let value = String::from_utf8_lossy(other);
            Some(ours(
                StatusCode::BAD_REQUEST,
                format!("unexpected probe header value: {value:?}\n"),
            ))
        }
        _ if kubelet => Some(if draining {
            ours(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        } else {
            ours(StatusCode::OK, "activator")
        }),
        _ => None,
    }
}

/// Why a pod probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeFailure {
    #[error("no answer within {POD_PROBE_TIMEOUT:?}")]
    Timeout,
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("answered 200 but not `queue`")]
    Body,
}

/// `GET /` with `K-Network-Probe: queue`; Ok when the pod's queue-proxy answers 200 `queue`.
/// Uses the proxy's HTTP/1 pool, so the probe's connection is then reused for the first request.
pub async fn probe_pod(
    client: &Client<HttpConnector, UpstreamBody>,
    authority: &http::uri::Authority,
) -> Result<(), ProbeFailure> {
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .expect("scheme, authority and path make a URI");
    let req = Request::get(uri)
        .header(&K_NETWORK_PROBE, "queue")
        .header(header::USER_AGENT, PROBE_USER_AGENT)
        .body(Either::Right(Empty::<Bytes>::new()))
        .expect("a valid request");
    let attempt = async {
        let resp = client.request(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(ProbeFailure::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), 64)
            .collect()
            .await
            .map_err(|_| ProbeFailure::Body)?
            .to_bytes();
        if body.as_ref() != b"queue" {
            return Err(ProbeFailure::Body);
        }
        Ok(())
    };
    tokio::time::timeout(POD_PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| ProbeFailure::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answered(pairs: &[(&str, &str)], draining: bool) -> Option<(u16, String)> {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let resp = answer(&headers, draining)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Some((status, String::from_utf8(body.to_vec()).unwrap()))
    }

    #[tokio::test]
    async fn probes_answered_here() {
        assert_eq!(
            answered(&[("k-network-probe", "activator")], true).await,
            Some((200, "activator".into()))
        );
        let (status, body) = answered(&[("k-network-probe", "queue")], false)
            .await
            .unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("\"queue\""), "{body}");
        assert_eq!(
            answered(
                &[("k-network-probe", "probe"), ("k-network-hash", "h")],
                false
            )
            .await
            .map(|(s, _)| s),
            Some(200)
        );
        assert_eq!(
            answered(&[("k-network-probe", "probe")], false)
                .await
                .map(|(s, _)| s),
            Some(400)
        );
        assert_eq!(
            answered(&[("user-agent", "kube-probe/1.30")], false).await,
            Some((200, "activator".into()))
        );
        assert_eq!(
            answered(&[("k-kubelet-probe", "activator")], true)
                .await
                .map(|(s, _)| s),
            Some(503)
        );
        assert_eq!(answered(&[("user-agent", "curl/8")], false).await, None);
    }
}
