//! Every kind of config the KIngress translation generates is accepted by the real Envoy
//! (`envoy --mode validate` on the whole snapshot, inlined into a static bootstrap), TLS included.

use std::process::Command;

use knarr_tests::kfixture::objects;
use knarr_translate::kingress::GatewayConfig;
use knarr_translate::reconcile::{Change, ClassFilter, IngressIndex};
use knarr_translate::validation::static_bootstrap;
use prost::Message;

/// Representative objects: splits with headers, cluster-local hosts, paths with header matches,
/// host rewrite, redirect, an h2c backend, an ExternalName Service and EndpointSlices.
const OBJECTS: &str = include_str!("../../examples/kingress/ingress.yaml");
const MORE: &str = r#"
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata: {name: shop, namespace: shop}
spec:
  httpOption: Redirected
  tls:
  - hosts: [shop.example.com]
    secretName: shop-cert
  rules:
  - hosts: [shop.example.com, www.shop.example.com]
    visibility: ExternalIP
    http:
      paths:
      - path: /api
        headers: {x-canary: {exact: "yes"}}
        appendHeaders: {x-path: api-canary}
        splits: [{serviceName: grpc, servicePort: h2c, percent: 100}]
      - path: /
        rewriteHost: web.internal
        splits: [{serviceName: web, servicePort: 80, percent: 100}]
      - path: /ext
        splits: [{serviceName: outside, servicePort: 443, percent: 100}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: shop}
spec: {ports: [{name: h2c, port: 80, targetPort: 8013}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: grpc-abc
  namespace: shop
  labels: {kubernetes.io/service-name: grpc}
addressType: IPv4
endpoints:
- addresses: [10.1.0.1]
- addresses: [10.1.0.2]
  conditions: {ready: false}
ports: [{name: h2c, port: 8013}]
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: shop}
spec: {type: ExternalName, externalName: example.org, ports: [{port: 443}]}
"#;

#[test]
fn generated_config_passes_envoy_validate() {
    let envoy = knarr_tests::envoy_binary().expect("Envoy is installed");
    let mut index = IngressIndex::new(GatewayConfig::default(), ClassFilter::default());
    let mut all = objects(OBJECTS);
    all.extend(objects(MORE));
    // A real certificate: Envoy parses it.
    let ca = knarr_tests::conformance::TestCa::new().unwrap();
    let leaf = ca.issue(&["shop.example.com"]).unwrap();
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    all.extend(objects(&format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: shop-cert, namespace: shop}}\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&leaf.cert_pem),
        indent(&leaf.key_pem)
    )));
    index.apply(all.into_iter().map(|o| Change::Upsert(o.into())));
    let snap = index.snapshot();
    assert!(
        snap.len() > 10,
        "expected a real config, got {} resources",
        snap.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.pb");
    std::fs::write(&path, static_bootstrap(&snap).encode_to_vec()).unwrap();
    let out = Command::new(envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .expect("envoy runs");
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "envoy rejected the config:\n{log}");
    assert!(log.contains("OK"), "{log}");
}
