//! The real `knarr-activator` binary: bad flags stop it with exit code 64 and a message naming
//! the flag; on SIGTERM it fails readiness at once, keeps serving (held requests included) and
//! exits once quiet, losing no request.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use knarr_test_support::{within, HttpClient, Upstream};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_knarr-activator");

fn command(args: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("KNARR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The `key=value` token of a log line.
fn field(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[tokio::test]
async fn bad_flags_exit_64_naming_the_flag() {
    let out = command(&["--queue-depth=0".into()]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--queue-depth"), "{stderr}");
}

#[tokio::test]
async fn sigterm_loses_no_held_or_in_flight_request() {
    // CC 1, one slow pod: one request at the pod, the others held in the activator.
    let pod = Upstream::builder("pod-a").gated().start().await.unwrap();
    let mut child = command(&[
        "--listen=127.0.0.1:0".into(),
        "--admin=127.0.0.1:0".into(),
        "--drain-quiet-seconds=1".into(),
        format!(
            "--static-revision=default/hello,cc=1,endpoint={}",
            pod.addr()
        ),
    ])
    .spawn()
    .unwrap();

    // The bound addresses are in the "serving" log line; keep reading stderr so the child never
    // blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let (serving_tx, serving_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut serving_tx = Some(serving_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("activator serving") {
                if let Some(tx) = serving_tx.take() {
                    let _ = tx.send(line.clone());
                }
            }
            eprintln!("activator: {line}");
        }
    });
    let line = within("the serving log line", serving_rx).await.unwrap();
    let listen = field(&line, "listen").expect(&line);
    let admin = field(&line, "admin").expect(&line);
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);

    let client = HttpClient::new(listen);
    let mut pending: Vec<_> = (0..5).map(|_| spawn_get(&client, "hello")).collect();
    let held = |n: f64| async move {
        let (_, metrics) = admin_get(admin, "/metrics").await;
        metric(&metrics, "activator_held_requests") == Some(n)
    };
    within("one at the pod, four held", async {
        while !(pod.in_flight() == 1 && held(4.0).await) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    // SIGTERM: not ready any more, still serving.
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    within("readiness fails", async {
        while admin_get(admin, "/readyz").await.0 != 503 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    pending.push(spawn_get(&client, "hello"));
    within("five held", async {
        while !held(5.0).await {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;

    // The pod answers: every request completes, then the activator exits on its own.
    pod.open();
    for p in pending {
        let reply = within("a request", p).await.unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "pod-a"));
    }
    let exit = within("the activator exits", child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(pod.requests(), 6);
    assert_eq!(pod.max_in_flight(), 1);
}
