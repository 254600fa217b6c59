//! The activator in-process against real local pods (HTTP servers answering the queue-proxy's
//! probe), on port 0, driven over real sockets.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use knarr_activator::Config;
use knarr_test_support::{wait_until, within, HttpClient, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> Config {
    Config::local()
}

#[tokio::test]
async fn probes_and_unknown_revisions() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let addr = act.listen_addr;

    let probe = send(
        &client,
        request(addr, "")
            .header("k-network-probe", "activator")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!((probe.status, probe.body.as_str()), (200, "activator"));

    let unnamed = get(&client, "").await;
    assert_eq!(unnamed.status, 404);
    assert!(
        unnamed.body.contains("Knative-Serving-Revision"),
        "{}",
        unnamed.body
    );

    let unknown = get(&client, "nope-00001").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body.contains("unknown revision default/nope-00001"),
        "{}",
        unknown.body
    );

    let (status, metrics) = admin_get(act.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"activator_refused_requests_total{reason="unknown_revision"} 2"#),
        "{metrics}"
    );
    assert_eq!(admin_get(act.admin_addr, "/readyz").await.0, 200);
    assert_eq!(admin_get(act.admin_addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn held_until_an_endpoint_answers_its_probe() {
    let (act, mut stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    // Known, no pods: requests wait.
    act.revisions.upsert(revision("hello", 0, 0, &[])).unwrap();
    let pending = spawn_get(&client, "hello");
    wait_until("the request is held", || {
        act.revisions.state("default", "hello").unwrap().held == 1
    })
    .await;

    // The first request for a revision at zero pokes the autoscaler at once.
    let poke = within("a poke", stats.recv()).await.unwrap();
    assert!(poke.poke, "{poke:?}");
    assert_eq!(
        (poke.namespace.as_str(), poke.revision.as_str()),
        ("default", "hello")
    );
    assert_eq!(poke.activator, "activator-test");
    assert_eq!(poke.request_count, 1.0);

    // A pod appears but is not ready yet: probed again and again, not used.
    let pod = Upstream::builder("pod-a").unready().start().await.unwrap();
    act.revisions
        .upsert(revision("hello", 0, 0, &[&pod]))
        .unwrap();
    wait_until("the pod is probed twice", || pod.probes() >= 2).await;
    let state = act.revisions.state("default", "hello").unwrap();
    assert_eq!((state.endpoints, state.ready_pods, state.held), (1, 0, 1));
    assert!(!pending.is_finished());
    assert_eq!(pod.requests(), 0);

    // Ready: the held request goes through.
    pod.set_ready(true);
    let reply = within("the held request", pending).await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a"));
    assert_eq!(pod.requests(), 1);
    assert_eq!(pod.requests_while_unready(), 0);
    let state = act.revisions.state("default", "hello").unwrap();
    assert_eq!((state.ready_pods, state.held, state.capacity), (1, 0, None));
}

#[tokio::test]
async fn a_hundred_held_requests_are_all_served_once_a_pod_appears() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    act.revisions.upsert(revision("burst", 0, 0, &[])).unwrap();
    let pending: Vec<_> = (0..100).map(|_| spawn_get(&client, "burst")).collect();
    wait_until("100 requests are held", || {
        act.revisions.state("default", "burst").unwrap().held == 100
    })
    .await;
    let (_, metrics) = admin_get(act.admin_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "activator_held_requests"), Some(100.0));

    let pod = Upstream::start("pod-a").await.unwrap();
    act.revisions
        .upsert(revision("burst", 0, 0, &[&pod]))
        .unwrap();
    for p in pending {
        let reply = within("a held request", p).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a"));
    }
    assert_eq!(pod.requests(), 100);
    let (_, metrics) = admin_get(act.admin_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "activator_held_requests"), Some(0.0));
    assert_eq!(
        metric(&metrics, "activator_proxied_requests_total"),
        Some(100.0)
    );
}

#[tokio::test]
async fn container_concurrency_one_spreads_over_three_pods() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pods = [
        Upstream::builder("pod-a")
            .delay(Duration::from_millis(20))
            .start()
            .await
            .unwrap(),
        Upstream::builder("pod-b")
            .delay(Duration::from_millis(20))
            .start()
            .await
            .unwrap(),
        Upstream::builder("pod-c")
            .delay(Duration::from_millis(20))
            .start()
            .await
            .unwrap(),
    ];
    act.revisions
        .upsert(revision("cc1", 1, 0, &[&pods[0], &pods[1], &pods[2]]))
        .unwrap();
    wait_until("all pods are ready", || {
        act.revisions.state("default", "cc1").unwrap().ready_pods == 3
    })
    .await;
    assert_eq!(
        act.revisions.state("default", "cc1").unwrap().capacity,
        Some(3)
    );
    let pending: Vec<_> = (0..30).map(|_| spawn_get(&client, "cc1")).collect();
    for p in pending {
        assert_eq!(within("a request", p).await.unwrap().status, 200);
    }
    for pod in &pods {
        assert_eq!(
            pod.max_in_flight(),
            1,
            "{} had more than one in flight",
            pod.name()
        );
        assert!(pod.requests() > 0, "{} got nothing", pod.name());
    }
    assert_eq!(pods.iter().map(Upstream::requests).sum::<u64>(), 30);
}

#[tokio::test]
async fn held_requests_are_served_in_arrival_order() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pod = Upstream::builder("pod-a")
        .gated()
        .record_header("x-order")
        .start()
        .await
        .unwrap();
    act.revisions
        .upsert(revision("fifo", 1, 0, &[&pod]))
        .unwrap();
    wait_until("the pod is ready", || {
        act.revisions.state("default", "fifo").unwrap().ready_pods == 1
    })
    .await;
    let mut pending = Vec::new();
    for i in 0..8 {
        let req = request(act.listen_addr, "fifo")
            .header("x-order", i.to_string())
            .body(Bytes::new())
            .unwrap();
        pending.push(spawn_send(&client, req));
        // Request i is at the pod or held before request i + 1 is sent.
        wait_until("the request is in", || {
            act.revisions.state("default", "fifo").unwrap().in_flight == i + 1
        })
        .await;
    }
    assert_eq!(act.revisions.state("default", "fifo").unwrap().held, 7);
    pod.open();
    for p in pending {
        assert_eq!(within("a request", p).await.unwrap().status, 200);
    }
    let expected: Vec<_> = (0..8).map(|i| i.to_string()).collect();
    assert_eq!(pod.recorded("x-order"), expected);
    assert_eq!(pod.max_in_flight(), 1);
}

#[tokio::test]
async fn queue_overflow_is_503() {
    let (act, _stats) = activator(Config {
        queue_depth: 3,
        ..config()
    })
    .await;
    let client = HttpClient::new(act.listen_addr);
    act.revisions.upsert(revision("full", 0, 0, &[])).unwrap();
    let pending: Vec<_> = (0..3).map(|_| spawn_get(&client, "full")).collect();
    wait_until("3 requests are held", || {
        act.revisions.state("default", "full").unwrap().held == 3
    })
    .await;
    let refused = get(&client, "full").await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (503, "pending request queue full")
    );

    // The queue still drains normally.
    let pod = Upstream::start("pod-a").await.unwrap();
    act.revisions
        .upsert(revision("full", 0, 0, &[&pod]))
        .unwrap();
    for p in pending {
        assert_eq!(within("a held request", p).await.unwrap().status, 200);
    }
    let (_, metrics) = admin_get(act.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(r#"activator_refused_requests_total{reason="queue_full"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn held_past_the_revision_timeout_is_504() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    act.revisions.upsert(revision("slow", 0, 1, &[])).unwrap();
    let started = tokio::time::Instant::now();
    let reply = get(&client, "slow").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (504, "activator request timeout")
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(act.revisions.state("default", "slow").unwrap().held, 0);
}

#[tokio::test]
async fn what_the_pod_sees() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pod = Upstream::builder("pod-a")
        .read_body()
        .hop_by_hop_header()
        .start()
        .await
        .unwrap();
    act.revisions
        .upsert(revision("hdrs", 0, 0, &[&pod]))
        .unwrap();
    let reply = send(
        &client,
        request(act.listen_addr, "hdrs")
            .method("POST")
            .header("host", "hello.default.example.com")
            .header("x-forwarded-for", "203.0.113.9")
            .header("connection", "x-secret")
            .header("x-secret", "hop")
            .body(Bytes::from_static(b"0123456789"))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-upstream-body-len"], "10");
    // The pod's hop-by-hop headers do not come back either.
    assert!(!reply.headers.contains_key("x-upstream-private"));
    let seen = pod.last_request().unwrap().headers;
    assert_eq!(seen["k-proxy-request"], "activator");
    assert_eq!(seen["knative-serving-revision"], "hdrs");
    assert_eq!(seen["knative-serving-namespace"], "default");
    assert_eq!(seen["host"], "hello.default.example.com");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(!seen.contains_key("x-secret"));
}

#[tokio::test]
async fn h2c_is_forwarded_as_h2c() {
    let (act, _stats) = activator(config()).await;
    let pod = Upstream::start("pod-a").await.unwrap();
    act.revisions.upsert(revision("h2", 0, 0, &[&pod])).unwrap();
    let reply = get(&HttpClient::h2c(act.listen_addr), "h2").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a"));
    assert_eq!(reply.header("x-upstream-proto"), Some("HTTP/2"));
    let reply = get(&HttpClient::new(act.listen_addr), "h2").await;
    assert_eq!(reply.header("x-upstream-proto"), Some("HTTP/1.1"));
}

#[tokio::test]
async fn upgrades_pass_through() {
    let (act, _stats) = activator(config()).await;
    let pod = Upstream::builder("pod-a")
        .echo_upgrades()
        .start()
        .await
        .unwrap();
    act.revisions.upsert(revision("ws", 1, 0, &[&pod])).unwrap();
    wait_until("the pod is ready", || {
        act.revisions.state("default", "ws").unwrap().ready_pods == 1
    })
    .await;

    let resp = send_upgrade(act.listen_addr, "ws").await;
    assert_eq!(resp.status(), 101);
    let mut upgraded = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    // The upgraded connection holds the pod's only slot (CC 1).
    assert_eq!(act.revisions.state("default", "ws").unwrap().proxied, 1);
    upgraded.write_all(b"ping over the upgrade").await.unwrap();
    let mut echoed = [0u8; 21];
    within("the echo", upgraded.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"ping over the upgrade");
    drop(upgraded);
    wait_until("the slot is free again", || {
        act.revisions.state("default", "ws").unwrap().proxied == 0
    })
    .await;
}

/// An `Upgrade: echo` request for `revision` on a connection of its own (upgrades allowed).
async fn send_upgrade(
    addr: std::net::SocketAddr,
    revision: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
        .send_request(
            request(addr, revision)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap()
}

/// A pod that refuses an upgrade answers an ordinary response: its body holds the pod's slot
/// and is under the revision's idle timeout, so a pod that stops sending is cut off and the slot
/// comes back.
#[tokio::test]
async fn a_refused_upgrade_is_under_the_idle_timeout() {
    let (act, _stats) = activator(config()).await;
    let pod = Upstream::builder("pod-a")
        .refuse_upgrades(400)
        .start()
        .await
        .unwrap();
    let mut rev = revision("ws", 1, 0, &[&pod]);
    rev.idle_timeout_seconds = 1;
    act.revisions.upsert(rev).unwrap();
    wait_until("the pod is ready", || {
        act.revisions.state("default", "ws").unwrap().ready_pods == 1
    })
    .await;

    let resp = send_upgrade(act.listen_addr, "ws").await;
    assert_eq!(resp.status(), 400);
    // The pod sends the start of its body, then nothing, keeping the body open.
    let refusal = within("the refusal", pod.refused_upgrade()).await;
    refusal.send("refused").unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "refused");
    // The body is still streaming: the slot is taken.
    assert_eq!(act.revisions.state("default", "ws").unwrap().proxied, 1);
    let cut = within("the idle timeout to cut the stalled body", body.frame()).await;
    assert!(matches!(cut, Some(Err(_))), "{cut:?}");
    wait_until("the slot is free again", || {
        act.revisions.state("default", "ws").unwrap().proxied == 0
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_pod_is_502_and_probed_again() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pod = Upstream::start("pod-a").await.unwrap();
    let addr = pod.addr();
    act.revisions
        .upsert(revision("gone", 0, 0, &[&pod]))
        .unwrap();
    assert_eq!(get(&client, "gone").await.status, 200);

    // The pod dies without the control plane noticing yet. (Its server stops asynchronously:
    // a request may still make it just before.)
    drop(pod);
    let mut replies = Vec::new();
    while act.revisions.state("default", "gone").unwrap().ready_pods == 1 {
        let reply = get(&client, "gone").await;
        assert!([200, 502].contains(&reply.status), "{reply:?}");
        replies.push(reply);
        assert!(replies.len() < 10, "{replies:?}");
    }
    assert!(
        replies.iter().any(|r| r.body.contains("cannot reach")),
        "{replies:?}"
    );

    // Meanwhile requests wait; the pod comes back on the same address and is used again.
    let pending = spawn_get(&client, "gone");
    wait_until("the request is held", || {
        act.revisions.state("default", "gone").unwrap().held == 1
    })
    .await;
    let back = Upstream::builder("pod-a-again")
        .listen(addr)
        .start()
        .await
        .unwrap();
    let reply = within("the held request", pending).await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a-again"));
    assert!(back.probes() >= 1);
}

#[tokio::test]
async fn removing_a_revision_answers_its_waiters_503() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    act.revisions.upsert(revision("bye", 0, 0, &[])).unwrap();
    let pending = spawn_get(&client, "bye");
    wait_until("the request is held", || {
        act.revisions.state("default", "bye").unwrap().held == 1
    })
    .await;
    assert!(act.revisions.remove("default", "bye"));
    let reply = within("the held request", pending).await.unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("removed"), "{}", reply.body);
    assert_eq!(get(&client, "bye").await.status, 404);
}

#[tokio::test]
async fn capacity_follows_container_concurrency_changes() {
    let (act, _stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pod = Upstream::builder("pod-a").gated().start().await.unwrap();
    act.revisions
        .upsert(revision("grow", 1, 0, &[&pod]))
        .unwrap();
    let pending: Vec<_> = (0..3).map(|_| spawn_get(&client, "grow")).collect();
    wait_until("one at the pod, two held", || {
        let s = act.revisions.state("default", "grow").unwrap();
        (s.proxied, s.held) == (1, 2) && pod.in_flight() == 1
    })
    .await;
    // CC 1 → 3: the held requests go at once, though the first is still in flight.
    act.revisions
        .upsert(revision("grow", 3, 0, &[&pod]))
        .unwrap();
    wait_until("three at the pod", || pod.in_flight() == 3).await;
    pod.open();
    for p in pending {
        assert_eq!(within("a request", p).await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn stats_report_time_weighted_concurrency() {
    let (act, mut stats) = activator(config()).await;
    let client = HttpClient::new(act.listen_addr);
    let pod = Upstream::builder("pod-a").gated().start().await.unwrap();
    act.revisions
        .upsert(revision("busy", 0, 0, &[&pod]))
        .unwrap();
    wait_until("the pod is ready", || {
        act.revisions.state("default", "busy").unwrap().ready_pods == 1
    })
    .await;
    let pending = spawn_get(&client, "busy");
    wait_until("the request is at the pod", || pod.in_flight() == 1).await;

    // The first report counts the request (part of the period); the next one covers a whole
    // period with it in flight.
    let first = within("a report", stats.recv()).await.unwrap();
    assert!(!first.poke, "ready pod: no poke");
    assert_eq!(first.request_count, 1.0, "{first:?}");
    assert!(
        first.average_concurrency > 0.0 && first.average_concurrency <= 1.0,
        "{first:?}"
    );
    let second = within("a report", stats.recv()).await.unwrap();
    assert_eq!(second.request_count, 0.0, "{second:?}");
    assert!(
        (second.average_concurrency - 1.0).abs() < 0.01,
        "{second:?}"
    );
    assert!(second.timestamp_millis >= first.timestamp_millis + 900);

    pod.open();
    assert_eq!(within("the request", pending).await.unwrap().status, 200);
    // A tick may still have caught the request in flight for a whole period; the first
    // partial period ends the reports: an idle revision is not reported.
    loop {
        let report = within("a report", stats.recv()).await.unwrap();
        if report.average_concurrency < 1.0 {
            break;
        }
    }
    let (_, metrics) = admin_get(act.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(
            r#"activator_revision_in_flight_requests{namespace="default",revision="busy"} 0"#
        ),
        "{metrics}"
    );
    let after = tokio::time::timeout(Duration::from_millis(1500), stats.recv()).await;
    assert!(after.is_err(), "idle revision reported: {after:?}");
}

#[tokio::test]
async fn drain_keeps_serving_held_requests() {
    let (act, _stats) = activator(Config {
        drain_quiet_period: Duration::from_secs(1),
        ..config()
    })
    .await;
    let client = HttpClient::new(act.listen_addr);
    act.revisions.upsert(revision("drain", 0, 0, &[])).unwrap();
    let held = spawn_get(&client, "drain");
    wait_until("the request is held", || {
        act.revisions.state("default", "drain").unwrap().held == 1
    })
    .await;
    let (revisions, admin, listen) = (act.revisions.clone(), act.admin_addr, act.listen_addr);
    let stopped = tokio::spawn(act.drain_and_stop());
    wait_until_async_ready_fails(admin).await;

    // Still serving while draining: a new request is held too; then a pod appears.
    let during = spawn_get(&client, "drain");
    wait_until("two requests are held", || {
        revisions.state("default", "drain").unwrap().held == 2
    })
    .await;
    let pod = Upstream::start("pod-a").await.unwrap();
    revisions.upsert(revision("drain", 0, 0, &[&pod])).unwrap();
    assert_eq!(within("held", held).await.unwrap().status, 200);
    assert_eq!(
        within("held during drain", during).await.unwrap().status,
        200
    );
    within("the drain", stopped).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "still listening"
    );
}

async fn wait_until_async_ready_fails(admin: std::net::SocketAddr) {
    within("readiness fails", async {
        while admin_get(admin, "/readyz").await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_pod_slow_to_start_its_response_is_504() {
    let (act, _stats) = activator(config()).await;
    let pod = Upstream::builder("pod-a").gated().start().await.unwrap();
    let mut rev = revision("mute", 0, 0, &[&pod]);
    rev.response_start_timeout_seconds = 1;
    act.revisions.upsert(rev).unwrap();
    let started = tokio::time::Instant::now();
    let reply = get(&HttpClient::new(act.listen_addr), "mute").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (504, "activator request timeout")
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(pod.requests(), 1);
    wait_until("the slot is free again", || {
        act.revisions.state("default", "mute").unwrap().proxied == 0
    })
    .await;
}
