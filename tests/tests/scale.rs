//! Scale to zero and back with `knarr up`: the KPA autoscaler, the activator and the flip of a
//! revision's endpoints between the activator and its pods — through the real Envoy, with the
//! example app as the pods. Windows are shortened with Knative's own knobs (`stable-window`
//! 6 s, the shortest it allows); every wait polls a status or a request.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use knarr_tests::poll_until;
use knarr_tests::up::{hello_app, KnarrUp};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// Knative's shortest stable window (panic window 10 % of it: 0.6 s) and a short grace period.
const FAST: &str = "stable-window: 6s\nscale-to-zero-grace-period: 1s\n";

/// A Service running the example app; `annotations` go on the template, `spec` lines (indented
/// six spaces) into the revision spec, `command` replaces the default one.
fn service(name: &str, annotations: &[(&str, &str)], spec: &str, command: Option<&str>) -> String {
    let app = hello_app();
    let command = command.map_or_else(
        || format!("[python3, {}]", app.display()),
        |c| c.replace("APP", &app.display().to_string()),
    );
    let annotations: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("autoscaling.knative.dev/{k}: {v:?}"))
        .collect();
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  template:\n    metadata:\n      annotations: {{{annotations}}}\n    spec:\n{spec}\
         \x20     containers:\n      - image: example.com/hello\n        command: {command}\n",
        annotations = annotations.join(", "),
    )
}

fn host(name: &str) -> String {
    format!("{name}.default.example.com")
}

/// The revision's status (`servingMode`, `desiredReplicas`, `actualReplicas`, `inPanic`, …).
async fn revision(up: &KnarrUp, name: &str) -> Value {
    up.api_json(&format!("/api/v1/revisions/default/{name}"))
        .await
        .map(|r| r["status"].clone())
        .unwrap_or_default()
}

async fn wait_for(up: &KnarrUp, what: &str, check: impl Fn(&Value) -> bool, name: &str) -> Value {
    let result = poll_until(what, WAIT, || async { check(&revision(up, name).await) }).await;
    if let Err(e) = result {
        panic!(
            "{e:#}\nrevision: {}\nknarr up printed:\n{}\nlog tail:\n{}",
            revision(up, name).await,
            up.output(),
            tail(&up.log(), 40)
        );
    }
    revision(up, name).await
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn at_zero(status: &Value) -> bool {
    status["desiredReplicas"] == 0 && status["actualReplicas"] == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_revision_goes_to_zero_behind_the_activator_and_the_next_requests_wake_it() {
    let up = KnarrUp::start_with(
        &[("s.yaml", &service("sleepy", &[], "", None))],
        Some(FAST),
        &[],
    )
    .await
    .unwrap();
    up.wait_service("sleepy", "sleepy-00001", WAIT).await;
    let pids = up.pod_pids("sleepy").await.unwrap();
    assert_eq!(pids.len(), 2);

    // Idle: to zero, and only once the activator is in the path.
    let status = wait_for(&up, "sleepy to scale to zero", at_zero, "sleepy-00001").await;
    assert_eq!(status["servingMode"], "Proxy", "{status}");
    poll_until("the pod's processes to exit", WAIT, || async {
        pids.iter().all(|pid| !knarr_tests::up::process_alive(*pid))
    })
    .await
    .unwrap();
    // The pods API lists the pod until the runtime has seen it gone (just after its processes).
    poll_until("the pods API to list no pod", WAIT, || async {
        up.pod_pids("sleepy").await.is_ok_and(|p| p.is_empty())
    })
    .await
    .unwrap();

    // 100 first requests at once: all held by the activator, all served by the new pod.
    let host = host("sleepy");
    let requests = (0..100).map(|_| up.get(&host, "/"));
    let replies = futures::future::join_all(requests).await;
    let mut served = 0;
    for reply in replies {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            reply.body.contains("Hello World! (revision sleepy-00001)"),
            "{}",
            reply.body
        );
        served += 1;
    }
    assert_eq!(served, 100);
    let status = revision(&up, "sleepy-00001").await;
    assert!(status["actualReplicas"].as_i64() >= Some(1), "{status}");

    // Idle again, then one request alone.
    wait_for(
        &up,
        "sleepy to scale to zero again",
        at_zero,
        "sleepy-00001",
    )
    .await;
    let reply = up.get(&host, "/").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_drives_panic_mode_and_the_pod_count_the_formulas_predict() {
    // Target 10 concurrent requests per pod at 100 % utilization: 30 in flight → 3 pods, and
    // 30 / 10 = 3 ≥ 2 × 1 ready pod → panic.
    let annotations = [("target", "10"), ("target-utilization-percentage", "100")];
    let up = KnarrUp::start_with(
        &[("b.yaml", &service("bursty", &annotations, "", None))],
        Some(FAST),
        &[],
    )
    .await
    .unwrap();
    up.wait_service("bursty", "bursty-00001", WAIT).await;
    assert_eq!(revision(&up, "bursty-00001").await["desiredReplicas"], 1);

    let host = host("bursty");
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..30 {
        let (stop, failures, up_gateway, host) =
            (stop.clone(), failures.clone(), up.gateway, host.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match knarr_tests::http_get(up_gateway, &host, "/sleep?ms=500").await {
                    Ok(r) if r.status == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let status = wait_for(
        &up,
        "panic mode with 3 pods wanted",
        |s| s["inPanic"] == true && s["desiredReplicas"].as_i64() >= Some(3),
        "bursty-00001",
    )
    .await;
    let desired = status["desiredReplicas"].as_i64().unwrap();
    // ceil(30 / 10) = 3; the activator's held requests may count one more for a moment.
    assert!((3..=4).contains(&desired), "{status}");
    wait_for(
        &up,
        "the pods to be ready",
        |s| s["actualReplicas"].as_i64() >= Some(3),
        "bursty-00001",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed in the burst"
    );

    // Load gone: out of panic after a stable window, then back to zero.
    wait_for(&up, "bursty to scale to zero", at_zero, "bursty-00001").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flips_between_activator_and_pods_lose_no_request_under_load() {
    // Capacity 5 per pod, 5 of burst headroom wanted, at least 2 pods: with light load the
    // excess burst capacity is 2 × 5 − 5 − ~2 ≥ 0, so the gateway goes straight to the pods
    // (serve); a burst of 12 makes it negative and puts the activator back in the path (proxy)
    // until enough pods are up.
    let annotations = [
        ("target-burst-capacity", "5"),
        ("min-scale", "2"),
        ("initial-scale", "2"),
    ];
    let up = KnarrUp::start_with(
        &[(
            "f.yaml",
            &service(
                "flippy",
                &annotations,
                "      containerConcurrency: 5\n",
                None,
            ),
        )],
        Some(FAST),
        &[],
    )
    .await
    .unwrap();
    up.wait_service("flippy", "flippy-00001", WAIT).await;
    let host = host("flippy");

    let modes = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    // Continuous light load from two clients for the whole test.
    for _ in 0..2 {
        let (stop, sent, failed, gateway, host) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            up.gateway,
            host.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                match knarr_tests::http_get(gateway, &host, "/sleep?ms=20").await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        eprintln!("failed: {} {}", r.status, r.body);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("failed: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let watcher = {
        let (modes, stop, api) = (modes.clone(), stop.clone(), up.api);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) =
                    knarr_tests::http_get(api, "knarr", "/api/v1/revisions/default/flippy-00001")
                        .await
                {
                    if let Ok(v) = serde_json::from_str::<Value>(&r.body) {
                        if let Some(mode) = v["status"]["servingMode"].as_str() {
                            let mut modes = modes.lock().unwrap();
                            if modes.last().map(String::as_str) != Some(mode) {
                                modes.push(mode.to_owned());
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_for(
        &up,
        "serve mode",
        |s| s["servingMode"] == "Serve",
        "flippy-00001",
    )
    .await;

    // A burst of 12 slow requests: over one pod's capacity of 5.
    let burst = tokio::spawn({
        let (failed, gateway, host) = (failed.clone(), up.gateway, host.clone());
        async move {
            let requests = (0..12).map(|_| knarr_tests::http_get(gateway, &host, "/sleep?ms=1500"));
            for reply in futures::future::join_all(requests).await {
                if !reply.is_ok_and(|r| r.status == 200) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    wait_for(
        &up,
        "proxy mode under the burst",
        |s| s["servingMode"] == "Proxy",
        "flippy-00001",
    )
    .await;
    burst.await.unwrap();
    wait_for(
        &up,
        "serve mode again",
        |s| s["servingMode"] == "Serve",
        "flippy-00001",
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    watcher.await.unwrap();
    let modes = modes.lock().unwrap().clone();
    let seen: BTreeSet<&str> = modes.iter().map(String::as_str).collect();
    assert!(
        seen.contains("Serve") && seen.contains("Proxy"),
        "{modes:?}"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests; modes {modes:?}",
        sent.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_time_out_with_504_and_overflow_with_503() {
    // The app takes 60 s to start listening: every request waits in the activator.
    let slow = "[sh, -c, 'sleep 60; exec python3 APP']";
    let up = KnarrUp::start_with(
        &[(
            "slow.yaml",
            &service("slow", &[], "      timeoutSeconds: 2\n", Some(slow)),
        )],
        None,
        &["--activator-queue-depth", "5"],
    )
    .await
    .unwrap();
    let host = host("slow");
    // The route is programmed (through the activator) before the revision is ready.
    poll_until("the route to reach the activator", WAIT, || async {
        up.get(&host, "/")
            .await
            .is_ok_and(|r| r.status != 404 && r.status != 503)
            || up
                .get(&host, "/")
                .await
                .is_ok_and(|r| r.body.contains("activator"))
    })
    .await
    .unwrap();

    // Eight at once: five wait (then time out), three find the queue full.
    let replies = futures::future::join_all((0..8).map(|_| up.get(&host, "/"))).await;
    let mut statuses: Vec<u16> = replies.into_iter().map(|r| r.unwrap().status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [503, 503, 503, 504, 504, 504, 504, 504]);

    let timed_out = up.get(&host, "/").await.unwrap();
    assert_eq!(timed_out.status, 504);
    assert!(
        timed_out.body.contains("activator request timeout"),
        "{}",
        timed_out.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_concurrency_1_spreads_requests_over_the_pods() {
    let up = KnarrUp::start_with(
        &[(
            "one.yaml",
            &service(
                "single",
                &[("min-scale", "3"), ("initial-scale", "3")],
                "      containerConcurrency: 1\n",
                None,
            ),
        )],
        None,
        &[],
    )
    .await
    .unwrap();
    up.wait_service("single", "single-00001", WAIT).await;
    wait_for(
        &up,
        "3 ready pods",
        |s| s["actualReplicas"] == 3,
        "single-00001",
    )
    .await;
    let host = host("single");
    for _ in 0..3 {
        let replies =
            futures::future::join_all((0..3).map(|_| up.get(&host, "/sleep?ms=300"))).await;
        let pids: BTreeSet<String> = replies
            .into_iter()
            .map(|r| {
                let r = r.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                r.header("x-process-id").unwrap_or_default().to_owned()
            })
            .collect();
        assert_eq!(
            pids.len(),
            3,
            "three requests in flight, one per pod: {pids:?}"
        );
    }
}
