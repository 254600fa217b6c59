//! The real `knarr-queue-proxy` binary: bad configuration stops it with a message naming the
//! variable, and a SIGTERM under continuous load loses no request.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knarr_test_support::{poll_until, HttpClient, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_knarr-queue-proxy");

/// A port for the child, which is configured by port numbers (see
/// [`knarr_test_support::free_port`]).
fn free_port() -> u16 {
    knarr_test_support::free_port().unwrap()
}

fn command(env: &[(&str, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("KNARR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn knative_env(serving: u16, user: u16) -> Vec<(&'static str, String)> {
    vec![
        ("SERVING_NAMESPACE", "default".into()),
        ("SERVING_CONFIGURATION", "hello".into()),
        ("SERVING_REVISION", "hello-00001".into()),
        ("SERVING_POD", "hello-00001-pod".into()),
        ("SERVING_POD_IP", "127.0.0.1".into()),
        ("QUEUE_SERVING_PORT", serving.to_string()),
        ("USER_PORT", user.to_string()),
        ("CONTAINER_CONCURRENCY", "0".into()),
        ("REVISION_TIMEOUT_SECONDS", "300".into()),
        ("KNARR_QUEUE_BIND", "127.0.0.1".into()),
        ("KNARR_QUEUE_ADMIN_PORT", free_port().to_string()),
        ("KNARR_QUEUE_METRICS_PORT", free_port().to_string()),
        ("KNARR_QUEUE_USER_METRICS_PORT", free_port().to_string()),
        ("KNARR_QUEUE_DRAIN_QUIET_SECONDS", "0.5".into()),
    ]
}

/// The status of a GET to the queue-proxy (a kubelet-style probe if `probe`), `None` if the
/// exchange failed.
async fn get(client: &HttpClient, probe: bool) -> Option<u16> {
    let headers: &[(&str, &str)] = if probe {
        &[("K-Network-Probe", "queue")]
    } else {
        &[]
    };
    Some(client.get_with("x", "/", headers).await.ok()?.status)
}

#[tokio::test]
async fn missing_variable_stops_it_naming_the_variable() {
    let mut env = knative_env(free_port(), 8080);
    env.retain(|(k, _)| *k != "USER_PORT");
    let out = command(&env).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("USER_PORT: is required"), "{stderr}");
}

#[tokio::test]
async fn sigterm_under_load_loses_no_request() {
    let app = Upstream::start("ok").await.unwrap();
    let port = free_port();
    let mut child = command(&knative_env(port, app.port())).spawn().unwrap();
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
    // Ready: the kubelet-style probe answers 200.
    poll_until(
        "the queue-proxy to be ready",
        Duration::from_secs(30),
        || async { get(&client, true).await == Some(200) },
    )
    .await
    .unwrap();
    // Continuous load.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match get(&client, false).await {
                    Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    while ok.load(Ordering::Relaxed) < 200 {
        tokio::task::yield_now().await;
    }
    // SIGTERM: probes fail at once, requests keep being served.
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    poll_until(
        "probes to fail while draining",
        Duration::from_secs(10),
        || async { get(&client, true).await == Some(503) },
    )
    .await
    .unwrap();
    let served = ok.load(Ordering::Relaxed);
    while ok.load(Ordering::Relaxed) < served + 200 {
        tokio::task::yield_now().await;
    }
    // The load stops (the gateway has stopped sending); after the quiet period it exits.
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after the quiet period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed around the SIGTERM"
    );
    assert!(ok.load(Ordering::Relaxed) >= 400);
}
