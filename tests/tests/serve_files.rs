//! `knarr serve --source file:DIR` end to end: a folder of Knative-generated objects, a real
//! Envoy, live edits, broken files, and the status API that `knarr get` reads.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_tests::conformance::LoadGenerator;
use knarr_tests::kfixture::service_yaml;
use knarr_tests::{http_get, poll_until, Envoy, HttpClient, Upstream};
use knarr_translate::kingress::{GatewayConfig, GatewayTag};

const WAIT: Duration = Duration::from_secs(30);

fn ingress(weights: (u32, u32), header: &str) -> String {
    format!(
        r#"apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: hello
  namespace: default
  annotations: {{networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev}}
spec:
  rules:
  - hosts: [hello.default.example.com]
    visibility: ExternalIP
    http:
      paths:
      - appendHeaders: {{x-version: "{header}"}}
        splits:
        - {{serviceName: blue, servicePort: 80, percent: {}}}
        - {{serviceName: green, servicePort: 80, percent: {}}}
"#,
        weights.0, weights.1
    )
}

/// Writes via a temporary file and a rename, as editors and `kubectl`-style tools do.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn api_json(api: SocketAddr, path: &str) -> serde_json::Value {
    let r = http_get(api, "knarr", path).await.unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn ready_of(report: &serde_json::Value) -> String {
    report["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| c["status"].as_str().unwrap().to_owned())
        .unwrap()
}

/// `knarr serve --source file:DIR` in-process, with the gateway on the given ports (0: Envoy picks).
async fn serve_folder(dir: &Path, external_port: u16, internal_port: u16) -> ControlPlane {
    ControlPlane::start(ServeConfig {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        source_dirs: vec![dir.to_owned()],
        gateway: GatewayConfig {
            address: "127.0.0.1".parse().unwrap(),
            external_http_port: external_port,
            internal_http_port: internal_port,
            external_https_port: 0,
            internal_https_port: 0,
        },
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A real Envoy on delta ADS to `cp`, ready.
async fn envoy_for(cp: &ControlPlane) -> Envoy {
    let envoy = Envoy::start(
        &bootstrap::render(&BootstrapOptions {
            xds_addr: cp.xds_addr.to_string(),
            delta: true,
            admin_port: 0,
            ..Default::default()
        })
        .unwrap(),
    )
    .await
    .unwrap();
    envoy.wait_ready(WAIT).await.unwrap();
    envoy
}

#[tokio::test]
async fn folder_of_objects_served_edited_live_and_broken_safely() {
    knarr_tests::trace_init();
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "services.yaml",
        &(service_yaml("blue", "http", blue.addr())
            + "---"
            + &service_yaml("green", "http", green.addr())),
    );
    write(dir.path(), "ingress.yaml", &ingress((100, 0), "v1"));

    let cp = serve_folder(dir.path(), 0, 0).await;
    let api = cp.api_addr.unwrap();

    // Before any Envoy connects the ingress is configured but no load balancer is ready.
    let before = api_json(api, "/api/v1/ingresses/default/hello").await;
    assert_eq!(ready_of(&before), "Unknown", "{before:#}");

    let envoy = envoy_for(&cp).await;
    let port = envoy
        .wait_listener_port(GatewayTag::External.listener_name(), WAIT)
        .await
        .unwrap();
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(
        client
            .get("hello.default.example.com", "/")
            .await
            .unwrap()
            .body,
        "blue"
    );
    poll_until("ingress Ready", WAIT, || async {
        ready_of(&api_json(api, "/api/v1/ingresses/default/hello").await) == "True"
    })
    .await
    .unwrap();
    let report = api_json(api, "/api/v1/ingresses/default/hello").await;
    assert_eq!(
        report["status"]["publicLoadBalancer"]["ingress"][0]["domainInternal"],
        "knarr-external.knarr-system.svc.cluster.local"
    );

    // Live edits under continuous traffic: no request fails.
    let load = LoadGenerator::builder(client.clone(), "hello.default.example.com", "/")
        .concurrency(2)
        .start();
    write(dir.path(), "ingress.yaml", &ingress((0, 100), "v2"));
    poll_until("traffic moves to green", WAIT, || async {
        client
            .get("hello.default.example.com", "/")
            .await
            .map(|r| r.body == "green")
            .unwrap_or(false)
    })
    .await
    .unwrap();

    // A broken edit: the error is reported with file and line, the last good version serves.
    write(
        dir.path(),
        "ingress.yaml",
        &ingress((0, 100), "v3").replace("percent: 100", "percent: 90"),
    );
    poll_until("the error shows in the API", WAIT, || async {
        api_json(api, "/api/v1/errors").await["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    })
    .await
    .unwrap();
    let errors = api_json(api, "/api/v1/errors").await;
    let message = errors["errors"][0].as_str().unwrap();
    assert!(
        message.contains("ingress.yaml")
            && message.contains("Ingress default/hello")
            && message.contains("splits")
            && message.contains("90"),
        "{message}"
    );
    let report = api_json(api, "/api/v1/ingresses/default/hello").await;
    assert!(
        report["error"].as_str().unwrap().contains("90"),
        "{report:#}"
    );
    let r = client.get("hello.default.example.com", "/").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "green"));
    assert_eq!(r.header("x-echo-x-version"), Some("v2"));

    // Syntax errors too; then a fix clears them.
    write(
        dir.path(),
        "services.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [\n",
    );
    poll_until("syntax error reported", WAIT, || async {
        api_json(api, "/api/v1/errors").await["errors"]
            .as_array()
            .is_some_and(|e| e.len() >= 2)
    })
    .await
    .unwrap();
    assert_eq!(
        client
            .get("hello.default.example.com", "/")
            .await
            .unwrap()
            .body,
        "green"
    );
    write(
        dir.path(),
        "services.yaml",
        &(service_yaml("blue", "http", blue.addr())
            + "---"
            + &service_yaml("green", "http", green.addr())),
    );
    write(dir.path(), "ingress.yaml", &ingress((50, 50), "v4"));
    poll_until("errors cleared", WAIT, || async {
        api_json(api, "/api/v1/errors").await["errors"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await
    .unwrap();
    poll_until("new header served", WAIT, || async {
        client
            .get("hello.default.example.com", "/")
            .await
            .map(|r| r.header("x-echo-x-version") == Some("v4"))
            .unwrap_or(false)
    })
    .await
    .unwrap();

    // Removing the file removes the ingress.
    std::fs::remove_file(dir.path().join("ingress.yaml")).unwrap();
    poll_until("host gone", WAIT, || async {
        client
            .get("hello.default.example.com", "/")
            .await
            .map(|r| r.status == 404)
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let summary = load.stop().await;
    let bad: Vec<_> = summary
        .requests
        .iter()
        .filter(|r| r.error.is_some() || (r.status != Some(200) && r.status != Some(404)))
        .collect();
    assert!(
        bad.is_empty(),
        "{} failed requests during live edits, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    assert!(summary.requests.len() > 20);
    cp.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn missing_source_directory_is_a_clear_startup_error() {
    let err = ControlPlane::start(ServeConfig {
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        api_addr: "127.0.0.1:0".parse().unwrap(),
        source_dirs: vec!["/nonexistent/knarr".into()],
        ..Default::default()
    })
    .await
    .err()
    .expect("start fails");
    assert!(err.to_string().contains("/nonexistent/knarr"), "{err}");
}

#[tokio::test]
async fn ready_waits_for_the_hash_probe_on_every_gateway() {
    knarr_tests::trace_init();
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "objects.yaml",
        &(service_yaml("blue", "http", blue.addr())
            + "---"
            + &service_yaml("green", "http", green.addr())
            + "---\n"
            + &ingress((100, 0), "v1")),
    );
    // The prober needs the gateway's real ports, so Envoy cannot pick them here.
    let (ext, int) = (
        knarr_tests::free_port().unwrap(),
        knarr_tests::free_port().unwrap(),
    );
    let cp = serve_folder(dir.path(), ext, int).await;
    let api = cp.api_addr.unwrap();
    let envoy = envoy_for(&cp).await;
    poll_until("ingress Ready", WAIT, || async {
        ready_of(&api_json(api, "/api/v1/ingresses/default/hello").await) == "True"
    })
    .await
    .unwrap();
    // Readiness came from the gateways answering the probe through the backend.
    assert!(blue.probes() > 0, "no probe reached the backend");

    // A new version: not Ready again until the probes see its hash.
    let probes_before = blue.probes() + green.probes();
    write(
        dir.path(),
        "objects.yaml",
        &(service_yaml("blue", "http", blue.addr())
            + "---"
            + &service_yaml("green", "http", green.addr())
            + "---\n"
            + &ingress((0, 100), "v2")),
    );
    poll_until("new version Ready", WAIT, || async {
        let report = api_json(api, "/api/v1/ingresses/default/hello").await;
        ready_of(&report) == "True" && green.probes() + blue.probes() > probes_before
    })
    .await
    .unwrap();
    let client = HttpClient::new(SocketAddr::from(([127, 0, 0, 1], ext)));
    assert_eq!(
        client
            .get("hello.default.example.com", "/")
            .await
            .unwrap()
            .body,
        "green"
    );
    envoy.stop().await;
    cp.shutdown(Duration::from_secs(5)).await;
}
