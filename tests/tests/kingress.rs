//! Knative's ingress conformance cases, through the real Envoy, over delta ADS (the mode Knarr
//! recommends); a few also run over state-of-the-world.
//!
//! Backends are the project's own servers; objects are the Knative/Kubernetes YAML a Knative
//! controller would produce.

use std::collections::HashMap;

use knarr_model::{Kind, ObjectKey};
use knarr_tests::kfixture::{service_yaml, KFixture};
use knarr_tests::Upstream;
use knarr_translate::reconcile::Change;

fn ingress(name: &str, body: &str) -> String {
    format!(
        "apiVersion: networking.internal.knative.dev/v1alpha1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev\nspec:\n{body}"
    )
}

/// A single-split rule for `host` to `service` with visibility.
fn simple_rule(host: &str, service: &str, visibility: &str) -> String {
    format!(
        "  - hosts: [{host}]\n    visibility: {visibility}\n    http:\n      paths:\n      - splits:\n        - serviceName: {service}\n          servicePort: 80\n          percent: 100\n          appendHeaders: {{Knative-Serving-Revision: {service}, Knative-Serving-Namespace: default}}\n"
    )
}

async fn basics(delta: bool) {
    let mut f = KFixture::start(delta).await.unwrap();
    let up = Upstream::start("basics").await.unwrap();
    f.apply_yaml(&service_yaml("basics", "http", up.addr()))
        .await
        .unwrap();
    f.apply_yaml(&ingress(
        "basics",
        &format!(
            "  rules:\n{}",
            simple_rule("basics.example.com", "basics", "ExternalIP")
        ),
    ))
    .await
    .unwrap();
    KFixture::wait_200(&f.external, "basics.example.com", "/")
        .await
        .unwrap();
    let r = f.external.get("basics.example.com", "/").await.unwrap();
    assert_eq!(r.body, "basics");
    assert_eq!(r.header("x-echo-knative-serving-revision"), Some("basics"));
    assert_eq!(
        r.header("x-echo-knative-serving-namespace"),
        Some("default")
    );
    // The gateway tag never reaches the backend.
    assert_eq!(r.header("x-echo-x-knarr-gateway"), None);
    // A port in the host changes nothing; the internal gateway serves external rules too.
    assert_eq!(
        f.external
            .get("basics.example.com:8080", "/")
            .await
            .unwrap()
            .body,
        "basics"
    );
    assert_eq!(
        f.internal
            .get("basics.example.com", "/")
            .await
            .unwrap()
            .body,
        "basics"
    );
    // Unknown hosts: 404.
    assert_eq!(
        f.external
            .get("nope.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn basics_delta() {
    basics(true).await;
}

#[tokio::test]
async fn basics_sotw() {
    basics(false).await;
}

#[tokio::test]
async fn visibility_cluster_local_is_404_outside() {
    let mut f = KFixture::start(true).await.unwrap();
    let up = Upstream::start("private").await.unwrap();
    f.apply_yaml(&service_yaml("private", "http", up.addr()))
        .await
        .unwrap();
    f.apply_yaml(&ingress(
        "private",
        &format!(
            "  rules:\n{}",
            simple_rule(
                "private.default.svc.cluster.local",
                "private",
                "ClusterLocal"
            )
        ),
    ))
    .await
    .unwrap();
    KFixture::wait_200(&f.internal, "private.default.svc.cluster.local", "/")
        .await
        .unwrap();
    let outside = f
        .external
        .get("private.default.svc.cluster.local", "/")
        .await
        .unwrap();
    assert_eq!(outside.status, 404);
    // A client cannot pick the internal scope by sending the gateway tag itself.
    let spoof = f
        .external
        .send(
            http::Request::get("/")
                .header("host", "private.default.svc.cluster.local")
                .header("x-knarr-gateway", "int")
                .body(bytes::Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(spoof.status, 404);
}

#[tokio::test]
async fn percentage_split_follows_weights() {
    let mut f = KFixture::start(true).await.unwrap();
    let weights = [1, 2, 4, 8, 16, 32, 37, 0, 0, 0];
    let mut ups = Vec::new();
    let mut splits = String::new();
    for (i, w) in weights.iter().enumerate() {
        let name = format!("pct{i}");
        let up = Upstream::start(&name).await.unwrap();
        f.apply_yaml(&service_yaml(&name, "http", up.addr()))
            .await
            .unwrap();
        splits.push_str(&format!(
            "        - serviceName: {name}\n          servicePort: 80\n          percent: {w}\n"
        ));
        ups.push(up);
    }
    f.apply_yaml(&ingress(
        "pct",
        &format!("  rules:\n  - hosts: [pct.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n{splits}"),
    ))
    .await
    .unwrap();
    KFixture::wait_200(&f.external, "pct.example.com", "/")
        .await
        .unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let total = 1000;
    for _ in 0..total {
        let r = f.external.get("pct.example.com", "/").await.unwrap();
        assert_eq!(r.status, 200);
        *seen.entry(r.body).or_default() += 1;
    }
    for (i, w) in weights.iter().enumerate() {
        let got = f64::from(*seen.get(&format!("pct{i}")).unwrap_or(&0)) * 100.0 / f64::from(total);
        if *w == 0 {
            assert_eq!(got, 0.0, "pct{i} has 0% but got {got}%");
        } else {
            assert!(
                (got - f64::from(*w)).abs() <= 10.0,
                "pct{i}: want {w}%, got {got}%"
            );
        }
    }
}

#[tokio::test]
async fn deleting_an_ingress_removes_its_hosts() {
    let mut f = KFixture::start(true).await.unwrap();
    let up = Upstream::start("gone").await.unwrap();
    f.apply_yaml(&service_yaml("gone", "http", up.addr()))
        .await
        .unwrap();
    f.apply_yaml(&ingress(
        "gone",
        &format!(
            "  rules:\n{}",
            simple_rule("gone.example.com", "gone", "ExternalIP")
        ),
    ))
    .await
    .unwrap();
    KFixture::wait_200(&f.external, "gone.example.com", "/")
        .await
        .unwrap();
    f.apply(vec![Change::Delete(ObjectKey::new(
        Kind::Ingress,
        "default",
        "gone",
    ))])
    .await
    .unwrap();
    assert_eq!(
        f.external
            .get("gone.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
    assert!(!f
        .envoy
        .cluster_names()
        .await
        .unwrap()
        .contains(&"default/gone:80".to_string()));
}
