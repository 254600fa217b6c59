//! knarr-queue-proxy with a real app on loopback: in-process for most cases, as the real binary
//! for signals, and behind the real Envoy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use knarr_proto::Stat;
use knarr_queue_proxy::app::Running;
use knarr_queue_proxy::config::Config;
use knarr_tests::conformance::{ws_connect, LoadGenerator, WebSocketEcho};
use knarr_tests::{http_get, poll_until, HttpClient, ReservedPort, Upstream};
use prost::Message;

const WAIT: Duration = Duration::from_secs(30);

fn env(user_port: u16, extra: &[(&'static str, String)]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("SERVING_NAMESPACE", "default"),
        ("SERVING_CONFIGURATION", "hello"),
        ("SERVING_REVISION", "hello-00001"),
        ("SERVING_POD", "hello-00001-pod"),
        ("SERVING_POD_IP", "127.0.0.1"),
        ("QUEUE_SERVING_PORT", "0"),
        ("CONTAINER_CONCURRENCY", "0"),
        ("REVISION_TIMEOUT_SECONDS", "300"),
        ("KNARR_QUEUE_BIND", "127.0.0.1"),
        ("KNARR_QUEUE_ADMIN_PORT", "0"),
        ("KNARR_QUEUE_METRICS_PORT", "0"),
        ("KNARR_QUEUE_USER_METRICS_PORT", "0"),
        ("KNARR_QUEUE_DRAIN_QUIET_SECONDS", "0.3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    env.insert("USER_PORT".into(), user_port.to_string());
    for (k, v) in extra {
        env.insert((*k).to_owned(), v.clone());
    }
    env
}

async fn start(user_port: u16, extra: &[(&'static str, String)]) -> Running {
    knarr_tests::trace_init();
    Running::start(Config::from_env(&env(user_port, extra)).unwrap())
        .await
        .unwrap()
}

async fn probe_queue(addr: SocketAddr) -> u16 {
    HttpClient::new(addr)
        .get_with("x", "/", &[("K-Network-Probe", "queue")])
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

async fn wait_ready(addr: SocketAddr) {
    poll_until("queue-proxy ready", WAIT, || async {
        probe_queue(addr).await == 200
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn proxies_strips_internal_headers_and_answers_probes() {
    let app = Upstream::start("app").await.unwrap();
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    let client = HttpClient::new(qp.serving_addr);
    let r = client
        .get_with(
            "hello.default.example.com",
            "/some/path?q=1",
            &[
                ("Knative-Serving-Revision", "hello-00001"),
                ("Knative-Serving-Namespace", "default"),
                ("x-keep", "yes"),
            ],
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "app"));
    assert_eq!(r.header("x-upstream-path"), Some("/some/path?q=1"));
    assert_eq!(r.header("x-echo-x-keep"), Some("yes"));
    assert_eq!(r.header("x-echo-knative-serving-revision"), None);
    assert_eq!(r.header("x-echo-knative-serving-namespace"), None);

    // Ingress hash probes are answered here, not by the app, and not counted.
    let before = app.requests();
    let r = client
        .get_with(
            "x",
            "/",
            &[("K-Network-Probe", "probe"), ("K-Network-Hash", "abc123")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("k-network-hash"), Some("abc123"));
    assert_eq!(app.requests(), before);
    assert_eq!(qp.proxy.stats.total_requests(), 1);
}

#[tokio::test]
async fn not_ready_until_the_app_listens() {
    // A port nothing listens on yet, but bound, so nothing else takes it meanwhile.
    let reserved = ReservedPort::new().unwrap();
    let qp = start(reserved.port(), &[]).await;
    assert_eq!(probe_queue(qp.serving_addr).await, 503);
    // And requests meanwhile: the app cannot be reached.
    let r = http_get(qp.serving_addr, "x", "/").await.unwrap();
    assert_eq!(r.status, 502);
    let app = Upstream::builder("late")
        .start_on(reserved.listen().unwrap())
        .unwrap();
    wait_ready(qp.serving_addr).await;
    assert_eq!(
        http_get(qp.serving_addr, "x", "/").await.unwrap().body,
        "late"
    );
    assert_eq!(app.requests(), 1);
}

#[tokio::test]
async fn breaker_queues_then_rejects_with_503() {
    let app = Upstream::builder("slow")
        .delay(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let qp = start(app.port(), &[("CONTAINER_CONCURRENCY", "1".into())]).await;
    wait_ready(qp.serving_addr).await;
    // 1 in flight + 10 queued are accepted; the 12th is turned away at once.
    let mut tasks = Vec::new();
    for _ in 0..11 {
        let addr = qp.serving_addr;
        tasks.push(tokio::spawn(async move {
            http_get(addr, "x", "/").await.unwrap().status
        }));
    }
    poll_until("11 requests taken", WAIT, || async {
        qp.proxy.stats.in_flight() == 11
    })
    .await
    .unwrap();
    let overflow = http_get(qp.serving_addr, "x", "/").await.unwrap();
    assert_eq!(overflow.status, 503);
    assert!(
        overflow.body.contains("pending request queue full"),
        "{}",
        overflow.body
    );
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    poll_until("nothing in flight", WAIT, || async {
        qp.proxy.stats.in_flight() == 0
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn timeouts_answer_504() {
    let app = Upstream::builder("slow")
        .delay(Duration::from_secs(3))
        .start()
        .await
        .unwrap();
    let qp = start(app.port(), &[("REVISION_TIMEOUT_SECONDS", "1".into())]).await;
    wait_ready(qp.serving_addr).await;
    let r = http_get(qp.serving_addr, "x", "/").await.unwrap();
    assert_eq!(r.status, 504);
    let qp = start(
        app.port(),
        &[("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "0.5".into())],
    )
    .await;
    wait_ready(qp.serving_addr).await;
    let r = http_get(qp.serving_addr, "x", "/").await.unwrap();
    assert_eq!(r.status, 504);
}

#[tokio::test]
async fn client_disconnect_mid_request_returns_concurrency_to_zero() {
    let app = Upstream::builder("slow")
        .delay(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let qp = start(app.port(), &[("CONTAINER_CONCURRENCY", "2".into())]).await;
    wait_ready(qp.serving_addr).await;
    let addr = qp.serving_addr;
    let req = tokio::spawn(async move { http_get(addr, "x", "/").await });
    poll_until("request in flight", WAIT, || async {
        qp.proxy.stats.in_flight() == 1
    })
    .await
    .unwrap();
    req.abort();
    poll_until(
        "in flight back to 0 after the client left",
        WAIT,
        || async { qp.proxy.stats.in_flight() == 0 },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn websocket_upgrade_through_the_queue_proxy() {
    let app = WebSocketEcho::start("ws").await.unwrap();
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    let mut ws = ws_connect(qp.serving_addr, "ws.example.com", "/chat")
        .await
        .unwrap();
    for i in 0..20 {
        let msg = format!("hello {i}");
        assert_eq!(ws.echo(&msg).await.unwrap(), msg);
    }
    ws.close().await.unwrap();
}

#[tokio::test]
async fn autoscaler_metrics_decode_as_knative_stat() {
    let app = Upstream::start("app").await.unwrap();
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    let client = HttpClient::new(qp.serving_addr);
    for _ in 0..5 {
        client.get("x", "/").await.unwrap();
    }
    let proxied = client
        .get_with("x", "/", &[("K-Proxy-Request", "activator")])
        .await
        .unwrap();
    assert_eq!(proxied.status, 200);
    let metrics = qp.metrics_addr;
    let stat = Arc::new(std::sync::Mutex::new(Stat::default()));
    let seen = stat.clone();
    poll_until("a report with the requests", WAIT, move || {
        let seen = seen.clone();
        async move {
            let Ok(r) = http_get(metrics, "x", "/metrics").await else {
                return false;
            };
            if r.header("content-type") != Some("application/protobuf") {
                return false;
            }
            let Ok(s) = Stat::decode(r.raw.as_ref()) else {
                return false;
            };
            let done =
                s.request_count >= 6.0 || s.request_count > 0.0 && s.proxied_request_count > 0.0;
            *seen.lock().unwrap() = s;
            done
        }
    })
    .await
    .unwrap();
    let s = stat.lock().unwrap().clone();
    assert_eq!(s.pod_name, "hello-00001-pod");
    assert!(s.process_uptime > 0.0 && s.timestamp > 0);
    // Prometheus for people.
    let text = http_get(qp.user_metrics_addr, "x", "/metrics")
        .await
        .unwrap();
    assert!(text.body.contains("queue_requests_total"), "{}", text.body);
}

#[tokio::test]
async fn malformed_probe_json_is_a_clear_startup_error() {
    let err = Running::start(
        Config::from_env(&env(
            8080,
            &[("SERVING_READINESS_PROBE", "{\"tcpSocket\": ".into())],
        ))
        .unwrap(),
    )
    .await
    .err()
    .expect("startup fails");
    assert!(err.to_string().contains("SERVING_READINESS_PROBE"), "{err}");
}

#[tokio::test]
async fn drain_keeps_serving_until_quiet_then_stops() {
    let app = Upstream::start("app").await.unwrap();
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    let addr = qp.serving_addr;
    let load = LoadGenerator::start(HttpClient::new(addr), "x", "/", 2);
    poll_until("traffic", WAIT, || async { app.requests() > 20 })
        .await
        .unwrap();
    qp.proxy.drainer.start();
    // Probes fail at once; requests are still served.
    assert_eq!(probe_queue(addr).await, 503);
    let served = app.requests();
    poll_until("still serving while draining", WAIT, || async {
        app.requests() > served + 20
    })
    .await
    .unwrap();
    let summary = load.stop().await;
    assert!(
        summary.requests.iter().all(|r| r.status == Some(200)),
        "a request failed while draining"
    );
    // No request for the quiet period: it stops.
    tokio::time::timeout(WAIT, qp.drain_and_stop())
        .await
        .expect("drained and stopped");
    assert!(
        http_get(addr, "x", "/").await.is_err(),
        "still accepting after stopping"
    );
}

#[tokio::test]
async fn envoy_to_queue_proxy_to_app() {
    use knarr_tests::kfixture::{service_yaml, KFixture};
    let app = Upstream::start("app").await.unwrap();
    let qp = start(app.port(), &[("CONTAINER_CONCURRENCY", "10".into())]).await;
    wait_ready(qp.serving_addr).await;
    let mut f = KFixture::start(true).await.unwrap();
    f.apply_yaml(&service_yaml("hello-00001", "http", qp.serving_addr))
        .await
        .unwrap();
    f.apply_yaml(
        "apiVersion: networking.internal.knative.dev/v1alpha1\nkind: Ingress\nmetadata: {name: hello, namespace: default}\nspec:\n  rules:\n  - hosts: [hello.default.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n        - serviceName: hello-00001\n          servicePort: 80\n          percent: 100\n          appendHeaders: {Knative-Serving-Revision: hello-00001, Knative-Serving-Namespace: default}\n",
    )
    .await
    .unwrap();
    let load = LoadGenerator::start(f.external.clone(), "hello.default.example.com", "/", 4);
    poll_until(
        "traffic through Envoy and the queue-proxy",
        WAIT,
        || async { app.requests() > 200 },
    )
    .await
    .unwrap();
    let summary = load.stop().await;
    assert!(
        summary.requests.iter().all(|r| r.status == Some(200)),
        "a request failed"
    );
    let r = f
        .external
        .get("hello.default.example.com", "/")
        .await
        .unwrap();
    assert_eq!(r.body, "app");
    // Envoy set the routing headers; the queue-proxy removed them before the app.
    assert_eq!(r.header("x-echo-knative-serving-revision"), None);
    // The ingress probe goes through Envoy to the queue-proxy, which echoes the hash.
    let hash = f
        .index
        .state(&knarr_model::ObjectKey::new(
            knarr_model::Kind::Ingress,
            "default",
            "hello",
        ))
        .unwrap()
        .hash;
    let probe = f
        .external
        .get_with(
            "hello.default.example.com",
            "/",
            &[("K-Network-Probe", "probe"), ("K-Network-Hash", "override")],
        )
        .await
        .unwrap();
    assert_eq!(probe.header("k-network-hash"), Some(hash.as_str()));
    poll_until("concurrency back to 0", WAIT, || async {
        qp.proxy.stats.in_flight() == 0
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn app_that_resets_connections_gets_502_and_nothing_leaks() {
    // An "app" that accepts and resets every connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            // A zero linger makes the drop send RST at once (so it cannot block).
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
    let qp = start(port, &[("CONTAINER_CONCURRENCY", "1".into())]).await;
    // Such an app never passes the readiness probe (the connection is reset).
    assert_eq!(probe_queue(qp.serving_addr).await, 503);
    for _ in 0..5 {
        let r = http_get(qp.serving_addr, "x", "/").await.unwrap();
        assert_eq!(r.status, 502, "{}", r.body);
    }
    poll_until("nothing in flight", WAIT, || async {
        qp.proxy.stats.in_flight() == 0
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn h2c_on_the_same_port_reaches_the_app_as_http2() {
    let app = Upstream::start("app").await.unwrap();
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    let r = HttpClient::h2c(qp.serving_addr)
        .get("x", "/")
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "app"));
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/2"));
    let r = HttpClient::new(qp.serving_addr)
        .get("x", "/")
        .await
        .unwrap();
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/1.1"));
}

#[tokio::test]
async fn idle_timeout_cuts_a_stalled_response() {
    let app = Upstream::builder("stall")
        .delay_in_body(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let qp = start(
        app.port(),
        &[("REVISION_IDLE_TIMEOUT_SECONDS", "0.3".into())],
    )
    .await;
    wait_ready(qp.serving_addr).await;
    // Headers came at once, then nothing for longer than the idle timeout: the stream is cut.
    assert!(http_get(qp.serving_addr, "x", "/").await.is_err());
    poll_until("nothing in flight", WAIT, || async {
        qp.proxy.stats.in_flight() == 0
    })
    .await
    .unwrap();
    // Without an idle timeout the same response completes.
    let qp = start(app.port(), &[]).await;
    wait_ready(qp.serving_addr).await;
    assert_eq!(
        http_get(qp.serving_addr, "x", "/").await.unwrap().body,
        "stall"
    );
}
