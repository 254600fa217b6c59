//! What only the activator's tests need: revisions of fake pods ([`Upstream`]s from
//! `knarr-test-support`), an in-process activator, requests that name a revision, and its admin
//! port and metrics. The pods, the client and the waits are `knarr-test-support`'s.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use knarr_activator::{stats_channel, Config, Running};
use knarr_proto::activator::{Endpoint, Revision, RevisionStats};
use knarr_test_support::{http_get, HttpClient, HttpReply, Upstream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The activator's endpoint for a fake pod.
pub fn endpoint(pod: &Upstream) -> Endpoint {
    Endpoint {
        address: pod.addr().ip().to_string(),
        port: u32::from(pod.port()),
    }
}

/// A revision named `name` in namespace `default`.
pub fn revision(name: &str, cc: i64, timeout_seconds: i64, pods: &[&Upstream]) -> Revision {
    Revision {
        namespace: "default".into(),
        name: name.into(),
        container_concurrency: cc,
        timeout_seconds,
        response_start_timeout_seconds: 0,
        idle_timeout_seconds: 0,
        endpoints: pods.iter().map(|p| endpoint(p)).collect(),
    }
}

/// An activator on 127.0.0.1:0 with its stats receiver.
pub async fn activator(config: Config) -> (Running, mpsc::Receiver<RevisionStats>) {
    let (tx, rx) = stats_channel();
    let running = Running::start(config, tx).await.unwrap();
    (running, rx)
}

/// A request for revision `default/<name>` (or none, with `name` empty), to the activator at
/// `addr`.
pub fn request(addr: SocketAddr, name: &str) -> http::request::Builder {
    let mut req = Request::get(format!("http://{addr}/hello?x=1"));
    if !name.is_empty() {
        req = req
            .header("knative-serving-namespace", "default")
            .header("knative-serving-revision", name);
    }
    req
}

/// Sends `req` through `client` (to the activator); any answer, whatever its status.
pub async fn send(client: &HttpClient, req: Request<Bytes>) -> HttpReply {
    client.send(req).await.expect("the activator answers")
}

/// GET for revision `default/<name>`.
pub async fn get(client: &HttpClient, name: &str) -> HttpReply {
    send(
        client,
        request(client.addr(), name).body(Bytes::new()).unwrap(),
    )
    .await
}

/// Sends a GET for revision `default/<name>` in the background.
pub fn spawn_get(client: &HttpClient, name: &str) -> JoinHandle<HttpReply> {
    let (client, name) = (client.clone(), name.to_owned());
    tokio::spawn(async move { get(&client, &name).await })
}

/// Sends `req` in the background.
pub fn spawn_send(client: &HttpClient, req: Request<Bytes>) -> JoinHandle<HttpReply> {
    let client = client.clone();
    tokio::spawn(async move { send(&client, req).await })
}

/// GET on the admin port: status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = http_get(addr, "admin", path)
        .await
        .expect("the admin server answers");
    (reply.status, reply.body)
}

/// The value of an unlabelled metric line (`name value`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
