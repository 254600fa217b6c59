//! Knative's ingress conformance cases about protocols and change, through the real Envoy over
//! delta ADS (and `update` over state-of-the-world too): basics/http2, grpc and grpc/split,
//! websocket and websocket/split, retry, timeout, tls, httpoption and update.
//!
//! Backends are the project's own servers (`Upstream`, `GrpcEcho`, `WebSocketEcho`); objects are
//! the Knative/Kubernetes YAML a Knative controller would produce. Every port is 0 and every wait
//! is on a condition (Envoy's ACK, a poll, or the traffic itself), never a fixed sleep.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use knarr_tests::conformance::{https_get_with_alpn, LeafCert, RequestRecord};
use knarr_tests::kfixture::{ingress, service_yaml, simple_rule, KFixture, WAIT};
use knarr_tests::{
    https_get, poll_until, ws_connect, GrpcEcho, GrpcStreamClient, HttpClient, LoadGenerator,
    TestCa, Upstream, WebSocketEcho,
};

/// An external rule for `host` splitting evenly between two services.
fn split_rule(host: &str, a: &str, b: &str) -> String {
    let split = |s: &str| {
        format!("        - serviceName: {s}\n          servicePort: 80\n          percent: 50\n          appendHeaders: {{Knative-Serving-Revision: {s}, Knative-Serving-Namespace: default}}\n")
    };
    format!(
        "  - hosts: [{host}]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n{}{}",
        split(a),
        split(b)
    )
}

/// A `kubernetes.io/tls` Secret in namespace `default` holding `leaf`.
fn tls_secret_yaml(name: &str, leaf: &LeafCert) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: {name}, namespace: default}}\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&leaf.cert_pem),
        indent(&leaf.key_pem)
    )
}

/// The `spec.tls` block for one host and secret.
fn tls_spec(host: &str, secret: &str) -> String {
    format!("  tls:\n  - hosts: [{host}]\n    secretName: {secret}\n    secretNamespace: default\n")
}

/// Applies a TLS Secret for `leaf` and an ingress `name` serving `host` over TLS with
/// `http_option` and `rules`, then waits until HTTPS answers 200. Returns the HTTPS address.
async fn apply_tls_ingress(
    f: &mut KFixture,
    name: &str,
    host: &str,
    ca: &TestCa,
    leaf: &LeafCert,
    http_option: &str,
    rules: &str,
) -> SocketAddr {
    let cert = format!("{name}-cert");
    f.apply_yaml(&format!(
        "{}\n---\n{}",
        tls_secret_yaml(&cert, leaf),
        ingress(
            name,
            &format!(
                "  httpOption: {http_option}\n{}  rules:\n{rules}",
                tls_spec(host, &cert)
            ),
        )
    ))
    .await
    .unwrap();
    let https = f.https_addr().await.unwrap();
    poll_until("https to answer 200", WAIT, || async {
        https_get(https, host, "/", ca.cert_pem())
            .await
            .is_ok_and(|r| r.reply.status == 200)
    })
    .await
    .unwrap();
    https
}

/// Polls until a request for `host` on `client` reaches a backend (its answer carries
/// `x-upstream`). Sends a Knative probe (`K-Network-Probe: probe`), which `Upstream` answers
/// without counting it as a request and `GrpcEcho` rejects with 415: either way it is not a real
/// request, so backends that count or fail their first requests are not disturbed.
async fn wait_routed(client: &HttpClient, host: &str) {
    poll_until(&format!("{host} to reach a backend"), WAIT, || async {
        let req = Request::get("/")
            .header("host", host)
            .header("k-network-probe", "probe")
            .body(Bytes::new())
            .unwrap();
        client
            .send(req)
            .await
            .is_ok_and(|r| r.header("x-upstream").is_some())
    })
    .await
    .unwrap();
}

/// Polls until a websocket upgrade for `host` through `addr` succeeds.
async fn wait_ws_routed(addr: SocketAddr, host: &str) {
    poll_until(&format!("websocket {host} to upgrade"), WAIT, || async {
        match ws_connect(addr, host, "/").await {
            Ok(ws) => ws.close().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// basics/http2

#[tokio::test]
async fn http2_backend_port_gets_http2() {
    let mut f = KFixture::start(true).await.unwrap();
    // Knative names an h2c port `http2` (or `h2c`); anything else is HTTP/1.1 to the backend.
    let cases = [("h2", "http2"), ("h2c", "h2c"), ("h1", "http")];
    let mut ups = Vec::new();
    let mut rules = String::new();
    for (name, port_name) in cases {
        let up = Upstream::start(name).await.unwrap();
        f.apply_yaml(&service_yaml(name, port_name, up.addr()))
            .await
            .unwrap();
        rules.push_str(&simple_rule(
            &format!("{name}.example.com"),
            name,
            "ExternalIP",
        ));
        ups.push(up);
    }
    f.apply_yaml(&ingress("http2", &format!("  rules:\n{rules}")))
        .await
        .unwrap();
    let h2_client = HttpClient::h2c(f.external_addr);
    for (name, port_name) in cases {
        let host = format!("{name}.example.com");
        KFixture::wait_200(&f.external, &host, "/").await.unwrap();
        let want = if port_name == "http" {
            "HTTP/1.1"
        } else {
            "HTTP/2"
        };
        // Whatever the client speaks to the gateway, the port name decides the upstream protocol.
        for client in [&f.external, &h2_client] {
            let r = client.get(&host, "/").await.unwrap();
            assert_eq!((r.status, r.body.as_str()), (200, name));
            assert_eq!(
                r.header("x-upstream-proto"),
                Some(want),
                "port named {port_name:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// grpc, grpc/split

const GRPC_PATH: &str = "/echo.Echo/Stream";

#[tokio::test]
async fn grpc_hundred_round_trips_on_one_stream() {
    let mut f = KFixture::start(true).await.unwrap();
    let echo = GrpcEcho::start("grpc").await.unwrap();
    f.expose("grpc", "h2c", echo.addr(), "grpc.example.com")
        .await
        .unwrap();
    wait_routed(&f.external, "grpc.example.com").await;

    let mut call = GrpcStreamClient::connect(f.external_addr, "grpc.example.com", GRPC_PATH)
        .await
        .unwrap();
    for i in 0..100 {
        let message = format!("message {i}");
        let reply = call.send(message.as_bytes()).await.unwrap();
        assert_eq!(reply, message.as_bytes(), "round trip {i}");
    }
    let (status, headers) = call.response_headers().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-upstream"], "grpc");
    assert_eq!(headers["x-upstream-proto"], "HTTP/2");
    assert_eq!(headers["x-echo-knative-serving-revision"], "grpc");
    let trailers = call.finish().await.unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(echo.streams(), 1, "all 100 messages went over one stream");
}

#[tokio::test]
async fn grpc_split_reaches_both_backends() {
    let mut f = KFixture::start(true).await.unwrap();
    let a = GrpcEcho::start("grpc-a").await.unwrap();
    let b = GrpcEcho::start("grpc-b").await.unwrap();
    f.apply_yaml(&service_yaml("grpc-a", "h2c", a.addr()))
        .await
        .unwrap();
    f.apply_yaml(&service_yaml("grpc-b", "http2", b.addr()))
        .await
        .unwrap();
    f.apply_rules(
        "grpc-split",
        &split_rule("grpc-split.example.com", "grpc-a", "grpc-b"),
    )
    .await
    .unwrap();
    wait_routed(&f.external, "grpc-split.example.com").await;

    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let mut call =
            GrpcStreamClient::connect(f.external_addr, "grpc-split.example.com", GRPC_PATH)
                .await
                .unwrap();
        let message = format!("stream {i}");
        assert_eq!(
            call.send(message.as_bytes()).await.unwrap(),
            message.as_bytes()
        );
        let upstream = call.upstream().await.unwrap();
        let (_, headers) = call.response_headers().await.unwrap();
        // The split's own headers go with the split that was chosen.
        assert_eq!(
            headers["x-echo-knative-serving-revision"],
            upstream.as_str()
        );
        call.finish().await.unwrap();
        seen.insert(upstream);
    }
    assert_eq!(
        seen,
        BTreeSet::from(["grpc-a".to_owned(), "grpc-b".to_owned()])
    );
    assert_eq!(a.streams() + b.streams(), 20);
}

// ---------------------------------------------------------------------------------------------
// websocket, websocket/split

#[tokio::test]
async fn websocket_hundred_echoes() {
    let mut f = KFixture::start(true).await.unwrap();
    let echo = WebSocketEcho::start("ws").await.unwrap();
    f.expose("ws", "http", echo.addr(), "ws.example.com")
        .await
        .unwrap();
    wait_ws_routed(f.external_addr, "ws.example.com").await;
    let before = echo.connections();

    let mut ws = ws_connect(f.external_addr, "ws.example.com", "/chat")
        .await
        .unwrap();
    assert_eq!(ws.status(), 101);
    assert_eq!(ws.upstream(), Some("ws"));
    assert_eq!(ws.headers()["x-echo-knative-serving-revision"], "ws");
    for i in 0..100 {
        let text = format!("echo {i}");
        assert_eq!(ws.echo(&text).await.unwrap(), text, "echo {i}");
    }
    ws.close().await.unwrap();
    assert_eq!(echo.connections(), before + 1);
}

#[tokio::test]
async fn websocket_split_reaches_both_backends() {
    let mut f = KFixture::start(true).await.unwrap();
    let a = WebSocketEcho::start("ws-a").await.unwrap();
    let b = WebSocketEcho::start("ws-b").await.unwrap();
    for (name, echo) in [("ws-a", &a), ("ws-b", &b)] {
        f.apply_yaml(&service_yaml(name, "http", echo.addr()))
            .await
            .unwrap();
    }
    f.apply_rules(
        "ws-split",
        &split_rule("ws-split.example.com", "ws-a", "ws-b"),
    )
    .await
    .unwrap();
    wait_ws_routed(f.external_addr, "ws-split.example.com").await;

    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let mut ws = ws_connect(f.external_addr, "ws-split.example.com", "/")
            .await
            .unwrap();
        let upstream = ws.upstream().unwrap_or_default().to_owned();
        assert_eq!(
            ws.headers()["x-echo-knative-serving-revision"],
            upstream.as_str()
        );
        let text = format!("connection {i}");
        assert_eq!(ws.echo(&text).await.unwrap(), text);
        ws.close().await.unwrap();
        seen.insert(upstream);
    }
    assert_eq!(seen, BTreeSet::from(["ws-a".to_owned(), "ws-b".to_owned()]));
}

// ---------------------------------------------------------------------------------------------
// retry

#[tokio::test]
async fn retry_the_first_503_reaches_the_client() {
    let mut f = KFixture::start(true).await.unwrap();
    let up = Upstream::builder("flaky")
        .fail_first(1, 503)
        .start()
        .await
        .unwrap();
    f.expose("flaky", "http", up.addr(), "flaky.example.com")
        .await
        .unwrap();
    // Probes are not requests: the failure is still unused.
    wait_routed(&f.external, "flaky.example.com").await;
    assert_eq!(up.requests(), 0);

    let first = f.external.get("flaky.example.com", "/").await.unwrap();
    assert_eq!(
        (first.status, first.header("x-upstream")),
        (503, Some("flaky")),
        "the backend's own 503 reaches the client: {first:?}"
    );
    assert_eq!(up.requests(), 1, "Envoy did not retry");
    let second = f.external.get("flaky.example.com", "/").await.unwrap();
    assert_eq!((second.status, second.body.as_str()), (200, "flaky"));
    assert_eq!(up.requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// timeout

/// How long the slow backends stall: Knative's conformance value.
const STALL: Duration = Duration::from_secs(10);

/// What a slow exchange looked like to the client.
#[derive(Debug)]
struct SlowReply {
    status: u16,
    upstream: Option<String>,
    headers_after: Duration,
    body: String,
    total: Duration,
}

/// `GET /` for `host` through `addr` over HTTP/1.1, with a deadline well past [`STALL`] (the
/// shared clients give up after 10 s, which is exactly the stall).
async fn slow_get(addr: SocketAddr, host: &str) -> anyhow::Result<SlowReply> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let started = Instant::now();
        let req = Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let headers_after = started.elapsed();
        let status = resp.status().as_u16();
        let upstream = resp
            .headers()
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await?.to_bytes();
        let total = started.elapsed();
        conn.abort();
        anyhow::Ok(SlowReply {
            status,
            upstream,
            headers_after,
            body: String::from_utf8_lossy(&body).into_owned(),
            total,
        })
    };
    tokio::time::timeout(STALL * 3, exchange)
        .await
        .with_context(|| {
            format!(
                "GET {host} via {addr}: no complete response in {:?}",
                STALL * 3
            )
        })?
        .with_context(|| format!("GET {host} via {addr}"))
}

/// Both sub-cases of Knative's `timeout` conformance test, run concurrently so the test costs
/// one stall (~10 s) rather than two.
#[tokio::test]
async fn timeout_slow_backends_succeed() {
    let mut f = KFixture::start(true).await.unwrap();
    // Sub-case "before headers": the backend waits 10 s, then answers.
    let before = Upstream::builder("slow-headers")
        .delay_before_headers(STALL)
        .start()
        .await
        .unwrap();
    // Sub-case "after headers": the backend sends headers and half the body, waits 10 s, then
    // sends the rest.
    let after = Upstream::builder("slow-body")
        .delay_in_body(STALL)
        .start()
        .await
        .unwrap();
    f.apply_yaml(&service_yaml("slow-headers", "http", before.addr()))
        .await
        .unwrap();
    f.apply_yaml(&service_yaml("slow-body", "http", after.addr()))
        .await
        .unwrap();
    f.apply_yaml(&ingress(
        "slow",
        &format!(
            "  rules:\n{}{}",
            simple_rule("slow-headers.example.com", "slow-headers", "ExternalIP"),
            simple_rule("slow-body.example.com", "slow-body", "ExternalIP")
        ),
    ))
    .await
    .unwrap();
    // Probes are answered at once, without the stall.
    wait_routed(&f.external, "slow-headers.example.com").await;
    wait_routed(&f.external, "slow-body.example.com").await;

    let (before_reply, after_reply) = tokio::join!(
        slow_get(f.external_addr, "slow-headers.example.com"),
        slow_get(f.external_addr, "slow-body.example.com"),
    );

    // Before headers: a 200 from the backend after the whole stall.
    let r = before_reply.unwrap();
    assert_eq!(
        (r.status, r.upstream.as_deref(), r.body.as_str()),
        (200, Some("slow-headers"), "slow-headers"),
        "{r:?}"
    );
    assert!(r.headers_after >= STALL, "{r:?}");

    // After headers: headers at once, the body completes after the stall.
    let r = after_reply.unwrap();
    assert_eq!(
        (r.status, r.upstream.as_deref(), r.body.as_str()),
        (200, Some("slow-body"), "slow-body"),
        "{r:?}"
    );
    assert!(r.headers_after < STALL, "headers were held back: {r:?}");
    assert!(r.total >= STALL, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// tls, httpoption

#[tokio::test]
async fn tls_serves_https_and_http_on_one_host() {
    let mut f = KFixture::start(true).await.unwrap();
    let host = "secure.example.com";
    let up = Upstream::start("secure").await.unwrap();
    // A second backend on another host, so the right one answering means something.
    let other = Upstream::start("other").await.unwrap();
    let ca = TestCa::new().unwrap();
    let leaf = ca.issue(&[host]).unwrap();
    f.apply_yaml(&service_yaml("secure", "http", up.addr()))
        .await
        .unwrap();
    f.apply_yaml(&service_yaml("other", "http", other.addr()))
        .await
        .unwrap();
    let https = apply_tls_ingress(
        &mut f,
        "secure",
        host,
        &ca,
        &leaf,
        "Enabled",
        &(simple_rule(host, "secure", "ExternalIP")
            + &simple_rule("other.example.com", "other", "ExternalIP")),
    )
    .await;

    // HTTPS with SNI = host, over whichever protocol ALPN settles on.
    let got = https_get(https, host, "/", ca.cert_pem()).await.unwrap();
    assert_eq!(got.alpn.as_deref(), Some("h2"), "the gateway offers h2");
    assert_eq!((got.reply.status, got.reply.body.as_str()), (200, "secure"));
    assert_eq!(
        got.reply.header("x-echo-knative-serving-revision"),
        Some("secure")
    );
    let got = https_get_with_alpn(https, host, "/", ca.cert_pem(), &["http/1.1"])
        .await
        .unwrap();
    assert_eq!(got.alpn.as_deref(), Some("http/1.1"));
    assert_eq!((got.reply.status, got.reply.body.as_str()), (200, "secure"));

    // Plain HTTP on the external listener serves the same host too (httpOption Enabled).
    let plain = f.external.get(host, "/").await.unwrap();
    assert_eq!((plain.status, plain.body.as_str()), (200, "secure"));
    let plain = f.external.get("other.example.com", "/").await.unwrap();
    assert_eq!((plain.status, plain.body.as_str()), (200, "other"));

    // The cluster-local HTTPS listener serves the host too (external rules are reachable
    // from inside the cluster).
    let internal_https = f.internal_https_addr().await.unwrap();
    let got = https_get(internal_https, host, "/", ca.cert_pem())
        .await
        .unwrap();
    assert_eq!((got.reply.status, got.reply.body.as_str()), (200, "secure"));
}

#[tokio::test]
async fn httpoption_redirected_sends_plain_http_to_https() {
    let mut f = KFixture::start(true).await.unwrap();
    let host = "redirect.example.com";
    let up = Upstream::start("redirect").await.unwrap();
    let ca = TestCa::new().unwrap();
    let leaf = ca.issue(&[host]).unwrap();
    f.apply_yaml(&service_yaml("redirect", "http", up.addr()))
        .await
        .unwrap();
    let https = apply_tls_ingress(
        &mut f,
        "redirect",
        host,
        &ca,
        &leaf,
        "Redirected",
        &simple_rule(host, "redirect", "ExternalIP"),
    )
    .await;
    let requests = up.requests();

    // Plain HTTP on the external gateway: a redirect to https, and the backend is not bothered.
    let r = f.external.get(host, "/some/path?q=1").await.unwrap();
    assert_eq!(r.status, 301, "{r:?}");
    let location = r.header("location").unwrap_or_default();
    assert!(
        location.starts_with(&format!("https://{host}")),
        "location {location:?}"
    );
    assert!(
        location.ends_with("/some/path?q=1"),
        "location {location:?}"
    );
    assert_eq!(up.requests(), requests);

    // HTTPS still serves.
    let got = https_get(https, host, "/", ca.cert_pem()).await.unwrap();
    assert_eq!(
        (got.reply.status, got.reply.body.as_str()),
        (200, "redirect")
    );

    // The cluster-local gateway still serves plain HTTP.
    let inside = f.internal.get(host, "/").await.unwrap();
    assert_eq!((inside.status, inside.body.as_str()), (200, "redirect"));
}

// ---------------------------------------------------------------------------------------------
// update

const UPDATE_HOST: &str = "update.example.com";
/// The header each version of the ingress sets, and the backend's echo of it.
const VERSION_HEADER: &str = "x-version";
const VERSION_ECHO: &str = "x-echo-x-version";

/// What one version of the ingress serves: the header value and the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Served {
    header: String,
    backend: String,
}

impl Served {
    fn of(r: &RequestRecord) -> Served {
        Served {
            header: r.header.clone().unwrap_or_default(),
            backend: r.upstream.clone().unwrap_or_default(),
        }
    }
}

fn update_ingress(v: &Served) -> String {
    ingress(
        "update",
        &format!(
            "  rules:\n  - hosts: [{UPDATE_HOST}]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - serviceName: {b}\n          servicePort: 80\n          percent: 100\n          appendHeaders: {{{VERSION_HEADER}: {h}, Knative-Serving-Revision: {b}, Knative-Serving-Namespace: default}}\n",
            b = v.backend,
            h = v.header
        ),
    )
}

/// One apply of the run: when it started and when it returned (Envoy had ACKed).
struct Step {
    served: Served,
    applied: Instant,
    returned: Instant,
}

/// Waits until at least 36 requests were *sent* after now: each of the 4 workers has at most one
/// request in flight, so 4 + 36 completions guarantee it.
async fn load_progress(load: &LoadGenerator) {
    let target = load.completed() + 40;
    poll_until("load to make progress", WAIT, || async {
        load.completed() >= target
    })
    .await
    .unwrap();
}

/// Knative's `update` case: `header_updates` new header values, then `swaps` backend swaps,
/// under continuous traffic (4 workers). No request may fail, and every request sent after an
/// apply returned must see that version (or a later one whose apply had begun by the time the
/// request ended).
async fn update_under_load(delta: bool, header_updates: usize, swaps: usize) {
    let mut f = KFixture::start(delta).await.unwrap();
    let a = Upstream::start("upd-a").await.unwrap();
    let b = Upstream::start("upd-b").await.unwrap();
    f.apply_yaml(&service_yaml("upd-a", "http", a.addr()))
        .await
        .unwrap();
    f.apply_yaml(&service_yaml("upd-b", "http", b.addr()))
        .await
        .unwrap();
    let initial = Served {
        header: "v0".into(),
        backend: "upd-a".into(),
    };
    f.apply_yaml(&update_ingress(&initial)).await.unwrap();
    KFixture::wait_200(&f.external, UPDATE_HOST, "/")
        .await
        .unwrap();

    let load_started = Instant::now();
    let load = LoadGenerator::builder(f.external.clone(), UPDATE_HOST, "/")
        .concurrency(4)
        .record_header(VERSION_ECHO)
        .max_duration(Duration::from_secs(180))
        .start();
    load_progress(&load).await;

    let mut versions = Vec::new();
    for i in 1..=header_updates {
        versions.push(Served {
            header: format!("v{i}"),
            backend: "upd-a".into(),
        });
    }
    let last_header = format!("v{header_updates}");
    for i in 1..=swaps {
        versions.push(Served {
            header: last_header.clone(),
            backend: if i % 2 == 1 { "upd-b" } else { "upd-a" }.into(),
        });
    }

    let mut steps = vec![Step {
        served: initial,
        applied: load_started,
        returned: load_started,
    }];
    for served in versions {
        let applied = Instant::now();
        f.apply_yaml(&update_ingress(&served)).await.unwrap();
        let returned = Instant::now();
        steps.push(Step {
            served,
            applied,
            returned,
        });
        load_progress(&load).await;
    }
    let summary = load.stop().await;

    assert!(!summary.hit_time_limit);
    assert!(
        summary.errors().is_empty(),
        "errors: {:?}",
        summary.errors()
    );
    summary.ensure_all_ok().unwrap();

    // Each request started after step k returned may see step k, or a later step whose apply had
    // begun before the request ended.
    let mut served_per_step = vec![0usize; steps.len()];
    for r in &summary.requests {
        let k = steps
            .iter()
            .rposition(|s| s.returned <= r.started)
            .expect("step 0 returned before the load started");
        let seen = Served::of(r);
        let allowed: Vec<&Served> = steps[k..]
            .iter()
            .enumerate()
            .filter(|(j, s)| *j == 0 || s.applied <= r.finished)
            .map(|(_, s)| &s.served)
            .collect();
        assert!(
            allowed.contains(&&seen),
            "a request sent {:?} after version {k} ({:?}) was ACKed saw {seen:?}; allowed {allowed:?}",
            r.started - steps[k].returned,
            steps[k].served
        );
        if seen == steps[k].served {
            served_per_step[k] += 1;
        }
    }
    // Every version was served (the loop waited for traffic after each apply).
    for (k, n) in served_per_step.iter().enumerate().skip(1) {
        assert!(
            *n > 0,
            "version {k} ({:?}) was never served",
            steps[k].served
        );
    }
    // Both backends took traffic, and only through the gateway's routes (no request without
    // the header).
    let by_upstream = summary.by_upstream();
    if swaps > 0 {
        assert!(by_upstream.contains_key("upd-b"), "{by_upstream:?}");
    }
    assert!(
        !summary.by_header().contains_key(""),
        "{:?}",
        summary.by_header()
    );
    eprintln!(
        "update ({}): {} requests, {} steps, per backend {by_upstream:?}",
        if delta { "delta" } else { "sotw" },
        summary.total(),
        steps.len() - 1
    );
}

#[tokio::test]
async fn update_under_load_delta() {
    update_under_load(true, 10, 10).await;
}

#[tokio::test]
async fn update_under_load_sotw() {
    update_under_load(false, 3, 3).await;
}
