//! KIngress translation: whole-config snapshots of representative ingresses (reviewed `.snap`
//! files under `snapshots/`), plus targeted checks.

use std::fmt::Write as _;

use super::*;
use crate::reconcile::{Change, ClassFilter, IngressIndex};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::{
    ClusterSpecifier, HostRewriteSpecifier,
};
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use knarr_model::{parse_documents, Document, Object};
use knarr_snapshot::{ResourceType, Snapshot};
use prost::Message;

fn objects(yaml: &str) -> Vec<Object> {
    parse_documents("t.yaml", yaml)
        .into_iter()
        .map(|d| match d {
            Document::Object { object, .. } => object,
            other => panic!("{other:?}"),
        })
        .collect()
}

fn header_matchers(h: &[HeaderMatcher]) -> String {
    h.iter()
        .map(|m| match &m.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(v)),
                ..
            })) => format!("{}={v}", m.name),
            other => format!("{}~{other:?}", m.name),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn headers_to_add(h: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]) -> String {
    h.iter()
        .map(|o| {
            let hv = o.header.as_ref().unwrap();
            format!("{}={} (action {})", hv.key, hv.value, o.append_action)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A readable rendering of everything in a snapshot that translation decides.
fn describe(snap: &Snapshot) -> String {
    let mut out = String::new();
    for (name, r) in snap.resources(ResourceType::Listener) {
        let l = Listener::decode(r.value.as_slice()).unwrap();
        let chains: Vec<String> = l
            .filter_chains
            .iter()
            .map(|c| {
                let sni = c
                    .filter_chain_match
                    .as_ref()
                    .map(|m| m.server_names.join("|"))
                    .unwrap_or_default();
                let tls = c.transport_socket.is_some();
                format!("[sni={sni} tls={tls}]")
            })
            .collect();
        let port = match l.address.and_then(|a| a.address) {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => {
                format!("{}:{:?}", s.address, s.port_specifier)
            }
            other => format!("{other:?}"),
        };
        writeln!(
            out,
            "listener {name} address={port} chains={}",
            chains.join(" ")
        )
        .unwrap();
    }
    for (name, r) in snap.resources(ResourceType::ScopedRoute) {
        let s = ScopedRouteConfiguration::decode(r.value.as_slice()).unwrap();
        let key: Vec<String> = s
            .key
            .unwrap()
            .fragments
            .into_iter()
            .map(|f| match f.r#type {
                Some(KeyFragmentType::StringKey(k)) => k,
                None => "?".into(),
            })
            .collect();
        writeln!(
            out,
            "scope {name} key={} -> {}",
            key.join("+"),
            s.route_configuration_name
        )
        .unwrap();
    }
    for (name, r) in snap.resources(ResourceType::Route) {
        let rc = RouteConfiguration::decode(r.value.as_slice()).unwrap();
        writeln!(
            out,
            "routes {name} remove={:?}",
            rc.request_headers_to_remove
        )
        .unwrap();
        for vh in rc.virtual_hosts {
            writeln!(
                out,
                "  vhost domains={:?} require_tls={}",
                vh.domains, vh.require_tls
            )
            .unwrap();
            for route in vh.routes {
                let m = route.r#match.unwrap();
                let prefix = match m.path_specifier {
                    Some(PathSpecifier::Prefix(p)) => p,
                    other => format!("{other:?}"),
                };
                writeln!(
                    out,
                    "    match prefix={prefix} headers=[{}]",
                    header_matchers(&m.headers)
                )
                .unwrap();
                if !route.request_headers_to_add.is_empty() {
                    writeln!(
                        out,
                        "      set {}",
                        headers_to_add(&route.request_headers_to_add)
                    )
                    .unwrap();
                }
                let Some(Action::Route(a)) = route.action else {
                    panic!("not a route action")
                };
                match a.cluster_specifier.unwrap() {
                    ClusterSpecifier::Cluster(c) => writeln!(out, "      -> {c}").unwrap(),
                    ClusterSpecifier::WeightedClusters(w) => {
                        for c in w.clusters {
                            writeln!(
                                out,
                                "      -> {} weight={} set [{}]",
                                c.name,
                                c.weight.unwrap().value,
                                headers_to_add(&c.request_headers_to_add)
                            )
                            .unwrap();
                        }
                    }
                    other => writeln!(out, "      -> {other:?}").unwrap(),
                }
                writeln!(
                    out,
                    "      timeout={:?} retries={} host_rewrite={:?}",
                    a.timeout.map(|d| d.seconds),
                    a.retry_policy.is_some(),
                    a.host_rewrite_specifier.map(|h| match h {
                        HostRewriteSpecifier::HostRewriteLiteral(l) => l,
                        other => format!("{other:?}"),
                    })
                )
                .unwrap();
            }
        }
    }
    for (name, r) in snap.resources(ResourceType::Cluster) {
        let c = Cluster::decode(r.value.as_slice()).unwrap();
        writeln!(
            out,
            "cluster {name} type={:?} h2={}",
            c.cluster_discovery_type,
            !c.typed_extension_protocol_options.is_empty()
        )
        .unwrap();
    }
    for (name, r) in snap.resources(ResourceType::Endpoint) {
        let cla = ClusterLoadAssignment::decode(r.value.as_slice()).unwrap();
        let eps: Vec<String> = cla
            .endpoints
            .iter()
            .flat_map(|l| l.lb_endpoints.iter())
            .map(|e| {
                format!("{:?}", e.host_identifier)
                    .split("address: \"")
                    .nth(1)
                    .map(|s| s.split('"').next().unwrap_or_default().to_owned())
                    .unwrap_or_default()
            })
            .collect();
        writeln!(out, "endpoints {name} {}", eps.join(",")).unwrap();
    }
    for name in snap.resources(ResourceType::Secret).keys() {
        writeln!(out, "secret {name}").unwrap();
    }
    out
}

const HELLO: &str = r#"
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: hello
  namespace: default
  annotations: {networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev}
spec:
  rules:
  - hosts: [hello.default.example.com]
    visibility: ExternalIP
    http:
      paths:
      - splits:
        - serviceName: hello-00001
          servicePort: 80
          percent: 90
          appendHeaders: {Knative-Serving-Revision: hello-00001, Knative-Serving-Namespace: default}
        - serviceName: hello-00002
          servicePort: 80
          percent: 10
          appendHeaders: {Knative-Serving-Revision: hello-00002, Knative-Serving-Namespace: default}
  - hosts: [hello.default, hello.default.svc, hello.default.svc.cluster.local]
    visibility: ClusterLocal
    http:
      paths:
      - splits:
        - serviceName: hello-00001
          servicePort: 80
          percent: 100
---
apiVersion: v1
kind: Service
metadata: {name: hello-00001, namespace: default}
spec:
  ports: [{name: http2, port: 80, targetPort: 8013}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: hello-00001, namespace: default}
subsets:
- addresses: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]
  notReadyAddresses: [{ip: 10.0.0.3}]
  ports: [{name: http2, port: 8013}]
"#;

fn translate(yaml: &str) -> (Snapshot, IngressIndex) {
    let mut index = IngressIndex::new(GatewayConfig::default(), ClassFilter::default());
    index.apply(objects(yaml).into_iter().map(|o| Change::Upsert(o.into())));
    (index.snapshot(), index)
}

#[test]
fn snapshot_revision_split_with_cluster_local_hosts() {
    let (snap, _) = translate(HELLO);
    insta::assert_snapshot!(describe(&snap));
}

#[test]
fn snapshot_paths_headers_rewrite_redirect_and_tls() {
    let yaml = r#"
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata: {name: shop, namespace: shop}
spec:
  httpOption: Redirected
  tls:
  - hosts: [shop.example.com]
    secretName: shop-cert
  rules:
  - hosts: [shop.example.com]
    visibility: ExternalIP
    http:
      paths:
      - path: /api
        headers: {x-canary: {exact: "yes"}}
        appendHeaders: {x-path: api-canary}
        splits: [{serviceName: api-canary, servicePort: http, percent: 100}]
      - path: /
        splits: [{serviceName: web, servicePort: 80}]
      - path: /api
        rewriteHost: api.internal
        splits: [{serviceName: api, servicePort: 80}]
---
apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata: {name: shop-cert, namespace: shop}
stringData:
  tls.crt: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
  tls.key: "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
"#;
    let (snap, _) = translate(yaml);
    insta::assert_snapshot!(describe(&snap));
}

#[test]
fn other_classes_are_left_alone() {
    let yaml = HELLO.replace(
        "networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev",
        "networking.knative.dev/ingress.class: istio.ingress.networking.knative.dev",
    );
    let (snap, index) = translate(&yaml);
    assert!(snap.resources(ResourceType::Route).is_empty());
    assert!(index.is_empty());
}

#[test]
fn domain_conflict_programs_only_the_first() {
    let second = HELLO
        .split("---")
        .next()
        .unwrap()
        .replace("name: hello\n", "name: hello-copy\n");
    let (snap, index) = translate(&format!("{HELLO}---{second}"));
    let states = index.states();
    let copy = states.iter().find(|s| s.key.name == "hello-copy").unwrap();
    let conflict = copy.not_programmed.as_ref().unwrap();
    assert_eq!(conflict.reason, "DomainConflict");
    assert!(
        conflict.message.contains("Ingress default/hello"),
        "{}",
        conflict.message
    );
    assert!(!snap
        .resources(ResourceType::Route)
        .keys()
        .any(|k| k.contains("hello-copy")));

    // Once the first is gone, the second takes over.
    let mut index = index;
    index.apply([Change::Delete(knarr_model::ObjectKey::new(
        knarr_model::Kind::Ingress,
        "default",
        "hello",
    ))]);
    let snap = index.snapshot();
    assert!(snap
        .resources(ResourceType::Route)
        .keys()
        .any(|k| k.contains("hello-copy")));
    assert!(index.states()[0].not_programmed.is_none());
}

#[test]
fn endpoint_change_touches_only_endpoints() {
    let (before, mut index) = translate(HELLO);
    index.apply(objects(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: hello-00001, namespace: default}\nsubsets:\n- addresses: [{ip: 10.0.0.9}]\n  ports: [{name: http2, port: 8013}]\n",
    )
    .into_iter()
    .map(|o| Change::Upsert(o.into())));
    let after = index.snapshot();
    for ty in ResourceType::ALL {
        let changed: Vec<&String> = after
            .resources(ty)
            .iter()
            .filter(|(k, v)| before.get(ty, k).map(|b| &b.version) != Some(&v.version))
            .map(|(k, _)| k)
            .collect();
        if ty == ResourceType::Endpoint {
            assert_eq!(changed, ["default/hello-00001:80"]);
        } else {
            assert!(changed.is_empty(), "{ty}: {changed:?}");
        }
    }
}

#[test]
fn ingress_change_touches_only_its_resources() {
    let other = HELLO
        .split("---")
        .next()
        .unwrap()
        .replace("name: hello\n", "name: other\n")
        .replace("hello.default", "other.default");
    let (before, mut index) = translate(&format!("{HELLO}---{other}"));
    let changed_other = other
        .replace("percent: 90\n", "percent: 80\n")
        .replace("percent: 10\n", "percent: 20\n");
    index.apply(
        objects(&changed_other)
            .into_iter()
            .map(|o| Change::Upsert(o.into())),
    );
    let after = index.snapshot();
    let mut changed = Vec::new();
    for ty in ResourceType::ALL {
        for (k, v) in after.resources(ty) {
            if before.get(ty, k).map(|b| &b.version) != Some(&v.version) {
                changed.push(format!("{ty} {k}"));
            }
        }
    }
    // Its route table changes (and carries the new probe hash); nothing else moves.
    assert_eq!(changed, ["RDS default/other"]);
}

#[test]
fn probe_hash_changes_with_the_spec() {
    let a = &objects(HELLO)[0];
    let Object::Ingress(a) = a else {
        unreachable!()
    };
    let mut b = a.clone();
    b.spec.rules[0].hosts.push("x.example.com".into());
    assert_ne!(ingress_hash(a), ingress_hash(&b));
    assert_eq!(ingress_hash(a), ingress_hash(&a.clone()));
    assert_eq!(ingress_hash(a).len(), 64);
}

#[test]
fn every_route_has_no_timeout_and_no_retries() {
    let (snap, _) = translate(HELLO);
    for r in snap.resources(ResourceType::Route).values() {
        let rc = RouteConfiguration::decode(r.value.as_slice()).unwrap();
        for route in rc.virtual_hosts.iter().flat_map(|v| v.routes.iter()) {
            let Some(Action::Route(a)) = &route.action else {
                panic!()
            };
            assert_eq!(a.timeout.as_ref().map(|d| d.seconds), Some(0));
            assert!(a.retry_policy.is_none());
        }
    }
}
